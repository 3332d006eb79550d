"""LayerParallelModule: freezing, YAML/CLI test + predict + fit, export of unfused weights."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from modules import layer_parallel
from modules.hf_models import build_causal_lm
from modules.layer_parallel import (
    LayerParallelModule,
    decode_tokens_per_s,
    greedy_decode,
    perplexity,
)
from modules.layer_parallel_model import original_layers, sequential_layers
from modules.token_perplexity import TokenPerplexity


def test_only_paired_layers_are_trainable(tiny_llama_8l_dir):
    module = LayerParallelModule(model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6})
    layers = original_layers(module.model)
    expected = {id(p) for k in (2, 3, 4, 5) for p in layers[k].parameters()}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == expected
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all(".layers.2." in n or ".layers.3." in n for n in names)  # pairs at LP positions 2, 3


def test_helpers_decode_and_perplexity(tiny_llama_8l_dir):
    module = LayerParallelModule(model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6})
    module.use_mode("fused")
    model, ids = module.model, torch.randint(0, 4096, (2, 12))
    with torch.no_grad():
        gen = greedy_decode(model, ids[:, :4], 5)
        ref = ids[:, :4]
        for _ in range(5):  # no cache: recompute the whole sequence each step
            ref = torch.cat([ref, model(input_ids=ref).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(gen, ref[:, 4:])
    assert decode_tokens_per_s(model, ids[:1, :4], 3, warmup=0, repeats=1) > 0
    with torch.no_grad():
        nll = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, ids) == pytest.approx(nll.exp().item(), rel=1e-5)
    # Chunks of 2 + 1 rows: the token mean, not the mean of the two chunk means.
    three = torch.randint(0, 4096, (3, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        nll3 = model(input_ids=three, labels=three).loss
    assert perplexity(model, three, batch_size=2) == pytest.approx(nll3.exp().item(), rel=1e-5)
    with sequential_layers(model):
        assert len(model.model.layers) == 8
    assert len(model.model.layers) == 6


def test_decode_tokens_per_s_counts_every_row_of_the_batch(tiny_llama_8l_dir, monkeypatch):
    model = LayerParallelModule(model=str(tiny_llama_8l_dir)).model
    clock = iter([10.0, 11.0])  # one timed repeat of exactly 1 s
    monkeypatch.setattr(layer_parallel.time, "perf_counter", lambda: next(clock))
    prompt = torch.randint(0, 4096, (2, 4))
    assert decode_tokens_per_s(model, prompt, 3, warmup=0, repeats=1) == 6.0  # 2 rows x 3 tokens


def test_token_perplexity_stays_finite_where_softmax_underflows():
    # One confidently wrong token (probability ~e^-110): softmax-then-log gives log(0) = -inf.
    logits = torch.zeros(1, 5, 10)
    logits[0, :, 0] = 110.0
    labels = torch.tensor([[0, 0, 0, 0, 5]])
    metric = TokenPerplexity()
    metric.update(logits, labels)
    expected = F.cross_entropy(logits[0, :-1], labels[0, 1:]).exp()
    assert torch.isfinite(metric.compute())
    assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-5)


def test_token_perplexity_reduces_sums_across_ranks():
    # DDP: sum NLL and token counts over ranks, then exp; ranks with fewer scored tokens (labels
    # -100) must weigh less than in a mean of per-rank perplexities.
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 6, 10, generator=gen) * 3 for _ in range(2)]
    labels = [torch.randint(0, 10, (2, 6), generator=gen) for _ in range(2)]
    labels[1][:, 1:5] = -100  # rank 1 scores 2 tokens, rank 0 scores 10
    ranks = [TokenPerplexity() for _ in range(2)]
    for metric, x, y in zip(ranks, logits, labels, strict=True):
        metric.update(x, y)
    ranks[0].merge_state(ranks[1])  # the states' dist_reduce_fx, as in the DDP sync

    def ppl(x: torch.Tensor, y: torch.Tensor) -> float:
        return F.cross_entropy(x.reshape(-1, 10), y.reshape(-1), ignore_index=-100).exp().item()

    expected = ppl(torch.cat([t[:, :-1] for t in logits]), torch.cat([t[:, 1:] for t in labels]))
    assert ranks[0].compute().item() == pytest.approx(expected, rel=1e-6)
    mean_of_ranks = sum(ppl(x[:, :-1], y[:, 1:]) for x, y in zip(logits, labels, strict=True)) / 2
    assert expected != pytest.approx(mean_of_ranks, rel=1e-3)


def test_fused_weights_follow_a_checkpoint_loaded_into_a_reused_module(tiny_llama_8l_dir, tmp_path):
    """A second validate with ``ckpt_path`` on a module left fused must use the loaded weights."""
    import lightning as L

    def trainer() -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip

    def module() -> LayerParallelModule:
        return LayerParallelModule(
            model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6}, mode="fused"
        )

    ids = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)
    tuned = module()  # a "fine-tuned" checkpoint: the paired layers moved
    torch.manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    saver = trainer()
    saver.validate(tuned, loader, verbose=False)
    saver.save_checkpoint(tmp_path / "tuned.ckpt")
    ckpt = str(tmp_path / "tuned.ckpt")
    fresh = trainer().validate(module(), loader, ckpt_path=ckpt, verbose=False)[0]
    reused = module()
    base = trainer().validate(reused, loader, verbose=False)[0]  # leaves it fused on base weights
    again = trainer().validate(reused, loader, ckpt_path=ckpt, verbose=False)[0]
    assert fresh["val/ppl"] != pytest.approx(base["val/ppl"], rel=1e-3)  # the checkpoint matters
    for key in ("val/ppl", "val/ppl_seq", "val/ppl_ratio"):
        assert again[key] == pytest.approx(fresh[key], rel=1e-6), key


def _cli(args: list[str]):
    from cli import main

    return main(args)


def _common(tiny_llama_8l_dir: Path, tmp_path: Path) -> list[str]:
    return [
        "--config", "configs/layer_parallel/eval.yaml",
        "--model.init_args.model", str(tiny_llama_8l_dir),
        "--model.init_args.plan", "{start: 2, end: 6}",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.init_args.batch_size", "4",
    ]  # fmt: skip


def test_cli_test_logs_ppl_ratio_and_decode_speed(
    tiny_llama_8l_dir, tmp_path, repo_root, monkeypatch
):
    monkeypatch.chdir(repo_root)
    cli = _cli(
        ["test", *_common(tiny_llama_8l_dir, tmp_path), "--trainer.limit_test_batches", "2",
         "--model.init_args.decode_new_tokens", "4", "--model.init_args.decode_repeats", "1"]
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert metrics["test/ppl_ratio"] == pytest.approx(metrics["test/ppl"] / metrics["test/ppl_seq"])
    # ppl_seq must be the plain model's perplexity on the same batches (the ratio alone holds by
    # construction, even if the "sequential" baseline silently ran the LP model).
    batches = itertools.islice(cli.datamodule.test_dataloader(), 2)
    ids = torch.cat([b["input_ids"] for b in batches])
    plain = build_causal_lm(str(tiny_llama_8l_dir)).eval()
    assert metrics["test/ppl_seq"].item() == pytest.approx(perplexity(plain, ids), rel=1e-5)
    assert metrics["test/ppl"].item() != pytest.approx(metrics["test/ppl_seq"].item(), rel=1e-3)
    assert metrics["test/ideal_speedup"] == pytest.approx(8 / 6)
    assert metrics["test/decode_tok_s"] > 0 and metrics["test/decode_tok_s_seq"] > 0
    written = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert "test/ppl_ratio" in json.dumps(written)


def test_cli_predict_generates(tiny_llama_8l_dir, tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    _cli(
        ["predict", *_common(tiny_llama_8l_dir, tmp_path), "--config", "configs/layer_parallel/predict.yaml",
         "--model.init_args.generation.max_new_tokens", "5"]
    )  # fmt: skip
    rows = [json.loads(line) for line in next(tmp_path.rglob("predictions*.jsonl")).open()]
    assert len(rows) == 2 and rows[0]["plan"] == [[2, 3], [4, 5]]


@pytest.mark.parametrize("train_with_lp", ["true", "false"])
def test_cli_fit_changes_only_paired_layers_and_exports(
    tiny_llama_8l_dir, tmp_path, repo_root, monkeypatch, train_with_lp
):
    monkeypatch.chdir(repo_root)
    cli = _cli(
        ["fit", *_common(tiny_llama_8l_dir, tmp_path), "--config", "configs/layer_parallel/finetune.yaml",
         "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
         "--trainer.val_check_interval", "2", "--model.init_args.optimizer.init_args.lr", "1e-2",
         "--model.init_args.train_with_lp", train_with_lp]
    )  # fmt: skip
    assert cli.model.model.layer_parallel.mode == "reference"  # back to training mode after val
    before = build_causal_lm(str(tiny_llama_8l_dir)).state_dict()
    export = next(tmp_path.rglob("layer_parallel.json")).parent
    after = build_causal_lm(str(export)).state_dict()
    assert json.loads((export / "layer_parallel.json").read_text())["plan"] == [[2, 3], [4, 5]]
    # A plain load says what it is: sequential layers, not the fine-tuned parallel function.
    config = json.loads((export / "config.json").read_text())
    assert config["layer_parallel"]["plan"] == [[2, 3], [4, 5]]
    assert "one after the other" in (export / "README.md").read_text()
    assert not hasattr(cli.model.model.config, "layer_parallel")  # only in the export
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(f"layers.{i}." in k for i in (2, 3, 4, 5)) for k in changed)


@pytest.mark.distributed
def test_ddp_finetune_of_paired_layers(tiny_llama_8l_dir):
    """2-process DDP (gloo): every trainable parameter gets a gradient each step (no unused ones)."""
    import lightning as L

    module = LayerParallelModule(
        model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6}, decode_new_tokens=0
    )
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    ids = torch.randint(0, 4096, (8, 32), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    after = module.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".layers.2." in k or ".layers.3." in k for k in changed)


def _rows_loader(seed: int) -> torch.utils.data.DataLoader:
    ids = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)


def test_validate_then_fit_then_test_twice_start_from_fresh_state(tiny_llama_8l_dir, tmp_path):
    """A standalone ``validate`` resets its metrics under inference mode; fit's validation (no_grad)
    must still update them. A second ``test`` on other data decodes that data's prompt."""
    import lightning as L

    module = LayerParallelModule(
        model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6}, decode_new_tokens=2, decode_prompt_len=8,
        decode_repeats=1,
    )  # fmt: skip
    quiet = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
             "enable_progress_bar": False, "enable_model_summary": False,
             "default_root_dir": str(tmp_path)}  # fmt: skip
    L.Trainer(**quiet).validate(module, _rows_loader(0), verbose=False)
    fit = L.Trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=1, **quiet)
    fit.fit(module, _rows_loader(1), _rows_loader(0))  # raised on the inference-mode states
    assert fit.global_step == 2 and torch.isfinite(fit.callback_metrics["val/ppl"])
    for seed in (2, 3):
        loader = _rows_loader(seed)
        result = L.Trainer(**quiet).test(module, loader, verbose=False)[0]
        assert result["test/decode_tok_s"] > 0
        first_rows = next(iter(loader))["input_ids"][:1, :8]
        assert torch.equal(module._decode_prompt, first_rows)  # this run's data, not seed 2's


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mode", "fuzed", "mode='fuzed' is not one of"),
        ("decode_repeats", 0, "decode_repeats=0 must be >= 1"),
        ("decode_new_tokens", -1, "decode_new_tokens=-1 must be >= 0"),
    ],
)
def test_bad_settings_are_refused_at_construction(tiny_llama_8l_dir, key, value, message):
    with pytest.raises(ValueError, match=message):
        LayerParallelModule(
            model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6}, **{key: value}
        )


