"""Fixtures shared by the module tests."""

from __future__ import annotations

import pytest
import torch

from modules.hf_models import build_causal_lm


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A random tiny Llama (4096-token vocabulary, eager attention) saved in Hugging Face format."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    build_causal_lm("tiny-llama", vocab_size=4096, attn_implementation="eager").save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="module")
def tiny_llama_8l_dir(tmp_path_factory):
    """A random tiny 8-layer Llama saved like ExportPretrained does (layer-parallel tests)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lp") / "hf_model"
    build_causal_lm("tiny-llama-8l").save_pretrained(out)
    return out
