"""Validation experiment of "warmup counteracts large angular updates" (spec §6).

A 2-block, d=128 character-level transformer (Hugging Face Llama config, untied head) trains for
400 steps on the running interpreter's stdlib sources with AdamW (0 % vs 5 % linear warmup,
trapezoidal schedule with 50 % cooldown), LionAR and LionAR with β = 0.98 + Nesterov, while
``callbacks.warmup_diagnostics.UpdateDiagnostics`` records update norms, angles, RRC and the
gradient noise scale. It prints a table, writes ``docs/results/warmup/summary.json`` + PNG plots
and rewrites the measured section of ``docs/warmup-diagnostics.md``.

    python experiments/warmup.py            # full run (3 seeds at the selected LRs)
    python experiments/warmup.py --quick    # smoke version: 40 steps, one seed, one LR each
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from callbacks.warmup_diagnostics import UpdateDiagnostics  # noqa: E402
from modules.hf_models import build_causal_lm  # noqa: E402
from ops.warmup import lionar_target_angle  # noqa: E402
from optim.lion import Lion, LionAR  # noqa: E402
from optim.schedules import Trapezoidal, trapezoidal_factor  # noqa: E402

OUT = ROOT / "docs" / "results" / "warmup"
DOC = ROOT / "docs" / "warmup-diagnostics.md"
VOCAB = [chr(c) for c in range(32, 127)] + ["\n"]  # 95 printable ASCII + newline; '?' is unknown


def stdlib_text(max_chars: int) -> torch.Tensor:
    """Top-level stdlib ``*.py`` files, sorted, concatenated, mapped to 96 symbols (spec §6)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts, n = [], 0
    for f in files:
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        n += len(parts[-1])
        if n >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    if len(text) < max_chars:
        raise RuntimeError(f"stdlib has only {len(text)} characters, need {max_chars}")
    table = {c: i for i, c in enumerate(VOCAB)}
    unknown = table["?"]
    return torch.tensor([table.get(c, unknown) for c in text], dtype=torch.long)


