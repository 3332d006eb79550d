"""Greedy completions of fixed prompts, logged as TensorBoard text after each validation."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.direct_logging import lightning_log_step
from modules.causal_lm import GenerationSettings, generate_completion
from modules.eval_mode import eval_mode


def generations_markdown(step: int, rows: list[tuple[str, str]]) -> str:
    """A markdown table ``prompt | completion`` (TensorBoard's text tab renders markdown)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = [f"**step {step}**", "", "| prompt | completion |", "|---|---|"]
    lines += [f"| {cell(prompt)} | {cell(completion)} |" for prompt, completion in rows]
    return "\n".join(lines)


class SampleGenerations(L.Callback):
    """After every ``every_n_validations``-th validation of fit, complete ``prompts`` greedily
    and log them to the loggers that take text (TensorBoard: ``samples/generations``).

    Works with any LightningModule that has a Hugging Face causal LM as ``model`` and its
    ``tokenizer`` (``CausalLMModule``, ``LayerParallelModule``). Rank 0 decodes alone, with the
    module in eval mode; under FSDP (sharded, flattened parameters) it is skipped.

    Args:
        prompts: texts to complete.
        max_new_tokens: tokens generated per prompt.
        every_n_validations: log after every n-th validation run of fit (sanity check excluded).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 32,
        every_n_validations: int = 1,
    ) -> None:
        self.prompts = ["The for statement is used to"] if prompts is None else list(prompts)
        if not self.prompts:
            raise ValueError("SampleGenerations: prompts must not be empty")
        if max_new_tokens < 1 or every_n_validations < 1:
            raise ValueError(
                f"SampleGenerations: max_new_tokens={max_new_tokens} and every_n_validations="
                f"{every_n_validations} must be >= 1"
            )
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens)
        self.every_n_validations = every_n_validations
        self._validations = 0

    def state_dict(self) -> dict[str, int]:
        return {"validations": self._validations}  # the every_n cadence continues on resume

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._validations = state_dict["validations"]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        missing = [a for a in ("model", "tokenizer") if getattr(pl_module, a, None) is None]
        if stage == "fit" and missing:
            raise TypeError(
                f"SampleGenerations needs a causal LM as `model` and its `tokenizer`; "
                f"{type(pl_module).__name__} has no {' / '.join(missing)}"
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._validations += 1
        if self._validations % self.every_n_validations:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            # FSDP units are meant to run inside the root's forward (sharded or flattened
            # parameters); decoding through the inner model would bypass it, even on one device
            rank_zero_warn("SampleGenerations skipped under FSDP: generate from the checkpoint")
            return
        if trainer.global_rank != 0:
            return  # the unwrapped model runs no collective, so rank 0 decodes alone
        with eval_mode(pl_module.model), torch.no_grad():
            rows = [
                (p, generate_completion(pl_module.model, pl_module.tokenizer, p, self.settings))
                for p in self.prompts
            ]
        text = generations_markdown(trainer.global_step, rows)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("samples/generations", text, lightning_log_step(trainer))
