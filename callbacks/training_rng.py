"""Keep the random-number stream of training independent of validation, and in checkpoints.

Two ways a run with dropout (or any other global-RNG draw in its training step) lost its
trajectory, found by running the same fit twice:

* every validation inside ``fit`` creates a DataLoader iterator, which draws a base seed from
  the global torch RNG (also with ``num_workers=0``); later dropout masks shifted, so a fit
  with validation trained other weights than the same fit without it;
* checkpoints held no RNG state, so a resumed run replayed the dropout masks of the steps after
  ``seed_everything`` instead of continuing the interrupted stream.

``TrainingRng`` records the generators' states at the start and end of every training step
(~46 us each on CPU, most of it NumPy's state copy) and puts them back when a validation inside
``fit`` ends: the validation iterator is created before any validation hook runs, so the state at
the last training batch end is the one to keep (Lightning already isolates its sanity check this way). Checkpoints hold that
training-stream state (for a save in the middle of a step, the state at its start), restored
right before the first resumed training batch (after whatever set-up the resumed run draws).
That is exact when nothing draws from the global RNG between a step and the next one in the
interrupted run: the project's loaders draw from generators of their own
(``datamodules/resumable_sampler.py``); a loader without one draws a seed at every epoch start,
so a run resumed at an epoch boundary from such a loader continues from a shifted stream. A
checkpoint holds rank 0's state; under ``seed_everything`` ranks draw alike.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn


def rng_states() -> dict[str, Any]:
    """torch (CPU, the current CUDA device once CUDA is in use, MPS on a Mac), NumPy and Python
    states."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: a list of every visible device's state failed to load
        # on a machine with fewer GPUs, and gave rank r rank 0's untouched cuda:r state.
        states["cuda"] = torch.cuda.get_rng_state()
    if torch.backends.mps.is_available():  # Apple GPUs: dropout there draws from this one
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def to_checkpoint(states: dict[str, Any]) -> dict[str, Any]:
    """``states`` as tensors and plain numbers only: checkpoints load with ``weights_only``."""
    kind, keys, pos, has_gauss, cached = states["numpy"]
    version, internal, gauss_next = states["python"]
    return {
        **states,
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def from_checkpoint(saved: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`to_checkpoint`."""
    n, p = saved["numpy"], saved["python"]
    keys = n["keys"].numpy().astype(np.uint32)
    return {
        **saved,
        "numpy": (n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]),
        "python": (p["version"], tuple(p["internal"]), p["gauss_next"]),
    }


class TrainingRng(L.Callback):
    """Isolates validation inside ``fit`` from the training RNG stream and checkpoints that
    stream (see the module docstring). Always on in ``mlo``."""

    def __init__(self) -> None:
        self._after_step: dict[str, Any] | None = None
        self._at_batch_start: dict[str, Any] | None = None
        self._to_restore: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit":  # a new fit (checkpoint states are loaded after setup)
            self._after_step, self._at_batch_start, self._to_restore = None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self._to_restore is not None:
            set_rng_states(self._to_restore)
            self._to_restore = None
        self._at_batch_start = rng_states()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        self._after_step = rng_states()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and self._after_step is not None:
            set_rng_states(self._after_step)

    def state_dict(self) -> dict[str, Any]:
        # The training stream as it will go on. Not yet resumed: the loaded state. During a
        # validation inside fit (ModelCheckpoint at its end): the state after the last step,
        # which on_validation_end restores. Otherwise the live state, also for a save from
        # another callback's on_train_batch_end that runs before this one's (SlurmRequeue).
        trainer = self._trainer
        if self._to_restore is not None:
            states = self._to_restore
        elif trainer is not None and trainer.validating and self._after_step is not None:
            states = self._after_step
        elif trainer is not None and _batch_unfinished(trainer) and self._at_batch_start:
            # An on-exception save in the middle of a step (Ctrl-C after the forward): the
            # step is redone on resume, so its random draws must be too.
            states = self._at_batch_start
        else:
            states = rng_states()
        return {"rng": to_checkpoint(states)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("rng")
        self._to_restore = from_checkpoint(saved) if saved is not None else None


def _batch_unfinished(trainer: L.Trainer) -> bool:
    """A training batch started but not processed: the save happens inside its step."""
    if not trainer.training:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    return progress.started > progress.processed
