"""Episodic task DataModules for meta-learning: linear regression, sinusoids, MNIST-1D few-shot.

A *task* is a dict ``support_x, support_y, query_x, query_y``; a training batch is a meta-batch of
tasks stacked along a leading task dimension plus the ``episode`` index. Episode ``e`` is drawn from
a dedicated ``torch.Generator`` seeded from ``(seed, e)`` only, so the task stream is a pure
function of the seed; the DataModule's ``state_dict`` stores the next episode and a resumed run
continues the same stream (spec §5, §9 Checkpointing). Under DDP every rank receives the same
meta-batch and the LightningModule takes its share of the tasks (``tasks[rank::world_size]``).
Validation and test use fixed task lists drawn once from the seed; under DDP they are sharded by
``EvenEvalSampler`` (every task once, the same batch count on every rank) and each evaluation batch
carries a bool ``scored`` mask [B] whose False rows are padding the module must not score.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from datamodules.even_eval_sampler import even_eval_loader
from ops.meta_tasks_closed_form import LinearTasks, sample_linear_tasks

Task = dict[str, Tensor]
_SPLITS = {"train": 0, "val": 1, "test": 2}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def task_generator(seed: int, split: str, index: int) -> torch.Generator:
    """A generator seeded by a well-mixed hash of ``(seed, split, index)``."""
    state = np.random.SeedSequence([seed, _SPLITS[split], index]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def stack_tasks(tasks: list[Task]) -> Task:
    return {k: torch.stack([t[k] for t in tasks]) for k in tasks[0]}


class _EpisodeStream(IterableDataset):
    """Yields meta-batches from ``dm.next_episode`` on, without end: Lightning ends each epoch
    after ``len`` batches (or ``limit_train_batches``), counting from where a resumed run
    stopped inside its epoch."""

    def __init__(self, dm: EpisodicTasks) -> None:
        self.dm = dm

    def __len__(self) -> int:
        # A whole epoch, also when resumed mid-epoch: Lightning keeps the first length it reads
        # for every later epoch, and the remainder made a max_epochs-bound resumed run end early.
        return self.dm.episodes_per_epoch

    def __iter__(self) -> Iterator[Task]:
        # Not cut at the next multiple of episodes_per_epoch: with limit_train_batches an epoch
        # consumes fewer episodes, and the cut ended a later epoch early, without validation.
        for episode in itertools.count(self.dm.next_episode):
            batch = self.dm.sample_meta_batch(task_generator(self.dm.seed, "train", episode))
            batch["episode"] = torch.tensor(episode)
            yield batch


class EpisodicTasks(L.LightningDataModule):
    """Base class: episodic training stream + fixed validation/test task lists.

    Args:
        meta_batch_size: tasks per meta-training step (split across DDP ranks).
        episodes_per_epoch: meta-batches per training epoch.
        num_val_tasks: fixed validation tasks.
        num_test_tasks: fixed test tasks.
        eval_batch_size: tasks per validation/test batch.
        seed: seed of every task draw (training stream and evaluation lists).
    """

    def __init__(
        self,
        meta_batch_size: int = 16,
        episodes_per_epoch: int = 100,
        num_val_tasks: int = 100,
        num_test_tasks: int = 200,
        eval_batch_size: int = 25,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.require_at_least(
            1,
            meta_batch_size=meta_batch_size,
            episodes_per_epoch=episodes_per_epoch,
            eval_batch_size=eval_batch_size,
        )
        # 0 evaluation tasks: an empty loader (no validation / test); a negative count ran silently
        self.require_at_least(0, num_val_tasks=num_val_tasks, num_test_tasks=num_test_tasks)
        self.meta_batch_size = meta_batch_size
        self.episodes_per_epoch = episodes_per_epoch
        self.num_val_tasks = num_val_tasks
        self.num_test_tasks = num_test_tasks
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.next_episode = 0
        self._eval: dict[str, list[Task]] = {}

    def require_at_least(self, low: int, **sizes: int) -> None:
        """Raise naming the first size below ``low`` (e.g. 0 support examples ran silently)."""
        for name, value in sizes.items():
            if value < low:
                raise ValueError(f"{type(self).__name__}: {name} must be >= {low}, got {value}")

    # -- subclasses implement -------------------------------------------------------------
    def sample_task(self, gen: torch.Generator, split: str) -> Task:
        raise NotImplementedError

    def sample_meta_batch(self, gen: torch.Generator) -> Task:
        return stack_tasks([self.sample_task(gen, "train") for _ in range(self.meta_batch_size)])

    def eval_tasks(self, split: str) -> list[Task]:
        count = self.num_val_tasks if split == "val" else self.num_test_tasks
        if split not in self._eval:
            self._eval[split] = [
                self.sample_task(task_generator(self.seed, split, i), split) for i in range(count)
            ]
        return self._eval[split]

    # -- Lightning hooks ------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_EpisodeStream(self), batch_size=None)

    def _eval_loader(self, split: str) -> DataLoader:
        tasks = self.eval_tasks(split)
        # Not Lightning's default DistributedSampler: it pads with repeated tasks, scored twice.
        return even_eval_loader(self, tasks, self.eval_batch_size, stack_tasks)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Record consumption here, not when the stream yields: Lightning prefetches one batch.
        # Before the transfer, so reading the episode does not sync the GPU.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and "episode" in batch:
            self.next_episode = int(batch["episode"]) + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        # A save in the middle of a step (an on-exception checkpoint): its episode was counted
        # when it was fetched but is trained again on resume, so it is not consumed yet.
        trainer = getattr(self, "trainer", None)
        progress = trainer.fit_loop.epoch_loop.batch_progress.current if trainer else None
        unfinished = (
            trainer is not None and trainer.training and progress.ready > progress.processed
        )
        return {"next_episode": self.next_episode - int(unfinished), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"{type(self).__name__}: checkpoint was made with seed={state_dict['seed']}, "
                f"this run has seed={self.seed}; the task stream would not continue"
            )
        self.next_episode = int(state_dict["next_episode"])


class LinearRegressionTasks(EpisodicTasks):
    """Linear-regression tasks from a fixed pool (spec §6 A); closed-form meta-gradients exist.

    w_bar ~ N(0, I), w_i = w_bar + task_std N(0, I), Gaussian design, labels x^T w_i + noise.
    Validation and test use the whole pool (the meta-objective is the pool average).

    Args:
        dim: input dimension d.
        n_support: support examples per task.
        n_query: query examples per task.
        task_std: spread of task weights around the shared mean.
        label_noise: std of the label noise.
        num_tasks: size N of the fixed task pool.
        meta_batch_size: tasks per step, drawn uniformly with replacement from the pool.
        full_batch: every step uses the whole pool in order (deterministic meta-gradient).
        episodes_per_epoch: meta-batches per epoch.
        seed: seed of the pool and of the task stream.
        dtype: ``float32`` or ``float64`` (use float64 with small ``nu``).
    """

    def __init__(
        self,
        dim: int = 20,
        n_support: int = 10,
        n_query: int = 10,
        task_std: float = 0.5,
        label_noise: float = 0.1,
        num_tasks: int = 200,
        meta_batch_size: int = 16,
        full_batch: bool = False,
        episodes_per_epoch: int = 100,
        seed: int = 0,
        dtype: str = "float64",
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(
                f"LinearRegressionTasks: dtype must be one of {list(_DTYPES)}, got {dtype!r}"
            )
        super().__init__(
            meta_batch_size=num_tasks if full_batch else meta_batch_size,
            episodes_per_epoch=episodes_per_epoch,
            num_val_tasks=num_tasks,
            num_test_tasks=num_tasks,
            eval_batch_size=min(num_tasks, 50),
            seed=seed,
        )
        self.require_at_least(1, dim=dim, n_support=n_support, n_query=n_query)
        self.dim = dim  # checked against the net's dim at setup
        self.full_batch = full_batch
        gen = torch.Generator().manual_seed(seed)
        sx, sy, qx, qy, _ = sample_linear_tasks(
            num_tasks, dim, n_support, n_query, task_std=task_std, label_noise=label_noise,
            generator=gen, dtype=_DTYPES[dtype],
        )  # fmt: skip
        self.pool = {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy}
        self.closed_form = LinearTasks.from_data(sx, sy, qx, qy)

    def _task(self, i: int) -> Task:
        return {k: v[i] for k, v in self.pool.items()}

    def sample_task(self, gen: torch.Generator, split: str) -> Task:
        return self._task(int(torch.randint(len(self.pool["support_x"]), (1,), generator=gen)))

    def sample_meta_batch(self, gen: torch.Generator) -> Task:
        if self.full_batch:
            return {k: v.clone() for k, v in self.pool.items()}
        return super().sample_meta_batch(gen)

    def eval_tasks(self, split: str) -> list[Task]:
        return [self._task(i) for i in range(len(self.pool["support_x"]))]


class SinusoidTasks(EpisodicTasks):
    """Sinusoid regression y = A sin(x - phi) (Finn et al. 2017 ranges).

    Args:
        amp_range: amplitude A ~ U(amp_range).
        phase_range: phase phi ~ U(phase_range).
        x_range: inputs x ~ U(x_range).
        k_support: support points per task.
        k_query: query points per task.
        meta_batch_size: tasks per step.
        episodes_per_epoch: meta-batches per epoch.
        num_val_tasks: fixed validation tasks.
        num_test_tasks: fixed test tasks.
        seed: seed of every draw.
    """

    def __init__(
        self,
        amp_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, 3.1416),
        x_range: tuple[float, float] = (-5.0, 5.0),
        k_support: int = 10,
        k_query: int = 10,
        meta_batch_size: int = 25,
        episodes_per_epoch: int = 100,
        num_val_tasks: int = 100,
        num_test_tasks: int = 200,
        seed: int = 0,
    ) -> None:
        super().__init__(
            meta_batch_size, episodes_per_epoch, num_val_tasks, num_test_tasks, 25, seed
        )
        self.require_at_least(1, k_support=k_support, k_query=k_query)
        self.amp_range, self.phase_range, self.x_range = amp_range, phase_range, x_range
        self.k_support, self.k_query = k_support, k_query

    def sample_task(self, gen: torch.Generator, split: str) -> Task:
        def uniform(lo_hi: tuple[float, float], *shape: int) -> Tensor:
            lo, hi = lo_hi
            return lo + (hi - lo) * torch.rand(*shape, generator=gen)

        amp, phase = uniform(self.amp_range, 1), uniform(self.phase_range, 1)
        xs = uniform(self.x_range, self.k_support + self.k_query)
        ys = amp * torch.sin(xs - phase)
        k = self.k_support
        return {"support_x": xs[:k], "support_y": ys[:k], "query_x": xs[k:], "query_y": ys[k:]}


@functools.lru_cache(maxsize=4)
def mnist1d_arrays(dataset_seed: int = 42) -> tuple[np.ndarray, ...]:
    """MNIST-1D generated procedurally (never downloaded), global RNG states left untouched.

    ``mnist1d.make_dataset`` reseeds Python's ``random`` and NumPy's global RNG (spec §4.4); the
    states are saved and restored around the call. ``get_dataset`` (which downloads) is not used.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        args = get_dataset_args()
        args.seed = dataset_seed
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


