"""FSDP for Hugging Face models: wrap each decoder layer, and LoRA adapters in their own units.

``HFFSDPStrategy`` derives the auto-wrap policy from the model at set-up time, so one YAML works
for any ``transformers`` decoder (the classes in ``_no_split_modules``: ``LlamaDecoderLayer``,
``GPT2Block``, ...) with or without ``peft`` LoRA. Trainable leaf modules (LoRA ``lora_A``/
``lora_B``) get their own FSDP units so frozen and trainable weights never share a flat
parameter, as PEFT's own FSDP recipe does. Select it with ``--trainer.strategy=fsdp_hf`` or the
fragment ``configs/trainer/fsdp.yaml``.

What Lightning's ``FSDPStrategy`` does not do, and this one does:

* ``gradient_clip_val`` with the default ``norm`` algorithm: FSDP's own ``clip_grad_norm_`` on the
  root module, which reduces the norm over every rank's shards (``HFFSDPPrecision``);
* LoRA in ``NO_SHARD`` mode (also FSDP's mode on one process), where FSDP loses frozen
  parameters after a backward: they stay out of FSDP there;
* ``HYBRID_SHARD``, which Lightning refuses without a policy at construction, before the model
  exists (``DeferredHFWrapPolicy``);
* run on CPU (gloo, ``device_id=cpu``), so that the sharding, the wrap policy and the sharded
  checkpoints are tested without a GPU. CUDA remains the target: bf16 autocast is CUDA-only,
  and ``state_dict_type: full`` is refused on CPU processes (torch crashes gathering it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from torch import nn


def sharded_checkpoint_meta(path: str | Path) -> Path | None:
    """``meta.pt`` of a sharded checkpoint directory (Lightning's FSDP ``state_dict_type:
    sharded``): the hyperparameters, step and loop states, without the model and optimizer
    shards. None for anything else."""
    meta = Path(path) / "meta.pt"
    return meta if meta.is_file() else None


def refuse_under_sharded_fsdp(trainer: Any, what: str, why: str) -> None:
    """Raise ``RuntimeError`` naming ``what`` and ``why`` when ``trainer`` runs FSDP on more
    than one process (one process does not shard)."""
    if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
        raise RuntimeError(f"{what} does not run under multi-process FSDP: {why}")


def refuse_generation_under_sharded_fsdp(trainer: Any) -> None:
    """``mlo predict``: every FSDP forward is a collective, and ranks generate for different
    numbers of prompts and stop at different tokens."""
    refuse_under_sharded_fsdp(
        trainer,
        "mlo predict",
        "every forward is a collective over the ranks, which generate for different numbers of "
        "prompts and stop at different tokens; use one process (--trainer.devices=1) or DDP",
    )


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


class DeferredHFWrapPolicy:
    """``auto_wrap_policy`` that becomes ``hf_auto_wrap_policy(model)`` once the strategy knows
    the model (``bind``). Lightning demands a policy at construction for ``HYBRID_SHARD``,
    before any model exists; FSDP calls it as ``policy(module=, recurse=, nonwrapped_numel=)``."""

    def __init__(self) -> None:
        self.policy: Any = None

    def bind(self, model: nn.Module) -> None:
        self.policy = hf_auto_wrap_policy(model)

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.policy is None:
            raise RuntimeError("DeferredHFWrapPolicy called before bind(model)")
        return self.policy(module=module, recurse=recurse, nonwrapped_numel=nonwrapped_numel)


class HFFSDPPrecision(FSDPPrecision):
    """``FSDPPrecision`` that clips by norm, with ``clip_grad_norm_`` of the root FSDP module.

    Lightning's plugin refuses norm clipping because it has no handle on the wrapped module; a
    per-shard ``torch.nn.utils.clip_grad_norm_`` would clip each shard by its own norm.
    ``root_module`` returns the strategy's wrapped model at clipping time.
    """

    def __init__(self, precision: Any, scaler: Any = None, *, root_module: Callable[[], nn.Module]):
        super().__init__(precision, scaler)
        self.root_module = root_module

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float | int) -> None:
        # The scaler (16-mixed) has already unscaled the gradients: Lightning calls
        # unscale_ before _after_closure, which clips.
        self.root_module().clip_grad_norm_(clip_val)


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
        if kwargs.get("auto_wrap_policy") is None:  # the CLI passes an explicit None
            kwargs["auto_wrap_policy"] = DeferredHFWrapPolicy()
        super().__init__(
            state_dict_type=state_dict_type, sharding_strategy=sharding_strategy, **kwargs
        )
        self.activation_checkpointing = activation_checkpointing

    @FSDPStrategy.precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if type(plugin) is FSDPPrecision:  # what the trainer builds from `precision`
            plugin = HFFSDPPrecision(
                plugin.precision, plugin.scaler, root_module=lambda: self.model
            )
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        policy = self.kwargs.get("auto_wrap_policy")
        if isinstance(policy, DeferredHFWrapPolicy):
            policy.bind(model)
        self._refuse_full_state_dicts_on_cpu()
        self._keep_frozen_params_out_when_unsharded(model)
        if self.activation_checkpointing and not self._activation_checkpointing_kwargs:
            blocks = tuple(transformer_block_classes(model))
            self._activation_checkpointing_kwargs = {"check_fn": lambda m: isinstance(m, blocks)}
        if self.root_device.type == "cpu":
            return self._wrap_on_cpu(model)
        return super()._setup_model(model)

    def _refuse_full_state_dicts_on_cpu(self) -> None:
        if (
            self.root_device.type == "cpu"
            and self.world_size > 1
            and self._state_dict_type == "full"
        ):
            raise ValueError(
                "HFFSDPStrategy(state_dict_type='full') on CPU processes: gathering the full "
                "state dict for a checkpoint crashes them (SIGSEGV in FSDP's offload of CPU "
                "shards to the CPU); use state_dict_type: sharded there"
            )

    def _keep_frozen_params_out_when_unsharded(self, model: nn.Module) -> None:
        """In NO_SHARD mode (also what FSDP switches to on one process) FSDP loses frozen
        parameters after the first backward: tied ones (LoRA on tied embeddings) fail the next
        forward, the others go missing from the state dict. Outside FSDP they cost nothing
        more, as nothing is sharded; FSDP does not move them, so they go to this rank's device."""
        frozen = [p for p in model.parameters() if not p.requires_grad]
        unsharded = self.world_size == 1 or self.sharding_strategy.name == "NO_SHARD"
        if unsharded and frozen and not self.kwargs.get("ignored_states"):
            self.kwargs["ignored_states"] = frozen
            for param in frozen:
                param.data = param.data.to(self.root_device)

    def _wrap_on_cpu(self, model: nn.Module) -> nn.Module:
        """Lightning passes ``device_id=root_device.index``, None on CPU, which FSDP refuses when
        no accelerator exists; FSDP itself runs on CPU given ``device_id=cpu``."""
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)  # wrapped in configure_model: nothing to place
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        # after wrapping, as Lightning's own _setup_model does
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped


StrategyRegistry.register(
    "fsdp_hf",
    HFFSDPStrategy,
    description="FSDP with Hugging Face decoder-block and LoRA-aware wrapping",
    override=True,
)
