import io
import random

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.training_rng import (
    TrainingRng,
    from_checkpoint,
    rng_states,
    set_rng_states,
    to_checkpoint,
)
from tests.interrupt_callback import InterruptAtStep


def test_states_survive_a_weights_only_checkpoint():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.normal()  # a cached Gaussian is part of NumPy's state
    buffer = io.BytesIO()
    torch.save(to_checkpoint(rng_states()), buffer)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    buffer.seek(0)
    set_rng_states(from_checkpoint(torch.load(buffer, weights_only=True)))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1])
    assert again[2] == expected[2]


class DropoutModel(BoringModel):
    """BoringModel whose training draws from the global RNG (dropout), as a dropout LM does.
    Its data are fixed tensors (BoringModel's own loaders draw new random data when built)."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)
        self.data = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))

    def forward(self, x):
        return self.layer(self.dropout(x))

    def train_dataloader(self):
        # A generator of its own, as the project's loaders have: an iterator of a loader
        # without one draws a seed from the global RNG at every epoch start.
        generator = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(self.data, batch_size=2, generator=generator)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.data[:8], batch_size=2)


def _fit(tmp_path, callbacks, ckpt_path=None, **kw):
    L.seed_everything(0)
    model = DropoutModel()
    settings = {"accelerator": "cpu", "max_steps": 12, "limit_train_batches": 8,
                "limit_val_batches": 2, "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "num_sanity_val_steps": 0}  # fmt: skip
    trainer = L.Trainer(**{**settings, **kw}, default_root_dir=tmp_path, callbacks=callbacks)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model.layer.weight.detach().clone()


@pytest.mark.parametrize("with_callback", [True, False])
def test_validation_inside_fit_leaves_the_training_stream_alone(tmp_path, with_callback):
    # Each validation creates a DataLoader iterator, which draws a seed from the global RNG.
    extra = [TrainingRng()] if with_callback else []
    validated = _fit(tmp_path / "a", list(extra), val_check_interval=3)
    not_validated = _fit(tmp_path / "b", [TrainingRng()] if with_callback else [],
                         limit_val_batches=0)  # fmt: skip
    assert torch.equal(validated, not_validated) == with_callback


def test_a_resumed_run_continues_the_dropout_stream_from_an_epoch_boundary(tmp_path):
    # 6 batches an epoch: the step-6 checkpoint is an epoch's end (a plain DataLoader cannot
    # resume mid-epoch; the mid-epoch case is tested through mlo in tests/test_cli.py).
    every_6 = {"every_n_train_steps": 6, "save_top_k": -1, "filename": "{step}"}
    kw = {"limit_val_batches": 0, "limit_train_batches": 6}
    full = _fit(tmp_path / "full", [TrainingRng(), ModelCheckpoint(**every_6)], **kw)
    (step_6,) = (tmp_path / "full").rglob("step=6.ckpt")
    resumed = _fit(tmp_path / "resumed", [TrainingRng()], ckpt_path=step_6, **kw)
    assert torch.equal(resumed, full)
    # Without the stored stream the resumed steps replay the masks drawn after seeding.
    replayed = _fit(tmp_path / "replayed", [], ckpt_path=step_6, **kw)
    assert not torch.equal(replayed, full)


def test_the_projects_loaders_leave_the_global_stream_alone(tmp_path, corpus_file):
    from datamodules.resumable_sampler import LoopResumedDataLoader
    from datamodules.text import TextDataModule

    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(corpus_file.read_text().splitlines()[:3]) + "\n")
    dm = TextDataModule(data_files=str(small), block_size=16, batch_size=2)
    dm.setup("fit")
    loaders = [LoopResumedDataLoader(torch.arange(4)), dm.train_dataloader(), dm.val_dataloader()]
    for loader in loaders:
        before = torch.get_rng_state()
        next(iter(loader))
        assert torch.equal(torch.get_rng_state(), before), type(loader).__name__
        # No torch.Generator kept in the loader: ddp_spawn pickles datamodules holding loaders,
        # and torch.multiprocessing could not rebuild a generator's state in the workers.
        assert loader.generator is None


class SaveAtStep(L.Callback):
    """Saves a checkpoint in on_train_batch_end, as SlurmRequeue does, possibly before
    TrainingRng's own on_train_batch_end has run."""

    def __init__(self, path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("saver_first", [True, False])
def test_a_checkpoint_saved_by_another_callback_holds_the_current_stream(tmp_path, saver_first):
    # At an epoch's last batch (6 an epoch): a plain DataLoader cannot resume mid-epoch.
    kw = {"limit_val_batches": 0, "limit_train_batches": 6}
    saved = tmp_path / "at6.ckpt"
    callbacks = [SaveAtStep(saved, 6), TrainingRng()]
    full = _fit(tmp_path / "full", callbacks if saver_first else callbacks[::-1], **kw)
    resumed = _fit(tmp_path / "resumed", [TrainingRng()], ckpt_path=saved, **kw)
    assert torch.equal(resumed, full)


def test_a_checkpoint_saved_mid_step_holds_the_stream_at_that_steps_start(tmp_path):
    # The on-exception checkpoint of a step interrupted after its forward: the step is redone
    # on resume, so its dropout masks must be drawn again, not the next step's. (At an epoch's
    # first batch: a plain DataLoader cannot resume mid-epoch.)
    from callbacks.checkpoint import ModelCheckpoint as OnExceptionCheckpoint

    kw = {"limit_val_batches": 0, "limit_train_batches": 6}
    full = _fit(tmp_path / "full", [TrainingRng()], **kw)
    saver = OnExceptionCheckpoint(
        dirpath=tmp_path / "ckpt", save_on_exception=True, every_n_epochs=0
    )
    with pytest.raises(SystemExit):  # Lightning's answer to a KeyboardInterrupt, after saving
        _fit(
            tmp_path / "cut", [TrainingRng(), saver, InterruptAtStep(6, "on_before_backward")], **kw
        )
    (saved,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert torch.load(saved, weights_only=True)["global_step"] == 6
    resumed = _fit(tmp_path / "resumed", [TrainingRng()], ckpt_path=saved, **kw)
    assert torch.equal(resumed, full)
