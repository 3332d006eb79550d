"""A shuffling sampler that resumes mid-epoch exactly where a checkpoint left off.

Lightning restores ``global_step`` from a checkpoint but a plain ``DataLoader`` restarts its
epoch from the first batch, so a resumed run would see different data than an uninterrupted one.
This sampler draws the same permutation for a given ``(seed, epoch)`` as PyTorch's
``DistributedSampler`` (which it subclasses, so Lightning does not wrap it again under DDP) and
skips the samples this rank already consumed in the current epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DistributedSampler

from datamodules.private_seed_loader import PrivateSeedDataLoader


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
        # Permutation epoch minus Lightning's epoch count: one less for every resume from a
        # checkpoint written when training ended mid-epoch (``continue_saved_permutation``).
        self.epoch_offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start with its own epoch count."""
        super().set_epoch(epoch + self.epoch_offset)

    def skip_batches(self, num_batches: int, batch_size: int) -> None:
        """Skip this rank's first ``num_batches * batch_size`` samples of the next epoch only."""
        if num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        self._skip_samples = num_batches * batch_size

    def rescale_skip(
        self, saved_world: int, saved_batch_size: int, batch_size: int
    ) -> tuple[str, int] | None:
        """Re-aim a pending skip set for this run's layout at a checkpoint of another one.

        ``skip_batches`` counted this epoch's batches per rank, which is right only for the
        checkpoint's world size and batch size. The ranks of the interrupted run consumed a
        prefix of the epoch's shared permutation, ``batches * saved_batch_size * saved_world``
        positions long (rank r read positions r, r + world, ...); each rank of this run skips its
        share of that prefix. Returns a note for the log and the number of samples trained
        again (the prefix split unevenly), or ``None`` when nothing changed.
        """
        if not self._skip_samples or (saved_world, saved_batch_size) == (
            self.num_replicas,
            batch_size,
        ):
            return None
        batches = self._skip_samples // batch_size
        consumed = batches * saved_batch_size * saved_world
        self._skip_samples, repeated = divmod(consumed, self.num_replicas)
        note = (
            f"resumed with {self.num_replicas} process(es) x batch size {batch_size}, the "
            f"checkpoint's run used {saved_world} x {saved_batch_size}: continuing after the "
            f"{consumed} samples it consumed this epoch"
        )
        if repeated:
            note += f"; {repeated} of them are trained again ({consumed} does not divide evenly)"
        return note, repeated

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip_samples = self._skip_samples, 0
        return iter(indices[skip:])


def skip_consumed_batches(sampler: ResumableSampler, trainer: Any, batch_size: int) -> None:
    """On resume, make ``sampler`` skip the batches this epoch already consumed.

    Counted by Lightning's restored loop state: deriving them from ``global_step`` breaks under
    ``limit_train_batches`` and under gradient accumulation with an epoch-end step on a partial
    accumulation. ``processed``, not ``completed``: a checkpoint written in
    ``on_train_batch_end`` (e.g. ``every_n_train_steps``) has processed the batch but not
    completed it. A checkpoint from the epoch's last batch resumes in the next epoch, which
    skips nothing.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    done_in_epoch = progress.current.processed
    if done_in_epoch > 0 and not progress.is_last_batch:
        sampler.set_epoch(trainer.current_epoch)
        sampler.skip_batches(done_in_epoch, batch_size)


class LoopResumedDataLoader(PrivateSeedDataLoader):
    """A ``DataLoader`` whose mid-epoch position comes back from Lightning's restored loop state.

    The position itself is restored elsewhere (``skip_consumed_batches``, or a module that reads
    its data position from ``global_step``). ``state_dict`` makes Lightning treat the loader as
    resumable, so a resumed run no longer warns that it "can cause unreliable results" (the
    warning is for loaders that restart their epoch). The state is the sampler's seed (resuming
    with another one gets a warning: that epoch's order then differs from the interrupted run's)
    and the world size and batch size, so that a run resumed on another number of processes or
    with another batch size still skips exactly the samples the interrupted run consumed.
    """

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": getattr(self.sampler, "seed", None),
            "world_size": getattr(self.sampler, "num_replicas", 1),
            "batch_size": self.batch_size,
            # the permutation being consumed, and how it relates to Lightning's epoch count
            "sampler_epoch": getattr(self.sampler, "epoch", None),
            "epoch_offset": getattr(self.sampler, "epoch_offset", 0),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, current = state_dict.get("seed"), getattr(self.sampler, "seed", None)
        if saved != current:
            rank_zero_warn(
                f"resumed with data seed {current}, the checkpoint's run used {saved}: the rest "
                "of this epoch is drawn from another order, so some samples repeat or are skipped"
            )
        if isinstance(self.sampler, ResumableSampler):
            continue_saved_permutation(self.sampler, state_dict)
        if isinstance(self.sampler, ResumableSampler) and "world_size" in state_dict:
            # Lightning calls this after train_dataloader() set the skip and before iterating.
            rescaled = self.sampler.rescale_skip(
                state_dict["world_size"], state_dict["batch_size"], self.batch_size
            )
            if rescaled is not None:
                note, repeated = rescaled
                (rank_zero_warn if repeated else rank_zero_info)(note)


def continue_saved_permutation(sampler: ResumableSampler, state_dict: dict[str, Any]) -> None:
    """Continue the permutation the checkpoint was consuming, whatever Lightning's epoch count.

    ``skip_consumed_batches`` aimed the skip at Lightning's restored epoch. That is the epoch
    being consumed for every checkpoint but one: the ``last.ckpt`` written in ``on_train_end``
    (a run stopped by ``max_steps`` without validating at that step), which Lightning saves
    after marking the epoch completed. Resumed with a longer ``max_steps``, such a run went on
    in the next epoch's permutation, skipping its first batches, and never trained the rest of
    the interrupted one. The offset is kept from then on: Lightning's epoch count stays ahead
    of the permutations of an uninterrupted run (by one more for every such resume).
    """
    saved_epoch = state_dict.get("sampler_epoch")
    if saved_epoch is None:  # a checkpoint from before the field existed
        return
    offset = state_dict.get("epoch_offset", 0)
    if sampler._skip_samples:  # mid-epoch: skip_consumed_batches set Lightning's epoch
        offset = saved_epoch - sampler.epoch
        sampler.epoch = saved_epoch
    sampler.epoch_offset = offset


def resumable_train_loader(
    datamodule: Any, dataset: Sized, batch_size: int, seed: int, drop_last: bool, **loader_kwargs
) -> LoopResumedDataLoader:
    """A shuffled training loader whose order depends on ``(seed, epoch)`` only and that resumes
    mid-epoch: an interrupted and resumed run sees exactly the batches of an uninterrupted one.

    Under DDP every rank reads its own ``1/world`` of each permutation (the sampler is a
    ``DistributedSampler``, so Lightning does not wrap it again).
    """
    trainer = datamodule.trainer
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ResumableSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=drop_last)
    if trainer is not None and trainer.fit_loop.restarting:
        skip_consumed_batches(sampler, trainer, batch_size)
    return LoopResumedDataLoader(
        dataset, sampler=sampler, batch_size=batch_size, drop_last=drop_last, seed=seed,
        **loader_kwargs,
    )  # fmt: skip
