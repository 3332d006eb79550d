"""Values for the JSON files a run writes (``metrics.json``, influence summaries, predictions).

Python's ``json`` writes NaN and infinity as the bare tokens ``NaN`` / ``Infinity``, which are not
JSON: strict parsers (``jq``, JavaScript, ``json.loads(..., parse_constant=...)``) reject the whole
file. A diverged run has such values, and its files must still load.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch


def json_safe(value: Any) -> Any:
    """``value`` with tensors turned into numbers or lists and non-finite floats into the strings
    ``"nan"``, ``"inf"``, ``"-inf"``, recursively through dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` (``value``), refusing any NaN that slipped through."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)
