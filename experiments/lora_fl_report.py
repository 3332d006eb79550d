"""Table, acceptance checks, plots and docs section of the lora-fl-memorization experiment."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from datamodules.federated_data import TEMPLATE_FAMILIES
from ops.docs_section import replace_section

SECAGG_BOUND = 3 * 2.0**-25 + 1e-6  # C * 2^-(f+1) + 1e-6 with C = 3 clients, f = 24


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _by_arm(results: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: (r["arm"], r["seed"])):
        out.setdefault(r["arm"], []).append(r)
    return out


def summarize(results: list[dict]) -> dict:
    """Per-arm means and the spec's acceptance items (section 6)."""
    arms = _by_arm(results)
    table = {}
    for arm, runs in arms.items():
        table[arm] = {
            "seeds": [r["seed"] for r in runs],
            "answer_acc": _mean([r["answer_acc"] for r in runs]),
            "answer_val_loss": _mean([r["val_loss"] for r in runs]),
            "exact_x10": _mean([r["mem_phi0"]["exact_x10"] for r in runs]),
            "exact_x1": _mean([r["mem_phi0"]["exact_x1"] for r in runs]),
            "approx_x10": _mean([r["mem_phi0"]["approx_x10"] for r in runs]),
            "approx_x1": _mean([r["mem_phi0"]["approx_x1"] for r in runs]),
            "worst_exact_x10": _mean([r["mem_phi0"]["worst_exact_x10"] for r in runs]),
            "exact_x10_phi1": _mean([r["mem_phi1"]["exact_x10"] for r in runs]),
            "approx_x10_phi1": _mean([r["mem_phi1"]["approx_x10"] for r in runs]),
            "bytes_per_client_round": runs[0]["bytes_per_client_round"],
            "wall_s": _mean([r["wall_s"] for r in runs]),
            "epsilon": runs[0].get("epsilon"),
            "per_seed_exact_x10": [r["mem_phi0"]["exact_x10"] for r in runs],
            "per_seed_acc": [r["answer_acc"] for r in runs],
        }
        if all("answer_acc_per_client" in r for r in runs):
            table[arm]["answer_first_token_acc"] = _mean(
                [r["answer_first_token_acc"] for r in runs]
            )
            per_client = zip(*(r["answer_acc_per_client"] for r in runs), strict=True)
            table[arm]["answer_acc_per_client"] = [_mean(list(c)) for c in per_client]
    checks = {}
    a, b = arms.get("A_full", []), arms.get("B_lora", [])
    if a and b:
        n10 = a[0]["mem_phi0"]["n_x10"]
        a_x10 = [r["mem_phi0"]["exact_x10"] for r in a]
        b_x10 = [r["mem_phi0"]["exact_x10"] for r in b]
        ratio = _mean(a_x10) / max(_mean(b_x10), 1.0 / (n10 * len(b)))
        checks["sanity_A_exact_x10_ge_0.3_every_seed"] = all(x >= 0.3 for x in a_x10)
        checks["utility_B_ge_A_minus_5pt"] = table["B_lora"]["answer_acc"] >= (
            table["A_full"]["answer_acc"] - 0.05
        )
        checks["ratio_A_over_B_ge_3"] = ratio >= 3.0
        checks["ratio_A_over_B"] = ratio
        paired = {r["seed"]: r["mem_phi0"]["exact_x10"] for r in a}
        checks["B_lt_A_every_seed"] = all(
            r["mem_phi0"]["exact_x10"] < paired.get(r["seed"], -1.0) for r in b
        )
        checks["x1_le_x10_both_arms"] = all(
            r["mem_phi0"]["exact_x1"] <= r["mem_phi0"]["exact_x10"] for r in a + b
        )
    for gf, ref in (("C_lora_goldfish", "B_lora"), ("D_full_goldfish", "A_full")):
        if gf in table and ref in table:
            checks[f"{gf}_exact_x10_le_0.05"] = table[gf]["exact_x10"] <= 0.05
            ref_acc = _mean([r["answer_acc"] for r in arms[ref] if r["seed"] in table[gf]["seeds"]])
            checks[f"{gf}_acc_drop_le_5pt"] = table[gf]["answer_acc"] >= ref_acc - 0.05
    if "E_lora_secagg" in arms and "B_lora" in arms:
        e = arms["E_lora_secagg"][0]
        errs = [h.get("secagg/max_abs_error", float("inf")) for h in e["rounds"]]
        checks["E_secagg_error_per_round"] = errs
        checks["E_secagg_error_within_bound"] = max(errs) <= SECAGG_BOUND
        b0 = next(r for r in arms["B_lora"] if r["seed"] == e["seed"])
        diff = sum(
            abs(e["mem_phi0"][k] - b0["mem_phi0"][k]) * e["mem_phi0"][f"n_x{g}"]
            for g in (1, 10)
            for k in [f"exact_x{g}_L{L}" for L in (16, 32, 48)]
        )
        checks["E_vs_B_exact_pairs_differing"] = diff
        checks["E_memorization_equals_B_within_1_pair"] = diff <= 1.0 + 1e-9
    if "F_lora_dpsgd" in table:
        f = table["F_lora_dpsgd"]
        checks["F_epsilon"] = f["epsilon"]
        checks["F_epsilon_finite"] = f["epsilon"] is not None and f["epsilon"] < float("inf")
        b_seed = _mean(
            [r["mem_phi0"]["exact_x10"] for r in arms["B_lora"] if r["seed"] in f["seeds"]]
        )
        checks["F_exact_x10_le_B"] = f["exact_x10"] <= b_seed
    return {"arms": table, "acceptance": checks}


