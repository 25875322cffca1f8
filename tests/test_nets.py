import pytest
import torch

from ae_lightning.models.ae import Autoencoder
from ae_lightning.nets import Decoder, Encoder, build_encoder_decoder, count_parameters


@pytest.mark.parametrize(
    ("hidden", "bottleneck", "encoder_params", "decoder_params"),
    [
        ([], 2, 784 * 2 + 2, 2 * 784 + 784),
        ([1024], 2, 784 * 1024 + 1024 + 1024 * 2 + 2, 2 * 1024 + 1024 + 1024 * 784 + 784),
        ([1024], 10, 784 * 1024 + 1024 + 1024 * 10 + 10, 10 * 1024 + 1024 + 1024 * 784 + 784),
    ],
)
def test_parameter_counts_match_the_architecture(
    hidden, bottleneck, encoder_params, decoder_params
):
    encoder, decoder = build_encoder_decoder(bottleneck, hidden)
    assert count_parameters(encoder) == encoder_params
    assert count_parameters(decoder) == decoder_params


def test_shapes_and_output_range():
    encoder, decoder = build_encoder_decoder(3, [64, 32], activation="gelu")
    x = torch.rand(5, 1, 28, 28)
    z = encoder(x)
    assert z.shape == (5, 3)
    assert encoder(x.flatten(1)).shape == (5, 3)  # flat input works too
    y = decoder(z * 100)  # far-out codes still decode to valid pixels
    assert y.shape == (5, 1, 28, 28)
    assert y.min() >= 0 and y.max() <= 1


def test_decoder_mirrors_encoder_unless_told():
    encoder, decoder = build_encoder_decoder(2, [512, 128])
    assert [m.out_features for m in encoder.to_latent if hasattr(m, "out_features")] == [
        512,
        128,
        2,
    ]
    linears = [m for m in decoder.to_pixels[0] if hasattr(m, "out_features")]
    assert [m.out_features for m in linears] == [128, 512, 784]
    _, custom = build_encoder_decoder(2, [512], decoder_hidden=[64, 256])
    assert [m.out_features for m in custom.to_pixels[0] if hasattr(m, "out_features")] == [
        64,
        256,
        784,
    ]


def test_linear_model_has_no_hidden_nonlinearity():
    encoder = Encoder(2, [])
    decoder = Decoder(2, [])
    assert len(encoder.to_latent) == 1
    assert isinstance(decoder.to_pixels[-1], torch.nn.Sigmoid)


def test_unknown_activation_names_the_choices():
    with pytest.raises(ValueError, match="Unknown activation 'swishy'.*relu"):
        build_encoder_decoder(2, [8], activation="swishy")


def test_module_encode_decode_forward_and_hparams():
    model = Autoencoder(bottleneck=4, hidden=[16])
    x = torch.rand(2, 1, 28, 28)
    assert model.encode(x).shape == (2, 4)
    assert model.decode(torch.zeros(2, 4)).shape == (2, 1, 28, 28)
    torch.testing.assert_close(model(x), model.decode(model.encode(x)))
    assert model.hparams["bottleneck"] == 4 and list(model.hparams["hidden"]) == [16]
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0
