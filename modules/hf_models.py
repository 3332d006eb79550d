"""Build Hugging Face causal language models from a preset name, a config dict or a directory.

Three ways to name a model, wherever the project accepts one:

* a **preset** (``"tiny-llama"``, ``"tiny-gpt2"``, ...): a small random-init config for CPU runs;
* a **dict** with ``model_type`` plus sizes, e.g. ``{"model_type": "llama", "hidden_size": 64}``,
  passed to ``AutoConfig.for_model`` (training from scratch);
* a **local directory** or **hub id**, loaded with ``from_pretrained`` (hub ids need network access;
  with ``HF_HUB_OFFLINE=1`` an unknown name fails with the list of presets).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from datamodules.file_checks import where_relative_paths_resolve
from modules.pretrained_presets import PRETRAINED_PRESETS, resolve_pretrained_preset

log = logging.getLogger(__name__)

# Tiny configs keep the real code paths of each family (RoPE, GQA, RMSNorm, SwiGLU for Llama)
# at a size that trains in minutes on two CPU cores. ``vocab_size`` is overridden by the tokenizer.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "model_type": "llama",
        "vocab_size": 4096,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
    },
    "tiny-llama-8l": {
        "model_type": "llama",
        "vocab_size": 4096,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
    },
    "micro-llama": {
        "model_type": "llama",
        "vocab_size": 4096,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
    },
    "tiny-gpt2": {
        "model_type": "gpt2",
        "vocab_size": 4096,
        "n_embd": 128,
        "n_layer": 4,
        "n_head": 4,
        "n_positions": 512,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
    },
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | None) -> torch.dtype | None:
    """Map ``"float32" | "bfloat16" | "float16" | None`` to a torch dtype, with a clear error."""
    if dtype is None:
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's BOS/EOS/PAD ids under their config keys (``None`` ids left out)."""
    ids = {key: getattr(tokenizer, key, None) for key in SPECIAL_TOKEN_KEYS}
    return {key: value for key, value in ids.items() if value is not None}


def build_config(
    model: str | dict[str, Any],
    vocab_size: int | None = None,
    special_ids: dict[str, int] | None = None,
) -> PretrainedConfig:
    """The config a preset name or config dict describes (no weights).

    ``special_ids`` (``special_token_ids(tokenizer)``) fill the BOS/EOS/PAD ids a config dict
    leaves out: otherwise the architecture's defaults (Llama: eos 2) would make ``generate`` stop
    on an ordinary token of the project's tokenizer and be written into exported configs. They
    replace a preset's ids, which are the project tokenizer's: with another vocabulary (the
    federated character vocabulary: pad 0, eos 1) the preset's pad id made the data's EOS the
    embedding's padding row (zero, and never trained as an input).
    """
    spec = copy.deepcopy(TINY_PRESETS[model]) if isinstance(model, str) else copy.deepcopy(model)
    if "model_type" not in spec:
        raise ValueError(
            f"model config dict {model!r} has no 'model_type' key "
            "(e.g. {'model_type': 'llama', 'hidden_size': 64, ...})"
        )
    model_type = spec.pop("model_type")
    if vocab_size is not None:
        spec["vocab_size"] = vocab_size
    if isinstance(model, str) and special_ids is not None:
        spec.update({key: special_ids.get(key) for key in SPECIAL_TOKEN_KEYS})
    else:
        for key, value in (special_ids or {}).items():
            spec.setdefault(key, value)
    try:
        return AutoConfig.for_model(model_type, **spec)
    except ValueError as err:
        raise ValueError(f"model_type={model_type!r} in the model config: {err}") from err


def is_pretrained_name(model: str | dict[str, Any]) -> bool:
    """True when ``model`` names weights to load (a pretrained preset such as
    ``smollm2-135m-instruct``, a directory or a hub id), not a random-init config."""
    return isinstance(model, str) and model not in TINY_PRESETS


