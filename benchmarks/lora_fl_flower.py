"""Per-round wall time of our federated simulation vs Flower's simulation, side by side.

    PYTHONPATH=/tmp/flwr_pkgs python benchmarks/lora_fl_flower.py [--rounds 4] [--steps 10]

``flwr`` pins ``packaging``/``protobuf`` versions that differ from the project's, so install it
*outside* the project environment and put it on ``PYTHONPATH`` for this process only::

    .venv/bin/pip install --target /tmp/flwr_pkgs "flwr[simulation]==1.42.0"

(or ``pip install -e '.[bench]'`` in a separate environment). Ray runs its workers at nice 15 by
default; ``--ray-worker-niceness 0`` (the default here) puts the Flower clients at our process's
priority, so that other jobs on a shared machine slow both sides alike.

Both systems run the same three clients of ``FederatedTextDataModule``, the same tiny Llama
(``MODEL`` of ``benchmarks/lora_fl_round.py``), the same LoRA settings, local steps, batch size
and seeds, and the same local-training routine (``modules.lora_fl_client.ClientTrainer.run``):

* ours: ``FederatedLoRAModule`` under a Lightning ``Trainer`` (one ``training_step`` = one
  round, clients sequential in-process, one all-reduce);
* Flower: ``run_simulation`` (Ray backend, one 1-CPU actor so clients also run one after the
  other) with a ``ServerApp`` running ``flwr.serverapp.strategy.FedAvg`` and a ``ClientApp``
  whose train function loads the received arrays into a replica of the module and calls
  ``ClientTrainer.run``. Full fine-tuning: clients return their weights, stock ``FedAvg``
  averages them. LoRA (``merged_delta_mean``): clients return their factors ``A, B``, and a
  ``FedAvg`` subclass adds ``sum_c w_c s B_c A_c`` to the target weights (``merged_deltas``).

The two systems alternate run by run (ours, Flower; LoRA then full; ``--repeats`` times); the
first round of every run is warm-up and dropped. Per-round time is the Lightning batch (ours)
and the time between successive strategy round ends (Flower; its ``evaluate_fn`` hook); the
seconds inside ``ClientTrainer.run`` are timed on both sides, so the rest of a round is the
system's own overhead (orchestration, serialization, aggregation). Both final global models are
compared (they must agree up to fp32 summation order). Bytes: what a client uploads per round
(ours: the module's count at 32 bits; Flower: ``ArrayRecord.count_bytes()`` of the reply) and
what it downloads (Flower: the sent ``ArrayRecord``; ours: the server parameters, implied).
Writes ``docs/results/benchmarks/lora_fl_flower.json``.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
# ``benchmarks`` is not importable as a package (opacus installs a top-level ``benchmarks``), so
# this folder goes on the path and the sibling benchmark is imported as ``lora_fl_round``.
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

INSTALL = '.venv/bin/pip install --target /tmp/flwr_pkgs "flwr[simulation]==1.42.0"'
try:
    import flwr
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
except ImportError as err:  # pragma: no cover - depends on the optional install
    sys.exit(
        f"flwr is not importable ({err}). Install it outside the project environment:\n"
        f"    {INSTALL}\n"
        f"and run: PYTHONPATH=/tmp/flwr_pkgs .venv/bin/python benchmarks/lora_fl_flower.py"
    )

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lora_fl_round import (  # noqa: E402
    BATCH,
    CLIENT_SIZES,
    LORA,
    MODEL,
    SEED,
    RoundTimer,
    build,
    round_trainer,
)

from datamodules.federated import FederatedTextDataModule  # noqa: E402
from modules.lora_fl import FederatedLoRAModule  # noqa: E402
from modules.lora_fl_client import ClientTrainer  # noqa: E402
from ops.federated import flatten_tensors, normalize_weights, unflatten_like  # noqa: E402
from ops.seeding import derive_seed  # noqa: E402


# ---------------------------------------------------------------------------- ours
class TimedClientTrainer(ClientTrainer):
    """``ClientTrainer`` that adds the seconds of every ``run`` to ``CLIENT_S`` (no other change)."""

    def run(self, client: int, seed: int):
        t0 = time.perf_counter()
        try:
            return super().run(client, seed)
        finally:
            CLIENT_S.append(time.perf_counter() - t0)


CLIENT_S: list[float] = []


def run_ours(mode: str, rounds: int, steps: int) -> dict:
    module, dm = build(mode, steps, rounds)
    timer = RoundTimer()
    trainer = round_trainer(rounds, timer)
    CLIENT_S.clear()
    # training_step looks ClientTrainer up in modules.lora_fl: time the clients for this run.
    lora_fl_module = sys.modules[FederatedLoRAModule.__module__]
    lora_fl_module.ClientTrainer = TimedClientTrainer
    try:
        trainer.fit(module, dm)
    finally:
        lora_fl_module.ClientTrainer = ClientTrainer
    n = len(CLIENT_SIZES)
    return {
        "round_s": timer.times,
        "client_s": [sum(CLIENT_S[i : i + n]) for i in range(0, len(CLIENT_S), n)],
        "upload_bytes_per_client": module.history[-1]["round/bytes_per_client"],
        "server_state_bytes": 4 * module.flat_server_state().numel(),
        "final": module.flat_server_state().clone(),
    }


# ---------------------------------------------------------------------------- Flower clients
class FactorUploadTrainer(ClientTrainer):
    """``ClientTrainer`` whose LoRA clients return their factors (the server merges them)."""

    def _start(self, stack):
        trainable, finish = super()._start(stack)
        self.trainable = trainable
        if self.m.adapter is None:
            return trainable, finish  # full: Delta_c over all weights
        return trainable, lambda: flatten_tensors(t.detach() for t in trainable)


_REPLICAS: dict[tuple, tuple[FederatedLoRAModule, FederatedTextDataModule]] = {}


def replica(mode: str, steps: int, rounds: int):
    """One module + data replica per (actor) process, built once like a client's base model."""
    key = (mode, steps, rounds)
    if key not in _REPLICAS:
        module, dm = build(mode, steps, rounds)
        dm.setup("fit")
        # ClientTrainer reads trainer.datamodule.batch_size / trainer.max_steps only.
        module.trainer = SimpleNamespace(datamodule=dm, max_steps=rounds)
        _REPLICAS[key] = (module, dm)
    return _REPLICAS[key]


