"""Step-time overhead of ``UpdateDiagnostics`` on the quickstart model (tiny-llama, block 128,
batch 16, AdamW), with and without the callback, interleaved.

The machine is shared, so the primary measure is the process CPU time per optimizer step
(single-threaded), which contention does not inflate; wall time is reported too. The callback
runs at its default steady-state cadence (``log_every_n_steps=25``, SNR every 25 steps on the
halves of the current batch); the dense phase (every step below ``dense_steps=100``) costs one
logging step per step and is reported as the cost of one logging step. The first ``--skip``
steps (one-off costs and the dense SNR phase, ``snr_dense_steps=10``) are not timed.

    python benchmarks/warmup_diagnostics_overhead.py [--steps 151 --skip 10 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
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

from callbacks.warmup_diagnostics import UpdateDiagnostics  # noqa: E402
from datamodules.text import TextDataModule  # noqa: E402
from modules.causal_lm import CausalLMModule  # noqa: E402


class StepTimer(L.Callback):
    """CPU and wall time of every optimizer step, from one batch start to the next.

    Timing start to start (and the last step to ``on_train_end``) charges every hook of every
    callback to its step, whatever the order of the callbacks, plus data loading and logging.
    """

    def __init__(self) -> None:
        self._cpu_marks: list[float] = []
        self._wall_marks: list[float] = []

    def _mark(self) -> None:
        self._cpu_marks.append(time.process_time())
        self._wall_marks.append(time.perf_counter())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mark()

    def on_train_end(self, trainer, pl_module) -> None:
        self._mark()

    @property
    def cpu(self) -> list[float]:
        return [b - a for a, b in zip(self._cpu_marks, self._cpu_marks[1:], strict=False)]

    @property
    def wall(self) -> list[float]:
        return [b - a for a, b in zip(self._wall_marks, self._wall_marks[1:], strict=False)]


def run(with_callback: bool, steps: int, root: Path) -> StepTimer:
    L.seed_everything(0, verbose=False)
    model = CausalLMModule(
        model="tiny-llama",
        tokenizer=str(ROOT / "data" / "tokenizer"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95)),
    )
    data = TextDataModule(
        data_files=str(ROOT / "data" / "corpus" / "python_docs.jsonl"),
        tokenizer=str(ROOT / "data" / "tokenizer"),
        block_size=128,
        batch_size=16,
    )
    timer = StepTimer()
    callbacks: list[L.Callback] = [timer]
    if with_callback:
        # default cadence; the dense phase is measured separately as the cost of one log step
        callbacks.append(UpdateDiagnostics(dense_steps=0))
    L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    ).fit(model, data)
    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description="UpdateDiagnostics overhead")
    parser.add_argument("--steps", type=int, default=151, help="steps per run")
    parser.add_argument(
        "--skip", type=int, default=10,
        help="leading steps not timed: step 0's one-off costs and the dense SNR phase "
        "(snr_dense_steps=10), so the mean is the steady state at the default interval",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path("/tmp/warmup_overhead")
    results: dict[str, list[StepTimer]] = {"without": [], "with": []}
    for _ in range(args.repeats):  # interleaved, so drifting contention hits both arms
        for arm in ("without", "with"):
            results[arm].append(run(arm == "with", args.steps, root))

    def per_step(arm: str, field: str) -> float:
        # mean over the steady-state steps, median over repeats
        return statistics.median(
            statistics.fmean(getattr(t, field)[args.skip :]) for t in results[arm]
        )

    log_steps = [s for s in range(args.skip, args.steps) if s % 25 == 0]
    plain_steps = [s for s in range(args.skip, args.steps) if s % 25 != 0]

    def median_plain_step(arm: str) -> float:
        # typical non-logging step: is there any per-step cost between logging steps?
        return statistics.median(
            statistics.median(t.cpu[s] for s in plain_steps) for t in results[arm]
        )

    base_cpu = per_step("without", "cpu")
    log_step_cpu = statistics.median(
        statistics.fmean(t.cpu[s] for s in log_steps) for t in results["with"]
    )
    summary = {
        "model": "tiny-llama (quickstart), block 128, batch 16, AdamW, 1 thread",
        "steps_timed": args.steps - args.skip,
        "first_timed_step": args.skip,
        "repeats": args.repeats,
        "cpu_ms_per_step_without": 1e3 * base_cpu,
        "cpu_ms_per_step_with": 1e3 * per_step("with", "cpu"),
        "cpu_overhead_pct": 100 * (per_step("with", "cpu") / base_cpu - 1),
        "wall_ms_per_step_without": 1e3 * per_step("without", "wall"),
        "wall_ms_per_step_with": 1e3 * per_step("with", "wall"),
        "wall_overhead_pct": 100 * (per_step("with", "wall") / per_step("without", "wall") - 1),
        "cpu_ms_one_logging_step_with_snr": 1e3 * log_step_cpu,
        "cpu_ms_median_non_logging_step_without": 1e3 * median_plain_step("without"),
        "cpu_ms_median_non_logging_step_with": 1e3 * median_plain_step("with"),
        "note": "shared 2-core machine: CPU time is the primary measure",
    }
    print(f"{'':<34}{'without':>10}{'with':>10}{'overhead':>10}")
    for unit in ("cpu", "wall"):
        print(
            f"{unit + ' ms / step':<34}{summary[f'{unit}_ms_per_step_without']:>10.1f}"
            f"{summary[f'{unit}_ms_per_step_with']:>10.1f}{summary[f'{unit}_overhead_pct']:>9.1f}%"
        )
    print(f"{'cpu ms of one logging+SNR step':<34}{'':>10}{log_step_cpu * 1e3:>10.1f}")
    print(
        f"{'median cpu ms, non-logging step':<34}{summary['cpu_ms_median_non_logging_step_without']:>10.1f}"
        f"{summary['cpu_ms_median_non_logging_step_with']:>10.1f}"
    )
    out = ROOT / "docs" / "results" / "benchmarks" / "warmup_diagnostics_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
