"""Influence setting groups: inclusive lower bounds, the accept_tol check, the defaults the
shipped HyperINF configs spell out, and the code-faithful presets of docs/hyperinf.md."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import yaml

from ops.influence_config import (
    CODE_FAITHFUL_PRESETS,
    DampingConfig,
    GradConfig,
    LissaConfig,
    SchulzConfig,
)


def test_lower_bounds_are_inclusive():
    """``_check`` refuses values *below* the bound: the bound itself is a valid setting."""
    SchulzConfig(max_iter=0, tol=0.0, accept_tol=0.0)
    LissaConfig(iters=1, code_faithful_iters=1)
    GradConfig(batch_size=1, fim_max_dim=1, cache_limit_bytes=0)


def test_negative_accept_tol_is_refused():
    """A negative acceptance residual could never be met: refuse it naming the key."""
    with pytest.raises(ValueError, match=r"schulz\.accept_tol=-0\.001 must be >= 0\.0"):
        SchulzConfig(accept_tol=-1e-3)


@pytest.mark.parametrize("config", ["mislabel_gmm.yaml", "mislabel_digits.yaml"])
def test_defaults_equal_the_settings_of_the_shipped_configs(repo_root, config):
    """The HyperINF configs write out the settings; code that builds the engine without them
    must run the same experiment."""
    text = (repo_root / "configs" / "hyperinf" / config).read_text()
    callbacks = yaml.safe_load(text)["trainer"]["callbacks"]
    (args,) = [c["init_args"] for c in callbacks if c["class_path"].endswith("HyperINFCallback")]
    for key, cls in [("damping", DampingConfig), ("schulz", SchulzConfig), ("lissa", LissaConfig)]:
        defaults = asdict(cls())
        for name, value in args[key].items():
            assert defaults[name] == value, (config, key, name)


def test_presets_are_the_documented_code_faithful_settings():
    """docs/hyperinf.md: fixed start 5e-5 (``legacy``), 30/30/15 iterations, delta 1e-3/0/0."""
    assert CODE_FAITHFUL_PRESETS == {
        "mislabel": {"extra": 1e-3, "init": "legacy", "max_iter": 30},
        "llm_selection": {"extra": 0.0, "init": "legacy", "max_iter": 30},
        "vlm_selection": {"extra": 0.0, "init": "legacy", "max_iter": 15},
    }
