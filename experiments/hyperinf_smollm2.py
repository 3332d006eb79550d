"""HyperINF on a real pretrained LLM: mislabeled-data detection with LoRA on SmolLM2-135M-Instruct.

The paper's mislabel experiment (section 5.1) fine-tunes LoRA + a classifier head of a pretrained
transformer on a text classification set with 20% flipped labels and ranks training examples by
influence on a clean validation set. Here: ``smollm2-135m-instruct`` (offline preset, 30 Llama
layers), LoRA r=4 on ``q_proj``/``v_proj`` of the last ``--tail-layers`` layers (earlier layers
frozen and precomputed, see ``modules.llm_tail_classifier``), a linear head on the last token,
English sentiment sentences from ``datamodules.text_classification`` (200 train with 20% flipped,
50 clean validation), trained by a Lightning ``Trainer`` with ``HyperINFCallback`` scoring every
method side by side on the LoRA + head gradients.

    python experiments/hyperinf_smollm2.py --seeds 10  # the committed results (~6 min)
    python experiments/hyperinf_smollm2.py --quick    # 1 seed, fewer epochs

Writes ``docs/results/hyperinf_smollm2/summary.json``, PNG plots there, and the measured section
of the SmolLM2 part of ``docs/hyperinf.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.hyperinf_report import method_table  # noqa: E402
from ops.docs_section import replace_section  # noqa: E402

METHODS = [
    "hyperinf",
    "hyperinf_mislabel",
    "exact_gfim",
    "exact_fim",
    "datainf",
    "lissa",
    "lissa_code_faithful",
    "grad_dot",
]
START, END = "<!-- smollm2:start -->", "<!-- smollm2:end -->"


def run_seed(args: argparse.Namespace, seed: int, workdir: Path) -> dict:
    import lightning as L
    from scipy.stats import spearmanr

    from callbacks.hyperinf import HyperINFCallback
    from datamodules.text_classification import SentimentNoisyDataModule
    from modules.llm_tail_classifier import LoRATailClassifier
    from ops.influence_config import GradConfig
    from ops.influence_metrics import detection_curve, detection_rate, roc_auc

    L.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    dm = SentimentNoisyDataModule(
        n_train=args.n_train,
        n_val=args.n_val,
        seed=seed,
        batch_size=args.batch_size,
        tail_layers=args.tail_layers,
    )
    dm.setup("fit")
    prefix_s = time.perf_counter() - t0
    model = LoRATailClassifier(
        tail_layers=args.tail_layers, lora_r=args.rank, lr=args.lr, init_seed=seed
    )
    cb = HyperINFCallback(
        methods=METHODS,
        include=["lora_A", "lora_B", "head.weight"],
        grads=GradConfig(batch_size=25),
        run_on="fit_end",
        output_dir=str(workdir / f"s{seed}"),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
    fit_s = time.perf_counter() - t1
    table, noisy = cb.table, cb.table["is_noisy"]
    scores = {m: table[f"score_{m}"] for m in METHODS}
    model.eval()
    tr, va = dm.train_dataset.tensors, dm.val_dataset.tensors
    with torch.no_grad():
        train_acc = float((model(tr["hidden"], tr["length"]).argmax(-1) == tr["y"]).float().mean())
        val_acc = float((model(va["hidden"], va["length"]).argmax(-1) == va["y"]).float().mean())
    rho = lambda a, b: float(spearmanr(a.numpy(), b.numpy())[0])  # noqa: E731
    row = {
        "seed": seed,
        "train_acc_noisy_labels": train_acc,
        "val_acc": val_acc,
        "prefix_s": prefix_s,
        "fit_and_influence_s": fit_s,
        "influence_runtime_s": cb.result.runtime_s,
        "auc": {m: roc_auc(s, noisy) for m, s in scores.items()},
        "detect_at_20": {m: detection_rate(s, noisy, 0.2) for m, s in scores.items()},
        "spearman_vs_hyperinf": {m: rho(scores["hyperinf"], s) for m, s in scores.items()},
        "schulz_residual_max": max(cb.result.residuals["hyperinf"].values()),
        "curve": {m: detection_curve(s, noisy).tolist() for m, s in scores.items()},
    }
    print(
        f"seed {seed}: train acc (noisy) {train_acc:.3f} val acc {val_acc:.3f} "
        + " ".join(f"{m}={row['auc'][m]:.3f}" for m in METHODS),
        flush=True,
    )
    return row


def plot(result: dict, out: Path) -> None:
    """AUC per method (mean +- std, seeds as dots) and the detection curves of every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = result["seeds"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    xs = range(len(METHODS))
    ax.bar(
        xs,
        [result["auc_mean"][m] for m in METHODS],
        0.6,
        yerr=[result["auc_std"][m] for m in METHODS],
        capsize=3,
        color="C0",
        alpha=0.6,
    )
    for i, m in enumerate(METHODS):
        ax.scatter([i] * len(seeds), [s["auc"][m] for s in seeds], color="k", s=10, zorder=3)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--", label="random")
    ax.set_xticks(list(xs), METHODS, rotation=20)
    ax.set_ylabel("ROC-AUC (score high = flipped)")
    ax.set_ylim(0.2, 1.0)
    ax.legend(fontsize=8)
    ax.set_title(f"SmolLM2-135M-Instruct + LoRA: mislabel detection, {len(seeds)} seeds (dots)")
    fig.tight_layout()
    fig.savefig(out / "auc.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(seeds), figsize=(4.3 * len(seeds), 3.8), squeeze=False)
    for ax, row in zip(axes[0], seeds, strict=True):
        for j, m in enumerate(METHODS):
            c = row["curve"][m]
            ls = "--" if m in ("lissa_code_faithful", "exact_gfim") else "-"
            ax.plot(
                [i / (len(c) - 1) for i in range(len(c))], c, label=m, lw=1.1, ls=ls, color=f"C{j}"
            )
        ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=0.8, label="random")
        ax.axvline(0.2, color="gray", lw=0.6)
        ax.set_title(f"seed {row['seed']}")
        ax.set_xlabel("fraction of training data inspected")
    axes[0][0].set_ylabel("fraction of flipped labels found")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "detection_curves.png", dpi=110)
    plt.close(fig)