def format_table(summary: dict) -> str:
    rows = [
        "| arm | seeds | answer acc | answer val loss | exact x10 | exact x1 | BLEU>=0.75 x10 "
        "| worst exact x10 | exact x10 (phi=1) | bytes/client/round | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, t in summary["arms"].items():
        rows.append(
            f"| {arm} | {len(t['seeds'])} | {t['answer_acc']:.3f} | {t['answer_val_loss']:.2f} | "
            f"{t['exact_x10']:.3f} | {t['exact_x1']:.3f} | {t['approx_x10']:.3f} | "
            f"{t['worst_exact_x10']:.3f} | "
            f"{t['exact_x10_phi1']:.3f} | {t['bytes_per_client_round'] / 1e3:.0f} kB | "
            f"{t['wall_s']:.0f} |"
        )
    return "\n".join(rows)


def format_utility_table(summary: dict) -> str:
    """Utility per client (one template family each) and of the first answer token alone."""
    arms = {a: t for a, t in summary["arms"].items() if "answer_acc_per_client" in t}
    if not arms:
        return ""
    n = len(next(iter(arms.values()))["answer_acc_per_client"])
    names = [f"client {c} ({TEMPLATE_FAMILIES[c % len(TEMPLATE_FAMILIES)]})" for c in range(n)]
    rows = [
        "| arm | answer acc | " + " | ".join(names) + " | first answer token acc |",
        "|---|---|" + "---|" * n + "---|",
    ]
    for arm, t in arms.items():
        cells = " | ".join(f"{a:.3f}" for a in t["answer_acc_per_client"])
        rows.append(
            f"| {arm} | {t['answer_acc']:.3f} | {cells} | {t['answer_first_token_acc']:.3f} |"
        )
    return "\n".join(rows)


def plot(summary: dict, results: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"A": "tab:red", "B": "tab:blue", "C": "tab:cyan", "D": "tab:orange",
              "E": "tab:purple", "F": "tab:green"}  # fmt: skip
    for r in results:
        axes[0].scatter(
            r["answer_acc"], r["mem_phi0"]["exact_x10"], color=colors[r["arm"][0]], s=40,
            label=r["arm"],
        )  # fmt: skip
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    axes[0].legend(uniq.values(), uniq.keys(), fontsize=8)
    axes[0].set_xlabel("held-out answer exact match (utility)")
    axes[0].set_ylabel("exact memorization, x10 canaries (phi=0)")
    axes[0].set_title("memorization vs utility (one dot per run)")
    axes[0].set_xlim(-0.02, 1.02)
    axes[0].set_ylim(-0.02, 1.02)
    arms = list(summary["arms"])
    x = range(len(arms))
    w = 0.38
    axes[1].bar([i - w / 2 for i in x], [summary["arms"][a]["exact_x10"] for a in arms], w,
                label="x10 canaries")  # fmt: skip
    axes[1].bar([i + w / 2 for i in x], [summary["arms"][a]["exact_x1"] for a in arms], w,
                label="x1 canaries")  # fmt: skip
    axes[1].set_xticks(list(x), [a.replace("_", "\n", 1) for a in arms], fontsize=8)
    axes[1].set_ylabel("exact memorization (mean over L, seeds)")
    axes[1].legend()
    axes[1].set_title("memorization per duplication group")
    axes[1].set_ylim(0, 1.02)
    fig.tight_layout()
    path = out / "memorization_vs_utility.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def write_report(
    results: list[dict],
    args,
    out: Path,
    command: str,
    docs: Path | None,
    section: str = "measured",
    base_fact_recall: float | None = None,
) -> dict:
    """Print and save the summary and plots; rewrite the docs page between the ``section``
    markers (``<!-- measured:start -->`` for the main experiment) when ``docs`` is given.
    ``base_fact_recall``: share of the entity facts the base model answers before fine-tuning."""
    summary = summarize(results)
    if base_fact_recall is not None:
        summary["base_fact_recall"] = base_fact_recall
    summary["command"] = command
    summary["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    table = format_table(summary)
    utility = format_utility_table(summary)
    print(table, utility, sep="\n\n")
    print(json.dumps(summary["acceptance"], indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plots = plot(summary, results, out)
    if docs is not None:
        page = docs / "lora-fl-memorization.md"
        lines = [f"Command: `{command}`", "", table, ""]
        if utility:
            lines += ["Utility per client (held-out questions of its template family):", "",
                      utility, ""]  # fmt: skip
        if base_fact_recall is not None:
            lines += [f"Base model before fine-tuning: answers {base_fact_recall:.3f} of the "
                      "entity table's facts (held-out ones included) in its pretraining format "
                      "`Q: ... A: ...` (teacher-forced exact match).", ""]  # fmt: skip
        lines += ["Acceptance (spec section 6):", ""]
        for k, v in summary["acceptance"].items():
            shown = f"{v:.3g}" if isinstance(v, float) else v
            if isinstance(v, list):
                shown = "[" + ", ".join(f"{x:.2e}" for x in v) + "]"
            lines.append(f"- `{k}`: {shown}")
        lines += ["", *[f"![{p}](results/{out.name}/{p})" for p in plots]]
        start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
        replace_section(page, start, end, "\n".join(lines))
    return summary
