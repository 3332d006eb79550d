"""Time per step: HVP cubic-Newton step vs exact (eigendecomposition) step vs one SGD step.

    python benchmarks/cubic_newton.py [--hidden 4 16 32 64] [--reps 3]

The model is ``MLPClassifier`` (one tanh hidden layer, d = 32·hidden parameters, float64) on the
breast-cancer data, batch 8 for gradient and Hessian; each cubic step is exactly what
``CubicNewtonModule.training_step`` does (torch.func gradient, then a d×d Hessian + exact solve, or
a double-backward HVP closure + the HVP solver with its defaults rel_acc = 1e-2, max_iters = 200). Prints a table
and writes docs/results/benchmarks/cubic_newton.json, including the smallest d at which the HVP step
is faster than the exact step.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(hidden: int, reps: int, batch: tuple) -> dict:
    results: dict = {"hidden": hidden}
    for solver in ("exact", "hvp"):
        module = CubicNewtonModule(
            MLPClassifier(30, hidden), LogisticLoss(), solver=solver, grad_momentum=0.1,
            hess_momentum=0.1, max_dim_exact=10**6,
        )  # fmt: skip
        opt = module.configure_optimizers()
        results["d"] = opt.dim

        def step(module=module, opt=opt, solver=solver) -> None:
            y, z = opt.evaluation_points()
            g = grad(module.objective)(y, batch)
            if solver == "exact":
                opt.step(grad=g, hess=module.sample_hessian(z, batch))
            else:
                opt.step(grad=g, hvp=module.sample_hvp(z, batch))

        results[f"{solver}_s"] = _time(step, reps)
        if solver == "hvp":
            results["hvp_solver_iters"] = opt.last.iterations
    model = MLPClassifier(30, hidden)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = LogisticLoss()

    def sgd_step() -> None:
        sgd.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        sgd.step()

    results["sgd_s"] = _time(sgd_step, max(reps, 20))
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, nargs="+", default=[4, 16, 32, 64])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dm = LogisticToyDataModule(source="breast_cancer")
    batch = (dm.A[:8], dm.y[:8])
    rows = [bench(h, args.reps, batch) for h in args.hidden]
    print(f"{'d':>6} {'SGD step':>10} {'HVP step':>10} {'exact step':>11} {'HVP iters':>9}")
    for r in rows:
        print(f"{r['d']:>6} {r['sgd_s'] * 1e3:>8.2f}ms {r['hvp_s'] * 1e3:>8.1f}ms "
              f"{r['exact_s'] * 1e3:>9.1f}ms {r['hvp_solver_iters']:>9}")  # fmt: skip
    faster = [r["d"] for r in rows if r["hvp_s"] < r["exact_s"]]
    summary = {
        "command": "python benchmarks/cubic_newton.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, 1 torch thread, shared CPU",
        "rows": rows,
        "hvp_faster_from_d": min(faster) if faster else None,
    }
    print(f"HVP step faster than exact step from d = {summary['hvp_faster_from_d']}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
