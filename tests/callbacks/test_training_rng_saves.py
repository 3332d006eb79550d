"""TrainingRng: NumPy's cached Gaussian survives a weights-only checkpoint, and a checkpoint saved
during a validation inside fit (before its end) holds the training stream, not the stream the
validation loader shifted."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.training_rng import (
    TrainingRng,
    from_checkpoint,
    rng_states,
    set_rng_states,
    to_checkpoint,
)


def test_numpys_cached_gaussian_survives_a_weights_only_checkpoint(tmp_path):
    np.random.seed(3)
    np.random.standard_normal()  # Box-Muller draws two: the second is cached
    torch.save(to_checkpoint(rng_states()), tmp_path / "rng.pt")
    expected = np.random.standard_normal(size=3)
    np.random.seed(99)
    set_rng_states(from_checkpoint(torch.load(tmp_path / "rng.pt", weights_only=True)))
    np.testing.assert_array_equal(np.random.standard_normal(size=3), expected)


class StateAfterBatch(L.Callback):
    def __init__(self) -> None:
        self.torch_state = None

    def on_train_batch_end(self, trainer, *args) -> None:
        self.torch_state = torch.get_rng_state()


class SaveInsideValidation(L.Callback):
    def __init__(self, path) -> None:
        self.path = path

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)


def test_a_save_inside_validation_holds_the_stream_after_the_last_step(tmp_path):
    after_batch = StateAfterBatch()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=1, val_check_interval=2,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[TrainingRng(), after_batch, SaveInsideValidation(tmp_path / "v.ckpt")],
    )  # fmt: skip
    trainer.fit(BoringModel())
    saved = torch.load(tmp_path / "v.ckpt", weights_only=True)["callbacks"]["TrainingRng"]
    assert torch.equal(saved["rng"]["torch"], after_batch.torch_state)
