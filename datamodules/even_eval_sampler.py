"""Evaluation sharding that gives every rank the same number of batches and counts each block once.

Lightning's default ``DistributedSampler`` pads the split with *repeated* samples, which metrics
then count twice (so results change with the number of GPUs). ``UnrepeatedDistributedSampler``
avoids that but leaves ranks with different batch counts, and a strategy whose forward pass
synchronizes (FSDP all-gathers each wrapped block) then hangs on the rank with one batch more.
Here every rank gets ``ceil(N / W)`` indices: the real ones once each, then indices ``>= N``,
which ``PaddedBlocks`` turns into blocks whose labels are all ignored (zero weight in
token-weighted metrics) and ``PaddedItems`` into items flagged unscored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class PaddedBlocks(Dataset):
    """Token blocks ``[N, T]`` as ``(ids, scored)``; an index ``>= N`` is an unscored padding block."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        if index < len(self.blocks):
            return self.blocks[index], True
        return torch.zeros_like(self.blocks[0]), False


class PaddedItems(Dataset):
    """Any map-style dataset as ``(item, scored)``; an index ``>= N`` repeats item 0, unscored.

    For datasets whose items are not token blocks (tasks, labelled examples): the collate function
    carries ``scored`` into the batch and the module gives unscored rows zero weight.
    """

    def __init__(self, dataset: Dataset) -> None:
        if len(dataset) == 0:
            raise ValueError("cannot shard an empty evaluation set")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, bool]:
        if index < len(self.dataset):
            return self.dataset[index], True
        return self.dataset[0], False


class EvenEvalSampler(DistributedSampler):
    """Rank ``r`` of ``W`` reads indices ``r, r + W, ...`` below ``W * ceil(N / W)``, in order.

    A ``DistributedSampler`` subclass, so Lightning does not wrap it again under DDP.
    """

    def __init__(self, dataset: PaddedBlocks | PaddedItems, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class ScoredCollate:
    """Collate ``PaddedItems`` rows ``(item, scored)``: ``collate(items)`` plus a bool ``scored``
    row mask (a class, not a closure, so loaders with worker processes can pickle it)."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, torch.Tensor]]) -> None:
        self.collate = collate

    def __call__(self, rows: list[tuple[Any, bool]]) -> dict[str, torch.Tensor]:
        batch = self.collate([item for item, _ in rows])
        batch["scored"] = torch.tensor([scored for _, scored in rows], dtype=torch.bool)
        return batch


def even_eval_loader(
    datamodule: L.LightningDataModule,
    dataset: Dataset,
    batch_size: int,
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
) -> DataLoader:
    """Unshuffled evaluation loader whose batches carry ``scored``, sharded evenly under DDP.

    With ``W > 1`` processes (the datamodule's trainer), rank ``r`` reads ``r, r + W, ...``: every
    item exactly once over the ranks and ``ceil(N / W)`` rows on each, a short shard ending in
    unscored copies of item 0. Lightning does not replace this sampler with its own.
    """
    if len(dataset) == 0:  # nothing to evaluate (e.g. n_val = 0), nothing to shard
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    padded = PaddedItems(dataset)
    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
    sampler = EvenEvalSampler(padded, world, rank) if world > 1 else None
    return DataLoader(
        padded, batch_size=batch_size, sampler=sampler, collate_fn=ScoredCollate(collate)
    )
