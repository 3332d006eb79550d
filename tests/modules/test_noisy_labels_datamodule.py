"""``NoisyLabelDataModule`` / ``flip_labels`` against their documented contract: the noise
rate bounds and rounding, the Gaussian mixture geometry, the standardised digits, and the
training loader (every example once, order from the seed)."""

from __future__ import annotations

import pytest
import torch

from datamodules.noisy_labels import NoisyLabelDataModule, flip_labels


def test_noise_rate_one_is_refused():
    """Rates lie in [0, 1): flipping every label leaves nothing clean to compare against."""
    with pytest.raises(ValueError, match=r"noise_rate=1.0: expected a value in \[0, 1\)"):
        flip_labels(torch.zeros(4, dtype=torch.long), 2, 1.0, torch.Generator())


def test_number_of_flips_is_rounded():
    """round(0.3 * 3) = 1 label flips (truncation would flip none)."""
    noisy, mask = flip_labels(torch.tensor([0, 1, 0]), 2, 0.3, torch.Generator().manual_seed(0))
    assert int(mask.sum()) == 1
    assert int((noisy != torch.tensor([0, 1, 0])).sum()) == 1


def test_gaussian_classes_sit_at_plus_minus_separation_along_a_unit_vector():
    """Means +-separation * u with |u| = 1: the class means are 2 * separation apart and
    symmetric about the origin (4000 points per split; standard error ~0.03)."""
    dm = NoisyLabelDataModule(n_train=4000, n_val=4000, noise_rate=0.0, d_in=4, separation=1.5)
    dm.setup("fit")
    x, y = dm.val_dataset.x, dm.val_dataset.y
    mean0, mean1 = x[y == 0].mean(0), x[y == 1].mean(0)
    assert float((mean1 - mean0).norm()) == pytest.approx(3.0, abs=0.15)
    assert float(((mean1 + mean0) / 2).norm()) < 0.15


def test_digits_are_standardised_per_pixel():
    """All 1797 images: every pixel has mean 0 and standard deviation 1, or is constant 0."""
    dm = NoisyLabelDataModule(source="digits", n_train=1000, n_val=797, noise_rate=0.0)
    dm.setup("fit")
    x = torch.cat([dm.train_dataset.x, dm.val_dataset.x]).double()
    assert float(x.mean(0).abs().max()) < 1e-5
    std = x.std(0)
    constant = std < 1e-3
    assert constant.any() and (~constant).sum() > 50
    torch.testing.assert_close(std[~constant], torch.ones_like(std[~constant]), rtol=0, atol=1e-4)


def test_more_digits_than_exist_are_refused():
    dm = NoisyLabelDataModule(source="digits", n_train=1700, n_val=100)
    with pytest.raises(ValueError, match="1800 exceeds the 1797 images"):
        dm.setup("fit")


def test_digit_labels_flip_to_any_of_the_ten_classes():
    """A flipped digit moves to a different class among all 10, not only 0/1."""
    from sklearn.datasets import load_digits

    dm = NoisyLabelDataModule(source="digits", n_train=500, n_val=100, noise_rate=0.5)
    dm.setup("fit")
    clean = torch.tensor(load_digits().target)[dm.train_dataset.sample_id]
    flipped = dm.train_dataset.y[dm.noisy_mask]
    assert (flipped != clean[dm.noisy_mask]).all()
    assert flipped.min() >= 0 and flipped.max() <= 9
    assert len(set(flipped.tolist())) == 10


def test_train_loader_reads_every_example_once_in_the_seeds_order():
    """10 examples in batches of 4: 3 batches (the last one short, nothing dropped), in the
    order ``randperm(10, seed)`` of epoch 0 (PyTorch's DistributedSampler rule)."""
    dm = NoisyLabelDataModule(n_train=10, n_val=4, d_in=2, batch_size=4, seed=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["y"]) for b in batches] == [4, 4, 2]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    got = torch.cat([b["sample_id"] for b in batches])
    assert torch.equal(got, dm.train_dataset.sample_id[order])
