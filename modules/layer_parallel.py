"""Layer parallelism as a LightningModule: evaluate, generate and (optionally) fine-tune LP models.

* ``mlo test`` / ``mlo validate``: applies the plan to a trained or pretrained Hugging Face model
  and logs ``<stage>/ppl`` (LP), ``<stage>/ppl_seq`` (same weights, sequential) and
  ``<stage>/ppl_ratio``; ``mlo test`` also measures greedy decode tokens/s (LP vs sequential, batch
  ``decode_batch_size``) after the test loop.
* ``mlo predict``: greedy/sampled generation with the LP model (KV cache, one entry per layer).
* ``mlo fit`` (optional, spec 3.7, protocol reconstructed): trains only the attention, MLP and norm
  parameters of the paired layers, in reference mode, with next-token loss.

Spec: ``shared/methods/layer-parallel.md``; model surgery in ``modules/layer_parallel_model.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy

from datamodules.text import load_tokenizer
from modules.causal_lm import (
    GenerationSettings,
    check_data_tokenizer,
    generate_completion,
    resolve_tokenizer_name,
)
from modules.hf_models import build_causal_lm, is_pretrained_name, special_token_ids
from modules.layer_parallel_model import (
    MODES,
    LPState,
    apply_layer_parallelism,
    original_layers,
    sequential_layers,
    undo_layer_parallelism,
)
from modules.precision import refuse_fp16_training, warn_bf16_weights_training
from modules.token_perplexity import TokenPerplexity, next_token_nll
from modules.trainable_checkpoint import TRAINABLE_ONLY, check_trainable_only, keep_trainable_only
from ops.layer_parallel import LayerParallelPlan, ideal_speedup
from optim.schedules import fill_total_steps
from strategies.fsdp import refuse_generation_under_sharded_fsdp, refuse_under_sharded_fsdp


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Prefill ``prompt`` ``[B, T]`` then ``n_new`` one-token steps with the KV cache (greedy)."""
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    tokens = [token]
    cache = out.cache
    for _ in range(n_new - 1):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def decode_tokens_per_s(
    model: torch.nn.Module, prompt: torch.Tensor, n_new: int, warmup: int = 1, repeats: int = 3
) -> float:
    """Median generated tokens/s (batch x new tokens / wall time, prefill included) (spec 3.6)."""
    times = []
    for r in range(warmup + repeats):
        if prompt.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        greedy_decode(model, prompt, n_new)
        if prompt.device.type == "cuda":
            torch.cuda.synchronize()
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return prompt.shape[0] * n_new / statistics.median(times)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Token-level perplexity ``exp(mean NLL)`` of next-token prediction over ``windows`` ``[N, T]``."""
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        nll, tokens = next_token_nll(model(input_ids=chunk).logits, chunk)
        total, count = total + nll.item(), count + tokens.item()
    return float(torch.tensor(total / count).exp())


#: Constructor arguments that are evaluation choices, not part of the trained model.
RUN_TIME_SETTINGS = (
    "mode", "compare_sequential", "decode_new_tokens", "decode_prompt_len", "decode_batch_size",
    "decode_repeats", "generation",
)  # fmt: skip


def layer_parallel_model_card(info: dict[str, Any]) -> str:
    """The ``README.md`` of a layer-parallel export: what plain loading computes, and how to run
    the model as it was fine-tuned."""
    plan = json.dumps(info["plan"])
    return (
        "# Fine-tuned for layer-parallel inference\n\n"
        f"These weights were fine-tuned with the layer pairs {plan} run in parallel "
        f"(post_norm_mode: {info['post_norm_mode']}), as recorded in `layer_parallel.json` and "
        "`config.json` (`layer_parallel`).\n\n"
        "`AutoModelForCausalLM.from_pretrained` runs every layer one after the other: another "
        "function than the one fine-tuned. To run it as fine-tuned:\n\n"
        "```\nmlo test --config configs/layer_parallel/eval.yaml "
        f"--model.init_args.model=<this directory> --model.init_args.plan='{plan}'\n```\n"
    )


class LayerParallelModule(L.LightningModule):
    """Evaluate / generate with / fine-tune a Hugging Face Llama-family model under layer parallelism.

    Args:
        model: local Hugging Face directory (e.g. ``runs/quickstart/demo/hf_model``), hub id,
            preset name or config dict (random weights: for smoke tests only).
        tokenizer: tokenizer directory or hub id; ``None`` = the pretrained model's own (else
            the project's ``data/tokenizer``). It must have the data's vocabulary (checked).
        plan: layers to pair: ``{start: 2, end: 6}`` (pairs (2,3),(4,5)), a list of pairs
            ``[[2, 3], [4, 5]]`` or ``null`` (no LP, sequential model).
        mode: LP implementation for validate/test/predict: ``fused`` (folded norms, one wide
            matmul per pair) or ``reference`` (members computed explicitly). Training always
            uses ``reference``.
        post_norm_mode: how both MLPs normalise the shared ``h``: ``per_member`` (spec 3.1) or the
            code-faithful ``rank_mixed`` / ``averaged`` variants (official-code defect 1).
        compare_sequential: also evaluate the same weights without LP, logging ``ppl_seq`` and
            ``ppl_ratio`` (twice the evaluation cost).
        train_with_lp: in ``fit``, train the paired layers' parameters with LP applied (``True``)
            or, as the fine-tuning control of spec acceptance 7, the same parameters of the
            sequential model (``False``).
        decode_new_tokens: tokens generated per run of the decode throughput measurement after
            ``mlo test`` (0 disables it).
        decode_prompt_len: prompt length of the decode measurement (taken from the test data).
        decode_batch_size: prompts decoded together in the measurement.
        decode_repeats: timed runs (median reported) after one warm-up run.
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``); ``None`` keeps float32.
        trainable_only_checkpoints: with a pretrained ``model``, checkpoints hold only the
            fine-tuned paired layers (the frozen rest is rebuilt from ``model`` on load, and a
            changed ``model`` is refused); ``False``, or a random-init ``model``, saves all.
        optimizer: optimizer for ``fit`` (``class_path`` in YAML); spec 3.7: AdamW lr 1e-4, wd 0.
        lr_scheduler: LR schedule stepped per optimizer step (e.g. ``optim.schedules.WarmupCosine``).
        generation: decoding settings for ``mlo predict``.
    """

    def __init__(
        self,
        model: str | dict[str, Any],
        tokenizer: str | None = None,
        plan: dict[str, int] | list[list[int]] | None = None,
        mode: str = "fused",
        post_norm_mode: str = "per_member",
        compare_sequential: bool = True,
        train_with_lp: bool = True,
        decode_new_tokens: int = 64,
        decode_prompt_len: int = 32,
        decode_batch_size: int = 1,
        decode_repeats: int = 3,
        dtype: str | None = None,
        trainable_only_checkpoints: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        generation: GenerationSettings | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"LayerParallelModule mode={mode!r} is not one of {MODES}")
        decode = {
            "decode_new_tokens": (decode_new_tokens, 0),
            "decode_prompt_len": (decode_prompt_len, 1),
            "decode_batch_size": (decode_batch_size, 1),
            "decode_repeats": (decode_repeats, 1),
        }
        for key, (value, low) in decode.items():
            if value < low:
                raise ValueError(f"LayerParallelModule {key}={value} must be >= {low}")
        # Evaluation choices (LP implementation, baseline, decode measurement, decoding) are
        # run-time settings, kept out of the checkpoint: LightningCLI applies a checkpoint's
        # hyperparameters over the config, so a model fine-tuned with `mode: reference` was
        # tested in reference mode whatever `mlo test` asked for. The weights are the same in
        # both modes.
        self.mode, self.compare_sequential = mode, compare_sequential
        self.decode_new_tokens, self.decode_prompt_len = decode_new_tokens, decode_prompt_len
        self.decode_batch_size, self.decode_repeats = decode_batch_size, decode_repeats
        self.save_hyperparameters(ignore=[*RUN_TIME_SETTINGS, "optimizer", "lr_scheduler"])
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.generation = generation or GenerationSettings()
        self.tokenizer = load_tokenizer(resolve_tokenizer_name(model, tokenizer), "model.tokenizer")
        vocab = None if is_pretrained_name(model) else len(self.tokenizer)
        self.model = build_causal_lm(
            model, vocab_size=vocab, dtype=dtype, special_ids=special_token_ids(self.tokenizer)
        )
        self.plan = LayerParallelPlan.parse(plan)
        # Reference mode holds the original layer objects, so parameter names (and checkpoints)
        # are the same whichever mode is active later; fused weights are non-persistent buffers.
        apply_layer_parallelism(self.model, self.plan, "reference", post_norm_mode)
        self._freeze_all_but_paired_layers()
        self.strict_loading = not (trainable_only_checkpoints and is_pretrained_name(model))
        self.metrics = torch.nn.ModuleDict(
            {f"{s}_{k}": TokenPerplexity() for s in ("val", "test") for k in ("lp", "seq")}
        )
        self._decode_prompt: torch.Tensor | None = None

    # ----------------------------------------------------------------- LP state
    def _freeze_all_but_paired_layers(self) -> None:
        layers = original_layers(self.model)
        keep = {id(p) for k in self.plan.layers for p in layers[k].parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # FSDP's sharded loader reads every key of the model's state dict: keep them all there.
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        if not self.strict_loading and not sharded:
            keep_trainable_only(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get(TRAINABLE_ONLY) and "state_dict" in checkpoint:
            check_trainable_only(self, checkpoint, f"model {self.hparams.model!r}")

    def use_mode(self, mode: str) -> None:
        """Switch the LP implementation (``fused``/``reference``) keeping the same weights.

        Fused weights are derived from the members' parameters when the pairs are built, so
        ``fused`` is rebuilt on every call: a checkpoint loaded since the last call (a second
        ``validate``/``test`` with ``ckpt_path`` on the same module) would otherwise be ignored.
        """
        state: LPState = self.model.layer_parallel
        if state.mode == mode and mode != "fused":
            return
        with torch.no_grad():
            undo_layer_parallelism(self.model)
            apply_layer_parallelism(self.model, self.plan, mode, self.hparams.post_norm_mode)

    def setup(self, stage: str) -> None:
        refuse_fp16_training(self.trainer, type(self).__name__, stage, self)
        warn_bf16_weights_training(self.trainer, type(self).__name__, stage)
        check_data_tokenizer(getattr(self.trainer, "datamodule", None), self.tokenizer)
        if stage == "test":
            self._check_decode_fits_the_test_data()
        if stage == "fit":
            # from_pretrained returns eval-mode modules; training runs the reference pairs.
            self.use_mode("reference")
            self.model.train()

    def on_train_start(self) -> None:
        self.use_mode("reference")

    def _check_decode_fits_the_test_data(self) -> None:
        """Refuse a decode prompt the test blocks cannot supply now, not after the test pass."""
        data = getattr(self.trainer, "datamodule", None)
        if self.decode_new_tokens <= 0 or data is None:
            return
        for key, data_key in [
            ("decode_prompt_len", "block_size"),
            ("decode_batch_size", "batch_size"),
        ]:
            want, have = getattr(self, key), getattr(data, data_key, None)
            if isinstance(have, int) and want > have:
                raise ValueError(
                    f"model.{key}={want} exceeds data.{data_key}={have}: the decode measurement "
                    "takes its prompts from one test batch (lower it, or set "
                    "model.decode_new_tokens: 0 to skip the measurement)"
                )

    def _refuse_fused_shards(self) -> None:
        if self.mode == "fused":
            refuse_under_sharded_fsdp(
                self.trainer,
                "LayerParallelModule with mode: fused",
                "it folds each pair's norms into whole weight matrices, and FSDP shards them; "
                "use mode: reference, or DDP",
            )

    def on_fit_start(self) -> None:
        self._refuse_fused_shards()  # before training: its validation would fail

    def on_validation_start(self) -> None:
        self._refuse_fused_shards()
        self.use_mode(self.mode)

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit":
            self.use_mode("reference")

    def on_test_start(self) -> None:
        self._refuse_fused_shards()
        self.use_mode(self.mode)

    def on_predict_start(self) -> None:
        refuse_generation_under_sharded_fsdp(self.trainer)
        self.use_mode(self.mode)

    # ----------------------------------------------------------------- steps
    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, **kwargs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.hparams.train_with_lp:
            loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        else:
            with sequential_layers(self.model):
                loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        ids, labels = batch["input_ids"], batch["labels"]
        self.metrics[f"{stage}_lp"].update(self.model(input_ids=ids).logits, labels)
        if self.compare_sequential:
            with sequential_layers(self.model):
                self.metrics[f"{stage}_seq"].update(self.model(input_ids=ids).logits, labels)
        if stage == "test" and self._decode_prompt is None:
            n = self.decode_prompt_len
            rows = ids[: self.decode_batch_size, :n]
            if rows.shape[0] == self.decode_batch_size and rows.shape[1] == n:
                self._decode_prompt = rows.clone()

    def _reset_metrics(self, stage: str) -> None:
        self.metrics[f"{stage}_lp"].reset()
        self.metrics[f"{stage}_seq"].reset()

    def _log_ppl(self, stage: str) -> None:
        # compute() already reduces the token sums over all ranks, so every rank holds the same
        # value; sync_dist averages identical numbers (and spares DDP users Lightning's warning).
        ppl = self.metrics[f"{stage}_lp"].compute()
        self.log(f"{stage}/ppl", ppl, prog_bar=True, sync_dist=True)
        if self.compare_sequential:
            seq = self.metrics[f"{stage}_seq"].compute()
            self.log(f"{stage}/ppl_seq", seq, sync_dist=True)
            self.log(f"{stage}/ppl_ratio", ppl / seq, prog_bar=True, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_start(self) -> None:
        # States left by an earlier ``trainer.validate`` were reset under inference mode, so they
        # are inference tensors; fit's validation runs under no_grad and could not update them.
        self._reset_metrics("val")

    def on_validation_epoch_end(self) -> None:
        self._log_ppl("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_start(self) -> None:
        self._reset_metrics("test")
        self._decode_prompt = None  # taken from this run's test data, not an earlier one's

    def on_test_epoch_end(self) -> None:
        self._log_ppl("test")
        n_new = self.decode_new_tokens
        if n_new <= 0:
            return
        if self._decode_prompt is None:
            raise ValueError(
                f"decode measurement needs a test batch of >= decode_batch_size="
                f"{self.decode_batch_size} rows of >= decode_prompt_len="
                f"{self.decode_prompt_len} tokens (set decode_new_tokens: 0 to skip it)"
            )
        prompt, repeats = self._decode_prompt, self.decode_repeats
        lp = decode_tokens_per_s(self.model, prompt, n_new, repeats=repeats)
        with sequential_layers(self.model):
            seq = decode_tokens_per_s(self.model, prompt, n_new, repeats=repeats)
        layers = self.model.config.num_hidden_layers
        self.log("test/decode_tok_s", lp, rank_zero_only=True)
        self.log("test/decode_tok_s_seq", seq, rank_zero_only=True)
        self.log("test/decode_speedup", lp / seq, rank_zero_only=True)
        self.log("test/ideal_speedup", ideal_speedup(layers, self.plan.delta), rank_zero_only=True)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, list[str]], batch_idx: int) -> list[dict[str, str]]:
        results = []
        for prompt in batch["prompts"]:
            completion = generate_completion(self.model, self.tokenizer, prompt, self.generation)
            results.append(
                {"prompt": prompt, "completion": completion, "plan": self.plan.to_list()}
            )
        return results

    # ----------------------------------------------------------------- optimization & export
    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("plan is empty: fine-tuning trains only the paired layers (set plan)")
        optimizer = self.optimizer(params)
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        fill_total_steps(scheduler, self.trainer.estimated_stepping_batches)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def save_pretrained(self, directory: str | Path, merge_lora: bool = False) -> Path:
        """Write the (sequential, unfused) model in Hugging Face format plus ``layer_parallel.json``.

        The canonical weights are the unfused ones (spec 3.4); ``LayerParallelModule`` re-applies
        the plan on load. A plain ``from_pretrained`` runs the layers one after the other, another
        function than the one fine-tuned: ``config.layer_parallel`` and a model card say so.
        """
        directory = Path(directory)
        info = {"plan": self.plan.to_list(), "post_norm_mode": self.hparams.post_norm_mode}
        self.model.config.layer_parallel = info
        try:
            with sequential_layers(self.model):
                self.model.save_pretrained(directory)
        finally:
            del self.model.config.layer_parallel
        self.tokenizer.save_pretrained(directory)
        (directory / "layer_parallel.json").write_text(json.dumps(info, indent=2))
        (directory / "README.md").write_text(layer_parallel_model_card(info))
        return directory
