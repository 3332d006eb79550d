"""Validation experiment for layer parallelism (spec ``shared/methods/layer-parallel.md`` section 6).

Trains (or loads from ``runs/``) a tiny 8-layer Llama on the bundled corpus, then measures on 40
fixed held-out windows the perplexity ratio ``ppl_LP / ppl_seq`` of every pair position and of
contiguous plans of ``Delta in {2, 4, 6}``, against two drop baselines that save the same
``Delta/2`` sequential steps (drop the second member of each pair; drop the lowest Block-Influence
layers), the code-faithful post-norm variants, LP fine-tuning vs a control (acceptance 7) and decode
tokens/s (sequential vs fused, batch 1 and 8). Prints a table, writes
``docs/results/layer_parallel/summary.json`` + PNGs, and rewrites the results section of
``docs/layer-parallel.md``.

    python experiments/layer_parallel.py            # full run (~10 min on 1 thread + training)
    python experiments/layer_parallel.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ops.docs_section import replace_section  # noqa: E402

RESULTS = REPO / "docs" / "results" / "layer_parallel"
DOC = REPO / "docs" / "layer-parallel.md"

# Validation model (spec section 6, adapted to the bundled corpus and tokenizer): 8 pre-norm Llama
# blocks, d=192, 6 heads (3 KV heads so grouped-query attention is exercised), context 128.
MODEL_CONFIG = {
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}
CONTEXT = 128


def corpus_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled corpus as one token stream (documents joined by EOS); last 5% held out."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer")
    with open(REPO / "data" / "corpus" / "python_docs.jsonl") as fh:
        docs = [json.loads(line)["text"] for line in fh if line.strip()]
    ids: list[int] = []
    for doc_ids in tok(docs)["input_ids"]:
        ids.extend(doc_ids)
        ids.append(tok.eos_token_id)
    stream = torch.tensor(ids, dtype=torch.long)
    split = int(len(stream) * 0.95)
    return stream[:split], stream[split:]


def train_tiny_llama(seed: int, steps: int, batch: int, lr: float, out_dir: Path) -> Path:
    """Train the validation model from scratch (AdamW, warm-up + cosine) and save it; cached."""
    from transformers import get_cosine_schedule_with_warmup

    from modules.hf_models import build_causal_lm

    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(seed)
    train, _ = corpus_tokens()
    model = build_causal_lm(dict(MODEL_CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(train) - CONTEXT - 1, (batch,), generator=gen)
        x = torch.stack([train[s : s + CONTEXT] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            print(
                f"train step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True
            )
    model.eval()
    model.save_pretrained(out_dir)
    return out_dir


def eval_windows(stream: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """``n`` fixed random windows of ``length`` tokens (spec: 40 x 128, fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length, (n,), generator=gen).tolist()
    return torch.stack([stream[s : s + length] for s in starts])


def lp_ppl(model, plan, windows, post_norm_mode: str = "per_member") -> float:
    """Perplexity of ``model`` with ``plan`` applied (fused), then undone."""
    from modules.layer_parallel import perplexity
    from modules.layer_parallel_model import apply_layer_parallelism, undo_layer_parallelism

    apply_layer_parallelism(model, plan, "fused", post_norm_mode)
    try:
        return perplexity(model, windows)
    finally:
        undo_layer_parallelism(model)


def drop_ppl(model, dropped: list[int], windows) -> float:
    """Perplexity with the layers ``dropped`` removed (ShortGPT-style baseline)."""
    from modules.layer_parallel import perplexity
    from modules.layer_parallel_model import sequential_layers

    keep = [k for k in range(model.config.num_hidden_layers) if k not in dropped]
    with sequential_layers(model, keep):
        return perplexity(model, windows)


