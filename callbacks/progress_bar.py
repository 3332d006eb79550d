"""The progress bar of ``mlo`` runs: Lightning's rich bar, readable for step-driven runs."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class RunProgressBar(RichProgressBar):
    """``RichProgressBar`` with two display fixes (the numbers it tracks are Lightning's).

    - A run bounded by ``max_steps`` has ``max_epochs = -1`` (no epoch limit); Lightning's bar
      then read "Epoch 0/-2". It reads "Epoch 0" (fixed upstream after Lightning 2.6).
    - The logger version showed as a float, "v_num: 0.000"; it shows as "v_num: 0".
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        # padded like Lightning's, so the bar does not jump between training and validation
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if "v_num" in items:
            items["v_num"] = str(items["v_num"])
        return items
