"""Per-round wall time and upload size of the federated simulation: LoRA vs full fine-tuning.

    python benchmarks/lora_fl_round.py [--rounds 3] [--steps 10]

Runs ``FederatedLoRAModule`` (3 clients, ``local_steps`` batches of 16 each, a small
character-level Llama, d = 64, random init) for each mode in one process and reports the median
round time and the bytes each client uploads per round. Writes ``docs/results/benchmarks/lora_fl_round.json``.
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
    module, dm = build(mode, steps, rounds, secagg)
    timer = RoundTimer()
    trainer = round_trainer(rounds, timer)
    trainer.fit(module, dm)
    return {
        "mode": mode + ("+secagg" if secagg else ""),
        "median_round_s": statistics.median(timer.times[1:] or timer.times),
        "bytes_per_client_round": module.history[-1]["round/bytes_per_client"],
        "local_steps_per_client": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        measure("full", False, args.rounds, args.steps),
        measure("lora", False, args.rounds, args.steps),
        measure("lora", True, args.rounds, args.steps),
    ]
    print("| mode | median s / round | bytes / client / round |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['median_round_s']:.2f} | {r['bytes_per_client_round']:.0f} |")
    out = ROOT / "docs" / "results" / "benchmarks" / "lora_fl_round.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
