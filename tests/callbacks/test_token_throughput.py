"""TokenThroughput on a fake clock: each training batch takes 1 s, each validation 100 s, so the
rates follow from the batch sizes by hand."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import callbacks.throughput as throughput
from callbacks.throughput import TokenThroughput

LENGTHS = [2, 4, 6, 8]  # tokens of batches 0..3 (2 rows each)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class TimedModel(L.LightningModule):
    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.layer = torch.nn.Linear(1, 1)
        self.rates: list[tuple[int, float]] = []

    def log(self, name, value, *args, **kwargs):
        if name == "perf/tokens_per_s":
            self.rates.append((self.global_step, value))
        super().log(name, value, *args, **kwargs)

    def training_step(self, batch, batch_idx):
        self.clock.now += 1.0  # every training batch takes one second
        return self.layer(batch["input_ids"].float().mean().reshape(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        self.clock.now += 100.0  # a slow validation, which must not count

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader():
    rows = [{"input_ids": torch.ones(2, n // 2, dtype=torch.long)} for n in LENGTHS]
    return DataLoader(rows, batch_size=None)


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    return clock


def test_rates_count_the_last_n_batches_and_skip_validation(tmp_path, clock):
    callback = TokenThroughput(log_every_n_steps=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=1,
        num_sanity_val_steps=0, logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=1,
        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    module = TimedModel(clock)
    trainer.fit(module, _loader(), _loader())
    assert callback.batch_tokens == LENGTHS  # every token of the batch, both rows
    assert callback.batch_seconds == [1.0, 1.0, 1.0, 1.0]  # the 100 s validation excluded
    # after step 2: batches 0+1, (2 + 4) / 2 s; after step 4: batches 2+3, (6 + 8) / 2 s
    assert module.rates == [(2, 3.0), (4, 7.0)]
    assert trainer.logged_metrics["perf/tokens_per_s"] == 7.0
    assert callback.tokens_per_second() == 20 / 4
    assert callback.tokens_per_second(skip_first=1) == 18 / 3


class TupleModel(TimedModel):
    def training_step(self, batch, batch_idx):
        ids, _ = batch
        return super().training_step({"input_ids": ids}, batch_idx)


def test_a_tuple_batch_counts_its_first_tensor(clock):
    callback = TokenThroughput(log_every_n_steps=10)
    rows = [(torch.ones(2, 3, dtype=torch.long), torch.zeros(2)) for _ in range(2)]
    L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, callbacks=[callback],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(TupleModel(clock), DataLoader(rows, batch_size=None))  # fmt: skip
    assert callback.batch_tokens == [6, 6]  # 2 x 3 ids, not the 2 labels
