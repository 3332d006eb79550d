"""Tables, plots and the docs section of the HyperINF experiment (``experiments/hyperinf.py``)."""

from __future__ import annotations

from pathlib import Path

from ops.docs_section import replace_section

START, END = "<!-- measured:start -->", "<!-- measured:end -->"
ARMS = {
    "schulz_frobenius": ("Schulz, X0 = I/||A||_F (default)", "C0", "-"),
    "schulz_legacy": ("Schulz, X0 = 5e-5 I (legacy)", "C1", "--"),
    "lissa_scaled": ("LiSSA, s = ||A||_F + 1", "C2", "-"),
    "datainf": ("DataInf closed form", "C3", ":"),
    "neumann": ("Neumann, unscaled", "C4", "-."),
}


def plot_v1(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for ax, (size, per_seed) in zip(axes.flat, runs.items(), strict=False):
        for arm, (label, color, ls) in ARMS.items():
            for i, curves in enumerate(per_seed.values()):
                ys = [min(max(e, 1e-9), 1e6) for e in curves[arm]]
                ax.semilogy(ys, color=color, ls=ls, lw=1.2, label=label if i == 0 else None)
        ax.axhline(1e-4, color="gray", lw=0.6)
        ax.set_title(f"d x N = {size}")
        ax.set_ylim(1e-9, 1e6)
        ax.set_xlabel("iteration")
        ax.set_ylabel("relative error of A^-1 v")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("V1: inverting A = (1/N) sum g g^T + 0.01 I in float32 (all seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_v2(res: dict, methods: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(len(res), 1)
    for j, (name, r) in enumerate(res.items()):
        xs = [i + (j - (len(res) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(
            xs,
            [r["auc_mean"][m] for m in methods],
            width,
            yerr=[r["auc_std"][m] for m in methods],
            label=name,
            capsize=2,
        )
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.axhline(0.65, color="red", lw=0.8, ls=":", label="acceptance 0.65")
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("ROC-AUC (score high = flipped)")
    ax.set_ylim(0.3, 1.0)
    ax.legend(fontsize=8)
    ax.set_title("V2: mislabeled-data detection, mean +- std over seeds")
    fig.tight_layout()
    fig.savefig(out / "v2_auc.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(res), figsize=(4.5 * len(res), 3.8), squeeze=False)
    for ax, (name, r) in zip(axes[0], res.items(), strict=False):
        seed0 = r["seeds"][0]
        for m in methods:
            c = seed0["curve"][m]
            ax.plot([i / (len(c) - 1) for i in range(len(c))], c, label=m, lw=1)
        ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=0.8, label="random")
        ax.axvline(0.2, color="gray", lw=0.6)
        ax.set_title(f"{name}, seed {seed0['seed']}")
        ax.set_xlabel("fraction of training data inspected")
        ax.set_ylabel("fraction of flipped labels found")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "v2_detection_curve.png", dpi=110)
    plt.close(fig)


def method_table(result: dict, methods: list[str]) -> list[str]:
    """Markdown rows: AUC, recall at 20 % inspected, per-seed AUC, Spearman vs HyperINF."""
    lines = [
        "| method | AUC mean +- std | recall @ 20% inspected | per-seed AUC | "
        "min Spearman vs hyperinf |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        per = ", ".join(f"{s['auc'][m]:.3f}" for s in result["seeds"])
        sp = min(s["spearman_vs_hyperinf"][m] for s in result["seeds"])
        lines.append(
            f"| {m} | {result['auc_mean'][m]:.3f} +- {result['auc_std'][m]:.3f} | "
            f"{result['detect_at_20_mean'][m]:.3f} | {per} | {sp:.4f} |"
        )
    return lines


def _v1_table(summary: dict) -> list[str]:
    lines = [
        "| d x N | seed | Schulz frob. it 20 | first it <= 1e-4 | legacy it 28 | LiSSA it 40 "
        "| DataInf | Neumann it 40 | LiSSA/Schulz | DataInf/Schulz |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["v1"]["rows"]:
        lines.append(
            f"| {r['size']} | {r['seed']} | {r['frobenius_it20']:.1e} | "
            f"{r['first_frobenius_iter_below_1e-4']} | {r['legacy_it28']:.1e} | "
            f"{r['lissa_it40']:.2g} | {r['datainf']:.2g} | {r['neumann_it40']:.1e} | "
            f"{r['ratio_lissa']:.1e} | {r['ratio_datainf']:.1e} |"
        )
    return lines


def _v2_table(summary: dict, methods: list[str]) -> list[str]:
    lines = []
    for name, r in summary["v2"].items():
        cfg = r["config"]
        accs = [s["train_acc_noisy_labels"] for s in r["seeds"]]
        vals = [s["val_acc"] for s in r["seeds"]]
        lines += [
            f"**{name}** ({cfg['source']}, n_train={cfg['n_train']}, {cfg['epochs']} full-batch "
            f"epochs, {len(r['seeds'])} seeds; train acc on noisy labels "
            f"{min(accs):.3f}-{max(accs):.3f}, clean val acc {min(vals):.3f}-{max(vals):.3f})",
            "",
            *method_table(r, methods),
        ]
        lines += [
            "",
            f"min Spearman(hyperinf, exact_gfim) over seeds: "
            f"{r['min_spearman_hyperinf_exact_gfim']:.6f}; min Spearman(hyperinf_mislabel, "
            f"inv(G + lambda I + 1e-3 I)): {r['min_spearman_mislabel_preset']:.6f}",
            "",
        ]
    return lines


def acceptance_lines(summary: dict) -> list[str]:
    c = summary["v1"]["checks"]
    mem = summary["v2"].get("memorising")
    ok = lambda b: "held" if b else "MISSED"  # noqa: E731
    lines = [
        f"- V1 (a) Schulz `frobenius` error <= 1e-4 by iteration 20, every size and seed: "
        f"{ok(c['a_frobenius_by_20'])}",
        f"- V1 (b) Schulz `legacy` error <= 1e-4 by iteration 28: {ok(c['b_legacy_by_28'])}",
        f"- V1 (c) err(LiSSA)/err(Schulz) >= 100 and err(DataInf)/err(Schulz) >= 100 at "
        f"iteration 40: {ok(c['c_ratio_100'])}",
        f"- V1 (d) Schulz residual non-increasing once below 1: {ok(c['d_monotone'])}",
    ]
    if mem:
        sp = min(r["min_spearman_hyperinf_exact_gfim"] for r in summary["v2"].values())
        lines += [
            f"- V2 Spearman(hyperinf, exact_gfim) >= 0.999 in every seed and regime: "
            f"{ok(sp >= 0.999)} (min {sp:.6f})",
            f"- V2 Spearman(preset `mislabel`, inv(G + lambda I + 1e-3 I)) >= 0.999 (memorising): "
            f"{ok(mem['min_spearman_mislabel_preset'] >= 0.999)} "
            f"(min {mem['min_spearman_mislabel_preset']:.6f})",
            f"- V2 mean hyperinf AUC >= 0.65 in the memorising regime: "
            f"{ok(mem['auc_mean']['hyperinf'] >= 0.65)} ({mem['auc_mean']['hyperinf']:.3f})",
        ]
        gap = mem["auc_mean"]["grad_dot"] - mem["auc_mean"]["hyperinf"]
        if gap > 0.05:
            lines.append(
                f"- WARNING: hyperinf's mean AUC is {gap:.3f} below grad_dot's (memorising)"
            )
    return lines


def print_tables(summary: dict, methods: list[str]) -> None:
    print("\n".join(["V1: synthetic inversion (relative error)", *_v1_table(summary), ""]))
    print("\n".join(["V2: mislabeled-data detection", *_v2_table(summary, methods)]))
    print("\n".join(["Acceptance:", *acceptance_lines(summary)]))


def write_docs(summary: dict, methods: list[str], doc: Path) -> None:
    body = "\n".join(
        [
            f"Produced by `{summary['command']}` (torch {summary['torch']}, 2 shared CPU cores, "
            f"one intra-op thread, {summary['runtime_s']:.0f} s in total). Raw numbers: "
            "`docs/results/hyperinf/summary.json`.",
            "",
            "### Acceptance",
            "",
            *acceptance_lines(summary),
            "",
            "### V1: synthetic inversion convergence (relative error of A^-1 v, float32)",
            "",
            *_v1_table(summary),
            "",
            "![V1](results/hyperinf/v1_convergence.png)",
            "",
            "### V2: mislabeled-data detection (score high = flipped label)",
            "",
            *_v2_table(summary, methods),
            "![V2 AUC](results/hyperinf/v2_auc.png)",
            "",
            "![V2 detection curves](results/hyperinf/v2_detection_curve.png)",
        ]
    )
    replace_section(doc, START, END, body, title="HyperINF")
