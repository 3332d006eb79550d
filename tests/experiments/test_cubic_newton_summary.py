"""experiments/cubic_newton.py merges parts run as separate processes only within one setting."""

from __future__ import annotations

import json

from experiments.cubic_newton import merge_summary


def _summary(parts: list[str], data_seed: int = 0) -> dict:
    config = {"steps": 4000, "seeds": [0, 1, 2], "data_seed": data_seed, "parts": parts}
    return {"command": "x", "config": config, "seconds": {"+".join(parts): 1.0},
            **{p: {"arm": {"median_floor": float(data_seed)}} for p in parts}}  # fmt: skip


def test_parts_of_one_setting_merge(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(_summary(["A"])))
    merged = merge_summary(path, _summary(["C"]))
    assert "A" in merged and "C" in merged
    assert merged["seconds"] == {"A": 1.0, "C": 1.0}


def test_a_part_of_another_data_draw_starts_over(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(_summary(["A", "C"])))
    merged = merge_summary(path, _summary(["A"], data_seed=1))
    assert "C" not in merged  # data seed 0's part C must not sit next to data seed 1's part A
    assert merged["config"]["data_seed"] == 1
