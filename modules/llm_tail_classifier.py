"""Sequence classification with LoRA on the last decoder layers of a pretrained causal LM.

The HyperINF mislabel experiment (paper section 5.1) fine-tunes LoRA adapters plus a classifier
head of a pretrained transformer and scores training examples on those gradients. Here the
pretrained model is a Llama-architecture causal LM (e.g. the ``smollm2-135m-instruct`` preset).
Only the last ``tail_layers`` decoder layers carry LoRA adapters (``q_proj``/``v_proj`` by
default); every earlier layer is frozen, so its output is a fixed function of the input and is
computed once by :func:`prefix_hidden_states` (``datamodules.text_classification`` does this).
The module then runs ``tail layers -> final RMSNorm -> hidden state of the last real token ->
linear head``. Gradients (training and per-sample influence) touch only the tail: exact, and ~30x
cheaper than running the whole 30-layer model for each step.

Sequences are right-padded and attention is causal, so padding never reaches a real token and the
pooled last-token state equals the unpadded one.

It exposes ``per_sample_loss(batch) -> Tensor[B]``, the contract of
``callbacks.hyperinf.HyperINFCallback``. Validation/test loss and accuracy are means over the
examples, exact under DDP (``modules.sequence_classifier.ScoredEvalMetrics``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from modules.precision import refuse_fp16_training, warn_bf16_weights_training
from modules.sequence_classifier import ScoredEvalMetrics, check_class_count
from ops.seeding import seeded_cpu_init


def llama_style_decoder(net: nn.Module, model: str) -> nn.Module:
    """``net.model``, checked for what the tail runs: ``layers``, a final ``norm`` and the
    shared ``rotary_emb`` (Llama, Mistral, Qwen2, Gemma, Phi-3 ... have them; GPT-2 has not)."""
    decoder = getattr(net, "model", None)
    missing = [a for a in ("layers", "norm", "rotary_emb") if not hasattr(decoder, a)]
    if decoder is None or missing:
        model_type = getattr(getattr(net, "config", None), "model_type", None)
        raise ValueError(
            f"{model!r} (model_type {model_type!r}) is not a Llama-style decoder: the tail "
            f"classifier needs model.layers, model.norm and model.rotary_emb (missing: "
            f"{', '.join(missing) or 'model'})"
        )
    return decoder


@torch.no_grad()
def prefix_hidden_states(
    model: str, input_ids: torch.Tensor, tail_layers: int, batch_size: int = 32
) -> torch.Tensor:
    """Input of decoder layer ``num_layers - tail_layers`` for right-padded ``input_ids``.

    ``hidden_states[i]`` of a Hugging Face decoder is the input of layer ``i`` (index 0: the
    embeddings), so this is the state the trainable tail starts from.
    """
    from modules.hf_models import build_causal_lm

    net = build_causal_lm(model, dtype="float32").eval()
    decoder = llama_style_decoder(net, model)
    num_layers = net.config.num_hidden_layers
    if not 1 <= tail_layers <= num_layers:
        raise ValueError(f"tail_layers={tail_layers} must be in 1..{num_layers} for {model!r}")
    out = []
    for chunk in input_ids.split(batch_size):
        states = decoder(input_ids=chunk, output_hidden_states=True).hidden_states
        out.append(states[num_layers - tail_layers].float())
    return torch.cat(out)


def check_prefix_matches_tail(model_hparams: Any, datamodule: Any) -> None:
    """The data's precomputed hidden states must be the input of this module's tail.

    A datamodule with a ``frozen_prefix_model`` ran that model's first ``n - tail_layers``
    layers; a different ``tail_layers`` here would feed them to the wrong layers, silently.
    A differently named prefix model may be the same one spelled otherwise: warned, not refused.
    """
    data = getattr(datamodule, "hparams", None) or {}
    if data.get("frozen_prefix_model") is None:
        return
    if data.get("tail_layers") != model_hparams.tail_layers:
        raise ValueError(
            f"data.tail_layers={data.get('tail_layers')} but model.tail_layers="
            f"{model_hparams.tail_layers}: the data holds the input of the last "
            f"{data.get('tail_layers')} decoder layers; set both to the same value"
        )
    if str(data["frozen_prefix_model"]) != str(model_hparams.model):
        rank_zero_warn(
            f"data.frozen_prefix_model={data['frozen_prefix_model']!r} and model.model="
            f"{model_hparams.model!r} differ: the tail must continue the same model's layers"
        )


class _Tail(nn.Module):
    """The last decoder layers (``layers``), the object peft adapts."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class LoRATailClassifier(ScoredEvalMetrics, L.LightningModule):
    """LoRA on the last decoder layers of a pretrained causal LM, plus a linear head.

    Args:
        model: pretrained causal LM (preset name such as ``smollm2-135m-instruct``, directory).
        tail_layers: decoder layers kept (with LoRA); earlier layers are frozen and precomputed.
        num_classes: number of classes.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scaling ``alpha / r``).
        target_modules: linear layers of each tail layer that get adapters.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        init_seed: seed of the LoRA ``A`` matrices and the head (independent of the global seed).
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        tail_layers: int = 1,
        num_classes: int = 2,
        lora_r: int = 4,
        lora_alpha: float = 8.0,
        target_modules: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        init_seed: int | None = None,
    ):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        from modules.hf_models import build_causal_lm

        self.save_hyperparameters()
        net = build_causal_lm(model, dtype="float32", attn_implementation="eager")
        decoder = llama_style_decoder(net, model)
        if not 1 <= tail_layers <= net.config.num_hidden_layers:
            raise ValueError(f"tail_layers={tail_layers} out of range for {model!r}")
        with seeded_cpu_init(init_seed):
            config = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=0.0,
                target_modules=list(target_modules or ["q_proj", "v_proj"]),
            )
            self.tail = get_peft_model(_Tail(list(decoder.layers[-tail_layers:])), config)
            self.head = nn.Linear(net.config.hidden_size, num_classes, bias=False)
        self.norm, self.rotary = decoder.norm, decoder.rotary_emb
        self.norm.requires_grad_(False)
        del net
        self.train()  # from_pretrained returns eval mode (Lightning warned at every fit)
        self.init_eval_metrics()

    def forward(self, hidden: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        seq = hidden.shape[1]
        position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        position_embeddings = self.rotary(hidden, position_ids)
        # Additive causal mask, explicit so that eager attention (vmap-friendly) is causal too.
        blocked = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).triu(1)
        mask = torch.zeros(seq, seq, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(blocked, torch.finfo(hidden.dtype).min)[None, None]
        for layer in self.tail.base_model.model.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = self.norm(hidden)
        # hidden state of the last real token; one-hot product instead of indexing (vmap-safe)
        pick = (position_ids == (length - 1).unsqueeze(-1)).to(hidden.dtype)
        pooled = (hidden * pick.unsqueeze(-1)).sum(1)
        return self.head(pooled)

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of every example, shape ``(B,)`` (used for per-sample gradients)."""
        logits = self(batch["hidden"], batch["length"])
        return F.cross_entropy(logits, batch["y"], reduction="none")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["hidden"], batch["length"])
        loss = F.cross_entropy(logits, batch["y"])
        acc = (logits.argmax(-1) == batch["y"]).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["y"].numel())
        self.log("train/acc", acc, prog_bar=True, batch_size=batch["y"].numel())
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log_eval(self(batch["hidden"], batch["length"]), batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log_eval(self(batch["hidden"], batch["length"]), batch, "test")

    def setup(self, stage: str) -> None:
        refuse_fp16_training(self.trainer, type(self).__name__, stage, self)
        warn_bf16_weights_training(self.trainer, type(self).__name__, stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        check_prefix_matches_tail(self.hparams, datamodule)
        check_class_count(type(self).__name__, self.hparams.num_classes, datamodule)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