class MNIST1DFewShot(EpisodicTasks):
    """N-way K-shot classification on MNIST-1D (4000 train / 1000 test signals of length 40).

    Each task samples ``n_way`` of the 10 classes and relabels them 0..n_way-1 (protocol is our
    choice, spec §5). Meta-training tasks come from the train split; validation and test tasks
    from the test split (different task draws).

    Args:
        n_way: classes per task.
        k_shot: support examples per class.
        k_query: query examples per class.
        meta_batch_size: tasks per meta-training step.
        episodes_per_epoch: meta-batches per epoch.
        num_val_tasks: fixed validation tasks.
        num_test_tasks: fixed test tasks (spec §6 F: 200).
        eval_batch_size: tasks per evaluation batch.
        dataset_seed: seed of the procedural MNIST-1D generation (42 = the published dataset).
        task_seed: seed of the task draws.
    """

    def __init__(
        self,
        n_way: int = 5,
        k_shot: int = 5,
        k_query: int = 15,
        meta_batch_size: int = 8,
        episodes_per_epoch: int = 100,
        num_val_tasks: int = 100,
        num_test_tasks: int = 200,
        eval_batch_size: int = 25,
        dataset_seed: int = 42,
        task_seed: int = 0,
    ) -> None:
        if not 2 <= n_way <= 10:
            raise ValueError(f"MNIST1DFewShot: n_way must be in [2, 10], got {n_way}")
        super().__init__(
            meta_batch_size, episodes_per_epoch, num_val_tasks, num_test_tasks, eval_batch_size,
            task_seed,
        )  # fmt: skip
        self.require_at_least(1, k_shot=k_shot, k_query=k_query)
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.dataset_seed = dataset_seed
        self._splits: dict[str, tuple[Tensor, list[Tensor]]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        x, y, x_test, y_test = mnist1d_arrays(self.dataset_seed)
        for split, (xs, ys) in {"train": (x, y), "test": (x_test, y_test)}.items():
            xs_t, ys_t = torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys)
            by_class = [torch.nonzero(ys_t == c).flatten() for c in range(10)]
            need = self.k_shot + self.k_query
            if min(len(i) for i in by_class) < need:
                raise ValueError(
                    f"MNIST1DFewShot: k_shot + k_query = {need} exceeds the smallest class "
                    f"of the {split} split ({min(len(i) for i in by_class)})"
                )
            self._splits[split] = (xs_t, by_class)

    def sample_task(self, gen: torch.Generator, split: str) -> Task:
        self.setup()
        xs, by_class = self._splits["train" if split == "train" else "test"]
        classes = torch.randperm(10, generator=gen)[: self.n_way]
        sx, sy, qx, qy = [], [], [], []
        for label, c in enumerate(classes.tolist()):
            idx = by_class[c][torch.randperm(len(by_class[c]), generator=gen)]
            sx.append(xs[idx[: self.k_shot]])
            qx.append(xs[idx[self.k_shot : self.k_shot + self.k_query]])
            sy += [label] * self.k_shot
            qy += [label] * self.k_query
        return {
            "support_x": torch.cat(sx),
            "support_y": torch.tensor(sy),
            "query_x": torch.cat(qx),
            "query_y": torch.tensor(qy),
        }
