"""Text data with DataLoader worker processes: the same training, workers kept across epochs."""

import multiprocessing

import lightning as L
import torch

from datamodules.text import TextDataModule
from modules.causal_lm import CausalLMModule


class _WorkerPids(L.Callback):
    """The live child processes at every training batch of every epoch."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pids = {p.pid for p in multiprocessing.active_children()}
        self.by_epoch.setdefault(trainer.current_epoch, set()).update(pids)


def _fit(tmp_path, corpus_file, tokenizer_dir, num_workers):
    L.seed_everything(0)
    data = TextDataModule(
        data_files=str(corpus_file), tokenizer=str(tokenizer_dir), block_size=32, batch_size=4,
        num_workers=num_workers,
    )  # fmt: skip
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    pids = _WorkerPids()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=3, limit_val_batches=2,
        val_check_interval=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[pids],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module.state_dict(), pids.by_epoch


def test_workers_train_the_same_weights_and_live_across_epochs(
    tmp_path, corpus_file, tokenizer_dir
):
    """Two epochs with a validation inside each: two worker processes give the weights of the
    in-process loading, and the training loader's workers of epoch 0 still serve epoch 1
    (re-created workers cost seconds each under the spawn start method)."""
    in_process, no_children = _fit(tmp_path / "w0", corpus_file, tokenizer_dir, 0)
    with_workers, children = _fit(tmp_path / "w2", corpus_file, tokenizer_dir, 2)
    for name, value in in_process.items():
        torch.testing.assert_close(with_workers[name], value, rtol=0, atol=0, msg=name)
    assert no_children == {0: set(), 1: set()}
    assert len(children[0]) >= 2 and children[0] == children[1]
