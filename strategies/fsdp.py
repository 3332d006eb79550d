"""FSDP for Hugging Face models: wrap each decoder layer, and LoRA adapters in their own units.

``HFFSDPStrategy`` derives the auto-wrap policy from the model at set-up time, so one YAML works
for any ``transformers`` decoder (the classes in ``_no_split_modules``: ``LlamaDecoderLayer``,
``GPT2Block``, ...) with or without ``peft`` LoRA. Trainable leaf modules (LoRA ``lora_A``/
``lora_B``) get their own FSDP units so frozen and trainable weights never share a flat
parameter, as PEFT's own FSDP recipe does. Select it with ``--trainer.strategy=fsdp_hf`` or the
fragment ``configs/trainer/fsdp.yaml``. FSDP needs CUDA.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from torch import nn


def transformer_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """Classes named in ``_no_split_modules`` of every Hugging Face model inside ``model``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            f"found no transformer block classes in {type(model).__name__} (no Hugging Face "
            "_no_split_modules): pass auto_wrap_policy explicitly"
        )
    return classes


def _is_trainable_leaf(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return not list(module.children()) and isinstance(weight, nn.Parameter) and weight.requires_grad


def _should_wrap(module: nn.Module, blocks: tuple[type[nn.Module], ...], lora: bool) -> bool:
    return isinstance(module, blocks) or (lora and _is_trainable_leaf(module))


def hf_auto_wrap_policy(model: nn.Module) -> Any:
    """FSDP ``auto_wrap_policy``: decoder blocks, plus trainable leaves when a frozen base exists."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    blocks = tuple(transformer_block_classes(model))
    has_frozen = any(not p.requires_grad for p in model.parameters())
    return functools.partial(
        lambda_auto_wrap_policy,
        lambda_fn=functools.partial(_should_wrap, blocks=blocks, lora=has_frozen),
    )


class HFFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` whose wrap and activation-checkpointing policies come from the model.

    Args:
        activation_checkpointing: recompute each decoder block's activations in backward.
        state_dict_type: ``sharded`` (one file per rank, fast) or ``full`` (one consolidated file).
        sharding_strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``HYBRID_SHARD`` or ``NO_SHARD``.
        cpu_offload: keep sharded parameters and gradients in CPU memory between uses.
        **kwargs: passed to ``FSDPStrategy`` and on to ``FullyShardedDataParallel``.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        sharding_strategy: Literal[
            "FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"
        ] = "FULL_SHARD",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            state_dict_type=state_dict_type, sharding_strategy=sharding_strategy, **kwargs
        )
        self.activation_checkpointing = activation_checkpointing

    def _setup_model(self, model: nn.Module) -> nn.Module:
        self.kwargs.setdefault("auto_wrap_policy", hf_auto_wrap_policy(model))
        if self.activation_checkpointing and not self._activation_checkpointing_kwargs:
            blocks = tuple(transformer_block_classes(model))
            self._activation_checkpointing_kwargs = {"check_fn": lambda m: isinstance(m, blocks)}
        return super()._setup_model(model)


StrategyRegistry.register(
    "fsdp_hf",
    HFFSDPStrategy,
    description="FSDP with Hugging Face decoder-block and LoRA-aware wrapping",
    override=True,
)