client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = msg.content["config"]
    client = int(context.node_config["partition-id"])
    round_index = int(cfg["server-round"]) - 1
    module, dm = replica(str(cfg["mode"]), int(cfg["steps"]), int(cfg["rounds"]))
    incoming = msg.content["arrays"].to_torch_state_dict()
    server = module.server_parameters()
    with torch.no_grad():
        for name, p in server:
            p.copy_(incoming[name])
    sizes = dm.client_num_samples
    t1 = time.perf_counter()
    trainer = FactorUploadTrainer(module, dm, round_index, sizes)
    flat, loss = trainer.run(client, derive_seed(SEED, round_index, client))
    t2 = time.perf_counter()
    tensors = unflatten_like(flat, trainer.trainable)
    if module.adapter is None:  # FedAvg averages the clients' weights theta_r + Delta_c
        out = {n: p.detach() + d for (n, p), d in zip(server, tensors, strict=True)}
    else:  # fresh factors A, B of every target layer
        out = dict(zip(module.adapter.factor_names(), tensors, strict=True))
    content = RecordDict(
        {
            "arrays": ArrayRecord(out),
            "metrics": MetricRecord(
                {"num-examples": sizes[client], "train_loss": loss, "load_s": t1 - t0,
                 "train_s": t2 - t1, "total_s": time.perf_counter() - t0,
                 "torch_threads": torch.get_num_threads()}
            ),
        }
    )  # fmt: skip
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------------------- Flower server
JOB: dict = {}  # set by the driver before run_simulation (ServerApp runs in a driver thread)


class TimedFedAvg(FedAvg):
    """Stock FedAvg that records payload sizes and client-side seconds of every round."""

    def configure_train(self, server_round, arrays, config, grid):
        self.current = arrays
        JOB["download_bytes"].append(arrays.count_bytes())
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        if len(ok) != len(replies):
            JOB["errors"].extend(m.error.reason for m in replies if m.has_error())
        JOB["upload_bytes"].append([m.content["arrays"].count_bytes() for m in ok])
        JOB["client_s"].append([dict(m.content["metrics"]) for m in ok])
        return self.merge(server_round, replies)

    def merge(self, server_round, replies):
        return super().aggregate_train(server_round, replies)


