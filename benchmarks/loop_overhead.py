"""Training throughput of ``mlo fit`` versus a minimal hand-written PyTorch loop.

Both train the quickstart model (tiny-llama, AdamW, warmup-cosine, gradient clipping 1.0) on
the same packed blocks, batch size and thread count, in one process, alternating app and loop
runs so machine noise hits both alike. Throughput is measured from step ``--warmup-steps`` on
(tokens / wall-clock seconds, data loading included); the reported value is the median over
``--repeats``. Validation and checkpointing are off in both (they are not per-step work).

    python benchmarks/loop_overhead.py            # writes docs/results/benchmarks/loop_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from cli import main as mlo  # noqa: E402
from datamodules.text import TextDataModule  # noqa: E402
from modules.hf_models import build_causal_lm  # noqa: E402
from optim.schedules import WarmupCosine  # noqa: E402

LR_WARMUP_STEPS = 50  # configs/quickstart.yaml's WarmupCosine warmup, used by both runners


def plain_loop(steps: int, warmup: int, seed: int) -> float:
    """Tokens/s of a bare PyTorch loop on the quickstart model and data."""
    L.seed_everything(seed, verbose=False)
    data = TextDataModule(
        data_files=str(ROOT / "data/corpus/python_docs.jsonl"),
        tokenizer=str(ROOT / "data/tokenizer"),
    )
    data.setup("fit")
    model = build_causal_lm("tiny-llama", vocab_size=len(data.tokenizer))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3,
        weight_decay=0.1,
        betas=(0.9, 0.95),
    )
    scheduler = WarmupCosine(
        optimizer, warmup_steps=LR_WARMUP_STEPS, total_steps=steps, min_lr_ratio=0.1
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.splits["train"]),
        batch_size=16,
        shuffle=True,
        drop_last=True,
    )
    done, tokens, start = 0, 0, None
    while done < steps:
        for (ids,) in loader:
            if done == warmup:
                start, tokens = time.perf_counter(), 0
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            tokens += ids.numel()
            done += 1
            if done == steps:
                break
    return tokens / (time.perf_counter() - start)


def app_run(steps: int, warmup: int, seed: int, workdir: Path) -> float:
    """Tokens/s of ``mlo fit --config configs/quickstart.yaml`` (validation/checkpoints off)."""
    cli = mlo([
        "fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--seed_everything={seed}",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[{class_path: callbacks.throughput.TokenThroughput}]",
        f"--trainer.logger.init_args.save_dir={workdir}", "--trainer.enable_progress_bar=true",
        f"--model.init_args.lr_scheduler.init_args.total_steps={steps}",
    ])  # fmt: skip
    timer = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "TokenThroughput")
    return timer.tokens_per_second(skip_first=warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs/results/benchmarks/loop_overhead.json"
    )
    args = parser.parse_args()
    # Checked before any run: a bad pair failed only after the first timed run (~35 s).
    if args.steps < LR_WARMUP_STEPS:
        parser.error(
            f"--steps {args.steps}: both runners use the quickstart's {LR_WARMUP_STEPS}-step LR "
            "warmup, so at least that many steps are needed"
        )
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(
            f"--warmup-steps {args.warmup_steps} must be >= 0 and below --steps {args.steps}: "
            "the timing starts after the warmup steps"
        )
    torch.set_num_threads(args.threads)
    workdir = ROOT / "runs" / "bench_loop_overhead"
    app, loop = [], []
    for r in range(args.repeats):
        # ABBA order: a slow drift of the machine must not always land on the same runner
        for name in ("loop", "app") if r % 2 == 0 else ("app", "loop"):
            if name == "loop":
                loop.append(plain_loop(args.steps, args.warmup_steps, seed=r))
            else:
                app.append(app_run(args.steps, args.warmup_steps, seed=r, workdir=workdir))
        print(
            f"repeat {r}: plain loop {loop[-1]:,.0f} tok/s   mlo fit {app[-1]:,.0f} tok/s",
            flush=True,
        )
    ratio = statistics.median(app) / statistics.median(loop)
    # The per-repeat ratios show the noise: the target is resolved only when they all agree.
    paired = [a / b for a, b in zip(app, loop, strict=True)]
    result = {
        "command": "python benchmarks/loop_overhead.py " + " ".join(sys.argv[1:]),
        "steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
        "threads": args.threads, "tokens_per_step": 16 * 128,
        "plain_loop_tokens_per_s": loop, "mlo_fit_tokens_per_s": app,
        "median_plain_loop": statistics.median(loop), "median_mlo_fit": statistics.median(app),
        "ratio_app_over_loop": ratio, "paired_ratios": paired,
        "median_paired_ratio": statistics.median(paired), "target": 0.95,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n| runner | median tokens/s |\n|---|---|\n| plain PyTorch loop | {result['median_plain_loop']:,.0f} |"
    )
    print(
        f"| mlo fit | {result['median_mlo_fit']:,.0f} |\n\nratio mlo/plain = {ratio:.3f} (target >= 0.95)"
    )
    verdict = "met" if min(paired) >= 0.95 else "missed" if max(paired) < 0.95 else "not resolved"
    print(f"paired ratios {min(paired):.3f}-{max(paired):.3f}, median "
          f"{statistics.median(paired):.3f}: {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
