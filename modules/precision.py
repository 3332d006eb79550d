"""Precision settings (and float64 on devices without it) a module cannot run under, refused
before the first step, and one it runs under with a known cost, warned about."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn


def refuse_fp16_training(
    trainer: L.Trainer, owner: str, stage: str, module: nn.Module | None = None
) -> None:
    """Refuse fp16 weights for training (``precision: 16-true``, or float16 trainable
    parameters of ``module``): fp16 weights *and* optimizer states.

    Adam's default ``eps=1e-8`` is 0 in fp16 and small squared gradients underflow too, so the
    update divides by zero after the first step and every later loss is NaN (the run used to end
    with exit code 0 and NaN metrics). Evaluation in fp16 (validate/test/predict) stays allowed.
    """
    if stage != "fit":
        return
    if module is not None and any(
        p.requires_grad and p.dtype == torch.float16 for p in module.parameters()
    ):
        # e.g. model.init_args.dtype: float16, under any precision setting
        raise ValueError(
            f"{owner}: the model's trainable weights are float16, where AdamW's eps=1e-8 rounds "
            "to 0 and the loss turns NaN after the first step; train them in float32 (dtype: "
            "null or float32) or bfloat16"
        )
    if str(trainer.precision) != "16-true":
        return
    raise ValueError(
        f"{owner}: trainer.precision='16-true' trains fp16 weights and optimizer states, where "
        "AdamW's eps=1e-8 rounds to 0 and the loss turns NaN after the first step; use "
        "'16-mixed' (GPU) or 'bf16-mixed' (16-true is fine for validate/test/predict)"
    )


def warn_bf16_weights_training(trainer: L.Trainer, owner: str, stage: str) -> None:
    """Warn that ``precision: bf16-true`` trains bfloat16 weights with bfloat16 optimizer states.

    bfloat16 keeps 8 significant bits: an update smaller than half the spacing around a weight
    (2^-9 relative) rounds away. With AdamW at lr 1e-3 the RMSNorm gains (1.0) of a Llama never
    moved (5 of the micro preset's 20 tensors bit-identical after 10 steps; bf16-mixed, which
    keeps float32 weights, moves all). Allowed, since it halves the weights' memory.
    """
    if stage == "fit" and str(trainer.precision) == "bf16-true":
        rank_zero_warn(
            f"{owner}: trainer.precision='bf16-true' keeps the weights and optimizer states in "
            "bfloat16, where updates below 2^-9 of a weight round away (norm gains at 1.0 do "
            "not move at lr 1e-3); use 'bf16-mixed' (float32 weights) unless memory requires it"
        )


def refuse_float64_on_mps(device: torch.device, owner: str, what: str) -> None:
    """Refuse the MPS backend (Apple GPUs, ``accelerator: mps``/``auto`` on a Mac) for parts that
    compute in float64, which MPS does not support: at set-up, naming the setting, instead of a
    ``TypeError`` at the first float64 tensor, possibly after training (an end-of-fit score)."""
    if device.type == "mps":
        raise ValueError(
            f"{owner} {what} in float64, which the MPS backend (Apple GPUs) does not support: "
            "run it on the CPU (--trainer.accelerator=cpu) or a CUDA GPU"
        )