def aggregate(rows: list[dict]) -> dict:
    mean = {m: sum(r["auc"][m] for r in rows) / len(rows) for m in METHODS}
    std = {
        m: math.sqrt(sum((r["auc"][m] - mean[m]) ** 2 for r in rows) / len(rows)) for m in METHODS
    }
    det = {m: sum(r["detect_at_20"][m] for r in rows) / len(rows) for m in METHODS}
    return {"seeds": rows, "auc_mean": mean, "auc_std": std, "detect_at_20_mean": det}


def table_lines(summary: dict) -> list[str]:
    r, cfg = summary["result"], summary["config"]
    accs = [s["train_acc_noisy_labels"] for s in r["seeds"]]
    vals = [s["val_acc"] for s in r["seeds"]]
    lines = [
        f"Produced by `{summary['command']}` (torch {summary['torch']}, 2 shared CPU cores, one "
        f"intra-op thread, {summary['runtime_s']:.0f} s in total). Raw numbers: "
        "`docs/results/hyperinf_smollm2/summary.json`.",
        "",
        f"SmolLM2-135M-Instruct, LoRA r={cfg['rank']} on q_proj/v_proj of the last "
        f"{cfg['tail_layers']} of 30 layers + linear head, n_train={cfg['n_train']} (20% flipped), "
        f"n_val={cfg['n_val']} (clean), {cfg['epochs']} epochs of AdamW lr {cfg['lr']} at batch "
        f"{cfg['batch_size']}, {len(r['seeds'])} seeds; train acc on the noisy labels "
        f"{min(accs):.3f}-{max(accs):.3f}, clean val acc {min(vals):.3f}-{max(vals):.3f}.",
        "",
        *method_table(r, METHODS),
    ]
    lines += [
        "",
        "![SmolLM2 AUC](results/hyperinf_smollm2/auc.png)",
        "",
        "![SmolLM2 detection curves](results/hyperinf_smollm2/detection_curves.png)",
    ]
    return lines


def write_docs(summary: dict, doc: Path) -> None:
    replace_section(doc, START, END, "\n".join(table_lines(summary)), title="HyperINF")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--tail-layers", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--quick", action="store_true", help="smoke version: 1 seed, 3 epochs")
    parser.add_argument("--out", default=str(ROOT / "docs/results/hyperinf_smollm2"))
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/hyperinf.md")
    parser.add_argument("--replot", action="store_true", help="plots + docs from summary.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        summary = json.loads((out / "summary.json").read_text())
        plot(summary["result"], out)
        if not args.no_docs and not summary["config"]["quick"]:
            write_docs(summary, ROOT / "docs/hyperinf.md")
        return
    if args.quick:
        args.seeds, args.epochs, args.n_train, args.n_val = 1, 3, 80, 20
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_seed(args, s, Path(tmp)) for s in range(args.seeds)]
    result = aggregate(rows)
    flags = "" if args.quick else f" --seeds {args.seeds}"
    summary = {
        "command": "python experiments/hyperinf_smollm2.py" + (" --quick" if args.quick else flags),
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "runtime_s": time.perf_counter() - t0,
        "torch": torch.__version__,
        "result": result,
    }
    plot(result, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(table_lines(summary)))
    if not args.no_docs and not args.quick:
        write_docs(summary, ROOT / "docs/hyperinf.md")


if __name__ == "__main__":
    main()
