"""Time and peak memory of HyperINF vs DataInf vs LiSSA vs exact inverses at two LoRA ranks.

Each (method, rank) runs in a fresh process (streaming mode, ``grads.cache=never``, so nothing of
size ``n`` is kept) on ``LoRAClassifier(in_features=128, hidden_size=256, num_classes=10)`` with
LoRA on the hidden layer and the head, random inputs, ``n`` training and ``m`` validation examples.
Reported per run: wall time of ``InfluenceEngine.run``, the increase of the process's peak RSS
during it, and the bytes of the curvature state the method builds (exact, from the shapes):
``d^2`` per tensor for ``hyperinf``/``exact_gfim`` (independent of the rank), ``(r d)^2`` for the
dense flattened Fisher of ``lissa``/``exact_fim``, nothing for ``datainf``/``grad_dot``.

    python benchmarks/hyperinf.py [--ranks 4 32] [--n 1000]

Writes ``docs/results/benchmarks/hyperinf.json``. CPU numbers on a shared machine are indicative.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["hyperinf", "exact_gfim", "datainf", "lissa", "exact_fim", "grad_dot"]


def curvature_bytes(method: str, shapes: dict[str, tuple[int, int]], itemsize: int = 4) -> int:
    """Bytes of the curvature a method materialises, from the oriented ``(r, d)`` shapes."""
    if method in ("hyperinf", "exact_gfim"):
        return sum(d * d for _, d in shapes.values()) * itemsize
    if method in ("lissa", "exact_fim"):
        return sum((r * d) ** 2 for r, d in shapes.values()) * itemsize
    return 0


def worker(method: str, rank: int, n: int, m: int, threads: int) -> dict:
    import torch

    from modules.sequence_classifier import LoRAClassifier
    from ops.influence import orient_grad
    from ops.influence_config import GradConfig
    from ops.influence_engine import InfluenceEngine
    from ops.per_sample_grads import select_params

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    model = LoRAClassifier(
        in_features=128, hidden_size=256, num_classes=10, lora_r=rank, lora_alpha=rank, init_seed=0
    ).eval()
    with torch.no_grad():  # random adapters: B = 0 would leave lora_A with zero gradients
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=gen)
    x = torch.randn(n + m, 128, generator=gen)
    y = torch.randint(0, 10, (n + m,), generator=gen)
    params = select_params(model, ["lora_A", "lora_B", "head.weight"])
    shapes = {k: tuple(orient_grad(k, p.detach()).shape) for k, p in params.items()}

    def batches(lo: int, hi: int, bs: int = 100):
        return lambda: (
            (
                torch.arange(i, min(i + bs, hi)),
                {"x": x[i : min(i + bs, hi)], "y": y[i : min(i + bs, hi)]},
            )
            for i in range(lo, hi, bs)
        )

    # Warm-up on 20 examples with grad_dot (no curvature state, so the high-water mark is not
    # raised by the measured method's own state): the first call's one-off costs (imports,
    # vmap tracing, allocator growth; ~20 MiB and most of a cheap method's time) were counted
    # for whichever method ran.
    grads = GradConfig(cache="never", fim_max_dim=16384)
    InfluenceEngine(["grad_dot"], grads=grads).run(
        model, params, model.per_sample_loss, batches(0, 10, 10), batches(n, n + 10, 10)
    )
    engine = InfluenceEngine([method], grads=grads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = engine.run(model, params, model.per_sample_loss, batches(0, n), batches(n, n + m))
    wall = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "rank": rank,
        "n": n,
        "wall_s": wall,
        "peak_rss_increase_mib": (rss1 - rss0) / 1024,
        "curvature_mib": curvature_bytes(method, shapes) / 2**20,
        "shapes": {k.split(".")[-3] if "lora" in k else k: v for k, v in shapes.items()},
        "schulz_residual_max": max(res.residuals[method].values()) if res.residuals else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--m", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "RANK"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "docs/results/benchmarks/hyperinf.json"))
    args = parser.parse_args()
    if args.worker:
        row = worker(args.worker[0], int(args.worker[1]), args.n, args.m, args.threads)
        print(json.dumps(row))
        return
    rows = []
    for rank in args.ranks:
        for method in args.methods:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                method,
                str(rank),
                "--n",
                str(args.n),
                "--m",
                str(args.m),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"r={rank:3d} {method:11s} {r['wall_s']:7.2f} s  peak RSS +{r['peak_rss_increase_mib']:7.1f} MiB"
                f"  curvature {r['curvature_mib']:8.2f} MiB",
                flush=True,
            )
    print("\n| rank | method | wall s | peak RSS increase MiB | curvature MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['rank']} | {r['method']} | {r['wall_s']:.2f} | "
            f"{r['peak_rss_increase_mib']:.1f} | {r['curvature_mib']:.2f} |"
        )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows}, indent=1
        )
    )


if __name__ == "__main__":
    main()
