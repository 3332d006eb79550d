"""Peak autograd memory and time per meta-step vs inner steps K: MAML vs FO-MAML vs FO-B-MAML.

Memory is the peak of *live autograd-saved storage bytes* during one meta-gradient, counted with
``torch.autograd.graph.saved_tensors_hooks``: every saved tensor goes into a box that holds a
reference on its storage; a storage's bytes are added when its first box is packed and subtracted
when the graph frees its last box. Several autograd ops often save the same tensor (or views of
one storage), so counting per saved tensor would count that memory several times (at 250 channels,
K = 20: 277 MB per saved tensor vs 123 MB per storage for MAML). Deterministic on CPU (spec §6 E).
Time per meta-step: median [min, max] over ``--repeats`` timed meta-steps after one warm-up.
Net: the MNIST-1D ``Conv1dNet``; task: 5-way 5-shot with 15 queries per class.

    python benchmarks/fo_maml_memory.py            # K = 5, 20, 80 at 32 and 250 channels
    python benchmarks/fo_maml_memory.py --quick

Prints a table and writes ``docs/results/benchmarks/fo_maml_memory.json`` (+ a PNG in
``docs/results/fo_maml/``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.meta_nets import Conv1dNet  # noqa: E402
from ops.meta_gradients import fob_maml_grad, fomaml_grad, maml_grad, task_objectives  # noqa: E402

METHODS = ("maml", "fomaml", "fo_b_maml")


class SavedTensorMeter:
    """Context manager tracking the peak bytes of live autograd-saved storages, each counted once."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage address -> number of live boxes saving it

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:  # the graph no longer holds this storage
            del self._refs[key]
            self.live -= nbytes

    def _pack(self, tensor: torch.Tensor):
        box = _Box(tensor)
        # Key on the storage, not the tensor: the same storage saved by several ops (or through
        # several views) is held once. The box keeps the storage alive, so its address cannot be
        # reused by another storage while the key is in ``_refs``.
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key not in self._refs:
            self._refs[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(box, self._release, key, nbytes)
        return box

    @staticmethod
    def _unpack(box: _Box) -> torch.Tensor:
        return box.tensor

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


class _Box:
    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _task(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sx, qx = torch.randn(25, 1, 40, generator=gen), torch.randn(75, 1, 40, generator=gen)
    return (sx, torch.arange(5).repeat_interleave(5)), (qx, torch.arange(5).repeat_interleave(15))


def meta_gradient(method: str, net: Conv1dNet, steps: int, task) -> None:
    g, f = task_objectives(net, F.cross_entropy, *task)
    x = {k: v.detach() for k, v in net.named_parameters()}
    if method == "maml":
        maml_grad(g, f, x, steps=steps, lr=0.1)
    elif method == "fomaml":
        fomaml_grad(g, f, x, steps=steps, lr=0.1)
    else:
        fob_maml_grad(g, f, x, nu=1e-2, alpha=1.0, steps=steps, lr=0.1, estimator="symmetric")


def peak_saved_mb(method: str, channels: int, steps: int) -> float:
    torch.manual_seed(0)
    net = Conv1dNet(channels=channels)
    with SavedTensorMeter() as meter:
        meta_gradient(method, net, steps, _task())
    return meter.peak / 2**20


def memory_table(channels: list[int], ks: list[int]) -> dict:
    """Spec §6 E: peak saved MB per (channels, method, K) and the three acceptance ratios."""
    table = {
        str(c): {m: {str(k): peak_saved_mb(m, c, k) for k in ks} for m in METHODS} for c in channels
    }
    for c, row in table.items():
        print(f"E  {c:>4s} ch " + "  ".join(
            f"{m}: " + " -> ".join(f"{row[m][str(k)]:.2f}" for k in ks) + " MB" for m in METHODS
        ))  # fmt: skip
    lo, hi = str(ks[0]), str(ks[-1])
    big = str(max(channels))
    ratios = {
        "maml_growth": min(table[c]["maml"][hi] / table[c]["maml"][lo] for c in table),
        "fob_growth": max(table[c]["fo_b_maml"][hi] / table[c]["fo_b_maml"][lo] for c in table),
        f"maml_over_fob_at_{big}ch_K{hi}": table[big]["maml"][hi] / table[big]["fo_b_maml"][hi],
    }
    accept = {
        "maml(K20)/maml(K5)>=3": ratios["maml_growth"] >= 3,
        "fob(K20)/fob(K5)<=1.05": ratios["fob_growth"] <= 1.05,
    }
    if big == "250":
        accept["maml/fob>=10_at_250ch_K20"] = ratios[f"maml_over_fob_at_{big}ch_K{hi}"] >= 10
    return {"table_mb": table, "ratios": ratios, "accept": accept}


def time_per_meta_step(
    method: str, channels: int, steps: int, tasks: int, repeats: int
) -> list[float]:
    """Seconds of each of ``repeats`` timed meta-steps (after one warm-up): a spread, not one number."""
    torch.manual_seed(0)
    net = Conv1dNet(channels=channels)
    batch = [_task(i) for i in range(tasks)]
    meta_gradient(method, net, steps, batch[0])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for task in batch:
            meta_gradient(method, net, steps, task)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 250])
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 20, 80])
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-step for timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed meta-steps per cell")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.channels, args.ks, args.tasks, args.repeats = [16], [5, 20], 1, 1
    torch.set_num_threads(1)
    rows = []
    print(
        f"{'channels':>8} {'method':>10} {'K':>4} {'peak saved MB':>14} {'s / meta-step median [min, max]':>14}"
    )
    for c in args.channels:
        for m in METHODS:
            for k in args.ks:
                mb = peak_saved_mb(m, c, k)
                runs = time_per_meta_step(m, c, k, args.tasks, args.repeats)
                sec = statistics.median(runs)
                rows.append({
                    "channels": c, "method": m, "K": k, "peak_saved_mb": mb,
                    "seconds": sec, "seconds_min": min(runs), "seconds_max": max(runs),
                    "seconds_runs": runs,
                })  # fmt: skip
                print(
                    f"{c:>8} {m:>10} {k:>4} {mb:>14.2f} {sec:>9.3f} [{min(runs):.3f}, {max(runs):.3f}]"
                )
    out = {
        "command": "python benchmarks/fo_maml_memory.py " + " ".join(sys.argv[1:]),
        "tasks_per_meta_step": args.tasks,
        "timed_repeats": args.repeats,
        "memory": "peak live autograd-saved storage bytes, each storage counted once",
        "torch_threads": 1,
        "rows": rows,
    }
    if not args.quick:
        path = ROOT / "docs" / "results" / "benchmarks" / "fo_maml_memory.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        from experiments.fo_maml_report import plot_benchmark

        plot_benchmark(out, ROOT / "docs" / "results" / "fo_maml" / "benchmark_memory_time.png")


if __name__ == "__main__":
    main()
