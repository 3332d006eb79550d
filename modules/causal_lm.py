"""The shared causal-LM LightningModule: a Hugging Face model, optional LoRA, LM loss, perplexity.

The model comes from a preset, a config dict, a local directory or a hub id
(``modules.hf_models.build_causal_lm``); LoRA goes through ``peft``. Optimizer and LR schedule
are chosen in YAML (LightningCLI ``OptimizerCallable`` / ``LRSchedulerCallable``) and the
schedule is stepped once per optimizer step.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import PreTrainedModel

from datamodules.text import load_tokenizer
from modules.hf_models import (
    build_causal_lm,
    is_pretrained_name,
    max_positions,
    own_tokenizer_dir,
    special_token_ids,
)
from modules.precision import refuse_fp16_training, warn_bf16_weights_training
from modules.token_perplexity import TokenPerplexity
from modules.trainable_checkpoint import TRAINABLE_ONLY, check_trainable_only, keep_trainable_only
from modules.weighted_mean import update_weighted, weighted_mean
from optim.schedules import fill_total_steps
from strategies.fsdp import refuse_generation_under_sharded_fsdp


@dataclass
class LoraSettings:
    """LoRA adapter settings (``peft.LoraConfig``).

    Args:
        r: adapter rank.
        alpha: scaling numerator: the update is ``alpha / r * B A`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``"all-linear"``.
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False


@dataclass
class GenerationSettings:
    """Decoding settings for ``predict_step``.

    Args:
        max_new_tokens: tokens generated after each prompt.
        do_sample: sample instead of greedy decoding.
        temperature: softmax temperature when sampling.
        top_k: keep the k most likely tokens when sampling (``None``: all).
        top_p: nucleus sampling mass (``None``: off).
        chat_template: wrap each prompt as a user turn with the tokenizer's chat template
            (instruction-tuned models such as ``smollm2-135m-instruct``).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    chat_template: bool = False


# Checkpoints store these settings among the hyperparameters; allow them in weights-only loads.
torch.serialization.add_safe_globals([LoraSettings, GenerationSettings])


@torch.no_grad()
def generate_completion(
    model: PreTrainedModel, tokenizer: Any, prompt: str, settings: GenerationSettings
) -> str:
    """Decode a continuation of ``prompt`` (new tokens only) with the given settings."""
    if settings.chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    ids = ids.to(next(model.parameters()).device)
    sampling = (
        {"temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p}
        if settings.do_sample
        else {}
    )
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> PreTrainedModel:
    """Wrap ``model`` in a ``peft`` LoRA model; only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_rslora=settings.use_rslora,
        task_type="CAUSAL_LM",
    )
    check_lora_targets(model, settings.target_modules)
    return get_peft_model(model, config)


def check_lora_targets(model: nn.Module, target_modules: list[str] | str) -> None:
    """Name the model's adaptable layers when a target matches none (peft's message lists only
    the missing names, and the CLI buries it under a type-validation error)."""
    if isinstance(target_modules, str):  # "all-linear" or a regex: peft resolves it
        return
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Linear | Conv1D)]
    # peft's rule for a list: a module matches a target equal to its name or a suffix of it
    missing = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} name no linear layer of this model; its layers: "
            f"{sorted({n.rsplit('.', 1)[-1] for n in names})} (or use target_modules: all-linear)"
        )


def _reject_rotating_conv1d(model: torch.nn.Module, optimizer: Any) -> None:
    """LionAR treats rows of dim 0 as neurons; GPT-2's ``Conv1D`` stores its weight (in, out)."""
    from transformers.pytorch_utils import Conv1D

    conv = {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
    for group in getattr(optimizer, "param_groups", []):
        if group.get("rotational") and any(id(p) in conv for p in group["params"]):
            raise ValueError(
                "LionAR would rotate GPT-2 Conv1D weights, whose rows are input features, not "
                "neurons: use a Llama-style preset, convert the layers with "
                "modules.hf_models.conv1d_to_linear, or set rotational: none"
            )


DEFAULT_TOKENIZER = "data/tokenizer"


def resolve_tokenizer_name(model: str | dict[str, Any], tokenizer: str | None) -> str:
    """The tokenizer to load: the given one, else the pretrained model's own, else the project's.

    An explicit tokenizer for a pretrained model that ships its own must have the same
    vocabulary: ids from another vocabulary would train silently on the wrong embeddings.
    """
    own = own_tokenizer_dir(model)
    if tokenizer is None:
        if own is not None:
            return str(own)
        local = isinstance(model, str) and Path(model).expanduser().exists()
        return model if is_pretrained_name(model) and not local else DEFAULT_TOKENIZER
    if (
        own is not None
        and load_tokenizer(tokenizer).get_vocab() != load_tokenizer(str(own)).get_vocab()
    ):
        raise ValueError(
            f"tokenizer={tokenizer!r} has a different vocabulary from the one model={model!r} "
            f"ships in {own}: leave model.tokenizer unset to use the model's own"
        )
    return tokenizer


def check_data_tokenizer(datamodule: Any, tokenizer: Any) -> None:
    """Refuse a datamodule whose tokenizer has another vocabulary than the model's: the model
    would read ids of another vocabulary, silently."""
    data_tokenizer = getattr(datamodule, "tokenizer", None)
    if data_tokenizer is not None and data_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"data.tokenizer ({len(data_tokenizer)} tokens, {data_tokenizer.name_or_path!r}) "
            f"differs from model.tokenizer ({len(tokenizer)} tokens, "
            f"{tokenizer.name_or_path!r}): the model would read ids of another "
            "vocabulary; use the same tokenizer for model and data"
        )


def _takes_weight_decay(name: str, ndim: int) -> bool:
    # Matrices decay; norm gains, biases and embeddings (Llama ``embed_tokens``, GPT-2 ``wte``/
    # ``wpe``) do not, as in GPT-2/Llama training recipes.
    return ndim >= 2 and not any(key in name for key in ("embed", "wte", "wpe"))


_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter name without the segments that FSDP and activation-checkpoint wrappers add."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


class CausalLMModule(L.LightningModule):
    """Next-token prediction with a Hugging Face causal LM.

    Args:
        model: preset name (``tiny-llama``, ``tiny-gpt2``, ...), config dict with ``model_type``,
            local directory or hub id.
        tokenizer: tokenizer directory, preset or hub id; gives the vocabulary size (and the
            BOS/EOS/PAD ids) of models built from a config and decodes generations. ``None``: the
            pretrained model's own tokenizer, else the project's ``data/tokenizer``.
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``); ``None`` keeps float32.
        lora: LoRA settings; ``None`` trains all parameters.
        optimizer: optimizer class and arguments (``class_path`` in YAML).
        lr_scheduler: LR schedule, stepped per optimizer step (e.g.
            ``optim.schedules.WarmupCosine``); ``None`` keeps the LR constant.
        weight_decay_norms_and_biases: apply the optimizer's weight decay to norm gains, biases
            and embeddings too (off: they go in a group with ``weight_decay=0``).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        trainable_only_checkpoints: with LoRA on pretrained weights, checkpoints hold only the
            trainable (adapter) weights; the frozen base is reloaded from ``model``. A randomly
            initialized base (a preset or config dict) cannot be rebuilt identically under
            another seed, so its checkpoints are always full. Under FSDP they are full too
            (sharded): its loader needs every key.
        generation: decoding settings for ``mlo predict``.
    """

    def __init__(
        self,
        model: str | dict[str, Any] = "tiny-llama",
        tokenizer: str | None = None,
        dtype: str | None = None,
        lora: LoraSettings | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        weight_decay_norms_and_biases: bool = False,
        gradient_checkpointing: bool = False,
        trainable_only_checkpoints: bool = True,
        generation: GenerationSettings | None = None,
    ) -> None:
        super().__init__()
        # Decoding settings are run-time choices: kept out of the checkpoint, whose hyperparameters
        # LightningCLI would otherwise let override the predict config.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "generation"])
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.generation = generation or GenerationSettings()
        tokenizer = resolve_tokenizer_name(model, tokenizer)
        self.tokenizer = load_tokenizer(tokenizer, setting="model.tokenizer")
        self.base_is_pretrained = is_pretrained_name(model)
        vocab_size = None if self.base_is_pretrained else len(self.tokenizer)
        special_ids = special_token_ids(self.tokenizer)
        net = build_causal_lm(model, vocab_size=vocab_size, dtype=dtype, special_ids=special_ids)
        embedding_rows = net.get_input_embeddings().num_embeddings
        if len(self.tokenizer) > embedding_rows:
            raise ValueError(
                f"tokenizer {tokenizer!r} has {len(self.tokenizer)} tokens but model {model!r} "
                f"embeds only {embedding_rows}: use the model's own tokenizer"
            )
        net.train()  # from_pretrained returns eval mode; Lightning switches modes per stage
        if gradient_checkpointing:
            net.gradient_checkpointing_enable()
        # LightningCLI records dataclass arguments as plain dicts in hparams; keep the dataclass.
        self.lora_settings = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.model = apply_lora(net, self.lora_settings) if lora is not None else net
        self.uses_lora = lora is not None
        # Shapes as built: FSDP (use_orig_params) turns every weight into a 1-D view of its
        # shard before configure_optimizers runs, which would put every matrix in no_decay.
        self._built_ndims = {n: p.ndim for n, p in self.named_parameters()}
        adapter_only = self.uses_lora and trainable_only_checkpoints and self.base_is_pretrained
        self.strict_loading = not adapter_only
        self.val_ppl, self.test_ppl = TokenPerplexity(), TokenPerplexity()
        # Token-weighted means: reduced as sums over ranks, so batches and ranks holding
        # different numbers of tokens weigh what they hold (a mean of rank means would not).
        self.val_loss, self.test_loss = weighted_mean(), weighted_mean()

    # ----------------------------------------------------------------- set-up checks
    def setup(self, stage: str) -> None:
        refuse_fp16_training(self.trainer, type(self).__name__, stage, self)
        warn_bf16_weights_training(self.trainer, type(self).__name__, stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        block_size = getattr(datamodule, "block_size", None)
        limit = max_positions(self.model.config)
        if block_size is not None and limit is not None and block_size > limit:
            raise ValueError(
                f"data.block_size={block_size} exceeds the model's maximum positions ({limit}): "
                "lower data.block_size or raise the model's max_position_embeddings"
            )
        check_data_tokenizer(datamodule, self.tokenizer)

    # ----------------------------------------------------------------- steps
    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, **kwargs)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch (callbacks such as diagnostics reuse it)."""
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        out = self.model(input_ids=batch["input_ids"], labels=batch["labels"])
        targets = batch["labels"][:, 1:]
        # Perplexity over the same shifted targets as the loss: logits at t predict token t+1.
        ppl, loss = getattr(self, f"{stage}_ppl"), getattr(self, f"{stage}_loss")
        ppl.update(out.logits, batch["labels"])
        tokens = (targets != -100).sum()
        # A batch of padding blocks only (sharded eval) has a NaN mean loss: it enters with
        # weight 0 as a 0 (torch.where, not an `if`, which would sync the GPU every batch).
        update_weighted(loss, torch.where(tokens > 0, out.loss.detach(), 0.0), tokens)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/ppl", ppl, prog_bar=stage == "val")

    def on_validation_epoch_start(self) -> None:
        # States left by an earlier ``trainer.validate`` are inference tensors; fit's validation
        # runs under no_grad and could not update them in place.
        self.val_ppl.reset()
        self.val_loss.reset()

    def on_test_epoch_start(self) -> None:
        self.test_ppl.reset()
        self.test_loss.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_predict_start(self) -> None:
        refuse_generation_under_sharded_fsdp(self.trainer)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, list[str]], batch_idx: int) -> list[dict[str, str]]:
        return [
            {
                "prompt": p,
                "completion": generate_completion(self.model, self.tokenizer, p, self.generation),
            }
            for p in batch["prompts"]
        ]

    # ----------------------------------------------------------------- optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters, split so weight decay skips 1-D tensors and embeddings.

        Groups carry ``param_names`` (``torch.optim`` keeps them), which optimizers that select
        tensors by name need, e.g. ``LionAR(rotational="blocks")``, and a ``name`` that
        ``LearningRateMonitor`` logs them by (``lr-AdamW/decay``, ``lr-AdamW/no_decay``).
        """
        trainable = [(unwrapped_name(n), p) for n, p in self.named_parameters() if p.requires_grad]
        if self.hparams.weight_decay_norms_and_biases:
            split = [(trainable, {})]
        else:
            decays = {
                n: _takes_weight_decay(n, self._built_ndims.get(n, p.ndim)) for n, p in trainable
            }
            decay = [(n, p) for n, p in trainable if decays[n]]
            no_decay = [(n, p) for n, p in trainable if not decays[n]]
            split = [(decay, {"name": "decay"})]
            split += [(no_decay, {"name": "no_decay", "weight_decay": 0.0})] if no_decay else []
        return [
            {"params": [p for _, p in named], "param_names": [n for n, _ in named], **extra}
            for named, extra in split
        ]

    def on_train_start(self) -> None:
        # LionAR: center the rotational neurons once, explicitly, before the first forward
        # (warmup spec §3.3; idempotent, so a resumed run is left alone).
        for opt in self.trainer.optimizers:
            center = getattr(opt, "center_rotational_weights", None)
            if callable(center):
                center()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameter_groups())
        _reject_rotating_conv1d(self.model, optimizer)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        fill_total_steps(scheduler, self.trainer.estimated_stepping_batches)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ----------------------------------------------------------------- checkpoints & export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.strict_loading:
            return
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            # FSDP's sharded loader reads every key of the model's state dict: an adapter-only
            # checkpoint could not be resumed. Each rank writes only its shard of the base.
            return
        keep_trainable_only(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not checkpoint.get(TRAINABLE_ONLY):
            return
        if "state_dict" not in checkpoint:
            # FSDP loads the weights before this hook and takes them out of the checkpoint;
            # strict_loading is off for adapter-only modules, so the base stays as built.
            return
        check_trainable_only(self, checkpoint, f"model {self.hparams.model!r}")
        if not self.base_is_pretrained:
            # Written before random-init bases were checkpointed in full: the base exists only
            # as whatever the current seed rebuilt, which is the saved one only if seeds match.
            rank_zero_warn(
                f"adapter-only checkpoint of the randomly initialized base {self.hparams.model!r}: "
                "its base weights were never saved, so the base is the one rebuilt from the "
                "current seed (identical only under the seed of the original run)"
            )
            for key, value in self.state_dict().items():  # the re-seeded base, loaded strictly
                checkpoint["state_dict"].setdefault(key, value)

    def base_model_copy(self) -> PreTrainedModel:
        """A separate copy of the frozen base model without adapters (the LoRA model is untouched)."""
        return copy.deepcopy(self.model).unload()  # peft: remove the adapters without merging

    def save_pretrained(self, directory: str | Path, merge_lora: bool = False) -> Path:
        """Write the model (or only its LoRA adapter) and tokenizer in Hugging Face format.

        ``transformers.AutoModelForCausalLM.from_pretrained`` (full model) or
        ``peft.PeftModel.from_pretrained`` (adapter) load the result directly. An adapter of a
        randomly initialized base also gets that base in ``<directory>/base`` (nothing else could
        rebuild it), and the adapter config points at it. ``merge_lora`` merges the adapters
        into a copy of the weights and saves a plain model; the module keeps its adapters.
        """
        directory = Path(directory)
        model = self.model
        if self.uses_lora and merge_lora:
            # Merge a copy: peft merges in place and removes the adapters, which would leave the
            # module unable to load its own checkpoints (``trainer.test(ckpt_path="best")``
            # after a fit that exported with ``ExportPretrained(merge_lora=True)``) or to write
            # loadable ones.
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        adapter_only = self.uses_lora and not merge_lora
        base_dir = None
        if adapter_only and not self.base_is_pretrained:
            base_dir = directory / "base"
            self.base_model_copy().save_pretrained(base_dir)
            self.tokenizer.save_pretrained(base_dir)
            config_path = directory / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text())
            adapter_config["base_model_name_or_path"] = str(base_dir.resolve())
            config_path.write_text(json.dumps(adapter_config, indent=2))
        provenance = {
            "source_model": self.hparams.model,
            "lora_adapter_only": adapter_only,
            "lora": asdict(self.lora_settings) if self.lora_settings else None,
            "base_model_dir": base_dir.name if base_dir else None,
        }
        (directory / "mlo_export.json").write_text(json.dumps(provenance, indent=2, default=str))
        return directory