def test_cli_test_refuses_a_decode_prompt_longer_than_a_block_before_testing(
    tiny_llama_8l_dir, tmp_path, repo_root, monkeypatch
):
    monkeypatch.chdir(repo_root)
    tested = []
    monkeypatch.setattr(LayerParallelModule, "test_step", lambda *a: tested.append(1))
    with pytest.raises(ValueError, match=r"decode_prompt_len=33 exceeds data\.block_size=32"):
        _cli(
            ["test", *_common(tiny_llama_8l_dir, tmp_path), "--data.init_args.block_size", "32",
             "--model.init_args.decode_prompt_len", "33"]
        )  # fmt: skip
    assert tested == []


def test_evaluation_choices_stay_out_of_the_checkpoint_hyperparameters(tiny_llama_8l_dir):
    # LightningCLI applies checkpoint hyperparameters over the config: a model fine-tuned in
    # reference mode was then tested in reference mode whatever `mlo test` asked for
    from modules.layer_parallel import RUN_TIME_SETTINGS

    module = LayerParallelModule(
        model=str(tiny_llama_8l_dir),
        plan={"start": 2, "end": 6},
        mode="reference",
        decode_repeats=2,
    )
    assert not set(RUN_TIME_SETTINGS) & set(module.hparams)
    assert {"model", "plan", "post_norm_mode", "train_with_lp"} <= set(module.hparams)
    assert module.mode == "reference" and module.decode_repeats == 2


