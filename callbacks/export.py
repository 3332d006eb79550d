"""Export the trained model (or LoRA adapter) in Hugging Face format at the end of training."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from callbacks.metrics_file import log_dir_of


class ExportPretrained(L.Callback):
    """Call the module's ``save_pretrained`` into ``<log_dir>/<dirname>`` when fit ends.

    The output loads with ``AutoModelForCausalLM.from_pretrained`` (full model) or
    ``peft.PeftModel.from_pretrained`` (adapter only).

    Under multi-process FSDP the export is skipped with a warning: the parameters are sharded
    over the ranks, and one rank reading them would hang on the gather or write shards. Export
    from the checkpoint instead (consolidate a sharded one with
    ``python -m lightning.pytorch.utilities.consolidate_checkpoint <dir>``, then
    ``Module.load_from_checkpoint(path).save_pretrained(out)`` in one process).

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

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        save = pl_module.save_pretrained
        if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
            rank_zero_warn(
                "ExportPretrained skipped: under multi-process FSDP the parameters are sharded "
                "over the ranks. Export from the checkpoint in one process (see "
                "callbacks.export.ExportPretrained)"
            )
            return
        out = save(log_dir_of(trainer) / self.dirname, merge_lora=self.merge_lora)
        rank_zero_info(f"exported Hugging Face model to {out}")