class LoraMergeFedAvg(TimedFedAvg):
    """FedAvg for fresh per-round adapters: ``W += sum_c w_c s B_c A_c`` (merged_delta_mean)."""

    def merge(self, server_round, replies):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        adapter = JOB["server_module"].adapter
        weights = normalize_weights(
            [float(m.content["metrics"]["num-examples"]) for m in valid]
        ).tolist()
        state = {k: v.clone() for k, v in self.current.to_torch_state_dict().items()}
        for m, w in zip(valid, weights, strict=True):
            for name, d in adapter.merged_deltas(m.content["arrays"].to_torch_state_dict()).items():
                state[name] += w * d
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(state), metrics


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    mode, steps, rounds = JOB["mode"], JOB["steps"], JOB["rounds"]
    module, _ = build(mode, steps, rounds)
    JOB["server_module"] = module
    initial = ArrayRecord({n: p.detach().clone() for n, p in module.server_parameters()})
    cls = LoraMergeFedAvg if mode == "lora" else TimedFedAvg
    n = len(CLIENT_SIZES)
    strategy = cls(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
    marks: list[float] = []

    def mark(server_round: int, arrays: ArrayRecord) -> None:
        marks.append(time.perf_counter())  # called before round 1 and after every round

    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=rounds,
        train_config=ConfigRecord({"mode": mode, "steps": steps, "rounds": rounds}),
        evaluate_fn=mark,
    )  # fmt: skip
    JOB["round_s"] = [b - a for a, b in itertools.pairwise(marks)]
    final = result.arrays.to_torch_state_dict()
    JOB["final"] = flatten_tensors(final[name] for name, _ in module.server_parameters())


