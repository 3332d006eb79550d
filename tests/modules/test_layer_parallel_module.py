"""LayerParallelModule: freezing, YAML/CLI test + predict + fit, export of unfused weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modules.hf_models import build_causal_lm
from modules.layer_parallel import (
    LayerParallelModule,
    decode_tokens_per_s,
    greedy_decode,
    perplexity,
)
from modules.layer_parallel_model import original_layers, sequential_layers


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random tiny 8-layer Llama saved like ExportPretrained does (no training needed)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lp") / "hf_model"
    build_causal_lm("tiny-llama-8l").save_pretrained(out)
    return out


def test_only_paired_layers_are_trainable(hf_dir):
    module = LayerParallelModule(model=str(hf_dir), plan={"start": 2, "end": 6})
    layers = original_layers(module.model)
    expected = {id(p) for k in (2, 3, 4, 5) for p in layers[k].parameters()}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == expected
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert all(".layers.2." in n or ".layers.3." in n for n in names)  # pairs at LP positions 2, 3


def test_helpers_decode_and_perplexity(hf_dir):
    module = LayerParallelModule(model=str(hf_dir), plan={"start": 2, "end": 6})
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
    with sequential_layers(model):
        assert len(model.model.layers) == 8
    assert len(model.model.layers) == 6


def _cli(args: list[str]):
    from cli import main

    return main(args)


def _common(hf_dir: Path, tmp_path: Path) -> list[str]:
    return [
        "--config", "configs/layer_parallel/eval.yaml",
        "--model.init_args.model", str(hf_dir),
        "--model.init_args.plan", "{start: 2, end: 6}",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.init_args.batch_size", "4",
    ]  # fmt: skip


def test_cli_test_logs_ppl_ratio_and_decode_speed(hf_dir, tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    cli = _cli(
        ["test", *_common(hf_dir, tmp_path), "--trainer.limit_test_batches", "2",
         "--model.init_args.decode_new_tokens", "4", "--model.init_args.decode_repeats", "1"]
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert metrics["test/ppl_ratio"] == pytest.approx(metrics["test/ppl"] / metrics["test/ppl_seq"])
    assert metrics["test/ideal_speedup"] == pytest.approx(8 / 6)
    assert metrics["test/decode_tok_s"] > 0 and metrics["test/decode_tok_s_seq"] > 0
    written = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert "test/ppl_ratio" in json.dumps(written)


def test_cli_predict_generates(hf_dir, tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    _cli(
        ["predict", *_common(hf_dir, tmp_path), "--config", "configs/layer_parallel/predict.yaml",
         "--model.init_args.generation.max_new_tokens", "5"]
    )  # fmt: skip
    rows = [json.loads(line) for line in next(tmp_path.rglob("predictions*.jsonl")).open()]
    assert len(rows) == 2 and rows[0]["plan"] == [[2, 3], [4, 5]]


@pytest.mark.parametrize("train_with_lp", ["true", "false"])
def test_cli_fit_changes_only_paired_layers_and_exports(
    hf_dir, tmp_path, repo_root, monkeypatch, train_with_lp
):
    monkeypatch.chdir(repo_root)
    cli = _cli(
        ["fit", *_common(hf_dir, tmp_path), "--config", "configs/layer_parallel/finetune.yaml",
         "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
         "--trainer.val_check_interval", "2", "--model.init_args.optimizer.init_args.lr", "1e-2",
         "--model.init_args.train_with_lp", train_with_lp]
    )  # fmt: skip
    assert cli.model.model.layer_parallel.mode == "reference"  # back to training mode after val
    before = build_causal_lm(str(hf_dir)).state_dict()
    export = next(tmp_path.rglob("layer_parallel.json")).parent
    after = build_causal_lm(str(export)).state_dict()
    assert json.loads((export / "layer_parallel.json").read_text())["plan"] == [[2, 3], [4, 5]]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(f"layers.{i}." in k for i in (2, 3, 4, 5)) for k in changed)


@pytest.mark.distributed
def test_ddp_finetune_of_paired_layers(hf_dir):
    """2-process DDP (gloo): every trainable parameter gets a gradient each step (no unused ones)."""
    import lightning as L

    module = LayerParallelModule(
        model=str(hf_dir), plan={"start": 2, "end": 6}, decode_new_tokens=0
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
