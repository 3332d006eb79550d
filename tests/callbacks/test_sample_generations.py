"""SampleGenerations: greedy completions of the trained model land in TensorBoard's text tab."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from callbacks.sample_generations import SampleGenerations, generations_markdown
from modules.causal_lm import CausalLMModule, GenerationSettings, generate_completion


def _loader() -> DataLoader:
    ids = torch.randint(0, 4096, (8, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=4)


def test_completions_of_the_trained_model_are_logged_after_every_second_validation(
    tmp_path, tokenizer_dir
):
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    prompts = ["A list comprehension", "Exceptions | pipes\nand lines"]
    callback = SampleGenerations(prompts, max_new_tokens=4, every_n_validations=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, val_check_interval=1, limit_val_batches=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        logger=TensorBoardLogger(tmp_path, name="tb"), callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, _loader(), _loader())
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    logged = events.Tensors("samples/generations/text_summary")  # add_text appends /text_summary
    # Validations 2 and 4 of 4 (not the sanity check), at the steps of their own val/loss.
    val_steps = [e.step for e in events.Scalars("val/loss")]
    assert [e.step for e in logged] == val_steps[1::2] == [1, 3]
    module.eval()
    expected = [
        (p, generate_completion(module.model, module.tokenizer, p, GenerationSettings(4)))
        for p in prompts
    ]
    text = logged[-1].tensor_proto.string_val[0].decode()
    assert text == generations_markdown(4, expected)
    assert "Exceptions \\| pipes<br>and lines" in text  # markdown-safe cells


def test_bad_settings_and_modules_without_a_language_model_are_refused():
    with pytest.raises(ValueError, match="prompts must not be empty"):
        SampleGenerations(prompts=[])
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        SampleGenerations(max_new_tokens=0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, callbacks=[SampleGenerations()]
    )
    with pytest.raises(TypeError, match="BoringModel has no model / tokenizer"):
        from lightning.pytorch.demos.boring_classes import BoringModel

        trainer.fit(BoringModel())
    assert trainer.global_step == 0


def test_fsdp_is_skipped_with_a_warning():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.trainer.states import TrainerFn

    # A real FSDPStrategy object (never set up: that needs CUDA); only its type is read.
    trainer = SimpleNamespace(
        strategy=FSDPStrategy.__new__(FSDPStrategy), sanity_checking=False, world_size=1,
        state=SimpleNamespace(fn=TrainerFn.FITTING), global_rank=0, loggers=[],
    )  # fmt: skip
    module = SimpleNamespace(model=None, tokenizer=None)  # decoding would fail on these
    with pytest.warns(UserWarning, match="SampleGenerations skipped under FSDP"):
        SampleGenerations().on_validation_end(trainer, module)
