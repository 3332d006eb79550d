"""Plots and the measured section of ``docs/fo-maml.md`` from ``docs/results/fo_maml/summary.json``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ops.docs_section import replace_section

START, END = "<!-- measured:start -->", "<!-- measured:end -->"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(summary: dict, out: Path) -> None:
    if "a" in summary:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        a = summary["a"]
        stride = max(1, 1000 // len(next(iter(a["arms"].values()))["trace"]))
        for name, arm in a["arms"].items():
            steps = [stride * (i + 1) for i in range(len(arm["trace"]))]
            ax.semilogy(steps, [max(v, 1e-17) for v in arm["trace"]], label=name)
        ax.set(xlabel="outer GD step", ylabel="true ||grad F||", title="A. linear tasks: floors")
        ax.legend(fontsize=7)
        _save(fig, out / "a_true_meta_grad_norm.png")
    if "c" in summary:
        c = summary["c"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for arm, style in (("forward", "--"), ("symmetric", "-")):
            for delta, errs in c[arm]["curves"].items():
                axes[0].loglog(c["nu"], errs, style, label=f"{arm} δ={float(delta):.0e}")
            axes[1].loglog(c["delta"], c[arm]["best"], "o" + style,
                           label=f"{arm}: slope {c[arm]['slope']:.2f}")  # fmt: skip
        # For nu L_f > 1/alpha the -nu problem is not strongly convex and its solve diverges.
        axes[0].set_ylim(top=1e2)
        axes[0].set(xlabel="ν", ylabel="||ĝ - ∇F||", title="C. error vs ν (inexact solves)")
        axes[1].set(xlabel="inner accuracy δ", ylabel="best error over ν", title="C. floor vs δ")
        axes[0].legend(fontsize=6)
        axes[1].legend(fontsize=8)
        _save(fig, out / "c_floor_vs_inner_accuracy.png")
    if "b" in summary:
        b = summary["b"]
        fig, ax = plt.subplots(figsize=(5, 4))
        for arm in ("forward", "symmetric"):
            ax.loglog(b["nu"], b[arm]["rel_error"], "o-",
                      label=f"{arm} (slope {b[arm]['slope']:.2f})")  # fmt: skip
        for arm in ("fomaml", "reptile"):
            ax.axhline(b[arm], ls=":", color="gray")
            ax.text(b["nu"][-1], b[arm], arm, fontsize=8, va="bottom")
        ax.set(xlabel="ν", ylabel="relative error", title="B. bias vs ν (exact solves)")
        ax.legend()
        _save(fig, out / "b_bias_vs_nu.png")
    if "d" in summary:
        d = summary["d"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        pts = d["sine"]["points"]
        axes[0].loglog([p[0] for p in pts], [p[1] for p in pts], ".", alpha=0.6)
        axes[0].set(xlabel="||∇F(x)||", ylabel="local smoothness",
                    title=f"D. one-step MAML: ratio {d['sine']['ratio']:.2f}")  # fmt: skip
        for name, trace in d["optimizers"].items():
            axes[1].semilogy(trace, label=name)
        axes[1].set(
            xlabel="outer step", ylabel="F(x)", title="D. GD vs SNGDM vs clipped (far start)"
        )
        axes[1].legend()
        _save(fig, out / "d_nonsmoothness.png")
    for key in [k for k in summary if k.startswith("f") and isinstance(summary[k], dict)]:
        f = summary[key]
        fig, ax = plt.subplots(figsize=(6, 4))
        names = list(f["arms"])
        for i, name in enumerate(names):
            accs = f["arms"][name]["acc"]
            ax.bar(i, f["arms"][name]["mean"], color="C0", alpha=0.6)
            ax.plot([i] * len(accs), accs, "ko", ms=4)
        if "untrained_acc" in f:
            ax.axhline(f["untrained_acc"], ls=":", color="gray", label="untrained + adaptation")
        ax.set_xticks(range(len(names)), names)
        ax.set(ylabel="meta-test query accuracy",
               title=f"F. MNIST-1D 5-way 5-shot, {f['steps']} meta-steps")  # fmt: skip
        if "untrained_acc" in f:
            ax.legend()
        _save(fig, out / f"{key}_mnist1d_accuracy.png")


def plot_benchmark(bench: dict, path: Path) -> None:
    rows = bench["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for c in sorted({r["channels"] for r in rows}):
        for m, style in (("maml", "o-"), ("fomaml", "s--"), ("fo_b_maml", "^-")):
            sel = [r for r in rows if r["channels"] == c and r["method"] == m]
            ks = [r["K"] for r in sel]
            axes[0].loglog(ks, [r["peak_saved_mb"] for r in sel], style, label=f"{m} {c}ch")
            axes[1].loglog(ks, [r["seconds"] for r in sel], style, label=f"{m} {c}ch")
    axes[0].set(
        xlabel="inner steps K", ylabel="peak saved-tensor MB", title="memory per meta-gradient"
    )
    axes[1].set(xlabel="inner steps K", ylabel="seconds / meta-step", title="time per meta-step")
    axes[0].legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)


def _yes(flag: bool) -> str:
    return "held" if flag else "**missed**"


def measured_section(s: dict) -> str:
    lines = ["", "## Measured results", ""]
    lines.append("Produced by `python experiments/fo_maml.py` (parts A-E: `--parts abcde`, part F: "
                 "`--parts f --seeds 0 1 2 --mnist-steps 300`), 2 shared CPU cores, float64 for A-D.")  # fmt: skip
    lines.append("")
    if "a" in s:
        a = s["a"]
        lines += ["### A. Linear-regression tasks: floors (outer GD, step 0.5/L_F, 1000 steps)", "",
                  "| arm | final ‖∇F‖ | after 3× longer | F − F* |", "|---|---|---|---|"]  # fmt: skip
        for name, arm in a["arms"].items():
            three = arm["final_grad_norm_3x"]
            lines.append(f"| {name} | {arm['final_grad_norm']:.3g} | "
                         f"{'' if three is None else f'{three:.3g}'} | {arm['F_gap']:.2g} |")  # fmt: skip
        st = a["stochastic"]
        lines += ["", "Stochastic version (reported, not gated; meta-batch 16, SNGDM β=0.9 lr 0.05, "
                  "mean true ‖∇F‖ over the last 50 of 500 steps, 3 seeds): "
                  + ", ".join(f"{k} {v['mean']:.3g}" for k, v in st.items()) + ".", ""]  # fmt: skip
    if "b" in s:
        b = s["b"]
        lines += ["### B. Bias vs ν with exact inner solves (K = 200)", "",
                  "| ν | " + " | ".join(f"{v:g}" for v in b["nu"]) + " | slope |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for arm in ("forward", "symmetric"):
            errs = " | ".join(f"{e:.3g}" for e in b[arm]["rel_error"])
            lines.append(f"| {arm} | {errs} | {b[arm]['slope']:.2f} |")
        lines += ["", f"FO-MAML relative error {b['fomaml']:.3f}, Reptile {b['reptile']:.3f}.", ""]
    if "c" in s:
        c = s["c"]
        lines += ["### C. Inexact solves: best error over 26 ν vs δ (K = 300, 3 draws)", "",
                  "| δ | " + " | ".join(f"{d:g}" for d in c["delta"]) + " | slope |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for arm in ("forward", "symmetric"):
            lines.append(f"| {arm} | " + " | ".join(f"{e:.3g}" for e in c[arm]["best"])
                         + f" | {c[arm]['slope']:.2f} |")  # fmt: skip
        lines.append("")
    if "d" in s:
        d = s["d"]["sine"]
        lines += ["### D. Non-smoothness of the one-step MAML objective", "",
                  f"Sine toy (upper bound on α·maxᵢ supₓ‖∇²gᵢ‖ = {d['alpha_hess_bound']:.2f}): median local "
                  f"smoothness {d['bottom_smoothness']:.2f} over the bottom decile of ‖∇F‖ "
                  f"(≈ {d['bottom_decile_grad']:.2f}) vs {d['top_smoothness']:.2f} over the top decile "
                  f"(≈ {d['top_decile_grad']:.0f}): ratio **{d['ratio']:.2f}**. Quadratic control "
                  f"ratios (5 seeds): {', '.join(f'{r:.3f}' for r in s['d']['quadratic_control_ratios'])}.",
                  ""]  # fmt: skip
        opt = s["d"]["optimizers"]
        lines += ["Reported only, far start: F after 300 steps " + ", ".join(
            f"{k} {v[-1]:.3f}" for k, v in opt.items()) + ".", ""]  # fmt: skip
    if "e" in s:
        e = s["e"]
        ks = list(next(iter(next(iter(e["table_mb"].values())).values())))
        lines += [f"### E. Peak autograd-saved memory of one meta-gradient, MB (K = {' → '.join(ks)})",
                  "", "| channels | MAML | FO-B-MAML | FO-MAML |", "|---|---|---|---|"]  # fmt: skip
        for c, row in e["table_mb"].items():
            cells = [
                " → ".join(f"{row[m][k]:.2f}" for k in ks) for m in ("maml", "fo_b_maml", "fomaml")
            ]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines += ["", "Ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in e["ratios"].items()), ""]
    for key in [k for k in s if k.startswith("f") and isinstance(s[k], dict)]:
        f = s[key]
        lines += [f"### F. MNIST-1D 5-way 5-shot, {f['steps']} meta-iterations, {f['test_tasks']} "
                  "meta-test tasks", "",
                  "Each (arm, seed) is `python experiments/fo_maml.py --parts f --arms <arm> --seeds "
                  "<seed>` (runs merge into summary.json); deterministic given the seed. Time per "
                  "meta-step is wall-clock on the shared, heavily loaded 2-core machine.", "",
                  "| arm | accuracy per seed | mean | s / meta-step |", "|---|---|---|---|"]  # fmt: skip
        for name, arm in f["arms"].items():
            per = " / ".join(f"{x:.3f}" for x in arm["acc"])
            lines.append(f"| {name} | {per} | {arm['mean']:.3f} | {arm['train_s_per_step']:.2f} |")
        if "untrained_acc" in f:
            lines.append(f"| untrained + adaptation | {f['untrained_acc']:.3f} | | |")
        lines.append("")
    lines += ["### Acceptance", "", "| part | item | result |", "|---|---|---|"]
    for part in sorted(k for k in s if isinstance(s[k], dict) and "accept" in s[k]):
        for item, ok in s[part]["accept"].items():
            lines.append(f"| {part.upper()} | `{item}` | {_yes(ok)} |")
    lines += ["", "Plots: `docs/results/fo_maml/*.png`.", ""]
    return "\n".join(lines)


def write_docs(summary: dict, path: Path) -> None:
    """Replace the measured section of the doc page (between the markers), keep the rest."""
    replace_section(path, START, END, measured_section(summary), title="FO-B-MAML")
