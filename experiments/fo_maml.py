"""FO-B-MAML validation experiment (spec ``methods/fo-maml.md`` §6, parts A-F).

A-D are synthetic float64 checks with closed-form ground truth (``experiments/fo_maml_synthetic.py``):
A floors of FO-MAML / Reptile vs FO-B-MAML on linear-regression tasks, B bias slopes vs nu,
C inexact-solve rates, D non-smoothness of the MAML objective. E measures the autograd-saved
memory of one meta-gradient (``benchmarks/fo_maml_memory.py``). F meta-trains a Conv1dNet on
MNIST-1D 5-way 5-shot through the real ``MetaLearningModule`` + Lightning ``Trainer`` and tests on
200 meta-test tasks, 3 seeds per method.

    python experiments/fo_maml.py                    # everything (A-E ~ minutes, F longer)
    python experiments/fo_maml.py --parts abcde      # only the synthetic + memory parts
    python experiments/fo_maml.py --parts f --seeds 0 1 2 --mnist-steps 300
    python experiments/fo_maml.py --quick            # smoke version

Results are merged into ``docs/results/fo_maml/summary.json`` (parts not run keep their previous
values), plots are written next to it, and the measured section of ``docs/fo-maml.md`` is rewritten.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from datamodules.tasks import MNIST1DFewShot  # noqa: E402
from modules.meta_learning import MetaLearningModule  # noqa: E402
from modules.meta_nets import Conv1dNet  # noqa: E402

OUT = ROOT / "docs" / "results" / "fo_maml"
MNIST_METHODS = {
    "maml": "maml",
    "fo_b_maml": "fo_b_maml_symmetric",
    "reptile": "reptile",
    "fomaml": "fomaml",
}


def mnist_run(method: str, seed: int, steps: int, test_tasks: int) -> dict[str, float]:
    """Spec §6 F: Conv1dNet(32), meta-batch 8, K=5, gamma=0.1, Adam 1e-3, nu=1e-2, alpha=1."""
    L.seed_everything(seed, verbose=False)
    dm = MNIST1DFewShot(
        n_way=5, k_shot=5, k_query=15, meta_batch_size=8, episodes_per_epoch=max(steps, 1),
        num_test_tasks=test_tasks, task_seed=seed,
    )  # fmt: skip
    module = MetaLearningModule(
        Conv1dNet(channels=32, n_way=5), loss="cross_entropy", method=method, nu=1e-2,
        alpha=1.0, inner_steps=5, inner_lr=0.1, optimizer=partial(torch.optim.Adam, lr=1e-3),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, inference_mode=False,
            limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
        )  # fmt: skip
        start = time.perf_counter()
        if steps > 0:
            trainer.fit(module, dm)
        train_s = time.perf_counter() - start
        (res,) = trainer.test(module, dm, verbose=False)
    return {"acc": res["test/query_acc"], "loss": res["test/query_loss"], "train_s": train_s}


def part_f(seeds: list[int], steps: int, test_tasks: int, arms: list[str]) -> dict:
    out: dict = {"steps": steps, "test_tasks": test_tasks, "arms": {}}
    for name in arms:
        runs = {str(s): mnist_run(MNIST_METHODS[name], s, steps, test_tasks) for s in seeds}
        out["arms"][name] = {
            "acc_by_seed": {s: r["acc"] for s, r in runs.items()},
            "train_s_per_step_by_seed": {s: r["train_s"] / max(steps, 1) for s, r in runs.items()},
        }
        print(f"F  {name:10s} acc by seed {out['arms'][name]['acc_by_seed']}")
    if "fo_b_maml" in arms:
        out["untrained_acc"] = mnist_run("fo_b_maml_symmetric", seeds[0], 0, test_tasks)["acc"]
    return out


def finalize_f(f: dict) -> dict:
    """Per-arm seed lists and means from the per-seed records (runs may come from several calls)."""
    for arm in f["arms"].values():
        seeds = sorted(arm["acc_by_seed"], key=int)
        arm["seeds"] = seeds
        arm["acc"] = [arm["acc_by_seed"][s] for s in seeds]
        arm["mean"] = sum(arm["acc"]) / len(arm["acc"])
        times = [v for v in arm.get("train_s_per_step_by_seed", {}).values() if v == v]
        arm["train_s_per_step"] = sum(times) / len(times) if times else float("nan")
    f["accept"] = f_acceptance(f)
    return f


def f_acceptance(f: dict) -> dict:
    """Spec §6 F acceptance on the means (needs all four arms)."""
    if set(f["arms"]) != set(MNIST_METHODS):
        return {}
    arms = {k: v["mean"] for k, v in f["arms"].items()}
    return {
        "fob_minus_fomaml>=0.10": arms["fo_b_maml"] - arms["fomaml"] >= 0.10,
        "fob_minus_reptile>=0.04": arms["fo_b_maml"] - arms["reptile"] >= 0.04,
        "maml_minus_fob<=0.15": arms["maml"] - arms["fo_b_maml"] <= 0.15,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="abcdef", help="subset of the letters abcdef")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mnist-steps", type=int, default=300)
    parser.add_argument("--test-tasks", type=int, default=200)
    parser.add_argument(
        "--arms", nargs="+", default=list(MNIST_METHODS), choices=list(MNIST_METHODS)
    )
    parser.add_argument("--quick", action="store_true", help="smoke version (small sizes)")
    parser.add_argument("--tag", default="", help="store part F under summary key 'f<tag>'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    OUT.mkdir(parents=True, exist_ok=True)
    summary_path = OUT / "summary.json"
    summary: dict = {}
    quick = args.quick
    if quick:
        args.seeds, args.mnist_steps, args.test_tasks = args.seeds[:1], 10, 20

    if set("abcd") & set(args.parts):
        from experiments import fo_maml_synthetic as syn

    if "a" in args.parts:
        summary["a"] = syn.part_a(outer_steps=100 if quick else 1000)
    if "b" in args.parts:
        summary["b"] = syn.part_b()
    if "c" in args.parts:
        summary["c"] = syn.part_c(num_nu=8 if quick else 26)
    if "d" in args.parts:
        summary["d"] = syn.part_d(points_per_scale=5 if quick else 20)
    if "e" in args.parts:
        # Loaded by path: an unrelated site-packages distribution also ships a `benchmarks` package.
        spec = importlib.util.spec_from_file_location(
            "fo_maml_memory", ROOT / "benchmarks" / "fo_maml_memory.py"
        )
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        summary["e"] = bench.memory_table(channels=[16] if quick else [16, 64, 250], ks=[5, 20])
    if "f" in args.parts:
        summary["f" + args.tag] = part_f(args.seeds, args.mnist_steps, args.test_tasks, args.arms)
    # Keyed with the tag too: a tagged part-F run must not overwrite the untagged run's command.
    command = "python experiments/fo_maml.py " + " ".join(sys.argv[1:])
    summary.setdefault("commands", {})[args.parts + args.tag] = command
    if quick:
        print(json.dumps(summary, indent=1, default=str)[:3000])
        return
    # Merge into the file as it is *now*, under a lock: parts may run in concurrent processes.
    # The lock lives next to the summary: a fixed name in the shared /tmp could be another user's
    # file or a symlink to one.
    with open(summary_path.with_name(".summary.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        summary = merge_summary(summary_path, summary)
    from experiments.fo_maml_report import plot_all, write_docs

    plot_all(summary, OUT)
    write_docs(summary, ROOT / "docs" / "fo-maml.md")


def merge_summary(summary_path: Path, summary: dict) -> dict:
    """Merge this run's parts into summary.json (F arms/seeds merged per seed) and write it."""
    merged = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    commands = {**merged.get("commands", {}), **summary.pop("commands")}
    for key in [k for k in summary if k.startswith("f")]:
        # Arms and seeds of part F may come from separate processes (--arms, --seeds): merge them.
        old = merged.get(key, {})
        if {k: old.get(k) for k in ("steps", "test_tasks")} == {
            k: summary[key][k] for k in ("steps", "test_tasks")
        }:
            arms = {name: dict(arm) for name, arm in old.get("arms", {}).items()}
            for name, arm in summary[key]["arms"].items():
                prev = arms.setdefault(name, {"acc_by_seed": {}, "train_s_per_step_by_seed": {}})
                for field in ("acc_by_seed", "train_s_per_step_by_seed"):
                    prev[field] = {**prev.get(field, {}), **arm[field]}
            summary[key] = {**old, **summary[key], "arms": arms}
    summary = {**merged, **summary, "commands": commands}
    for key in [k for k in summary if k.startswith("f") and isinstance(summary[k], dict)]:
        summary[key] = finalize_f(summary[key])
    summary_path.write_text(json.dumps(summary, indent=1, default=float))
    return summary


if __name__ == "__main__":
    main()