def build_causal_lm(
    model: str | dict[str, Any],
    vocab_size: int | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = "sdpa",
    special_ids: dict[str, int] | None = None,
) -> PreTrainedModel:
    """Instantiate a causal LM from a preset, a config dict, a local directory or a hub id.

    Args:
        model: preset name (see ``TINY_PRESETS``), pretrained preset name (see
            ``modules.pretrained_presets.PRETRAINED_PRESETS``: resolved to its cached directory,
            built on first use), config dict with ``model_type``, local directory or hub id.
        vocab_size: for presets and dicts, the embedding size (normally ``len(tokenizer)``);
            ignored for pretrained weights.
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``); ``None`` is float32,
            also for weights stored in another dtype (``transformers`` loads the stored one: a
            float16 export fine-tuned again trained float16 weights, NaN after one step).
        attn_implementation: attention kernel passed to ``transformers`` (``sdpa``, ``eager``).
        special_ids: the tokenizer's BOS/EOS/PAD ids: replace a preset's, fill those a dict
            leaves out (see ``build_config``); ignored for pretrained weights.
    """
    torch_dtype = resolve_dtype(dtype)
    if not is_pretrained_name(model):
        config = build_config(model, vocab_size, special_ids)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        net = AutoModelForCausalLM.from_config(config, **kwargs)
        return net.to(torch_dtype) if torch_dtype is not None else net
    assert isinstance(model, str)
    if model in PRETRAINED_PRESETS:
        model = str(resolve_pretrained_preset(model))
    path = Path(model).expanduser()
    if not path.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"model={model!r} is neither a preset "
            f"({', '.join(sorted(TINY_PRESETS) + sorted(PRETRAINED_PRESETS))}) nor an "
            f"existing directory{where_relative_paths_resolve(model)}, and HF_HUB_OFFLINE=1 "
            "forbids downloading it from the hub"
        )
    if (path / "adapter_config.json").is_file():
        return _merged_adapter(path, dtype, attn_implementation)
    kwargs: dict[str, Any] = {"dtype": torch_dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else model, **kwargs)


def _merged_adapter(
    adapter_dir: Path, dtype: str | None, attn_implementation: str | None
) -> PreTrainedModel:
    """A LoRA adapter directory (an ``hf_model/`` export) as the plain model it adapts: its base
    (bundled in ``base/`` for a random-init preset, else the one the adapter names) with the
    adapter merged. Loaded as is, ``transformers`` injected the adapter frozen: fine-tuning had
    no trainable weight, and layer-parallel fusion read the base weights without the adapter."""
    from peft import PeftConfig, PeftModel

    bundled = adapter_dir / "base"
    base_name = (
        str(bundled)
        if bundled.is_dir()
        else PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    )
    base = build_causal_lm(base_name, dtype=dtype, attn_implementation=attn_implementation)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.requires_grad_(True)  # peft froze the base; a loaded model trains every weight
    log.info("model=%s is a LoRA adapter: loaded merged into its base %s", adapter_dir, base_name)
    return merged


def own_tokenizer_dir(model: str | dict[str, Any]) -> Path | None:
    """The local directory of pretrained ``model`` when it ships a tokenizer, else ``None``."""
    if not is_pretrained_name(model):
        return None
    assert isinstance(model, str)
    path = resolve_pretrained_preset(model) if model in PRETRAINED_PRESETS else Path(model)
    path = path.expanduser()
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return path if has_tokenizer else None


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's position handling allows, or ``None`` when unbounded."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every GPT-2 style ``Conv1D`` (weight ``[in, out]``) by an ``nn.Linear`` in place.

    ``Conv1D`` computes ``x @ W + b``; the ``nn.Linear`` gets ``W.T`` and the same bias, so the
    forward pass is unchanged. Code that treats "rows of dim 0" as output neurons (LionAR's
    per-neuron rotation, per-neuron angles of the warmup diagnostics, LoRA targets) is wrong on
    the transposed ``Conv1D`` layout; after this call every projection has the Linear layout.
    Returns the number of modules replaced.
    """
    from transformers.pytorch_utils import Conv1D

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in targets:
        weight = conv.weight
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None)
        linear = linear.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(targets)
