"""LoRA vs full fine-tuning in FedAvg on a real pretrained LLM: canary memorization on SmolLM2.

The paper's claim (Bossy et al. 2025) is about pretrained LLMs. This runs the protocol of
``experiments/lora_fl.py`` from ``smollm2-135m-instruct`` (offline preset, 30 Llama layers,
135M parameters, its own BPE tokenizer) instead of the character-level base, scaled to the
2-core CPU: 3 clients with 40/50/60 synthetic QA examples + 20 clinical-record canaries (6 x10,
14 x1), examples packed into 128-token sequences, batch 4, 4 rounds of 3 local epochs, the
official LRs and LoRA of the paper's scripts (full FT AdamW 1e-4; LoRA r=16, alpha=8 on all 7
projections, 1e-3), memorization with L in {8, 16, 24} tokens, S = 16, phi = 0 (phi = 1
reported). Utility is the held-out answer exact match, as in the main experiment.

    python experiments/lora_fl_smollm2.py             # A (full), B (LoRA), seeds 0-2 (~30 min each)
    python experiments/lora_fl_smollm2.py --quick     # 1 seed, 1 round, 10 canaries

Writes ``docs/results/lora_fl_smollm2/`` (runs, summary.json, plot) and the SmolLM2 section of
``docs/lora-fl-memorization.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experiments.lora_fl import run_arm  # noqa: E402
from experiments.lora_fl_report import write_report  # noqa: E402
from modules.pretrained_presets import resolve_pretrained_preset  # noqa: E402

PRESET = "smollm2-135m-instruct"
RESULTS = ROOT / "docs" / "results" / "lora_fl_smollm2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["A_full", "B_lora"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--local-epochs", type=int, default=3,
        help="3: with 1 epoch full FT memorized nothing (see docs)",
    )  # fmt: skip
    parser.add_argument("--client-sizes", type=int, nargs=3, default=[40, 50, 60])
    parser.add_argument("--canaries", type=int, default=20)
    parser.add_argument("--lr-full", type=float, default=1e-4, help="official full-FT LR")
    parser.add_argument("--lr-lora", type=float, default=1e-3, help="official LoRA LR")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.set_defaults(
        num_entities=100, val_questions=20, lora_rank=16, lora_alpha=8.0,
        prefix_lengths=[8, 16, 24], suffix_len=16, batch_size=4, pack=128, goldfish_h=13,
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rounds, args.canaries, args.client_sizes = [0], 1, 10, [10, 10, 10]
        args.val_questions, args.out = 5, Path("/tmp/lora_fl_smollm2_quick")
    torch.set_num_threads(args.threads)
    base = resolve_pretrained_preset(PRESET)  # builds the local directory on first use
    args.tokenizer = str(base)
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    for arm in args.arms:
        for seed in args.seeds:
            path = runs_dir / f"{arm}_seed{seed}.json"
            if path.exists():
                continue
            print(f"== {arm} seed {seed}", flush=True)
            t0 = time.time()
            result = run_arm(arm, seed, base, args)
            path.write_text(json.dumps(result, indent=1))
            m = result["mem_phi0"]
            print(
                f"   acc {result['answer_acc']:.3f}  exact_x10 {m['exact_x10']:.3f}  "
                f"exact_x1 {m['exact_x1']:.3f}  ({time.time() - t0:.0f}s)",
                flush=True,
            )
    results = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    command = "python experiments/lora_fl_smollm2.py " + " ".join(sys.argv[1:])
    docs = ROOT / "docs" if args.out.resolve() == RESULTS.resolve() else None
    write_report(results, args, args.out, command.strip(), docs=docs, section="smollm2")


if __name__ == "__main__":
    main()
