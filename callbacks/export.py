"""Export the trained model (or LoRA adapter) in Hugging Face format at the end of training."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.metrics_file import log_dir_of, skipped_in_fast_dev_run


class ExportPretrained(L.Callback):
    """Call the module's ``save_pretrained`` into ``<log_dir>/<dirname>`` when fit ends.

    The output loads with ``AutoModelForCausalLM.from_pretrained`` (full model) or
    ``peft.PeftModel.from_pretrained`` (adapter only).

    Under FSDP every rank takes part in gathering the full state dict (on rank 0, in CPU
    memory); rank 0 then loads it into an unwrapped twin of the module, built from its
    hyperparameters, and exports that. The wrapped module itself cannot be exported: its
    parameters are sharded over the ranks, and its layers are FSDP units.

    Args:
        dirname: sub-directory of the run's log directory.
        merge_lora: merge LoRA adapters into the base weights and save a plain model.
    """

    def __init__(self, dirname: str = "hf_model", merge_lora: bool = False) -> None:
        self.dirname, self.merge_lora = dirname, merge_lora

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # at start-up, not after training: the export is the last thing fit does
        if stage == "fit" and not callable(getattr(pl_module, "save_pretrained", None)):
            raise TypeError(
                f"ExportPretrained: {type(pl_module).__name__} has no save_pretrained(directory) "
                "method to export; remove the callback from trainer.callbacks"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if skipped_in_fast_dev_run(trainer, f"the {self.dirname} export"):
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            # a collective: every rank takes part
            on_gpu = trainer.strategy.root_device.type != "cpu"
            state = gather_full_state_dict(trainer.strategy.model, offload_to_cpu=on_gpu)
            try:
                if trainer.is_global_zero:
                    self._export(trainer, unwrapped_twin(pl_module, state))
            finally:  # a failing export must not leave the other ranks in the barrier
                trainer.strategy.barrier("ExportPretrained")
        elif trainer.is_global_zero:
            self._export(trainer, pl_module)

    def _export(self, trainer: L.Trainer, module: Any) -> None:
        out = module.save_pretrained(log_dir_of(trainer) / self.dirname, merge_lora=self.merge_lora)
        rank_zero_info(f"exported Hugging Face model to {out}")
        bad = non_finite_trainable(module)
        if bad:
            rank_zero_warn(
                f"ExportPretrained: {out} holds non-finite weights ({bad[0][1]} entries of "
                f"{bad[0][0]}{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}): "
                "the run diverged; an earlier checkpoint may still be good"
            )


def non_finite_trainable(module: torch.nn.Module) -> list[tuple[str, int]]:
    """``(name, count)`` of every trainable parameter with NaN or infinite entries."""
    return [
        (name, int((~torch.isfinite(p)).sum()))
        for name, p in module.named_parameters()
        if p.requires_grad and not bool(torch.isfinite(p).all())
    ]


def non_finite_on_any_rank(trainer: L.Trainer, module: torch.nn.Module) -> bool:
    """Whether any rank's trainable weights hold NaN or inf (a diverged run). Collective when
    several processes run: every rank must call it at the same point (FSDP shards differ)."""
    local = bool(non_finite_trainable(module))
    if trainer.world_size == 1:
        return local
    return bool(trainer.strategy.reduce_boolean_decision(local, all=False))


def gather_full_state_dict(
    fsdp_root: torch.nn.Module, offload_to_cpu: bool
) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP-wrapped module on rank 0 (empty on the other ranks),
    moved to CPU memory with ``offload_to_cpu``; every rank must call it.

    ``offload_to_cpu`` is for GPU runs only: with CPU shards it crashes the process (SIGSEGV,
    torch 2.13 FSDP on gloo)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config = FullStateDictConfig(offload_to_cpu=offload_to_cpu, rank0_only=True)
    with FSDP.state_dict_type(fsdp_root, StateDictType.FULL_STATE_DICT, config):
        return fsdp_root.state_dict()


def unwrapped_twin(pl_module: L.LightningModule, state: dict[str, torch.Tensor]) -> Any:
    """A new instance of the module's class, built from its hyperparameters on the CPU, holding
    ``state``. The global random stream is left as it was (a random-init base draws from it
    before its weights are overwritten)."""
    with torch.random.fork_rng(devices=[]):
        # LightningCLI adds private keys (``_class_path``, ``_instantiator``) to the hparams
        init_args = {k: v for k, v in pl_module.hparams.items() if not k.startswith("_")}
        twin = type(pl_module)(**init_args)
    twin.load_state_dict(state)
    return twin.eval()