def test_a_model_with_its_own_tokenizer_uses_it_and_data_of_another_vocabulary_is_refused(
    tiny_llama_8l_dir, tmp_path
):
    """The model's own tokenizer is the default; the data's must have the same vocabulary
    (a 600-token model tokenizer against the project's 4096-token data used to run silently)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from datamodules.text import TextDataModule

    own = tmp_path / "model_with_own_tokenizer"
    build_causal_lm("tiny-llama-8l", vocab_size=600).save_pretrained(own)
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    corpus = [f"line {i} of a tiny corpus for a tiny tokenizer" for i in range(50)]
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(own)
    module = LayerParallelModule(model=str(own), plan={"start": 2, "end": 6})
    assert len(module.tokenizer) == len(PreTrainedTokenizerFast.from_pretrained(own))
    data_file = tmp_path / "tiny.jsonl"
    data_file.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus))
    data = TextDataModule(data_files=str(data_file), tokenizer="data/tokenizer", block_size=16,
                          batch_size=2, val_fraction=0.2, test_fraction=0.2)  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"data.tokenizer \(4096 tokens.*differs from model"):
        trainer.validate(module, datamodule=data)


def test_fused_mode_and_predict_are_refused_on_several_fsdp_processes(tiny_llama_8l_dir):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = LayerParallelModule(
        model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6}, mode="fused"
    )
    module._trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), world_size=2)
    # fused folds each pair's norms into whole matrices; FSDP hands it 1-D shards
    for hook in (module.on_fit_start, module.on_validation_start, module.on_test_start):
        with pytest.raises(RuntimeError, match="mode: fused does not run under multi-process"):
            hook()
    with pytest.raises(RuntimeError, match="mlo predict does not run under multi-process FSDP"):
        module.on_predict_start()
    module.mode = "reference"
    module.on_validation_start()  # the reference pairs run on shards


def test_checkpoints_hold_the_paired_layers_and_refuse_a_changed_base(tiny_llama_8l_dir, tmp_path):
    """On a pretrained base only the trained paired layers are saved (the whole frozen model
    was: 95 % of a SmolLM2-135M checkpoint); a base that changed at that path is refused."""
    import lightning as L

    def trainer() -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip

    ids = torch.randint(0, 4096, (4, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2)
    tuned = LayerParallelModule(model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6})
    saver = trainer()
    saver.validate(tuned, loader, verbose=False)
    saver.save_checkpoint(tmp_path / "tuned.ckpt")
    saved = torch.load(tmp_path / "tuned.ckpt", weights_only=True)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert set(saved["state_dict"]) == trainable and saved["trainable_only"]

    torch.manual_seed(5)  # another model at another path: the "re-exported" base
    other = tmp_path / "other_base"
    build_causal_lm("tiny-llama-8l").save_pretrained(other)
    moved = LayerParallelModule(model=str(other), plan={"start": 2, "end": 6})
    with pytest.raises(ValueError, match=r"frozen weights rebuilt from model .* are not those"):
        trainer().validate(moved, loader, ckpt_path=str(tmp_path / "tuned.ckpt"), verbose=False)
    full = LayerParallelModule(
        model=str(tiny_llama_8l_dir), plan={"start": 2, "end": 6}, trainable_only_checkpoints=False
    )
    keeper = trainer()
    keeper.validate(full, loader, verbose=False)
    keeper.save_checkpoint(tmp_path / "full.ckpt")
    all_keys = torch.load(tmp_path / "full.ckpt", weights_only=True)["state_dict"]
    assert set(all_keys) == set(full.state_dict())