def finetune_ratio(model_dir: Path, plan, train: torch.Tensor, windows, args, seed: int) -> dict:
    """Acceptance 7: fine-tune the paired layers with LP vs the same params without LP."""
    import lightning as L

    from modules.layer_parallel import LayerParallelModule, perplexity
    from modules.layer_parallel_model import sequential_layers
    from optim.schedules import WarmupCosine

    out = {}
    for with_lp in (True, False):
        L.seed_everything(seed, verbose=False)
        module = LayerParallelModule(
            model=str(model_dir),
            plan=plan.to_list(),
            mode="reference",
            train_with_lp=with_lp,
            optimizer=lambda p: torch.optim.AdamW(p, lr=args.ft_lr, weight_decay=0.0),
            lr_scheduler=lambda o: WarmupCosine(o, warmup_steps=max(1, args.ft_steps // 20)),
        )
        loader = torch.utils.data.DataLoader(
            [
                {"input_ids": w, "labels": w}
                for w in eval_windows(train, args.ft_steps * args.ft_batch, CONTEXT, 99)
            ],
            batch_size=args.ft_batch,
        )
        trainer = L.Trainer(
            max_steps=args.ft_steps, accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=loader)
        module.use_mode("fused")
        model = module.model.eval()
        lp = perplexity(model, windows)
        with sequential_layers(model):
            seq = perplexity(model, windows)
        out["lp_ft" if with_lp else "control_ft"] = {"ppl_lp": lp, "ppl_seq": seq}
    out["ratio_lp_ft_over_seq_ft"] = out["lp_ft"]["ppl_lp"] / out["control_ft"]["ppl_seq"]
    return out


def decode_rows(model, plans: dict, prompt_stream: torch.Tensor, args) -> list[dict]:
    """Greedy decode tokens/s of the trained model: sequential vs fused LP, batch 1 and 8."""
    from modules.layer_parallel import decode_tokens_per_s
    from modules.layer_parallel_model import (
        apply_layer_parallelism,
        sequential_layers,
        undo_layer_parallelism,
    )
    from ops.layer_parallel import ideal_speedup

    rows = []
    for name, plan in plans.items():
        apply_layer_parallelism(model, plan, "fused")
        for batch in (1, 8):
            prompt = eval_windows(prompt_stream, batch, args.decode_prompt, 7)
            seq_r, lp_r = [], []
            for _ in range(args.decode_repeats):  # alternate so CPU drift hits both equally
                with sequential_layers(model):
                    seq_r.append(decode_tokens_per_s(model, prompt, args.decode_new, 1, 1))
                lp_r.append(decode_tokens_per_s(model, prompt, args.decode_new, 1, 1))
            seq, lp = sorted(seq_r)[len(seq_r) // 2], sorted(lp_r)[len(lp_r) // 2]
            ideal = ideal_speedup(model.config.num_hidden_layers, plan.delta)
            rows.append({"plan": name, "batch": batch, "seq_tok_s": seq, "lp_tok_s": lp,
                         "ratio": lp / seq, "ideal": ideal})  # fmt: skip
        undo_layer_parallelism(model)
    return rows


def run_seed(seed: int, args) -> dict:
    from modules.hf_models import build_causal_lm
    from modules.layer_parallel import perplexity
    from modules.layer_parallel_model import layer_block_influence
    from ops.layer_parallel import LayerParallelPlan, admissible_ranges, lowest_influence_layers

    tag = f"tiny_llama_s{seed}_{args.train_steps}st_b{args.batch}"
    model_dir = train_tiny_llama(seed, args.train_steps, args.batch, args.lr, args.cache_dir / tag)
    model = build_causal_lm(str(model_dir)).eval()
    train, held_out = corpus_tokens()
    windows = eval_windows(held_out, args.windows, CONTEXT, seed=1234)
    calib = eval_windows(train, 16, CONTEXT, seed=4321)
    L = model.config.num_hidden_layers
    base = perplexity(model, windows)
    bi = layer_block_influence(model, calib.split(8))
    res: dict = {"seed": seed, "model_dir": str(model_dir), "ppl_seq": base, "block_influence": bi}

    def entry(plan: LayerParallelPlan) -> dict:
        k = plan.delta // 2
        second = [j for _, j in plan.pairs]
        lowbi = lowest_influence_layers(bi, k)
        return {
            "plan": plan.to_list(), "delta": plan.delta,
            "lp": lp_ppl(model, plan, windows) / base,
            "drop_second": drop_ppl(model, second, windows) / base, "dropped_second": second,
            "drop_low_bi": drop_ppl(model, lowbi, windows) / base, "dropped_low_bi": lowbi,
        }  # fmt: skip

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pairing layer 0 / the last layer warns
        res["pair_sweep"] = [entry(LayerParallelPlan(((i, i + 1),))) for i in range(L - 1)]
        res["ranges"] = {
            str(d): [
                entry(p) for p in [LayerParallelPlan.from_range(0, d), *admissible_ranges(L, d)]
            ]
            for d in (2, 4, 6)
        }
        named = {"(2,3)": [[2, 3]], "(4,5)": [[4, 5]], "(2,3),(4,5)": [[2, 3], [4, 5]],
                 "(1,2),(3,4)": [[1, 2], [3, 4]], "(0,1)": [[0, 1]]}  # fmt: skip
        res["named"] = {k: entry(LayerParallelPlan.parse(v)) for k, v in named.items()}
        both = LayerParallelPlan.parse(named["(2,3),(4,5)"])
        res["post_norm_modes"] = {
            m: lp_ppl(model, both, windows, m) / base
            for m in ("per_member", "rank_mixed", "averaged")
        }
    if args.ft_steps > 0:
        res["finetune"] = finetune_ratio(model_dir, both, train, windows, args, seed)
    if args.decode_new > 0:
        plans = {"(4,5)": LayerParallelPlan(((4, 5),)), "(2,3),(4,5)": both,
                 "(1..6) Delta=6": LayerParallelPlan.from_range(1, 7)}  # fmt: skip
        res["decode"] = decode_rows(model, plans, held_out, args)
    return res


@torch.no_grad()
def exactness(model_dir: Path, windows: torch.Tensor) -> dict:
    """Acceptance 1 on the trained model: fused vs reference, full sequence and 5 cached steps."""
    import copy

    from modules.hf_models import build_causal_lm
    from modules.layer_parallel_model import apply_layer_parallelism

    base = build_causal_lm(str(model_dir)).eval()
    ids = windows[:4, :32]
    out = {"empty_plan_bit_identical": bool(
        torch.equal(apply_layer_parallelism(copy.deepcopy(base), None)(ids).logits, base(ids).logits)
    )}  # fmt: skip
    models = {m: apply_layer_parallelism(copy.deepcopy(base), [[2, 3], [4, 5]], m)
              for m in ("reference", "fused")}  # fmt: skip
    full = {m: net(ids).logits for m, net in models.items()}
    dec = {}
    for m, net in models.items():
        o = net(ids[:, :27], use_cache=True)
        steps, cache = [o.logits], o.cache
        for t in range(27, 32):
            o = net(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(o.logits)
            cache = o.cache
        dec[m] = torch.cat(steps, 1)
    out["fused_vs_reference_full"] = (full["fused"] - full["reference"]).abs().max().item()
    out["fused_vs_reference_decode"] = (dec["fused"] - dec["reference"]).abs().max().item()
    out["decode_vs_full_under_lp"] = (dec["fused"] - full["fused"]).abs().max().item()
    return out


def acceptance(res: dict) -> dict:
    n = res["named"]
    L = len(res["block_influence"])
    middle = [e for e in res["pair_sweep"] if e["plan"][0][0] >= 1 and e["plan"][0][1] <= L - 2]
    beats = lambda e: e["lp"] < min(e["drop_second"], e["drop_low_bi"])  # noqa: E731
    ex = res["exactness"]
    acc = {
        "1_exact": ex["empty_plan_bit_identical"]
        and max(ex["fused_vs_reference_full"], ex["fused_vs_reference_decode"]) <= 1e-5
        and ex["decode_vs_full_under_lp"] <= 1e-5,
        "2_pair23_le_1.05": n["(2,3)"]["lp"] <= 1.05,
        "2_pair45_le_1.05": n["(4,5)"]["lp"] <= 1.05,
        "2_pairs23_45_le_1.10": n["(2,3),(4,5)"]["lp"] <= 1.10,
        "3_lp_beats_both_drops": all(beats(n[k]) for k in ("(2,3)", "(4,5)", "(2,3),(4,5)")),
        "4_first_pair_worse_than_best_middle": n["(0,1)"]["lp"] > min(e["lp"] for e in middle),
        "issue_middle_pairs_le_1.10": max(e["lp"] for e in middle) <= 1.10,
        "issue_middle_pairs_beat_drops": all(beats(e) for e in middle),
    }
    if "finetune" in res:
        ft = res["finetune"]
        acc["7_finetune_reduces_ratio"] = ft["ratio_lp_ft_over_seq_ft"] < n["(2,3),(4,5)"]["lp"]
    return acc


def table(res: dict) -> str:
    """Markdown table of the named plans (ratios to the sequential perplexity)."""
    lines = [
        f"Sequential perplexity: {res['ppl_seq']:.3f} (seed {res['seed']}).",
        "",
        "| plan (0-based pairs) | Delta | LP ratio | drop 2nd members | drop lowest-BI layers |",
        "|---|---|---|---|---|",
    ]
    for name, e in res["named"].items():
        lines.append(
            f"| {name} | {e['delta']} | {e['lp']:.3f} | {e['drop_second']:.3f} "
            f"(drop {e['dropped_second']}) | {e['drop_low_bi']:.3f} (drop {e['dropped_low_bi']}) |"
        )
    for d, entries in res["ranges"].items():
        best = min(entries[1:], key=lambda e: e["lp"])
        lines.append(
            f"| best range, Delta={d}: {best['plan']} | {d} | {best['lp']:.3f} | "
            f"{best['drop_second']:.3f} | {best['drop_low_bi']:.3f} |"
        )
    return "\n".join(lines)


def plots(res: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    sweep = res["pair_sweep"]
    x = [e["plan"][0][0] for e in sweep]
    for key, label in (("lp", "LP pair (i, i+1)"), ("drop_second", "drop layer i+1"),
                       ("drop_low_bi", "drop lowest-BI layer")):  # fmt: skip
        ax[0].plot(x, [e[key] for e in sweep], marker="o", label=label)
    ax[0].set(
        xlabel="first layer i of the pair", ylabel="ppl / ppl_seq", title="Delta = 2: position"
    )
    ax[0].axhline(1.05, ls=":", c="gray")
    ax[0].legend()
    deltas = sorted(res["ranges"], key=int)
    for key, label in (("lp", "LP (best range)"), ("drop_second", "drop 2nd members (best range)"),
                       ("drop_low_bi", "drop Delta/2 lowest-BI layers")):  # fmt: skip
        ys = [min(e[key] for e in res["ranges"][d][1:]) for d in deltas]
        ax[1].plot([int(d) for d in deltas], ys, marker="o", label=label)
    ax[1].plot([int(d) for d in deltas], [res["ranges"][d][0]["lp"] for d in deltas], marker="x",
               ls="--", label="LP starting at layer 0")  # fmt: skip
    ax[1].set(xlabel="Delta (paired layers)", ylabel="ppl / ppl_seq", title="ratio vs Delta")
    ax[1].set_xticks([int(d) for d in deltas])
    ax[1].legend()
    ax[2].bar(range(len(res["block_influence"])), res["block_influence"])
    ax[2].set(xlabel="layer", ylabel="1 - cos(x_in, x_out)", title="Block Influence (calibration)")
    fig.tight_layout()
    fig.savefig(out_dir / "ppl_ratio.png", dpi=110)
    files = ["ppl_ratio.png"]
    if "decode" in res:
        fig, ax = plt.subplots(figsize=(7, 4))
        rows = res["decode"]
        labels = [f"{r['plan']}\nbatch {r['batch']}" for r in rows]
        ax.bar(
            [i - 0.2 for i in range(len(rows))], [r["ratio"] for r in rows], 0.4, label="measured"
        )
        ax.bar(
            [i + 0.2 for i in range(len(rows))],
            [r["ideal"] for r in rows],
            0.4,
            label="ideal L/(L-Delta/2)",
        )
        ax.axhline(1.0, c="k", lw=0.8)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set(ylabel="LP tok/s / sequential tok/s", title="decode speed-up, trained 8-layer model")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "decode_speedup.png", dpi=110)
        files.append("decode_speedup.png")
    plt.close("all")
    return files


def write_doc(summary: dict, command: str, doc: Path) -> None:
    """Rewrite the measured-numbers section of docs/layer-parallel.md between its markers."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    res = summary["runs"][0]
    acc = summary["acceptance"][0]
    ex = res["exactness"]
    parts = ["", f"Command: `{command}` ({summary['elapsed_s']:.0f} s).", "", table(res), ""]
    parts.append(
        f"Exactness on the trained model (pairs (2,3),(4,5), fp32): fused vs reference max |dlogit| "
        f"{ex['fused_vs_reference_full']:.1e} (full sequence), {ex['fused_vs_reference_decode']:.1e} "
        f"(5 cached decode steps); cached decode vs full sequence under LP "
        f"{ex['decode_vs_full_under_lp']:.1e}; empty plan bit-identical: {ex['empty_plan_bit_identical']}."
    )
    pm = res["post_norm_modes"]
    parts += [
        "",
        "Post-norm variants on (2,3),(4,5): "
        + ", ".join(f"`{k}` {v:.4f}" for k, v in pm.items())
        + ".",
    ]
    if "finetune" in res:
        ft = res["finetune"]
        parts += ["", (
            f"Fine-tuning (paired layers only, {summary['args']['ft_steps']} steps, reconstructed protocol): "
            f"ppl_LP_ft / ppl_seq_ft = {ft['lp_ft']['ppl_lp']:.3f} / {ft['control_ft']['ppl_seq']:.3f} = "
            f"{ft['ratio_lp_ft_over_seq_ft']:.3f} vs {res['named']['(2,3),(4,5)']['lp']:.3f} before."
        )]  # fmt: skip
    if "decode" in res:
        parts += [
            "",
            "| decode plan | batch | seq tok/s | LP tok/s | ratio | ideal |",
            "|---|---|---|---|---|---|",
        ]
        parts += [f"| {r['plan']} | {r['batch']} | {r['seq_tok_s']:.1f} | {r['lp_tok_s']:.1f} | "
                  f"{r['ratio']:.3f} | {r['ideal']:.3f} |" for r in res["decode"]]  # fmt: skip
    parts += ["", "| acceptance item | held |", "|---|---|"]
    parts += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in acc.items()]
    if len(summary["runs"]) > 1:
        for r, a in zip(summary["runs"][1:], summary["acceptance"][1:], strict=True):
            held = ", ".join(k for k, v in a.items() if v)
            parts += ["", f"Seed {r['seed']}: ppl_seq {r['ppl_seq']:.3f}; held: {held}."]
    parts += ["", "![ppl ratio](results/layer_parallel/ppl_ratio.png)"]
    if "decode" in res:
        parts += ["![decode](results/layer_parallel/decode_speedup.png)"]
    parts.append("")
    replace_section(doc, start, end, "\n".join(parts), title="Layer parallelism")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--windows", type=int, default=40, help="held-out windows of 128 tokens")
    p.add_argument("--ft-steps", type=int, default=100, help="fine-tuning steps (0: skip)")
    p.add_argument("--ft-batch", type=int, default=8)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--decode-new", type=int, default=64, help="decode tokens (0: skip)")
    p.add_argument("--decode-prompt", type=int, default=64)
    p.add_argument("--decode-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "layer_parallel")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--replot", action="store_true", help="redraw plots + doc from summary.json")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="summary.json and plots")
    p.add_argument("--doc", type=Path, default=DOC, help="markdown page whose results to rewrite")
    p.add_argument("--quick", action="store_true", help="smoke: 30 train steps, few windows")
    args = p.parse_args()
    if args.quick:
        args.train_steps, args.windows, args.ft_steps, args.decode_new = 30, 8, 4, 8
        args.decode_repeats, args.out_dir = 1, Path("/tmp/layer_parallel_quick")
        args.doc = args.out_dir / "layer-parallel.md"
    torch.set_num_threads(args.threads)
    if args.train_only:
        for seed in args.seeds:
            tag = f"tiny_llama_s{seed}_{args.train_steps}st_b{args.batch}"
            train_tiny_llama(seed, args.train_steps, args.batch, args.lr, args.cache_dir / tag)
        return
    if args.replot:
        summary = json.loads((args.out_dir / "summary.json").read_text())
        plots(summary["runs"][0], args.out_dir)
        write_doc(summary, summary.get("command", "python experiments/layer_parallel.py"), args.doc)
        return
    t0 = time.time()
    runs = []
    for seed in args.seeds:
        res = run_seed(seed, args)
        _, held_out = corpus_tokens()
        res["exactness"] = exactness(Path(res["model_dir"]), eval_windows(held_out, 4, CONTEXT, 5))
        runs.append(res)
        print(table(res))
    summary = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": runs,
        "acceptance": [acceptance(r) for r in runs],
        "elapsed_s": time.time() - t0,
    }
    for a in summary["acceptance"]:
        print(json.dumps(a, indent=1))
    summary["plots"] = plots(runs[0], args.out_dir)
    summary["command"] = "python experiments/layer_parallel.py " + " ".join(sys.argv[1:])
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    write_doc(summary, summary["command"], args.doc)
    print(f"wrote {args.out_dir / 'summary.json'} and {args.doc}")


if __name__ == "__main__":
    main()
