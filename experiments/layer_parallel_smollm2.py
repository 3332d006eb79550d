"""Layer parallelism on the real pretrained SmolLM2-135M-Instruct (30 layers), issue #9.

Measures on held-out English text (the last 5% of the bundled corpus ``python_docs.jsonl``,
i.e. Python documentation prose + snippets, tokenized with SmolLM2's own tokenizer) the perplexity
ratio ``ppl_LP / ppl_seq`` versus the number of paired layers ``Delta`` and their position: a
centred middle range, the first layers (from layer 0), early layers (from layer 1), a late range
ending 3 layers before the top (the official default's relative position) and the last layers (up
to layer 29). Baselines that save the same ``Delta/2`` sequential steps: dropping the second member
of each middle pair, and dropping the ``Delta/2`` lowest Block-Influence layers (ShortGPT). Also
measures greedy decode tokens/s at batch 1, sequential vs fused LP, next to the ideal depth ratio
``L / (L - Delta/2)``. Writes ``docs/results/layer_parallel_smollm2/summary.json`` (rewritten after
every measurement, so an interrupted run keeps what it measured), ``ppl_ratio.png`` (ratio vs Delta
per position and the baselines; Block Influence per layer) and the generated table block of the
SmolLM2 section of ``docs/layer-parallel.md``.

    python experiments/layer_parallel_smollm2.py            # ~10 min on 1 thread (shared CPU)
    python experiments/layer_parallel_smollm2.py --quick    # smoke run
    python experiments/layer_parallel_smollm2.py --replot   # plots + doc from summary.json

Needs the ``smollm2-135m-instruct`` preset (``python scripts/fetch_smollm2.py`` once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ops.docs_section import replace_section  # noqa: E402

RESULTS = REPO / "docs" / "results" / "layer_parallel_smollm2"
DOC = REPO / "docs" / "layer-parallel.md"
PRESET = "smollm2-135m-instruct"
POSITIONS = ("first", "early", "middle", "late", "last")
START, END = "<!-- smollm2-results:start -->", "<!-- smollm2-results:end -->"


def held_out_tokens(tokenizer, frac: float = 0.05) -> torch.Tensor:
    """The last ``frac`` of the corpus documents (test split) as one stream joined by EOS."""
    with open(REPO / "data" / "corpus" / "python_docs.jsonl") as fh:
        docs = [json.loads(line)["text"] for line in fh if line.strip()]
    ids: list[int] = []
    for doc_ids in tokenizer(docs[-max(1, int(len(docs) * frac)) :])["input_ids"]:
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def plans_for(num_layers: int, deltas: list[int], edge_deltas: list[int]) -> list[dict]:
    """(position, Delta, plan) rows: a centred middle range per Delta, edge ranges for some."""
    from ops.layer_parallel import LayerParallelPlan

    span = LayerParallelPlan.from_range
    rows = []
    for d in deltas:
        start = (num_layers - d) // 2
        rows.append({"position": "middle", "delta": d, "plan": span(start, start + d)})
    for d in edge_deltas:
        rows.append({"position": "first", "delta": d, "plan": span(0, d)})
        rows.append({"position": "early", "delta": d, "plan": span(1, d + 1)})
        # "late": ends 3 layers before the top, the relative position of the official default
        # for Llama-3.2-3B (pairs (21,22),(23,24) of 28 layers).
        rows.append(
            {"position": "late", "delta": d, "plan": span(num_layers - 3 - d, num_layers - 3)}
        )
        rows.append({"position": "last", "delta": d, "plan": span(num_layers - d, num_layers)})
    return rows


def measure(args) -> dict:
    from transformers import AutoTokenizer

    from modules.hf_models import build_causal_lm
    from modules.layer_parallel import decode_tokens_per_s, perplexity
    from modules.layer_parallel_model import (
        apply_layer_parallelism,
        layer_block_influence,
        sequential_layers,
        undo_layer_parallelism,
    )
    from modules.pretrained_presets import resolve_pretrained_preset
    from ops.layer_parallel import ideal_speedup, lowest_influence_layers

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(resolve_pretrained_preset(PRESET))
    model = build_causal_lm(PRESET).eval()
    L = model.config.num_hidden_layers
    stream = held_out_tokens(tok)
    n = min(args.windows, len(stream) // args.length)
    windows = stream[: n * args.length].view(n, args.length)  # disjoint, contiguous windows
    res: dict = {"model": PRESET, "num_layers": L, "eval_tokens": windows.numel(),
                 "window": args.length, "n_windows": n, "rows": [], "decode": []}  # fmt: skip

    def save() -> None:
        res["elapsed_s"] = time.time() - t0
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "summary.json").write_text(json.dumps(res, indent=1))

    def ppl_lp(plan) -> float:
        apply_layer_parallelism(model, plan, "fused")
        try:
            return perplexity(model, windows, args.batch)
        finally:
            undo_layer_parallelism(model)

    def ppl_drop(dropped: list[int]) -> float:
        with sequential_layers(model, [k for k in range(L) if k not in dropped]):
            return perplexity(model, windows, args.batch)

    res["ppl_seq"] = base = perplexity(model, windows, args.batch)
    res["block_influence"] = bi = layer_block_influence(model, windows[: args.calib].split(1))
    print(f"ppl_seq {base:.3f} on {windows.numel()} tokens ({time.time() - t0:.0f}s)", flush=True)
    save()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pairing layer 0 / the last layer warns
        for row in plans_for(L, args.deltas, args.edge_deltas):
            plan, k = row.pop("plan"), row["delta"] // 2
            row["pairs"] = plan.to_list()
            row["lp"] = ppl_lp(plan) / base
            if row["position"] == "middle":
                row["dropped_second"] = [j for _, j in plan.pairs]
                row["drop_second"] = ppl_drop(row["dropped_second"]) / base
                row["dropped_low_bi"] = lowest_influence_layers(bi, k)
                row["drop_low_bi"] = ppl_drop(row["dropped_low_bi"]) / base
            res["rows"].append(row)
            print(json.dumps(row), f"({time.time() - t0:.0f}s)", flush=True)
            save()
    prompt = stream[-args.decode_prompt :].unsqueeze(0)
    for d in args.decode_deltas:
        start = (L - d) // 2
        from ops.layer_parallel import LayerParallelPlan

        apply_layer_parallelism(model, LayerParallelPlan.from_range(start, start + d), "fused")
        seq_r, lp_r = [], []
        for _ in range(args.decode_repeats):  # alternate so CPU drift hits both equally
            with sequential_layers(model):
                seq_r.append(decode_tokens_per_s(model, prompt, args.decode_new, 1, 1))
            lp_r.append(decode_tokens_per_s(model, prompt, args.decode_new, 1, 1))
        undo_layer_parallelism(model)
        seq, lp = sorted(seq_r)[len(seq_r) // 2], sorted(lp_r)[len(lp_r) // 2]
        row = {"delta": d, "pairs_start": start, "batch": 1, "seq_tok_s": seq, "lp_tok_s": lp,
               "ratio": lp / seq, "ideal": ideal_speedup(L, d)}  # fmt: skip
        res["decode"].append(row)
        print(json.dumps(row), f"({time.time() - t0:.0f}s)", flush=True)
        save()
    return res


def table(res: dict) -> str:
    lines = [
        "| position | Delta | pairs | LP ppl ratio | drop 2nd members | drop lowest-BI |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(res["rows"], key=lambda r: (POSITIONS.index(r["position"]), r["delta"])):
        span = f"{r['pairs'][0][0]}..{r['pairs'][-1][1]}"
        ds = f"{r['drop_second']:.3f}" if "drop_second" in r else "-"
        db = f"{r['drop_low_bi']:.3f} ({r['dropped_low_bi']})" if "drop_low_bi" in r else "-"
        lines.append(f"| {r['position']} | {r['delta']} | {span} | {r['lp']:.3f} | {ds} | {db} |")
    if res["decode"]:
        lines += ["", "| decode (batch 1) Delta | seq tok/s | fused LP tok/s | ratio | ideal |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['delta']} (middle) | {r['seq_tok_s']:.1f} | {r['lp_tok_s']:.1f} | "
                  f"{r['ratio']:.3f} | {r['ideal']:.3f} |" for r in res["decode"]]  # fmt: skip
    return "\n".join(lines)


def plots(res: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    top = 40.0  # pairing layer 0 costs ~1000x; clip it so the other curves stay readable
    for pos, marker in (
        ("middle", "o"),
        ("first", "s"),
        ("early", "D"),
        ("late", "v"),
        ("last", "^"),
    ):
        rows = sorted((r for r in res["rows"] if r["position"] == pos), key=lambda r: r["delta"])
        if not rows:
            continue
        ys = [r["lp"] for r in rows]
        label = f"{pos} layers" + (f" (clipped: up to {max(ys):.0f}x)" if max(ys) > top else "")
        ax[0].plot(
            [r["delta"] for r in rows], [min(y, top) for y in ys], marker=marker, label=label
        )
    ax[0].set_yscale("log")
    ax[0].set_ylim(0.9, top * 1.2)
    ax[0].set(xlabel="Delta (paired layers)", ylabel="ppl_LP / ppl_seq (log)",
              title=f"LP by position, SmolLM2-135M ({res['num_layers']} layers)")  # fmt: skip
    ax[0].legend(fontsize=8, loc="center left")
    mid = sorted((r for r in res["rows"] if r["position"] == "middle"), key=lambda r: r["delta"])
    for key, label, ls in (("lp", "LP, middle range", "-"),
                           ("drop_second", "drop 2nd member of each pair", "--"),
                           ("drop_low_bi", "drop Delta/2 lowest-BI layers", "--")):  # fmt: skip
        ax[1].plot([r["delta"] for r in mid], [r[key] for r in mid], ls=ls, marker="o", label=label)
    ax[1].set_yscale("log")
    ax[1].set(xlabel="Delta (LP) = 2 x dropped layers", ylabel="ppl / ppl_seq (log)",
              title="same sequential depth saved: LP vs dropping")  # fmt: skip
    ax[1].legend(fontsize=8)
    ax[2].bar(range(len(res["block_influence"])), res["block_influence"])
    ax[2].set(xlabel="layer", ylabel="1 - cos(x_in, x_out)", title="Block Influence (held-out)")
    fig.tight_layout()
    fig.savefig(out_dir / "ppl_ratio.png", dpi=110)
    plt.close(fig)
    return ["ppl_ratio.png"]


def write_doc(res: dict, command: str, doc: Path) -> None:
    """Rewrite the generated block of the SmolLM2 section (between its markers)."""
    head = (
        f"Command: `{command}` ({res.get('elapsed_s', 0):.0f} s, 1 thread, shared 2-core CPU). "
        f"Held-out text: {res['eval_tokens']} tokens ({res['n_windows']} windows of "
        f"{res['window']}); sequential perplexity {res['ppl_seq']:.3f}."
    )
    png = "![ppl ratio](results/layer_parallel_smollm2/ppl_ratio.png)"
    text = doc.read_text() if doc.exists() else "# Layer parallelism\n"
    if START not in text:  # first run: the section heading goes with the markers
        doc.write_text(
            f"{text}\n## SmolLM2-135M-Instruct (pretrained, 30 layers)\n\n{START}\n{END}\n"
        )
    replace_section(doc, START, END, "\n".join(["", head, "", table(res), "", png, ""]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--windows", type=int, default=6, help="held-out windows (disjoint)")
    p.add_argument("--length", type=int, default=256, help="tokens per window")
    p.add_argument("--batch", type=int, default=2, help="windows per forward pass")
    p.add_argument("--calib", type=int, default=2, help="windows for Block Influence")
    p.add_argument("--deltas", type=int, nargs="+", default=[2, 4, 8, 12, 16], help="middle range")
    p.add_argument("--edge-deltas", type=int, nargs="+", default=[4, 8], help="first/last ranges")
    p.add_argument("--decode-deltas", type=int, nargs="*", default=[16])
    p.add_argument("--decode-new", type=int, default=32)
    p.add_argument("--decode-prompt", type=int, default=32)
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--replot", action="store_true", help="plots + doc from summary.json")
    p.add_argument("--quick", action="store_true", help="smoke: 1 window, 2 plans, 4 tokens")
    args = p.parse_args()
    if args.quick:
        args.windows, args.length, args.calib, args.deltas, args.edge_deltas = 1, 64, 1, [2], [2]
        args.decode_deltas, args.decode_new, args.decode_repeats = [2], 4, 1
        args.out_dir = Path("/tmp/layer_parallel_smollm2_quick")
        args.doc = args.out_dir / "layer-parallel.md"
    torch.set_num_threads(args.threads)
    command = "python experiments/layer_parallel_smollm2.py " + " ".join(sys.argv[1:])
    if args.replot:
        res = json.loads((args.out_dir / "summary.json").read_text())
    else:
        res = measure(args)
        res["command"] = command.strip()
        (args.out_dir / "summary.json").write_text(json.dumps(res, indent=1))
    print(table(res))
    plots(res, args.out_dir)
    write_doc(res, res.get("command", command).strip(), args.doc)
    print(f"wrote {args.out_dir / 'summary.json'} and {args.doc}")


if __name__ == "__main__":
    main()