class Windows(Dataset):
    """Fixed random windows of ``block + 1`` characters (inputs and next-char labels)."""

    def __init__(self, data: torch.Tensor, block: int, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.data, self.block = data, block
        self.starts = torch.randint(len(data) - block - 1, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = int(self.starts[i])
        x = self.data[s : s + self.block]
        return {"input_ids": x, "labels": x}


class CharLM(L.LightningModule):
    """Character LM whose optimizer is one experiment arm.

    Args:
        optimizer: ``adamw``, ``lion`` or ``lionar``.
        lr: peak LR (LionAR: the virtual LR of the rotational tensors).
        warmup_frac: fraction of steps of linear warmup.
        total_steps: schedule length.
        betas: momentum coefficients.
        nesterov: LionAR/Lion Nesterov momentum.
        inverse_bias_correction: LionAR/Lion σ_t = 1 − β₂ᵗ.
        lr_other: Lion LR of LionAR's non-rotational tensors.
    """

    def __init__(
        self,
        optimizer: str,
        lr: float,
        warmup_frac: float,
        total_steps: int,
        betas: tuple[float, float] = (0.9, 0.95),
        nesterov: bool = False,
        inverse_bias_correction: bool = False,
        lr_other: float = 3e-4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = {
            "model_type": "llama",
            "vocab_size": len(VOCAB),
            "hidden_size": 128,
            "intermediate_size": 344,  # SwiGLU with ≈ the parameters of a 4× GELU MLP
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 64,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
        }
        self.model = build_causal_lm(config)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.compute_loss(batch)

    def on_train_start(self) -> None:
        opt = self.trainer.optimizers[0]
        if isinstance(opt, LionAR):
            opt.center_rotational_weights()  # explicit, idempotent centering (spec §4.2)

    def configure_optimizers(self) -> Any:
        h = self.hparams
        named = list(self.named_parameters())
        if h.optimizer == "adamw":
            decay = [p for n, p in named if p.dim() >= 2]
            other = [p for n, p in named if p.dim() < 2]
            opt = torch.optim.AdamW(
                [{"params": decay}, {"params": other, "weight_decay": 0.0}],
                lr=h.lr,
                betas=h.betas,
                weight_decay=0.1,
            )
        elif h.optimizer == "lion":
            opt = Lion(named, lr=h.lr, betas=h.betas, weight_decay=0.1, nesterov=h.nesterov)
        elif h.optimizer == "lionar":
            opt = LionAR(
                named,
                lr=h.lr,
                betas=h.betas,
                weight_decay=0.1,
                nesterov=h.nesterov,
                inverse_bias_correction=h.inverse_bias_correction,
                rotational="blocks",
                lr_other=h.lr_other,
            )
        else:
            raise ValueError(f"optimizer={h.optimizer!r}: expected adamw, lion or lionar")
        sched = Trapezoidal(
            opt,
            warmup_steps=round(h.warmup_frac * h.total_steps),
            total_steps=h.total_steps,
            cooldown_fraction=0.5,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def run_arm(arm: dict[str, Any], data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train one arm, return its val loss and the diagnostics it needs."""
    L.seed_everything(arm["seed"], verbose=False)
    model = CharLM(
        arm["opt"],
        arm["lr"],
        arm["warmup"],
        args.steps,
        betas=tuple(arm.get("betas", (0.9, 0.95) if arm["opt"] == "adamw" else (0.9, 0.99))),
        nesterov=arm.get("nesterov", False),
        inverse_bias_correction=arm.get("ibc", False),
    )
    snr = arm.get("snr", False)
    cb = UpdateDiagnostics(
        log_every_n_steps=25,
        dense_steps=100,
        rrc_layers=["*.q_proj", "*.up_proj"],
        snr_every_n_steps=25 if snr else 0,
        snr_dense_steps=10,
        snr_fresh_batches=4,
        keep_history=True,
        seed=arm["seed"],
    )
    train = Windows(data["train"], 64, args.steps * args.batch_size, seed=arm["seed"])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.time()
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size))
    model.eval()
    with torch.no_grad():
        val = sum(float(model.compute_loss(b)) for b in data["val_batches"]) / len(
            data["val_batches"]
        )
    keep = (
        "warmup/global/angle",
        "warmup/global/update_norm",
        "warmup/rrc_median",
        "warmup/snr/b_noise_raw",
    )
    history: dict[str, dict[int, float]] = {k: {} for k in keep}
    first, step100, angles = {}, {}, {}
    for r in cb.history:
        for k in keep:
            if k in r:
                history[k][r["step"]] = r[k]
        for k, v in r.items():
            if k.startswith("warmup/direction_rms/") and r["step"] in (0, 100):
                (first if r["step"] == 0 else step100)[k.split("/", 2)[2]] = v
            if k.startswith("warmup/angle/") and arm["opt"] == "lionar":
                angles.setdefault(k.split("/", 2)[2], {})[r["step"]] = v
    rotational = [n for n, p in model.named_parameters() if p.dim() >= 2 and ".layers." in n]
    return {
        **arm,
        "val_loss": val,
        "seconds": time.time() - t0,
        "history": history,
        "direction_rms_step0": first,
        "direction_rms_step100": step100,
        "lionar_angles": {n: angles.get(n, {}) for n in rotational} if angles else {},
    }


def lionar_angle_error(res: dict[str, Any], steps: int) -> float:
    """Max relative error of the measured angles against atan(σ_t η_r(t)) (check 5)."""
    betas = tuple(res.get("betas", (0.9, 0.99)))
    eff = (betas[0] * betas[1], betas[1]) if res.get("nesterov") else betas
    worst = 0.0
    for per_step in res["lionar_angles"].values():
        for t, measured in per_step.items():
            t = int(t)
            lr_t = res["lr"] * trapezoidal_factor(t, round(res["warmup"] * steps), steps, 0.5)
            sigma = 1 - betas[1] ** (t + 1) if res.get("ibc") else 1.0
            target = math.atan(sigma * lionar_target_angle(lr_t, 0.1, eff))
            if target > 0:
                worst = max(worst, abs(measured - target) / target)
    return worst


# --------------------------------------------------------------------------- orchestration
def _key(arm: dict[str, Any]) -> str:
    parts = [arm["opt"], f"lr{arm['lr']:g}", f"w{arm['warmup']:g}", f"s{arm['seed']}"]
    if arm.get("nesterov"):
        parts.append("nest")
    if arm.get("ibc"):
        parts.append("ibc")
    if "betas" in arm:
        parts.append("b" + "-".join(f"{b:g}" for b in arm["betas"]))
    return "_".join(parts)


def _runner(data: dict[str, Any], args: argparse.Namespace, runs_dir: Path):
    def run(**arm: Any) -> dict[str, Any]:
        path = runs_dir / f"{_key(arm)}.json"
        if path.exists():
            return json.loads(path.read_text())
        res = run_arm(arm, data, args)
        path.write_text(json.dumps(res))
        print(f"  {_key(arm):<40} val {res['val_loss']:.4f}  ({res['seconds']:.0f} s)", flush=True)
        return res

    return run


_RUN: Any = None


def _run_one(arm: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    _RUN(**arm)


def _parallel(run: Any, arms: list[dict[str, Any]], jobs: int) -> None:
    """Run arms in ``jobs`` forked processes (results land in the run cache)."""
    global _RUN
    if jobs <= 1 or len(arms) <= 1:
        for arm in arms:
            run(**arm)
        return
    import multiprocessing as mp

    _RUN = run
    with mp.get_context("fork").Pool(min(jobs, len(arms))) as pool:
        pool.map(_run_one, arms, chunksize=1)


def _cached(runs_dir: Path):
    def run(**arm: Any) -> dict[str, Any] | None:
        path = runs_dir / f"{_key(arm)}.json"
        return json.loads(path.read_text()) if path.exists() else None

    return run


def _some(d: dict[Any, Any]) -> dict[Any, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _early_max(r: dict[str, Any]) -> float:
    """Max global angular update over the first 10 steps (check 2)."""
    h = r["history"]["warmup/global/angle"]
    return max(v for t, v in h.items() if int(t) < 10)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="spec: 400 (see docs)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3, help="seeds at the selected LRs")
    parser.add_argument("--max-chars", type=int, default=3_000_000)
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 1 seed")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--jobs", type=int, default=1, help="arms trained in parallel processes")
    parser.add_argument("--with-lion", action="store_true", help="also run plain Lion (optional)")
    parser.add_argument(
        "--cached-only", action="store_true", help="evaluate the cached runs without training"
    )
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the docs page")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    adam_lrs, lionar_lrs = [1e-3, 3e-3, 1e-2], [0.03, 0.1, 0.3]
    lion_lrs = [3e-4, 1e-3] if args.with_lion else []
    if args.quick:
        args.steps, args.seeds, args.max_chars = 40, 1, 300_000
        adam_lrs, lionar_lrs, lion_lrs = [3e-3], [0.1], []
    out = OUT / ("quick" if args.quick else "")
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        for cached in runs_dir.glob("*.json"):
            cached.unlink()
    text = stdlib_text(args.max_chars)
    split = int(0.9 * len(text))
    val = Windows(text[split:], 64, 20 * 64, seed=1234)
    data = {"train": text[:split], "val_batches": list(DataLoader(val, batch_size=64))}
    run = _runner(data, args, runs_dir)
    seeds = list(range(args.seeds))
    t0 = time.time()

    n0_cfg = {"opt": "lionar", "warmup": 0.0, "seed": 0, "betas": [0.98, 0.98], "nesterov": True}
    seed_cfgs = {
        "A0": {"opt": "adamw", "warmup": 0.0},
        "A5": {"opt": "adamw", "warmup": 0.05, "snr": True},
        "R0": {"opt": "lionar", "warmup": 0.0},
        "R5": {"opt": "lionar", "warmup": 0.05},
    }
    # Phase 1: the seed-0 LR sweeps; phase 2 depends on the LRs they select.
    sweep = [
        *(
            {"opt": "adamw", "lr": lr, "warmup": w, "seed": 0, **({"snr": True} if w else {})}
            for w in (0.0, 0.05)
            for lr in adam_lrs
        ),
        *({"opt": "lionar", "lr": lr, "warmup": 0.0, "seed": 0} for lr in lionar_lrs),
        *(
            {"opt": "lion", "lr": lr, "warmup": 0.0, "seed": 0, "betas": [0.9, 0.99]}
            for lr in lion_lrs
        ),
    ]
    if args.cached_only:  # evaluate whatever runs exist, e.g. when time ran out
        run = _cached(runs_dir)
    else:
        _parallel(run, sweep, args.jobs)
    a0 = _some({lr: run(opt="adamw", lr=lr, warmup=0.0, seed=0) for lr in adam_lrs})
    a5 = _some({lr: run(opt="adamw", lr=lr, warmup=0.05, seed=0, snr=True) for lr in adam_lrs})
    lr_star = min(a5, key=lambda lr: a5[lr]["val_loss"])
    r0 = _some({lr: run(opt="lionar", lr=lr, warmup=0.0, seed=0) for lr in lionar_lrs})
    r_star = min(r0, key=lambda lr: r0[lr]["val_loss"])
    lrs = {"A0": lr_star, "A5": lr_star, "R0": r_star, "R5": r_star}
    phase2 = [{**n0_cfg, "lr": r_star, "ibc": ibc} for ibc in (False, True)]
    phase2 += [{**cfg, "lr": lrs[k], "seed": s} for k, cfg in seed_cfgs.items() for s in seeds]
    if not args.cached_only:
        _parallel(run, phase2, args.jobs)
    n0 = _some({ibc: run(**{**n0_cfg, "lr": r_star, "ibc": ibc}) for ibc in (False, True)})
    for lr in lionar_lrs if args.cached_only and not n0 else []:  # N0 ran at another LR
        n0 = n0 or _some({ibc: run(**{**n0_cfg, "lr": lr, "ibc": ibc}) for ibc in (False, True)})
    lion = _some(
        {lr: run(opt="lion", lr=lr, warmup=0.0, seed=0, betas=[0.9, 0.99]) for lr in lion_lrs}
    )
    by_seed = {
        k: [r for s in seeds if (r := run(**{**cfg, "lr": lrs[k], "seed": s})) is not None]
        for k, cfg in seed_cfgs.items()
    }
    # Secondary view: the warmup gap and early-angle ratio at every AdamW LR, over the seeds
    # whose runs exist (the full protocol runs seeds 1, 2 only at LR*).
    cached = _cached(runs_dir)
    per_lr = {}
    for opt, lr in [*(("adamw", lr) for lr in adam_lrs), *(("lionar", lr) for lr in lionar_lrs)]:
        pairs = [
            (
                cached(opt=opt, lr=lr, warmup=0.0, seed=s),
                cached(opt=opt, lr=lr, warmup=0.05, seed=s),
            )
            for s in seeds
        ]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if pairs:
            per_lr[f"{opt} {lr:g}"] = {
                "seeds": [x["seed"] for x, _ in pairs],
                "val_A0": _mean([x["val_loss"] for x, _ in pairs]),
                "val_A5": _mean([y["val_loss"] for _, y in pairs]),
                "gap": _mean([x["val_loss"] - y["val_loss"] for x, y in pairs]),
                "angle_ratio": _mean([_early_max(x) for x, _ in pairs])
                / _mean([_early_max(y) for _, y in pairs]),
            }
    summary = evaluate(a0, a5, r0, n0, lion, by_seed, lr_star, r_star, args)
    summary["per_lr"] = per_lr
    summary["wall_seconds"] = time.time() - t0
    summary["command"] = "python " + " ".join(["experiments/warmup.py", *(argv or sys.argv[1:])])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    plot(a0, a5, r0, by_seed, lr_star, r_star, out)
    if not args.no_doc and not args.quick:
        write_doc(summary, DOC)
    return summary


# --------------------------------------------------------------------------- acceptance checks
def evaluate(a0, a5, r0, n0, lion, by_seed, lr_star, r_star, args) -> dict[str, Any]:
    """The acceptance items of spec §6, as means over the seeds that ran."""
    val = {k: _mean([r["val_loss"] for r in v]) for k, v in by_seed.items() if v}
    checks: dict[str, dict[str, Any]] = {}
    gap_adam = val["A0"] - val["A5"]
    checks["1_warmup_helps_adamw"] = {
        "measured": gap_adam,
        "threshold": ">= 0.05",
        "held": gap_adam >= 0.05,
    }
    ang0 = _mean([_early_max(r) for r in by_seed["A0"]])
    ang5 = _mean([_early_max(r) for r in by_seed["A5"]])
    checks["2_early_angles_large_without_warmup"] = {
        "measured": ang0 / ang5,
        "A0_max_angle": ang0,
        "A5_max_angle": ang5,
        "threshold": ">= 3",
        "held": ang0 / ang5 >= 3,
    }

    runs = by_seed["A0"] + by_seed["A5"]
    names = sorted(runs[0]["direction_rms_step0"])
    first = {n: _mean([r["direction_rms_step0"][n] for r in runs]) for n in names}
    at100 = {
        n: _mean([r["direction_rms_step100"].get(n, math.nan) for r in runs])
        for n in names
        if n.endswith("weight")
    }
    mats = [n for n in names if "layernorm" not in n and "norm.weight" not in n]
    embed = [n for n in mats if "embed_tokens" in n]
    others = [n for n in mats if n not in embed]
    held3 = (
        all(first[n] >= 0.99 for n in others)
        and all(first[n] >= 0.9 for n in embed)
        and all(at100[n] < 0.3 for n in mats)
    )
    checks["3_adamw_first_step_sign_like"] = {
        "min_step0_blocks_and_head": min(first[n] for n in others),
        "step0_token_embedding": first[embed[0]] if embed else None,
        "max_step100_matrices": max(at100[n] for n in mats),
        "threshold": "step0 >= 0.99 (blocks, head), >= 0.9 (token embedding); step100 < 0.3",
        "held": held3,
        "note": "Llama uses RoPE: there is no position-embedding matrix to check",
    }

    b_noise: dict[int, list[float]] = {}
    for r in by_seed["A5"]:
        for t, v in r["history"]["warmup/snr/b_noise_raw"].items():
            b_noise.setdefault(int(t), []).append(v)
    b_mean = {t: _mean(v) for t, v in sorted(b_noise.items())}
    early = _mean([b_mean[t] for t in (0, 2, 5) if t in b_mean])
    late = {t: v for t, v in b_mean.items() if t >= args.steps // 2}  # spec: step >= 200 of 400
    checks["4_noise_scale_small_early"] = {
        "early_mean": early,
        "late_min": min(late.values()) if late else None,
        "threshold": f"early <= B/8 = {args.batch_size / 8:g}; "
        f"every step >= {args.steps // 2} >= 5x early",
        "held": early <= args.batch_size / 8 and bool(late) and min(late.values()) >= 5 * early,
        "b_noise_by_step": b_mean,
    }

    lionar_runs = [*r0.values(), *n0.values(), *by_seed["R0"], *by_seed["R5"]]
    err = max(lionar_angle_error(r, args.steps) for r in lionar_runs)
    checks["5_lionar_hits_target_angle"] = {
        "max_rel_error": err,
        "runs": len(lionar_runs),
        "threshold": "<= 0.02",
        "held": err <= 0.02,
    }
    if "R0" in val and "R5" in val:
        gap_r = val["R0"] - val["R5"]
        checks["6_lionar_needs_less_warmup"] = {
            "measured": gap_r,
            "adamw_gap": gap_adam,
            "threshold": "<= 0.5 x adamw gap (vacuous unless the AdamW gap > 0)",
            "held": gap_adam > 0 and gap_r <= 0.5 * gap_adam,
        }
    best_a5 = min(r["val_loss"] for r in a5.values())
    reported: dict[str, Any] = {"N0_lr": next(iter(n0.values()))["lr"]} if n0 else {}
    reported |= {f"N0_ibc_{'on' if k else 'off'}": r["val_loss"] for k, r in n0.items()}
    if n0:
        reported["best_N0_minus_best_A5"] = min(r["val_loss"] for r in n0.values()) - best_a5
    if lion:
        reported["lion"] = {f"{lr:g}": r["val_loss"] for lr, r in lion.items()}
    sweep = {
        "adamw_0": {f"{lr:g}": r["val_loss"] for lr, r in a0.items()},
        "adamw_5": {f"{lr:g}": r["val_loss"] for lr, r in a5.items()},
        "lionar_0": {f"{lr:g}": r["val_loss"] for lr, r in r0.items()},
    }
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "lr_star": lr_star,
        "lionar_lr_star": r_star,
        "val_mean": val,
        "val_by_seed": {k: [r["val_loss"] for r in v] for k, v in by_seed.items()},
        "seeds_used": {k: [r["seed"] for r in v] for k, v in by_seed.items()},
        "sweep_seed0": sweep,
        "checks": checks,
        "reported_only": reported,
        "first_step_direction_rms": first,
        "step100_direction_rms": at100,
    }


def print_table(summary: dict[str, Any]) -> None:
    print(f"\nval loss, seed 0 (steps={summary['steps']}, batch={summary['batch_size']})")
    for arm, sweep in summary["sweep_seed0"].items():
        print(f"  {arm:<10}" + "  ".join(f"lr {k}: {v:.3f}" for k, v in sweep.items()))
    print(
        f"\nmeans over the seeds that ran at LR*={summary['lr_star']:g} (AdamW), "
        f"{summary['lionar_lr_star']:g} (LionAR):"
    )
    for k, v in summary["val_mean"].items():
        print(f"  {k}: {v:.4f}")
    print("\nper LR (mean over the seeds that ran): gap = val(0 %) - val(5 %)")
    for lr, d in summary["per_lr"].items():
        print(
            f"  lr {lr}: seeds {d['seeds']}, gap {d['gap']:+.4f}, early angle ratio {d['angle_ratio']:.2f}"
        )
    print("\nacceptance:")
    for name, c in summary["checks"].items():
        shown = {k: v for k, v in c.items() if k not in ("b_noise_by_step", "held", "threshold")}
        print(
            f"  {'HELD  ' if c['held'] else 'MISSED'} {name}: {_fmt(shown)} (need {c['threshold']})"
        )
    print(f"\nreported only: {_fmt(summary['reported_only'])}")


def _fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


# --------------------------------------------------------------------------- plots and docs
def plot(a0, a5, r0, by_seed, lr_star, r_star, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(r, key, upto=None):
        h = sorted((int(t), v) for t, v in r["history"][key].items())
        return [t for t, _ in h if upto is None or t < upto], [
            v for t, v in h if upto is None or t < upto
        ]

    runs = {
        f"AdamW {lr_star:g}, 0% warmup": a0[lr_star],
        f"AdamW {lr_star:g}, 5% warmup": a5[lr_star],
        f"LionAR {r_star:g}, 0% warmup": r0[r_star],
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(
        axes,
        [
            ("warmup/global/update_norm", "ℓ2 update norm ‖Δw‖ (all tensors)"),
            ("warmup/global/angle", "angular update (rad, all matrices)"),
            ("warmup/rrc_median", "relative representation change (median layer)"),
        ],
        strict=True,
    ):
        for label, r in runs.items():
            ax.plot(*series(r, key, 100), label=label)
        ax.set(title=title, xlabel="step", yscale="log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "early_steps.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, sweep in (("0% warmup", a0), ("5% warmup", a5)):
        lrs = sorted(sweep)
        axes[0].plot(lrs, [sweep[lr]["val_loss"] for lr in lrs], "o-", label=label)
    axes[0].set(xscale="log", xlabel="AdamW LR", ylabel="val loss", title="AdamW (seed 0)")
    axes[0].legend()
    lrs = sorted(r0)
    axes[1].plot(lrs, [r0[lr]["val_loss"] for lr in lrs], "o-", label="LionAR, 0% warmup")
    axes[1].set(xscale="log", xlabel="LionAR virtual LR", title="LionAR (seed 0)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "loss_vs_lr.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in by_seed["A5"]:
        ax.plot(*series(r, "warmup/snr/b_noise_raw"), "o-", ms=3, label=f"seed {r['seed']}")
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="B_noise = tr Σ / |G|²",
        title=f"gradient noise scale, AdamW {lr_star:g}, 5% warmup",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "noise_scale.png", dpi=110)
    plt.close(fig)


START, END = "<!-- results:start -->", "<!-- results:end -->"


def write_doc(summary: dict[str, Any], doc: Path) -> None:
    """Rewrite the measured section of the docs page between the result markers."""
    s = summary
    lines = [
        START,
        (
            f"Evaluated by `{s['command']}` from the cached runs in `docs/results/warmup/runs/`"
            " (each run's wall time is in its JSON)."
            if "--cached-only" in s["command"]
            else f"Produced by `{s['command']}` ({s['wall_seconds'] / 60:.0f} min on 2 shared CPU cores)."
        ),
        "",
        f"Validation loss after {s['steps']} steps (batch {s['batch_size']}), seed 0 sweep:",
        "",
        "| arm | " + " | ".join(f"LR {k}" for k in s["sweep_seed0"]["adamw_0"]) + " |",
        "|---|" + "---|" * len(s["sweep_seed0"]["adamw_0"]),
    ]
    for arm in ("adamw_0", "adamw_5"):
        lines.append(
            f"| {arm} | " + " | ".join(f"{v:.3f}" for v in s["sweep_seed0"][arm].values()) + " |"
        )
    lines += [
        "",
        "| LionAR 0 % | "
        + " | ".join(f"virtual LR {k}: {v:.3f}" for k, v in s["sweep_seed0"]["lionar_0"].items())
        + " |",
        "",
        f"Means over the seeds that ran at the selected LRs (AdamW LR* = {s['lr_star']:g}, "
        f"LionAR virtual LR {s['lionar_lr_star']:g}):",
        "",
        "| arm | mean val loss | per seed |",
        "|---|---|---|",
    ]
    for k, v in s["val_mean"].items():
        per = ", ".join(
            f"s{seed}: {x:.3f}"
            for seed, x in zip(s["seeds_used"][k], s["val_by_seed"][k], strict=True)
        )
        lines.append(f"| {k} | {v:.4f} | {per} |")
    lines += [
        "",
        "Every LR with both warmup arms, over the seeds whose runs exist (gap = val(0 %) − val(5 %); angle ratio ="
        " max global angle over steps 0–9, 0 % / 5 %):",
        "",
        "| optimizer, LR | seeds | val 0 % | val 5 % | gap | early angle ratio |",
        "|---|---|---|---|---|---|",
    ]
    for lr, d in s["per_lr"].items():
        lines.append(
            f"| {lr} | {d['seeds']} | {d['val_A0']:.3f} | {d['val_A5']:.3f} | {d['gap']:+.3f} "
            f"| {d['angle_ratio']:.2f} |"
        )
    lines += ["", "| acceptance item | measured | needed | held |", "|---|---|---|---|"]
    for name, c in s["checks"].items():
        shown = {
            k: v for k, v in c.items() if k not in ("b_noise_by_step", "held", "threshold", "note")
        }
        lines.append(
            f"| {name} | {_fmt(shown)} | {c['threshold']} | {'yes' if c['held'] else '**no**'} |"
        )
    lines += [
        "",
        f"Reported only: {_fmt(s['reported_only'])}.",
        "",
        "![early steps](results/warmup/early_steps.png)",
        "![loss vs LR](results/warmup/loss_vs_lr.png)",
        "![noise scale](results/warmup/noise_scale.png)",
        END,
    ]
    text = doc.read_text() if doc.exists() else f"# Warmup diagnostics\n\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    doc.write_text(head + "\n".join(lines) + tail)


if __name__ == "__main__":
    main()
