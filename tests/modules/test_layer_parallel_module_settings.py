"""``LayerParallelModule`` settings and hooks called directly (no Trainer run): decode
timing without the warm-up, the decode-size checks, the captured decode prompt, the mode
after fit's validation, the empty-plan optimizer and the export's model card."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from modules import layer_parallel
from modules.layer_parallel import (
    LayerParallelModule,
    decode_tokens_per_s,
    layer_parallel_model_card,
)


def _attach(module: LayerParallelModule, **trainer) -> None:
    module._trainer = SimpleNamespace(**trainer)


def test_the_warmup_run_is_not_timed(monkeypatch):
    """A warm-up decode of 100 s (e.g. compilation) then a timed one of 1 s: the rate is
    2 rows x 3 tokens / 1 s, whatever the warm-up cost."""
    now = [0.0]
    durations = iter([100.0, 1.0])

    def fake_decode(model, prompt, n_new):
        now[0] += next(durations)

    monkeypatch.setattr(layer_parallel, "greedy_decode", fake_decode)
    monkeypatch.setattr(layer_parallel.time, "perf_counter", lambda: now[0])
    prompt = torch.zeros(2, 4, dtype=torch.long)
    assert decode_tokens_per_s(None, prompt, 3, warmup=1, repeats=1) == 6.0


@pytest.mark.parametrize("key", ["decode_prompt_len", "decode_batch_size"])
def test_empty_decode_prompts_are_refused(tiny_llama_8l_dir, key):
    with pytest.raises(ValueError, match=f"{key}=0 must be >= 1"):
        LayerParallelModule(model=str(tiny_llama_8l_dir), **{key: 0})


def test_decode_prompt_may_fill_a_whole_test_batch(tiny_llama_8l_dir):
    """The prompt is cut from one test batch: as long and as wide as the batch is fine, one
    more row is refused before testing."""
    module = LayerParallelModule(
        model=str(tiny_llama_8l_dir), decode_prompt_len=32, decode_batch_size=4
    )
    _attach(module, datamodule=SimpleNamespace(block_size=32, batch_size=4))
    module._check_decode_fits_the_test_data()
    module.decode_batch_size = 5
    with pytest.raises(ValueError, match=r"decode_batch_size=5 exceeds data\.batch_size=4"):
        module._check_decode_fits_the_test_data()


@torch.no_grad()
def test_decode_prompt_is_taken_from_the_first_batch_large_enough(tiny_llama_8l_dir):
    module = LayerParallelModule(
        model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6}, decode_prompt_len=8, decode_batch_size=2,
        compare_sequential=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    small = torch.randint(0, 4096, (1, 12), generator=gen)  # one row: too few
    short = torch.randint(0, 4096, (3, 6), generator=gen)  # 6 tokens: too short
    good = torch.randint(0, 4096, (3, 12), generator=gen)
    for ids in (small, short):
        module._eval_step({"input_ids": ids, "labels": ids}, "test")
        assert module._decode_prompt is None
    module._eval_step({"input_ids": good, "labels": good}, "test")
    assert torch.equal(module._decode_prompt, good[:2, :8])


def test_fit_returns_to_reference_mode_after_its_validation(tiny_llama_8l_dir):
    """Validation runs the fused pairs; training must continue through the reference ones.
    A stand-alone validate keeps the requested mode."""
    module = LayerParallelModule(model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6})
    module.use_mode("fused")
    _attach(module, state=SimpleNamespace(fn="validate"))
    module.on_validation_end()
    assert module.model.layer_parallel.mode == "fused"
    _attach(module, state=SimpleNamespace(fn="fit"))
    module.on_validation_end()
    assert module.model.layer_parallel.mode == "reference"


def test_fine_tuning_without_a_plan_is_refused(tiny_llama_8l_dir):
    """Only paired layers train: with no plan nothing is trainable."""
    module = LayerParallelModule(model=str(tiny_llama_8l_dir), plan=None)
    with pytest.raises(ValueError, match="plan is empty"):
        module.configure_optimizers()


def test_decode_new_tokens_zero_skips_the_measurement(tiny_llama_8l_dir):
    """No prompt was captured, and none is needed: 0 means no decode measurement."""
    module = LayerParallelModule(
        model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6}, decode_new_tokens=0
    )
    logged = []
    module._log_ppl = logged.append  # the perplexity logging needs a Trainer
    module.on_test_epoch_start()
    module.on_test_epoch_end()
    assert logged == ["test"]


def test_model_card_gives_the_command_with_the_plan():
    card = layer_parallel_model_card({"plan": [[2, 3], [4, 5]], "post_norm_mode": "per_member"})
    assert "--model.init_args.plan='[[2, 3], [4, 5]]'" in card
    assert "post_norm_mode: per_member" in card
