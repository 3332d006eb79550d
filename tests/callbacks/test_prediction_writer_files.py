"""JsonlPredictionWriter: one JSON line per record, a fresh file per run, text as written,
other ranks' file names, and no echo when switched off."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader

from callbacks.prediction_writer import JsonlPredictionWriter


class Predicts(BoringModel):
    def predict_step(self, batch, batch_idx):
        # Two records per batch, one with text outside ASCII and a value JSON cannot encode.
        return [
            {"batch": batch_idx, "text": "café ✓"},
            {"batch": batch_idx, "where": Path("out") / f"{batch_idx}.txt"},
        ]


def _predict(root, writer):
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=root,
                        callbacks=[writer], enable_progress_bar=False)  # fmt: skip
    trainer.predict(Predicts(), DataLoader(torch.randn(3, 32), batch_size=1))


def test_records_are_written_to_a_fresh_file_as_text(tmp_path, caplog):
    root = tmp_path / "not" / "yet"  # created by the writer
    with caplog.at_level(logging.INFO):
        _predict(root, JsonlPredictionWriter(echo=False))
        _predict(root, JsonlPredictionWriter(echo=False))  # the second run replaces the file
    text = (root / "predictions.jsonl").read_text(encoding="utf-8")
    expected = []
    for i in range(3):
        expected += [{"batch": i, "text": "café ✓"}, {"batch": i, "where": f"out/{i}.txt"}]
    assert [json.loads(line) for line in text.splitlines()] == expected
    assert "café ✓" in text  # not \u escapes
    assert "café" not in caplog.text  # echo off


def test_other_ranks_write_their_own_file(tmp_path):
    trainer = SimpleNamespace(global_rank=2, logger=None, default_root_dir=str(tmp_path))
    assert JsonlPredictionWriter()._path(trainer) == tmp_path / "predictions.rank2.jsonl"
    named = JsonlPredictionWriter(filename="out.v2.jsonl")
    assert named._path(trainer) == tmp_path / "out.v2.rank2.jsonl"
    trainer.global_rank = 0
    assert named._path(trainer) == tmp_path / "out.v2.jsonl"
