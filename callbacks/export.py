"""Export the trained model (or LoRA adapter) in Hugging Face format at the end of training."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from callbacks.metrics_file import log_dir_of


class ExportPretrained(L.Callback):
    """Call the module's ``save_pretrained`` into ``<log_dir>/<dirname>`` when fit ends.

    The output loads with ``AutoModelForCausalLM.from_pretrained`` (full model) or
    ``peft.PeftModel.from_pretrained`` (adapter only).

    Args:
        dirname: sub-directory of the run's log directory.
        merge_lora: merge LoRA adapters into the base weights and save a plain model.
    """

    def __init__(self, dirname: str = "hf_model", merge_lora: bool = False) -> None:
        self.dirname, self.merge_lora = dirname, merge_lora

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        save = getattr(pl_module, "save_pretrained", None)
        if save is None:
            raise TypeError(
                f"{type(pl_module).__name__} has no save_pretrained(directory) method to export"
            )
        out = save(log_dir_of(trainer) / self.dirname, merge_lora=self.merge_lora)
        rank_zero_info(f"exported Hugging Face model to {out}")
