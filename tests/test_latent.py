import pytest
import torch

from ae_lightning.latent import (
    CodeSampler,
    crossfade,
    encode_images,
    fit_projection,
    interpolate,
    manifold_grid,
    pick_pair,
)
from ae_lightning.models.ae import Autoencoder


def test_interpolation_endpoints_decode_to_the_reconstructions():
    torch.manual_seed(0)
    model = Autoencoder(bottleneck=3, hidden=[32]).eval()
    images = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    codes = encode_images(model.encode, images)
    with torch.no_grad():
        path = model.decode(interpolate(codes[0], codes[1], 11))
        reconstructions = model(images.unsqueeze(1).float() / 255)
    assert path.shape == (11, 1, 28, 28)
    torch.testing.assert_close(path[0], reconstructions[0])
    torch.testing.assert_close(path[-1], reconstructions[1])


def test_interpolation_is_linear_in_z():
    z = interpolate(torch.tensor([0.0, 2.0]), torch.tensor([10.0, -2.0]), 5)
    torch.testing.assert_close(z[:, 0], torch.tensor([0.0, 2.5, 5.0, 7.5, 10.0]))
    torch.testing.assert_close(z[2], torch.tensor([5.0, 0.0]))


def test_crossfade_blends_pixels():
    a, b = torch.zeros(1, 28, 28), torch.ones(1, 28, 28)
    fade = crossfade(a, b, 3)
    assert fade.shape == (3, 1, 28, 28)
    assert fade[1].unique().tolist() == [0.5]


def test_fitted_gaussian_matches_the_codes_mean_and_covariance():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [-1.0, 0.3, 0.2]])
    codes = torch.randn(20_000, 3, generator=generator) @ mixing.T + torch.tensor([5.0, -1.0, 0.5])
    samples = CodeSampler("gaussian", codes, seed=1).sample(50_000)
    torch.testing.assert_close(samples.mean(0), codes.mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), torch.cov(codes.T), atol=0.08, rtol=0.03)


@pytest.mark.parametrize("kind", ["gaussian", "normal", "gmm", "box"])
def test_every_sampler_is_seeded_and_shaped(kind):
    codes = torch.randn(500, 2) * 3 + 10
    a = CodeSampler(kind, codes, seed=4).sample(64)
    b = CodeSampler(kind, codes, seed=4).sample(64)
    assert a.shape == (64, 2) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    if kind == "box":
        assert (a >= codes.min(0).values).all() and (a <= codes.max(0).values).all()
    if kind == "normal":
        assert a.mean().abs() < 0.5  # ignores the codes on purpose
    if kind == "gmm":
        assert (a.mean(0) - 10).abs().max() < 1.5


def test_unknown_sampler_lists_the_choices():
    with pytest.raises(ValueError, match="Unknown sampler 'magic'.*gaussian"):
        CodeSampler("magic", torch.zeros(5, 2))


def test_pca_projection_finds_the_main_axes():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(2000, 10, generator=generator) * torch.tensor([10.0, 5.0] + [0.1] * 8)
    projection = fit_projection(codes)
    assert projection.method == "pca" and projection.explained[0] > projection.explained[1] > 0.15
    points = projection(codes)
    assert points.shape == (2000, 2)
    assert abs(points[:, 0].std() - 10) < 0.5 and abs(points[:, 1].std() - 5) < 0.3
    assert projection.axis_labels[0].startswith("PC1 (")


def test_two_dimensional_codes_are_shown_as_they_are():
    codes = torch.randn(50, 2)
    projection = fit_projection(codes)
    torch.testing.assert_close(projection(codes), codes)
    assert projection.axis_labels == ("z[0]", "z[1]")


def test_manifold_grid_spans_the_percentiles_top_row_highest():
    codes = torch.stack([torch.linspace(0, 100, 1001), torch.linspace(-50, 50, 1001)], dim=1)
    grid, xs, ys = manifold_grid(codes, n=5, percentiles=(1, 99))
    assert grid.shape == (25, 2)
    torch.testing.assert_close(xs[[0, -1]], torch.tensor([1.0, 99.0]))
    torch.testing.assert_close(ys[[0, -1]], torch.tensor([49.0, -49.0]))
    torch.testing.assert_close(grid[4], torch.tensor([99.0, 49.0]))  # top-right tile


def test_pick_pair_draws_two_different_digits_reproducibly():
    labels = torch.tensor([3] * 50 + [8])
    first, second = pick_pair(labels, seed=0)
    assert labels[first] != labels[second]
    assert pick_pair(labels, seed=0) == (first, second)
