"""Update norms and angles of one step over several tensors, against hand-computed values."""

import math

import pytest
import torch

from ops.warmup_step_metrics import TensorSnapshot, step_update_metrics


def _snapshot(name, before, after, lr=0.5, wd=0.0, decoupled=True):
    param = torch.nn.Parameter(torch.tensor(after, dtype=torch.float32))
    return TensorSnapshot(name, param, torch.tensor(before, dtype=torch.float32), lr, wd, decoupled)


def test_one_matrix_step():
    """Row 0 turns (1,0,1) -> (1,1,1), row 1 stays: ‖Δw‖ = 1, u = -Δw/lr has RMS 2/√6."""
    s = _snapshot("w", [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    out, per_neuron = step_update_metrics([s], {}, set(), per_neuron=True, per_tensor=True)
    row0 = math.acos(2 / (math.sqrt(2) * math.sqrt(3)))
    whole = math.acos(4 / (2 * math.sqrt(5)))  # <a,b> = 4, ‖a‖ = 2, ‖b‖ = √5
    assert out["warmup/update_norm/w"] == pytest.approx(1.0)
    assert out["warmup/direction_rms/w"] == pytest.approx(2 / math.sqrt(6))
    assert out["warmup/angle/w"] == pytest.approx(whole)
    assert out["warmup/angle_neuron_mean/w"] == pytest.approx(row0 / 2)
    assert out["warmup/angle_neuron_max/w"] == pytest.approx(row0)
    assert out["warmup/global/update_norm"] == pytest.approx(1.0)
    assert out["warmup/global/angle"] == pytest.approx(whole)
    torch.testing.assert_close(per_neuron[0], torch.tensor([row0, 0.0], dtype=torch.float64))


def test_stored_transposed_weights_have_column_neurons():
    """Columns (1,0), (0,1), (1,1) -> (1,0), (1,1), (1,1): only the middle neuron turns, by π/4."""
    s = _snapshot("w", [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    out, _ = step_update_metrics([s], {}, {id(s.param)}, per_neuron=True, per_tensor=True)
    assert out["warmup/angle_neuron_mean/w"] == pytest.approx(math.pi / 12)
    assert out["warmup/angle_neuron_max/w"] == pytest.approx(math.pi / 4)


def test_lr_multiplier_and_decoupled_decay_recover_the_direction():
    """w = 2 -> 1.8 at lr 0.1, decay 0.5: decoupled u = 2 - 0.5*2 = 1, coupled u = 2; an
    optimizer that applied 2x the LR took a direction half as large."""
    kinds = {
        "decoupled": _snapshot("a", [2.0], [1.8], lr=0.1, wd=0.5, decoupled=True),
        "coupled": _snapshot("b", [2.0], [1.8], lr=0.1, wd=0.5, decoupled=False),
        "doubled_lr": _snapshot("c", [2.0], [1.8], lr=0.1),
    }
    multipliers = {id(kinds["doubled_lr"].param): 2.0}
    out, per_neuron = step_update_metrics(
        list(kinds.values()), multipliers, set(), per_neuron=True, per_tensor=True
    )
    assert out["warmup/direction_rms/a"] == pytest.approx(1.0)
    assert out["warmup/direction_rms/b"] == pytest.approx(2.0)
    assert out["warmup/direction_rms/c"] == pytest.approx(1.0)
    assert out["warmup/global/direction_rms"] == pytest.approx(math.sqrt((1 + 4 + 1) / 3))
    assert out["warmup/global/update_norm"] == pytest.approx(math.sqrt(3 * 0.2**2))
    assert per_neuron == [] and "warmup/global/angle" not in out  # no matrix


def test_global_angle_concatenates_the_matrices_and_skips_vectors():
    """Two 1x2 matrices (1,0) -> (0,1) and (0,1) -> (0,1): concatenated (1,0,0,1) -> (0,1,0,1),
    cos = 1/2, angle π/3 (not the mean of π/2 and 0); the bias vector is left out."""
    tensors = [
        _snapshot("w1", [[1.0, 0.0]], [[0.0, 1.0]]),
        _snapshot("w2", [[0.0, 1.0]], [[0.0, 1.0]]),
        _snapshot("bias", [1.0], [-1.0]),
    ]
    out, _ = step_update_metrics(tensors, {}, set(), per_neuron=False, per_tensor=False)
    assert out["warmup/global/angle"] == pytest.approx(math.pi / 3)
    assert not any("/w1" in k or "/bias" in k for k in out)  # global scalars only


def test_zero_lr_and_non_finite_weights():
    """lr 0: no direction to recover (NaN); NaN weights: the angles are NaN, not 'no update'."""
    frozen = _snapshot("z", [[1.0, 0.0]], [[1.0, 0.0]], lr=0.0)
    out, _ = step_update_metrics([frozen], {}, set(), per_neuron=False, per_tensor=True)
    assert math.isnan(out["warmup/direction_rms/z"]) and math.isnan(
        out["warmup/global/direction_rms"]
    )
    assert out["warmup/angle/z"] == 0.0 and out["warmup/global/angle"] == 0.0
    diverged = _snapshot("d", [[1.0, 0.0]], [[math.nan, 0.0]])
    out, _ = step_update_metrics([diverged], {}, set(), per_neuron=True, per_tensor=True)
    assert math.isnan(out["warmup/angle/d"]) and math.isnan(out["warmup/global/angle"])
    assert math.isnan(out["warmup/angle_neuron_max/d"])
