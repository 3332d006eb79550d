"""Scratch memory of the warmup diagnostics' float64 math versus the size of one weight tensor.

``UpdateDiagnostics`` keeps one snapshot of the trainable weights; everything else it computes
(update norm, direction RMS, per-tensor and per-neuron angles, RRC) should need scratch memory
that does not grow with the model. Each (size, implementation) runs in a fresh process: allocate
w_t and w_{t+1} (float32: the snapshot and the live weights) without temporaries, record the
resident set, run the metrics of one logging step, and report the growth of the peak resident set
(``ru_maxrss``). ``blocked`` is ``ops.warmup`` (float64 blocks of 2^20 elements); ``whole`` is the
same math on whole-tensor float64 copies, for comparison. glibc's dynamic mmap threshold makes
freed blocks linger, so each is measured with the default allocator and with
``MALLOC_MMAP_THRESHOLD_=131072`` (the algorithm's own scratch).

    python benchmarks/warmup_diagnostics_memory.py [--sizes 1e6 1e7 2.5e7 1e8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "benchmarks" / "warmup_diagnostics_memory.json"
FAN_IN = 1024


def whole_tensor_metrics(old, new, probe) -> None:
    """The metrics with whole-tensor float64 copies (how they are usually written)."""
    import torch

    a, b = old.double(), new.double()
    delta = b - a
    u = -delta / 1e-3 - 0.1 * a
    _ = float(delta.norm()), float(u.norm())
    na, nb = a.norm(), b.norm()
    _ = 2 * torch.atan2((a / na - b / nb).norm(), (a / na + b / nb).norm())
    ra, rb = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    _ = 2 * torch.atan2((ra - rb).norm(dim=1), (ra + rb).norm(dim=1))
    x = probe.double()
    _ = float((x @ (b - a).T).norm() / (x @ a.T).norm())


def measure(elements: int, impl: str) -> dict:
    """Runs inside the child process: peak RSS growth of one logging step's metrics."""
    sys.path.insert(0, str(ROOT))
    import torch

    from ops.warmup import angular_update, rrc, update_norms

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(elements // FAN_IN, FAN_IN, generator=gen)
    new = torch.empty_like(old).normal_(generator=gen).mul_(1e-3).add_(old)  # no temporaries
    probe = torch.randn(1024, FAN_IN, generator=gen)  # 16 x 64 tokens, the callback's default
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    before_kib = resident_pages * resource.getpagesize() // 1024
    if impl == "blocked":
        update_norms(old, new, lr=1e-3, weight_decay=0.1)
        angular_update(old, new)
        angular_update(old, new, per_neuron=True)
        rrc(probe, old, new)
    else:
        whole_tensor_metrics(old, new, probe)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"elements": old.numel(), "tensor_mib": old.numel() * 4 / 2**20,
            "scratch_peak_mib": (peak_kib - before_kib) / 1024}  # fmt: skip


def run_child(elements: int, impl: str, fixed_mmap: bool) -> float:
    env = dict(os.environ)
    if fixed_mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(elements), "--impl", impl],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["scratch_peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 2.5e7, 1e8])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="blocked", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.impl)))
        return
    rows = []
    print("| elements | fp32 tensor MiB | blocked (default malloc) | blocked (fixed mmap) "
          "| whole-tensor (default) | whole-tensor (fixed mmap) |")  # fmt: skip
    for size in args.sizes:
        n = int(size) // FAN_IN * FAN_IN
        row = {"elements": n, "tensor_mib": n * 4 / 2**20}
        for impl in ("blocked", "whole"):
            for fixed in (False, True):
                row[f"{impl}_{'fixed_mmap' if fixed else 'default'}_mib"] = run_child(
                    n, impl, fixed
                )
        rows.append(row)
        cells = " | ".join(f"{v:.0f}" for k, v in row.items() if k.endswith("_mib"))
        print(f"| {n:,d} | {cells} |")
    worst_blocked = max(r["blocked_fixed_mmap_mib"] for r in rows)
    print(f"largest blocked scratch with a fixed mmap threshold: {worst_blocked:.0f} MiB")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": "python benchmarks/warmup_diagnostics_memory.py",
                               "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
