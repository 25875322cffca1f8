import torch

from ae_lightning.latent import knn_accuracy, per_digit_mse, probe_accuracy


def separated_codes(n, generator, centres):
    labels = torch.arange(n) % 10
    return centres[labels] + torch.randn(n, 5, generator=generator) * 0.1, labels


def test_perfectly_separated_codes_score_one():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 5, generator=generator) * 20  # ten far-apart clusters
    train_codes, train_labels = separated_codes(1000, generator, centres)
    test_codes, test_labels = separated_codes(300, generator, centres)
    assert knn_accuracy(train_codes, train_labels, test_codes, test_labels) == 1.0
    assert probe_accuracy(train_codes, train_labels, test_codes, test_labels) == 1.0


def test_random_codes_score_chance():
    generator = torch.Generator().manual_seed(0)
    train_codes, test_codes = torch.randn(3000, 5, generator=generator), torch.randn(2000, 5)
    train_labels = torch.randint(0, 10, (3000,), generator=generator)
    test_labels = torch.randint(0, 10, (2000,), generator=generator)
    assert abs(knn_accuracy(train_codes, train_labels, test_codes, test_labels) - 0.1) < 0.04
    assert abs(probe_accuracy(train_codes, train_labels, test_codes, test_labels) - 0.1) < 0.04


def test_per_digit_mse_averages_each_digit():
    errors = torch.tensor([1.0, 3.0, 10.0, 20.0])
    labels = torch.tensor([0, 0, 7, 7])
    assert per_digit_mse(errors, labels) == {0: 2.0, 7: 15.0}
