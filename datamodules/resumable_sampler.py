"""A shuffling sampler that resumes mid-epoch exactly where a checkpoint left off.

Lightning restores ``global_step`` from a checkpoint but a plain ``DataLoader`` restarts its
epoch from the first batch, so a resumed run would see different data than an uninterrupted one.
This sampler draws the same permutation for a given ``(seed, epoch)`` as PyTorch's
``DistributedSampler`` (which it subclasses, so Lightning does not wrap it again under DDP) and
skips the samples this rank already consumed in the current epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the first ``skip_batches`` batches of one epoch.

    Args:
        dataset: the dataset to sample from.
        num_replicas: number of ranks (1 without DDP).
        rank: this process's rank.
        shuffle: permute indices per epoch (seeded by ``seed + epoch``).
        seed: base seed of the permutation; identical on every rank.
        drop_last: drop the tail that does not divide evenly across ranks.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__(
            dataset, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self._skip_samples = 0

    def skip_batches(self, num_batches: int, batch_size: int) -> None:
        """Skip this rank's first ``num_batches * batch_size`` samples of the next epoch only."""
        if num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        self._skip_samples = num_batches * batch_size

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip_samples = self._skip_samples, 0
        return iter(indices[skip:])
