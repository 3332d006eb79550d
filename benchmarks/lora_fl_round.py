"""Per-round wall time and upload size of the federated simulation: LoRA vs full fine-tuning.

    python benchmarks/lora_fl_round.py [--rounds 5] [--steps 10] [--repeats 4]

Runs ``FederatedLoRAModule`` (3 clients, ``local_steps`` batches of 16 each, a small
character-level Llama, d = 64, random init) for each mode (full FT, LoRA, LoRA + SecAgg) in one
process and reports the round time and the bytes each client uploads per round.

Method (the machine is shared and noisy): each repeat runs every mode once, in a rotated
(round-robin) order, ``--rounds`` rounds per run with the first round dropped (warm-up). Per mode:
median [q1, q3] and min-max over all timed rounds. Per repeat and mode: the median round time
divided by full FT's in the same repeat (paired ratio), summarised as median [min, max]. Writes
``docs/results/benchmarks/lora_fl_round.json``.
The side-by-side comparison with Flower's simulation of the same clients is
``benchmarks/lora_fl_flower.py`` (Flower installed separately, see its docstring).
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
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from datamodules.federated import CharVocab, FederatedTextDataModule  # noqa: E402
from modules.lora_fl import FederatedLoRAModule  # noqa: E402
from modules.lora_fl_settings import (  # noqa: E402
    LoraFLSettings,
    MemorizationSettings,
    SecureAggregationSettings,
)

MODEL = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}  # fmt: skip


class RoundTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self.t0)


SEED = 0
CLIENT_SIZES = [200, 250, 300]
BATCH = 16
LORA = LoraFLSettings(rank=4, alpha=2.0)


def build(
    mode: str, steps: int, rounds: int, secagg: bool = False
) -> tuple[FederatedLoRAModule, FederatedTextDataModule]:
    """The benchmarked module and clients (also used by ``lora_fl_flower.py``: same seeds)."""
    L.seed_everything(SEED, verbose=False)
    module = FederatedLoRAModule(
        model=MODEL, vocab_size=len(CharVocab()), finetune_mode=mode,
        lora=LORA, local_steps=steps, local_warmup_steps=2,
        secure_aggregation=SecureAggregationSettings(enabled=secagg),
        memorization=MemorizationSettings(enabled=False), seed=SEED,
    )  # fmt: skip
    dm = FederatedTextDataModule(
        num_rounds=rounds, client_sizes=CLIENT_SIZES, num_entities=100, batch_size=BATCH
    )
    return module, dm


def round_trainer(rounds: int, timer: RoundTimer) -> L.Trainer:
    """A quiet Trainer that runs ``rounds`` federated rounds and times each with ``timer``."""
    return L.Trainer(
        max_steps=rounds, accelerator="cpu", devices=1, logger=False, callbacks=[timer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip


def measure(mode: str, secagg: bool, rounds: int, steps: int) -> dict:
    """One run of ``rounds`` rounds: the timed round times (first round dropped) and upload size."""
    module, dm = build(mode, steps, rounds, secagg)
    timer = RoundTimer()
    trainer = round_trainer(rounds, timer)
    trainer.fit(module, dm)
    return {
        "mode": mode + ("+secagg" if secagg else ""),
        "round_s": timer.times[1:] or timer.times,
        "bytes_per_client_round": module.history[-1]["round/bytes_per_client"],
    }


MODES = (("full", False), ("lora", False), ("lora", True))


def _quantiles(xs: list[float]) -> dict:
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    return {"median": med, "q1": q1, "q3": q3, "min": min(xs), "max": max(xs), "n": len(xs)}


def run_round_robin(rounds: int, steps: int, repeats: int) -> list[list[dict]]:
    """``repeats`` lists of one run per mode; the mode order rotates by one each repeat so that no
    mode always runs first (cold) or last, and slow stretches of machine load spread over all."""
    runs = []
    for rep in range(repeats):
        order = [MODES[(rep + i) % len(MODES)] for i in range(len(MODES))]
        done = {}
        for mode, secagg in order:
            r = measure(mode, secagg, rounds, steps)
            done[r["mode"]] = r
            print(f"repeat {rep} {r['mode']:>12}: {statistics.median(r['round_s']):.2f} s / round")
        runs.append([done[m + ("+secagg" if sa else "")] for m, sa in MODES])
    return runs


def summarize(runs: list[list[dict]], steps: int) -> list[dict]:
    """Per mode: round-time quantiles over all timed rounds, and the per-repeat paired ratio of
    its median round time to full FT's median in the same repeat."""
    rows = []
    for j, (mode, secagg) in enumerate(MODES):
        all_s = [t for rep in runs for t in rep[j]["round_s"]]
        ratios = [
            statistics.median(rep[j]["round_s"]) / statistics.median(rep[0]["round_s"])
            for rep in runs
        ]
        rows.append({
            "mode": mode + ("+secagg" if secagg else ""),
            "round_s": _quantiles(all_s),
            "paired_ratio_to_full": {
                "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                "per_repeat": ratios,
            },
            "bytes_per_client_round": runs[0][j]["bytes_per_client_round"],
            "local_steps_per_client": steps,
            "raw_round_s": [rep[j]["round_s"] for rep in runs],
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds per run (the first is dropped)"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=4, help="runs per mode, modes rotated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = summarize(run_round_robin(args.rounds, args.steps, args.repeats), args.steps)
    print("| mode | s / round: median [q1, q3] (min-max) | paired ratio to full: median [min, max] "
          "| bytes / client / round |")  # fmt: skip
    print("|---|---|---|---|")
    for r in rows:
        t, q = r["round_s"], r["paired_ratio_to_full"]
        print(f"| {r['mode']} | {t['median']:.2f} [{t['q1']:.2f}, {t['q3']:.2f}] "
              f"({t['min']:.2f}-{t['max']:.2f}) | {q['median']:.2f} [{q['min']:.2f}, {q['max']:.2f}] "
              f"| {r['bytes_per_client_round']:.0f} |")  # fmt: skip
    out = ROOT / "docs" / "results" / "benchmarks" / "lora_fl_round.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    method = (
        "modes rotated round-robin over repeats; first round of each run dropped; "
        "round_s over all timed rounds; ratios paired per repeat (median round time / full's)"
    )
    out.write_text(json.dumps({"args": vars(args), "method": method, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
