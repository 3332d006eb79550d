"""Classification data with a known fraction of flipped training labels (HyperINF validation).

Two sources, both offline and deterministic given ``seed``:

* ``gaussian_mixture``: two Gaussian classes in ``d_in`` dimensions, means ``+-separation * u``
  for a random unit vector ``u`` (spec V2);
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, shipped
  inside the package), standardised; a flipped label moves to a different random class.

Every item is ``{"x": float[d_in], "y": long, "sample_id": long}``; ``sample_id`` is the row of the
source data, kept so scores can be joined back. The validation set keeps its clean labels.
``noisy_mask`` (training set order) says which labels were flipped.

Validation/test loaders shard the set with ``EvenEvalSampler`` under DDP (every example once over
the ranks, the same batch count on every rank) and their batches carry a boolean ``scored`` row
mask (``False`` on the padding rows that even the shards out; see
``datamodules.even_eval_sampler``). ``train_dataset``/``val_dataset`` stay the plain datasets.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from datamodules.even_eval_sampler import even_eval_loader
from datamodules.resumable_sampler import resumable_train_loader


class LabeledDataset(Dataset):
    """Tensors ``x (n, d)``, labels ``y (n,)`` and source ``sample_id (n,)`` as dict items."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sample_id: torch.Tensor):
        self.x, self.y, self.sample_id = x, y, sample_id

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "sample_id": self.sample_id[i]}


def flip_labels(
    y: torch.Tensor, num_classes: int, rate: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``round(rate * n)`` random labels to a different, uniformly chosen class.

    Returns:
        ``(noisy_y, noisy_mask)``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"noise_rate={rate}: expected a value in [0, 1)")
    n = y.numel()
    k = round(rate * n)
    flip = torch.randperm(n, generator=generator)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=generator)
    noisy = y.clone()
    noisy[flip] = (y[flip] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[flip] = True
    return noisy, mask


class NoisyLabelDataModule(L.LightningDataModule):
    """Train/val classification splits with ``noise_rate`` of the training labels flipped.

    Args:
        source: ``gaussian_mixture`` (generated) or ``digits`` (scikit-learn bundled).
        n_train: training examples.
        n_val: validation examples (clean labels).
        noise_rate: fraction of training labels flipped.
        d_in: input dimension of ``gaussian_mixture`` (``digits`` is always 64).
        separation: distance of each class mean from the origin (``gaussian_mixture``).
        batch_size: training batch size (``n_train`` or larger = full batch).
        seed: seed of the data, split and flips.
        val_batch_size: validation/test batch size; ``None`` = the whole set in one batch.
    """

    def __init__(
        self,
        source: Literal["gaussian_mixture", "digits"] = "gaussian_mixture",
        n_train: int = 500,
        n_val: int = 200,
        noise_rate: float = 0.2,
        d_in: int = 32,
        separation: float = 1.0,
        batch_size: int = 500,
        seed: int = 0,
        val_batch_size: int | None = None,
    ):
        super().__init__()
        if source not in ("gaussian_mixture", "digits"):
            raise ValueError(f"source={source!r}: expected 'gaussian_mixture' or 'digits'")
        # logger=False: see TextDataModule (datamodules/text.py)
        self.save_hyperparameters(logger=False)
        self.source, self.n_train, self.n_val = source, n_train, n_val
        self.noise_rate, self.d_in, self.separation = noise_rate, d_in, separation
        self.batch_size, self.seed = batch_size, seed
        self.val_batch_size = val_batch_size
        self.train_dataset: LabeledDataset | None = None
        self.val_dataset: LabeledDataset | None = None
        self.noisy_mask: torch.Tensor | None = None
        self.num_classes = 2 if source == "gaussian_mixture" else 10
        self.input_dim = d_in if source == "gaussian_mixture" else 64

    def _load(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n_train + self.n_val
        if self.source == "gaussian_mixture":
            u = torch.randn(self.d_in, generator=gen)
            u = u / u.norm()
            y = torch.randint(0, 2, (n,), generator=gen)
            x = (
                torch.randn(n, self.d_in, generator=gen)
                + self.separation * (2 * y - 1)[:, None] * u
            )
            return x, y
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.long)
        if n > x.shape[0]:
            raise ValueError(
                f"n_train + n_val = {n} exceeds the {x.shape[0]} images of sklearn digits"
            )
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        return x, y

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        x, y = self._load(gen)
        perm = torch.randperm(x.shape[0], generator=gen)[: self.n_train + self.n_val]
        tr, va = perm[: self.n_train], perm[self.n_train :]
        noisy_y, self.noisy_mask = flip_labels(y[tr], self.num_classes, self.noise_rate, gen)
        self.train_dataset = LabeledDataset(x[tr].float(), noisy_y, tr)
        self.val_dataset = LabeledDataset(x[va].float(), y[va], va)

    def train_dataloader(self) -> DataLoader:
        # order from (seed, epoch) only, so a resumed run continues with the same batches
        return resumable_train_loader(self, self.train_dataset, self.batch_size, self.seed, False)

    def val_dataloader(self) -> DataLoader:
        batch_size = self.val_batch_size or max(self.n_val, 1)
        return even_eval_loader(self, self.val_dataset, batch_size, default_collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
