"""CPU decode throughput: fused layer-parallel pairs vs the sequential model, next to the ideal.

Random-weight Llama-shaped models (16 layers by default), greedy decoding with the KV cache,
``Delta`` middle layers paired (fused mode). On one device LP does the same FLOPs with half the
kernel launches in the paired range, so the gain is bounded by the depth ratio
``L / (L - Delta/2)`` and shows up where decode is launch-bound (small width, batch 1).

    python benchmarks/layer_parallel_decode.py                 # widths 64 256 1024, batch 1 and 8
    python benchmarks/layer_parallel_decode.py --quick         # smoke run (writes to /tmp)

Two numbers per row: whole-model greedy decode tokens/s (embedding, mask, LM head and the HF
wrapper included: the user-visible speed) and ms per decode step through the decoder layers only
(the part whose depth LP shortens, so the one the ideal ratio describes).

Runs of the sequential and the LP model alternate (same weights, same process), and the median of
``--repeats`` runs after one warm-up is reported, so slow drifts of a shared CPU hit both equally.
Writes ``docs/results/benchmarks/layer_parallel_decode.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from modules.hf_models import build_causal_lm  # noqa: E402
from modules.layer_parallel import greedy_decode  # noqa: E402
from modules.layer_parallel_model import apply_layer_parallelism, sequential_layers  # noqa: E402
from ops.layer_parallel import LayerParallelPlan, ideal_speedup  # noqa: E402


def llama_config(width: int, layers: int, vocab: int) -> dict:
    heads = max(1, width // 64)
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": 256 * ((8 * width // 3 + 255) // 256),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2) if heads > 1 else 1,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    }


def middle_plan(layers: int, delta: int) -> LayerParallelPlan:
    """``delta`` layers centred in the stack (never layer 0, never the last layer)."""
    start = max(1, (layers - delta) // 2)
    return LayerParallelPlan.from_range(start, start + delta)


@torch.no_grad()
def measure(model, prompt: torch.Tensor, n_new: int, repeats: int) -> tuple[float, float]:
    """Median tokens/s of (sequential, LP), alternating runs, one warm-up each (prefill
    included, as ``modules.layer_parallel.decode_tokens_per_s`` defines it)."""
    times: dict[str, list[float]] = {"seq": [], "lp": []}
    on_gpu = prompt.device.type == "cuda"
    for r in range(repeats + 1):
        for name in ("seq", "lp"):
            if on_gpu:  # queued kernels of the previous run must not be charged to this one
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if name == "seq":
                with sequential_layers(model):
                    greedy_decode(model, prompt, n_new)
            else:
                greedy_decode(model, prompt, n_new)
            if on_gpu:  # argmax and cat stay on the device: nothing else waits for the kernels
                torch.cuda.synchronize()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    tokens = prompt.shape[0] * n_new
    return tokens / statistics.median(times["seq"]), tokens / statistics.median(times["lp"])


@torch.no_grad()
def measure_stack(model, batch: int, prompt: int, n_new: int, repeats: int) -> tuple[float, float]:
    """Median ms per decode step through the decoder layers only (seq, LP), alternating runs.

    Leaves out the embedding, mask construction, final norm, LM head and the model's Python
    wrapper, i.e. the part of a step whose depth LP shortens.
    """
    from transformers import DynamicCache

    dec = model.model
    width = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(batch, prompt, width, generator=gen)
    x = torch.randn(batch, 1, width, generator=gen)
    pe0 = dec.rotary_emb(h0, torch.arange(prompt)[None])
    pes = [dec.rotary_emb(x, torch.tensor([[prompt + t]])) for t in range(n_new)]

    def run(layers) -> float:
        cache = DynamicCache(config=model.config)
        h = h0
        for layer in layers:  # prefill (not timed); causal mask None = is_causal in SDPA
            h = layer(h, attention_mask=None, position_embeddings=pe0, cache=cache)
        t0 = time.perf_counter()
        for pe in pes:
            h = x
            for layer in layers:
                h = layer(h, attention_mask=None, position_embeddings=pe, cache=cache)
        return (time.perf_counter() - t0) / n_new

    lp_layers = list(dec.layers)
    with sequential_layers(model):
        seq_layers = list(dec.layers)
    times: dict[str, list[float]] = {"seq": [], "lp": []}
    for r in range(repeats + 1):
        for name, layers in (("seq", seq_layers), ("lp", lp_layers)):
            t = run(layers)
            if r > 0:
                times[name].append(t)
    return 1e3 * statistics.median(times["seq"]), 1e3 * statistics.median(times["lp"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--delta", type=int, default=8)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256, help="spec default (paper: 4096)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="widths 64 256, 32 new tokens, 1 repeat")
    p.add_argument(
        "--out", type=Path, default=REPO / "docs/results/benchmarks/layer_parallel_decode.json"
    )
    args = p.parse_args()
    if args.quick:
        args.widths, args.new_tokens, args.repeats, args.prompt = [64, 256], 32, 1, 32
        if args.out == p.get_default("out"):  # a smoke run keeps the committed results
            args.out = Path(tempfile.gettempdir()) / "layer_parallel_decode_quick.json"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = middle_plan(args.layers, args.delta)
    ideal = ideal_speedup(args.layers, args.delta)
    rows = []
    print(f"L={args.layers} Delta={args.delta} pairs={plan.to_list()} ideal={ideal:.3f}x "
          f"threads={args.threads} prompt={args.prompt} new={args.new_tokens}")  # fmt: skip
    print(f"{'width':>6} {'batch':>5} {'seq tok/s':>10} {'LP tok/s':>10} {'ratio':>6} "
          f"{'ideal':>6} {'of ideal gain':>13} {'stack seq ms':>12} {'stack LP ms':>11} "
          f"{'stack ratio':>11}")  # fmt: skip
    for width in args.widths:
        model = build_causal_lm(llama_config(width, args.layers, args.vocab)).eval()
        apply_layer_parallelism(model, plan, mode="fused")
        for batch in args.batches:
            prompt = torch.randint(0, args.vocab, (batch, args.prompt))
            seq, lp = measure(model, prompt, args.new_tokens, args.repeats)
            ratio = lp / seq
            frac = (ratio - 1) / (ideal - 1)
            s_seq, s_lp = measure_stack(model, batch, args.prompt, args.new_tokens, args.repeats)
            rows.append({"width": width, "batch": batch, "seq_tok_s": seq, "lp_tok_s": lp,
                         "ratio": ratio, "ideal": ideal, "fraction_of_ideal_gain": frac,
                         "stack_seq_ms": s_seq, "stack_lp_ms": s_lp, "stack_ratio": s_seq / s_lp,
                         "stack_fraction_of_ideal_gain": (s_seq / s_lp - 1) / (ideal - 1)})  # fmt: skip
            print(f"{width:6d} {batch:5d} {seq:10.1f} {lp:10.1f} {ratio:6.3f} {ideal:6.3f} "
                  f"{frac:13.2f} {s_seq:12.2f} {s_lp:11.2f} {s_seq / s_lp:11.3f}", flush=True)  # fmt: skip
    result = {
        "benchmark": "layer_parallel_decode",
        "command": "python benchmarks/layer_parallel_decode.py " + " ".join(sys.argv[1:]),
        "layers": args.layers, "delta": args.delta, "pairs": plan.to_list(),
        "threads": args.threads, "prompt": args.prompt, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "torch": torch.__version__, "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
