import json
import math

import pytest
import torch

from callbacks.json_values import json_safe, strict_json


def test_non_finite_values_become_strings_at_any_depth():
    value = {
        "loss": torch.tensor(float("nan")),
        "curve": torch.tensor([1.0, float("inf")]),
        "nested": {"gaps": (0.5, -math.inf), "ok": [1, "a", None]},
    }
    assert json_safe(value) == {
        "loss": "nan",
        "curve": [1.0, "inf"],
        "nested": {"gaps": [0.5, "-inf"], "ok": [1, "a", None]},
    }
    text = strict_json(value)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["curve"] == [1.0, "inf"]


def test_strict_json_refuses_what_json_safe_cannot_see():
    class Opaque:
        def __repr__(self):
            return "opaque"

    # default=str turns unknown objects into strings, as json.dumps would
    assert strict_json({"x": Opaque()}, default=str) == '{"x": "opaque"}'
    with pytest.raises(TypeError):
        strict_json({"x": Opaque()})
