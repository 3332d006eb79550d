"""Validation experiment of "warmup counteracts large angular updates" (spec §6).

A 2-block, d=128 character-level GPT (Hugging Face GPT-2 config, untied head, spec init) trains for
400 steps on the running interpreter's stdlib sources with AdamW (0 % vs 5 % linear warmup,
trapezoidal schedule with 50 % cooldown), LionAR and LionAR with β = 0.98 + Nesterov, while
``callbacks.warmup_diagnostics.UpdateDiagnostics`` records update norms, angles, RRC and the
gradient noise scale. It prints a table, writes ``docs/results/warmup/summary.json`` + PNG plots
and rewrites the measured section of ``docs/warmup-diagnostics.md``.

    python experiments/warmup.py            # full run (3 seeds at the selected LRs)
    python experiments/warmup.py --quick    # smoke version: 40 steps, one seed, one LR each (in /tmp)
    python experiments/warmup.py --gradient-clip-val 1.0  # side run (docs/results/warmup/clip1/)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
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
from experiments.warmup_report import (  # noqa: E402
    early_max_angle,
    evaluate,
    mean,
    plot,
    print_table,
    write_doc,
)
from modules.hf_models import build_causal_lm, conv1d_to_linear  # noqa: E402
from optim.lion import Lion, LionAR  # noqa: E402
from optim.schedules import Trapezoidal, steps_of  # noqa: E402

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
    """Fixed random windows of ``block`` characters; the model predicts the ``block − 1`` next
    characters inside each (Hugging Face shifts the labels), not ``block`` as a nanoGPT loader of
    ``block + 1`` characters would (1.6 % fewer targets at block 64)."""

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


def init_gpt_like_spec(model: torch.nn.Module) -> None:
    """Spec §6 init: every matrix N(0, 0.02), biases 0, LayerNorm gains 1 (no GPT-2 rescaling)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


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
        # The spec's GPT (§6): pre-LN, learned positions, GELU MLP 4x, untied head, no dropout,
        # 429,568 parameters. Conv1D projections become nn.Linear so that "rows of dim 0" are
        # output neurons for LionAR and the per-neuron angles.
        config = {
            "model_type": "gpt2",
            "vocab_size": len(VOCAB),
            "n_embd": 128,
            "n_layer": 2,
            "n_head": 4,
            "n_inner": 512,
            "n_positions": 64,
            "activation_function": "gelu",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": False,
            "bos_token_id": None,
            "eos_token_id": None,
        }
        self.model = build_causal_lm(config)
        conv1d_to_linear(self.model)
        init_gpt_like_spec(self.model)

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
            warmup_steps=steps_of(h.warmup_frac, h.total_steps),
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
        rrc_layers=["*.c_attn", "*.mlp.c_fc"],
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
        gradient_clip_val=getattr(args, "gradient_clip_val", None),
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
    rotational = [n for n, p in model.named_parameters() if p.dim() >= 2 and ".h." in n]
    return {
        **arm,
        "val_loss": val,
        "seconds": time.time() - t0,
        "history": history,
        "direction_rms_step0": first,
        # Rows of absent symbols get a zero gradient, hence a zero first AdamW direction: the
        # token-embedding RMS is sqrt(present / vocab) times the RMS over the present rows.
        "vocab_size": len(VOCAB),
        "first_batch_symbols": len(
            {int(t) for i in range(args.batch_size) for t in train[i]["input_ids"]}
        ),
        "direction_rms_step100": step100,
        "lionar_angles": {n: angles.get(n, {}) for n in rotational} if angles else {},
    }


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (spec: 400)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3, help="seeds at the selected LRs")
    parser.add_argument("--max-chars", type=int, default=3_000_000)
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 steps, 1 seed")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--jobs", type=int, default=1, help="arms trained in parallel processes")
    parser.add_argument("--with-lion", action="store_true", help="also run plain Lion (optional)")
    parser.add_argument(
        "--seeds-at-every-lr", action="store_true",
        help="also run every seed of AdamW 0 %% / 5 %% at every LR of the sweep (beyond the "
        "spec's protocol; feeds the per-LR table)",
    )  # fmt: skip
    parser.add_argument(
        "--cached-only", action="store_true", help="evaluate the cached runs without training"
    )
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the docs page")
    parser.add_argument(
        "--gradient-clip-val", type=float, default=None,
        help="global-norm gradient clipping for every arm (reconstructed: the paper's setting is "
        "unknown; the spec default is none). Writes to docs/results/warmup/clip<val>/ and leaves "
        "the docs page alone",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    adam_lrs, lionar_lrs = [1e-3, 3e-3, 1e-2], [0.03, 0.1, 0.3]
    lion_lrs = [3e-4, 1e-3] if args.with_lion else []
    if args.quick:
        args.steps, args.seeds, args.max_chars = 40, 1, 300_000
        adam_lrs, lionar_lrs, lion_lrs = [3e-3], [0.1], []
    # A smoke run writes outside the repository, like the other experiments' --quick.
    out = Path(tempfile.gettempdir()) / "warmup_quick" if args.quick else OUT
    if args.gradient_clip_val is not None:  # a side run: its own cache, the page stays as is
        out, args.no_doc = out / f"clip{args.gradient_clip_val:g}", True
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
    if args.seeds_at_every_lr:
        phase2 += [
            {**seed_cfgs[k], "lr": lr, "seed": s}
            for k in ("A0", "A5")
            for lr in adam_lrs
            for s in seeds
            if lr != lr_star
        ]
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
                "val_A0": mean([x["val_loss"] for x, _ in pairs]),
                "val_A5": mean([y["val_loss"] for _, y in pairs]),
                "gap": mean([x["val_loss"] - y["val_loss"] for x, y in pairs]),
                "angle_ratio": mean([early_max_angle(x) for x, _ in pairs])
                / mean([early_max_angle(y) for _, y in pairs]),
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


if __name__ == "__main__":
    main()
