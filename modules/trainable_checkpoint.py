"""Checkpoints that hold only the trainable weights, for modules whose frozen rest is the
pretrained model they are built from (LoRA adapters, layer-parallel fine-tuning of the paired
layers): the frozen weights are rebuilt from ``model`` on load instead of being written at
every save (94 % of a SmolLM2-135M layer-parallel checkpoint).

The frozen weights' fingerprint (per-tensor float64 sum and sum of squares) goes with the saved
ones, so a base that changed since the fine-tuning (a re-exported ``hf_model``, another model
at the same path) is refused on load instead of silently combined with the saved weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

#: The checkpoint keys this module writes.
TRAINABLE_ONLY, FROZEN_FINGERPRINT = "trainable_only", "frozen_fingerprint"


def trainable_names(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def frozen_fingerprint(module: nn.Module) -> Tensor:
    """``(tensors, 2)``: float64 sum and sum of squares of every frozen parameter, in order."""
    # MPS (Apple GPUs) has no float64: sum those on the CPU.
    frozen = [
        p.detach().cpu() if p.device.type == "mps" else p.detach()
        for p in module.parameters()
        if not p.requires_grad
    ]
    if not frozen:
        return torch.zeros(0, 2, dtype=torch.float64)
    return torch.stack(
        [
            torch.stack([p.sum(dtype=torch.float64), p.square().sum(dtype=torch.float64)])
            for p in frozen
        ]
    ).cpu()


def keep_trainable_only(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Drop the frozen weights from ``checkpoint`` (``on_save_checkpoint``), keeping their
    fingerprint."""
    trainable = trainable_names(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
    checkpoint[TRAINABLE_ONLY] = True
    checkpoint[FROZEN_FINGERPRINT] = frozen_fingerprint(module)


def check_trainable_only(module: nn.Module, checkpoint: dict[str, Any], source: str) -> None:
    """Refuse a trainable-only checkpoint that does not fit ``module`` (``on_load_checkpoint``,
    before the weights load): other trainable weights, or a frozen base that is not the one it
    was saved with. ``source`` names where the base comes from, for the message."""
    trainable, saved = trainable_names(module), set(checkpoint["state_dict"])
    if saved != trainable:
        missing, unexpected = sorted(trainable - saved)[:5], sorted(saved - trainable)[:5]
        raise KeyError(
            "checkpoint of the trainable weights only does not match this model's trainable "
            f"weights (missing e.g. {missing}, unexpected e.g. {unexpected}): same model and "
            "settings?"
        )
    expected = checkpoint.get(FROZEN_FINGERPRINT)  # absent in checkpoints from before it
    if expected is None:
        return
    current = frozen_fingerprint(module)
    if current.shape != expected.shape or not torch.allclose(current, expected, rtol=1e-6):
        raise ValueError(
            f"the frozen weights rebuilt from {source} are not those this checkpoint was saved "
            "with (it holds the trained weights only): the model at that path changed since "
            "(re-exported or replaced); point the config's model at the original"
        )
