"""A small LoRA classifier: frozen random feature layer + peft LoRA adapter + trainable head.

``x -> ReLU((W0 + s B A) x) -> C`` with ``W0`` frozen (``hidden_size x in_features``), LoRA
``B A`` of rank ``r`` (``A`` random, ``B`` zero, ``s = alpha / r``) through ``peft``, and a
trainable linear head ``C``. This is the HyperINF spec's V2 model: the influence of every
training example is computed on the LoRA ``A``/``B`` and head gradients, as the official mislabel
path does for RoBERTa (LoRA + classifier ``out_proj``), at a size that trains in seconds on CPU.

It exposes ``per_sample_loss(batch) -> Tensor[B]``, the contract of
``callbacks.hyperinf.HyperINFCallback``.

Validation/test loss and accuracy are means over the examples, exact under DDP
(:class:`ScoredEvalMetrics`).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from modules.precision import refuse_fp16_training, warn_bf16_weights_training
from modules.weighted_mean import update_weighted, weighted_mean
from ops.seeding import seeded_cpu_init


class ScoredEvalMetrics:
    """Validation/test cross-entropy and accuracy as example means over all ranks.

    A mixin of a ``LightningModule``: call :meth:`init_eval_metrics` in ``__init__`` and
    :meth:`log_eval` from the validation/test steps. A batch may carry a boolean ``scored`` row
    mask (the padding rows of ``EvenEvalSampler`` shards are ``False``); only scored rows count.
    Each batch adds its mean over scored rows with weight = their number to a ``MeanMetric``,
    whose sums are all-reduced at epoch end: the result is the mean over every scored example,
    whatever the number of processes. In one process this is exactly what
    ``self.log(..., batch_size=B)`` of the batch means gave. A batch of padding only adds
    nothing (weight 0), but still updates, so every rank logs and syncs the same metrics.
    """

    def init_eval_metrics(self) -> None:
        self.val_loss, self.val_acc = weighted_mean(), weighted_mean()
        self.test_loss, self.test_acc = weighted_mean(), weighted_mean()

    def log_eval(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], stage: str) -> None:
        y = batch["y"]
        scored = batch.get("scored")
        if scored is None:
            scored = torch.ones_like(y, dtype=torch.bool)
        n = scored.sum()
        dtype = torch.promote_types(torch.get_default_dtype(), logits.dtype)
        if n > 0:  # indexing with an all-True mask keeps the unsharded values bit for bit
            logits, y = logits[scored], y[scored]
            loss = F.cross_entropy(logits, y).detach()
            acc = (logits.argmax(-1) == y).to(dtype).mean()
        else:  # padding only: no NaN mean, and weight 0 adds nothing
            loss = acc = logits.new_zeros((), dtype=dtype)
        loss_metric, acc_metric = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        update_weighted(loss_metric, loss, n)
        update_weighted(acc_metric, acc, n)
        self.log(f"{stage}/loss", loss_metric, prog_bar=True)
        self.log(f"{stage}/acc", acc_metric, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        # States left by an earlier ``trainer.validate`` are inference tensors; fit's validation
        # runs under no_grad and could not update them in place.
        self.val_loss.reset()
        self.val_acc.reset()

    def on_test_epoch_start(self) -> None:
        self.test_loss.reset()
        self.test_acc.reset()


def check_class_count(module: str, num_classes: int, datamodule: object) -> None:
    """Refuse a head with fewer outputs than the data has classes: the first batch with a label
    past the head failed with a bare "index 1 is out of bounds" (CPU) or a device assert (CUDA)."""
    data_classes = getattr(datamodule, "num_classes", None)
    if isinstance(data_classes, int) and num_classes < data_classes:
        raise ValueError(
            f"{module} num_classes={num_classes} (model.init_args.num_classes) but the data has "
            f"{data_classes} classes: the head needs one output per class"
        )


class FrozenFeatures(nn.Module):
    """``x -> ReLU(hidden(x))``; ``hidden`` is the layer peft adapts."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.hidden(x))


class LoRAClassifier(ScoredEvalMetrics, L.LightningModule):
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
        with seeded_cpu_init(init_seed):
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
        self.lr, self.weight_decay = lr, weight_decay
        self.init_eval_metrics()

    def setup(self, stage: str) -> None:
        refuse_fp16_training(self.trainer, type(self).__name__, stage, self)
        warn_bf16_weights_training(self.trainer, type(self).__name__, stage)
        check_class_count(type(self).__name__, self.hparams.num_classes, self.trainer.datamodule)
        features = getattr(self.trainer.datamodule, "input_dim", None)
        if isinstance(features, int) and features != self.hparams.in_features:
            raise ValueError(
                f"LoRAClassifier in_features={self.hparams.in_features} but the data has "
                f"{features} input features (data.init_args.d_in; 64 for source: digits)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of every example, shape ``(B,)`` (used for per-sample gradients)."""
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["x"])
        loss = F.cross_entropy(logits, batch["y"])
        acc = (logits.argmax(-1) == batch["y"]).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["y"].numel())
        self.log("train/acc", acc, prog_bar=True, batch_size=batch["y"].numel())
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log_eval(self(batch["x"]), batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log_eval(self(batch["x"]), batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
