"""Time per step: HVP cubic-Newton step vs exact (eigendecomposition) step vs one SGD step.

    python benchmarks/cubic_newton.py [--hidden 4 16 32 64] [--reps 7]

The model is ``MLPClassifier`` (one tanh hidden layer, d = 32·hidden parameters, float64) on the
breast-cancer data, batch 8 for gradient and Hessian; each cubic step is exactly what
``CubicNewtonModule.training_step`` does (torch.func gradient, then a d×d Hessian + exact solve, or
a double-backward HVP closure + the HVP solver with its defaults rel_acc = 1e-2, max_iters = 200).

Method (the machine is shared and noisy): every variant is timed the same number of times
(``--reps``) with the same statistic (median). Within each repetition the three variants run one
after another in a rotated (round-robin) order, so a burst of load hits all of them alike, and the
per-repetition (paired) ratios to the SGD step are reported as their median and min-max. Prints a
table and writes docs/results/benchmarks/cubic_newton.json, including the smallest d at which the
median paired exact/HVP ratio is above 1 (HVP step faster than the exact step).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import grad

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.cubic_problems import LogisticLoss, LogisticToyDataModule, MLPClassifier  # noqa: E402
from modules.cubic_newton import CubicNewtonModule  # noqa: E402

OUT = ROOT / "docs" / "results" / "benchmarks" / "cubic_newton.json"


def _spread(xs: list[float]) -> dict:
    """Median and min-max of repeated measurements (the machine is noisy: never one number)."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _paired(num: list[float], den: list[float]) -> list[float]:
    """Ratio per repetition: both samples were taken in the same round, under the same load."""
    return [a / b for a, b in zip(num, den, strict=True)]


def _round_robin(fns: dict, reps: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, ``reps`` calls each, interleaved in a rotated order.

    Interleaving (instead of timing one variant after another) puts each variant's i-th sample in
    the same stretch of machine load, which makes the per-repetition ratios meaningful.
    """
    names = list(fns)
    for name in names:
        fns[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _cubic_step(solver: str, hidden: int, batch: tuple):
    """One ``CubicNewtonModule`` step with the given solver, its optimizer and d."""
    module = CubicNewtonModule(
        MLPClassifier(30, hidden), LogisticLoss(), solver=solver, grad_momentum=0.1,
        hess_momentum=0.1, max_dim_exact=10**6,
    )  # fmt: skip
    opt = module.configure_optimizers()

    def step() -> None:
        y, z = opt.evaluation_points()
        g = grad(module.objective)(y, batch)
        if solver == "exact":
            opt.step(grad=g, hess=module.sample_hessian(z, batch))
        else:
            opt.step(grad=g, hvp=module.sample_hvp(z, batch))

    return step, opt


def _sgd_step(hidden: int, batch: tuple):
    model = MLPClassifier(30, hidden)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = LogisticLoss()

    def step() -> None:
        sgd.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        sgd.step()

    return step


def bench(hidden: int, reps: int, batch: tuple) -> dict:
    exact, _ = _cubic_step("exact", hidden, batch)
    hvp, hvp_opt = _cubic_step("hvp", hidden, batch)
    iters: list[int] = []

    def hvp_step() -> None:
        hvp()
        iters.append(hvp_opt.last.iterations)

    times = _round_robin({"sgd": _sgd_step(hidden, batch), "hvp": hvp_step, "exact": exact}, reps)
    iters = iters[1:]  # drop the warm-up step's count
    paired = {
        "hvp_over_sgd": _paired(times["hvp"], times["sgd"]),
        "exact_over_sgd": _paired(times["exact"], times["sgd"]),
        "exact_over_hvp": _paired(times["exact"], times["hvp"]),
    }
    return {
        "hidden": hidden,
        "d": hvp_opt.dim,
        **{f"{name}_s": _spread(ts) for name, ts in times.items()},
        **{name: _spread(rs) for name, rs in paired.items()},
        "hvp_solver_iters": {"min": min(iters), "max": max(iters)},
        "raw_s": times,
    }


def _fmt(x: dict, scale: float, spec: str) -> str:
    return f"{x['median'] * scale:{spec}} [{x['min'] * scale:{spec}}, {x['max'] * scale:{spec}}]"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, nargs="+", default=[4, 16, 32, 64])
    p.add_argument("--reps", type=int, default=7, help="timed calls per variant (same for all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dm = LogisticToyDataModule(source="breast_cancer")
    batch = (dm.A[:8], dm.y[:8])
    rows = [bench(h, args.reps, batch) for h in args.hidden]
    print(
        f"median [min, max] over {args.reps} interleaved repetitions; ratios are paired per repetition"
    )
    print(f"{'d':>5} | {'SGD step ms':>20} | {'HVP step ms':>20} | {'exact step ms':>23} | "
          f"{'HVP/SGD':>19} | {'exact/SGD':>25} | {'exact/HVP':>20} | HVP iters")  # fmt: skip
    for r in rows:
        it = r["hvp_solver_iters"]
        print(f"{r['d']:>5} | {_fmt(r['sgd_s'], 1e3, '.2f'):>20} | {_fmt(r['hvp_s'], 1e3, '.1f'):>20} | "
              f"{_fmt(r['exact_s'], 1e3, '.1f'):>23} | {_fmt(r['hvp_over_sgd'], 1, '.0f'):>19} | "
              f"{_fmt(r['exact_over_sgd'], 1, '.0f'):>25} | {_fmt(r['exact_over_hvp'], 1, '.2f'):>20} | "
              f"{it['min']}-{it['max']}")  # fmt: skip
    faster = [r["d"] for r in rows if r["exact_over_hvp"]["median"] > 1]
    summary = {
        "command": "python benchmarks/cubic_newton.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, 1 torch thread, shared CPU",
        "method": f"{args.reps} timed calls per variant, interleaved round-robin; median [min, max]; "
        "ratios paired per repetition",
        "rows": rows,
        "hvp_faster_from_d": min(faster) if faster else None,
    }
    print(
        f"HVP step faster than exact step (median paired ratio) from d = {summary['hvp_faster_from_d']}"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