def run_flower(mode: str, rounds: int, steps: int, app_module) -> dict:
    job = app_module.JOB
    job.clear()
    job.update(mode=mode, steps=steps, rounds=rounds, download_bytes=[], upload_bytes=[],
               client_s=[], errors=[])  # fmt: skip
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    }
    t0 = time.perf_counter()
    run_simulation(
        server_app=app_module.server_app, client_app=app_module.client_app,
        num_supernodes=len(CLIENT_SIZES), backend_config=backend_config,
    )  # fmt: skip
    total = time.perf_counter() - t0
    if job["errors"] or "final" not in job:
        raise RuntimeError(f"Flower simulation failed: {job['errors'] or 'no result'}")
    return {
        "round_s": job["round_s"],
        "run_simulation_s": total,
        "download_bytes_per_client": statistics.median(job["download_bytes"]),
        "upload_bytes_per_client": statistics.median(b for r in job["upload_bytes"] for b in r),
        "client_s": [sum(c["train_s"] for c in r) for r in job["client_s"]],
        "client_app_s": [sum(c["total_s"] for c in r) for r in job["client_s"]],
        "actor_torch_threads": max(c["torch_threads"] for r in job["client_s"] for c in r),
        "final": job["final"],
    }


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "q1_s": q[0], "q3_s": q[2],
            "min_s": min(times), "max_s": max(times), "n": len(times)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (first = warm-up)")
    parser.add_argument("--steps", type=int, default=10, help="local steps per client per round")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per system/mode")
    parser.add_argument(
        "--ray-worker-niceness", type=int, default=0,
        help="nice value of Ray workers (Ray's default 15 starves the ClientApp actor next to "
        "other jobs, while our process runs at 0; 0 = both at the same priority)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    # Ray's config name is case-sensitive; the raylet started by run_simulation inherits it.
    os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)  # noqa: SIM112
    # The ClientApp / ServerApp must be importable in Ray workers: use the module, not __main__.
    app_module = importlib.import_module("lora_fl_flower")

    raw: dict[str, dict[str, list]] = {}
    last: dict[str, dict] = {}
    diffs: dict[str, list[float]] = {"lora": [], "full": []}
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for mode in ("lora", "full"):
            for system in ("ours", "flower") if rep % 2 == 0 else ("flower", "ours"):
                t = time.perf_counter()
                if system == "ours":
                    r = run_ours(mode, args.rounds, args.steps)
                else:
                    r = run_flower(mode, args.rounds, args.steps, app_module)
                rounds_txt = " ".join(f"{x:.2f}" for x in r["round_s"])
                print(f"[{rep}] {system:6s} {mode}: rounds {rounds_txt} s "
                      f"(run {time.perf_counter() - t:.1f} s)", flush=True)  # fmt: skip
                slot = raw.setdefault(
                    f"{system}/{mode}", {"round_s": [], "client_s": [], "runs": []}
                )
                slot["round_s"].extend(r["round_s"][1:])
                slot["client_s"].extend(r["client_s"][1:])
                slot["runs"].append(r["round_s"])
                last.setdefault(mode, {})[system] = r
            d = last[mode]["ours"]["final"] - last[mode]["flower"]["final"]
            diffs[mode].append(float(d.abs().max()))

    rows = []
    for mode in ("lora", "full"):
        row: dict = {"mode": mode}
        for system in ("ours", "flower"):
            slot, r = raw[f"{system}/{mode}"], last[mode][system]
            overhead = [a - b for a, b in zip(slot["round_s"], slot["client_s"], strict=True)]
            row[system] = {
                **summary(slot["round_s"]),
                "client_train_median_s": statistics.median(slot["client_s"]),
                "overhead_median_s": statistics.median(overhead),
                "per_run_round_s": slot["runs"],
                "upload_bytes_per_client_round": r["upload_bytes_per_client"],
            }
        row["ours"]["download_bytes_per_client_round_implied"] = last[mode]["ours"][
            "server_state_bytes"
        ]
        row["flower"]["download_bytes_per_client_round"] = last[mode]["flower"][
            "download_bytes_per_client"
        ]
        row["flower"]["run_simulation_s_last_run"] = last[mode]["flower"]["run_simulation_s"]
        row["flower"]["actor_torch_threads"] = last[mode]["flower"]["actor_torch_threads"]
        row["flower_over_ours_median"] = row["flower"]["median_s"] / row["ours"]["median_s"]
        row["final_state_max_abs_diff"] = diffs[mode]
        rows.append(row)

    print("\n| mode | system | median s / round [q1, q3] | client training s | other s | "
          "upload B / client | download B / client |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for system in ("ours", "flower"):
            s = r[system]
            down = s.get("download_bytes_per_client_round",
                         s.get("download_bytes_per_client_round_implied"))  # fmt: skip
            print(f"| {r['mode']} | {system} | {s['median_s']:.3f} [{s['q1_s']:.3f}, "
                  f"{s['q3_s']:.3f}] | {s['client_train_median_s']:.3f} | "
                  f"{s['overhead_median_s']:.3f} | {s['upload_bytes_per_client_round']:.0f} | "
                  f"{down:.0f} |")  # fmt: skip
        print(f"  flower/ours median = {r['flower_over_ours_median']:.2f}x; final-state max "
              f"|diff| {max(r['final_state_max_abs_diff']):.2e}")  # fmt: skip

    import ray

    out = ROOT / "docs" / "results" / "benchmarks" / "lora_fl_flower.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "PYTHONPATH=/tmp/flwr_pkgs .venv/bin/python benchmarks/lora_fl_flower.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "install": INSTALL,
        "versions": {
            "flwr": flwr.__version__,
            "ray": ray.__version__,
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": 1,
            "ray_num_cpus": 1,
            "flower_actors": 1,
            "ray_worker_niceness": args.ray_worker_niceness,
        },
        "setup": {
            "clients": len(CLIENT_SIZES),
            "client_sizes_arg": CLIENT_SIZES,
            "batch_size": BATCH,
            "model": MODEL,
            "lora_rank": LORA.rank,
            "lora_alpha": LORA.alpha,
            "lora_aggregation": "merged_delta_mean",
            "warmup_rounds_dropped": 1,
        },
        "args": vars(args),
        "total_wall_s": time.perf_counter() - t_start,
        "rows": rows,
    }
    out.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
