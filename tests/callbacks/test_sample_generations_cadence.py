"""SampleGenerations: the every-n cadence across a resume, eval mode while decoding, and when it
does not decode (validate runs, other ranks). Decoding is stubbed: what is checked is when and
how the callback calls it."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger
from torch.utils.data import DataLoader

import callbacks.sample_generations as sample_generations
from callbacks.sample_generations import SampleGenerations


class TextLogger(Logger):
    """Keeps every ``add_text`` call as ``(tag, text, step)``."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[tuple[str, str, int]] = []
        self._experiment = SimpleNamespace(add_text=lambda *args: self.texts.append(args))

    @property
    def experiment(self):
        return self._experiment

    @property
    def name(self):
        return "text"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class TinyLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(2, 1)
        self.tokenizer = object()

    def training_step(self, batch, batch_idx):
        return self.model(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.fixture
def decoded(monkeypatch):
    """The stub decoder's calls: ``(prompt, model.training)``."""
    calls = []

    def generate(model, tokenizer, prompt, settings):
        calls.append((prompt, model.training))
        return f"<{prompt}>"

    monkeypatch.setattr(sample_generations, "generate_completion", generate)
    return calls


def _trainer(root, steps, callbacks, logger, **kwargs):
    return L.Trainer(
        accelerator="cpu", max_steps=steps, val_check_interval=1, limit_val_batches=1,
        num_sanity_val_steps=0, default_root_dir=root, logger=logger, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def _loader():
    return DataLoader(torch.randn(16, 2), batch_size=2)


def test_the_cadence_continues_across_a_resume(tmp_path, decoded):
    # saved at every validation end, after SampleGenerations counted that validation
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = TextLogger()
    _trainer(tmp_path, 3, [SampleGenerations(["hi"], every_n_validations=2), saver],
             first).fit(TinyLM(), _loader(), _loader())  # fmt: skip
    assert [step for _, _, step in first.texts] == [1]  # validation 2 of 1, 2, 3 (after step 2)
    resumed = TextLogger()
    _trainer(tmp_path, 5, [SampleGenerations(["hi"], every_n_validations=2)], resumed,
             enable_checkpointing=False).fit(
        TinyLM(), _loader(), _loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))  # fmt: skip
    # Validations 4 and 5 run after steps 4 and 5: the 4th is due, logged at step index 3.
    assert [step for _, _, step in resumed.texts] == [3]
    assert resumed.texts[0][1].startswith("**step 4**")


def test_decoding_runs_in_eval_mode_and_training_mode_comes_back(tmp_path, decoded):
    module = TinyLM()
    _trainer(tmp_path, 1, [SampleGenerations(["a", "b"])], TextLogger(),
             enable_checkpointing=False).fit(module, _loader(), _loader())  # fmt: skip
    assert decoded == [("a", False), ("b", False)]
    assert module.model.training


def test_a_validate_run_decodes_nothing(tmp_path, decoded):
    logger = TextLogger()
    trainer = _trainer(tmp_path, 1, [SampleGenerations(["a"])], logger, enable_checkpointing=False)
    trainer.validate(TinyLM(), _loader(), verbose=False)
    assert decoded == [] and logger.texts == []


def test_other_ranks_decode_nothing(decoded):
    logger = TextLogger()
    trainer = SimpleNamespace(
        strategy=object(), sanity_checking=False, state=SimpleNamespace(fn="fit"),
        global_rank=1, global_step=1, loggers=[logger],
    )  # fmt: skip
    SampleGenerations(["a"]).on_validation_end(trainer, TinyLM())
    assert decoded == [] and logger.texts == []


def test_every_n_validations_below_one_is_refused():
    with pytest.raises(ValueError, match="every_n_validations=0 must be >= 1"):
        SampleGenerations(every_n_validations=0)
