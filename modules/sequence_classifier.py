"""A small LoRA classifier: frozen random feature layer + peft LoRA adapter + trainable head.

``x -> ReLU((W0 + s B A) x) -> C`` with ``W0`` frozen (``hidden_size x in_features``), LoRA
``B A`` of rank ``r`` (``A`` random, ``B`` zero, ``s = alpha / r``) through ``peft``, and a
trainable linear head ``C``. This is the HyperINF spec's V2 model: the influence of every
training example is computed on the LoRA ``A``/``B`` and head gradients, as the official mislabel
path does for RoBERTa (LoRA + classifier ``out_proj``), at a size that trains in seconds on CPU.

It exposes ``per_sample_loss(batch) -> Tensor[B]``, the contract of
``callbacks.hyperinf.HyperINFCallback``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn


class FrozenFeatures(nn.Module):
    """``x -> ReLU(hidden(x))``; ``hidden`` is the layer peft adapts."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.hidden(x))


class LoRAClassifier(L.LightningModule):
    """Classifier with a peft LoRA adapter on a frozen random layer and a trainable head.

    Args:
        in_features: input dimension.
        hidden_size: width of the frozen layer ``W0``.
        num_classes: number of classes.
        lora_r: LoRA rank ``r``.
        lora_alpha: LoRA ``alpha`` (scaling ``alpha / r``; ``alpha = r`` gives ``W0 + B A``).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        init_seed: seed of ``W0``, ``A`` and the head (independent of the global seed if set).
    """

    def __init__(
        self,
        in_features: int = 32,
        hidden_size: int = 128,
        num_classes: int = 2,
        lora_r: int = 4,
        lora_alpha: float = 4.0,
        use_rslora: bool = False,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        init_seed: int | None = None,
    ):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.save_hyperparameters()
        if init_seed is not None:
            state = torch.random.get_rng_state()
            torch.manual_seed(init_seed)
        base = FrozenFeatures(in_features, hidden_size)
        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=0.0,
            target_modules=["hidden"],
            use_rslora=use_rslora,
        )
        self.features = get_peft_model(base, config)
        self.head = nn.Linear(hidden_size, num_classes, bias=False)
        if init_seed is not None:
            torch.random.set_rng_state(state)
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of every example, shape ``(B,)`` (used for per-sample gradients)."""
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["x"])
        loss = F.cross_entropy(logits, batch["y"])
        acc = (logits.argmax(-1) == batch["y"]).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch["y"].numel())
        self.log(f"{stage}/acc", acc, prog_bar=True, batch_size=batch["y"].numel())
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
