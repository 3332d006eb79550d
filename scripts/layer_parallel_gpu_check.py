"""GPU check for layer parallelism (spec 3.5 / 3.6): single-device fused LP vs sequential decode
tokens/s, and a 2-process tensor-parallel emulation that counts all-reduces.

Not a test and not run in CI: run it when a GPU is available. ``--tiny`` is a CPU dry run (gloo, a
64-wide 4-layer model) that checks the same things in seconds and is what the test suite runs.

    python scripts/layer_parallel_gpu_check.py                 # GPU: Llama-3.2-1B-shaped
    python scripts/layer_parallel_gpu_check.py --tiny          # CPU dry run

Tensor-parallel emulation, one process per "GPU" (NCCL when there are >= world GPUs, else gloo):

* sequential layer (Megatron TP): heads and MLP hidden units split by rank; one all-reduce after
  the attention output projection, one after the MLP down projection -> ``2L`` per step;
* LP pair: ranks ``[0, W/2)`` compute member ``i``'s attention (its own input norm), ranks
  ``[W/2, W)`` member ``j``'s, one all-reduce gives ``Attn_i + Attn_j``; every rank holds its slice
  of the hidden units of *both* MLPs, one all-reduce -> ``2L - Delta`` per step.

Checks (fp32 runs): the counts; TP logits equal the single-process HF model (sequential) and the
reference LP model (``per_member``, and ``rank_mixed`` against its reference) within ``--tol``;
``rank_mixed`` differs from ``per_member``. Results go to ``--out`` as JSON.

Dtypes: the tensor-parallel emulation always runs in fp32 (on GPU too), so its checks can use an
fp32 tolerance; only the single-device decode timing runs in bf16 (CUDA; fp32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.fabric.plugins.environments.lightning import find_free_network_port  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from ops.layer_parallel import LayerParallelPlan, count_allreduces, rms_normalize  # noqa: E402


def model_config(args) -> dict:
    return {
        "model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.width,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
    }  # fmt: skip


def build(args, dtype=torch.float32):
    """Random-weight Llama; identical on every rank (same seed, CPU init), random norm gains."""
    from modules.hf_models import build_causal_lm

    torch.manual_seed(args.seed)
    model = build_causal_lm(model_config(args)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)  # so that rank_mixed really differs from per_member
    return model.to(dtype)


class Comm:
    """All-reduce(SUM) that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.count += 1
        dist.all_reduce(t)
        return t


def _slice(lin, rows=None, cols=None, gain=None):
    w = lin.weight
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    if gain is not None:  # fold the RMSNorm gain (spec 3.4), rows of w see gain[rows] when 2-D
        w = w * (gain if gain.dim() == 2 else gain.unsqueeze(0))
    return w.contiguous()


def shard(model, plan: LayerParallelPlan, rank: int, world: int, post: str, device) -> list[dict]:
    """Per-rank weights of every sequential step (a layer or an LP pair), gains folded."""
    layers, steps = model.model.layers, []
    first, second = dict(plan.pairs), {j for _, j in plan.pairs}
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for idx in range(len(layers)):
        if idx in second:
            continue
        members = [idx] if idx not in first else [idx, first[idx]]
        # Attention: which member this rank serves and its share of that member's heads.
        group = world if len(members) == 1 else world // 2
        m = members[0] if len(members) == 1 else members[rank // group]
        lr = rank % group
        a, n1 = layers[m].self_attn, layers[m].input_layernorm
        hq, hkv = cfg.num_attention_heads // group, cfg.num_key_value_heads // group
        q_rows = slice(lr * hq * hd, (lr + 1) * hq * hd)
        kv_rows = slice(lr * hkv * hd, (lr + 1) * hkv * hd)
        step = {
            "cache_idx": m, "hq": hq, "hkv": hkv, "hd": hd, "eps1": n1.variance_epsilon,
            "q": _slice(a.q_proj, q_rows, gain=n1.weight), "k": _slice(a.k_proj, kv_rows, gain=n1.weight),
            "v": _slice(a.v_proj, kv_rows, gain=n1.weight), "o": _slice(a.o_proj, cols=q_rows),
        }  # fmt: skip
        # MLP: this rank's slice of the hidden units of every member (one member for a layer).
        inter = layers[idx].mlp.gate_proj.out_features
        rows = slice(rank * inter // world, (rank + 1) * inter // world)
        norms = [layers[k].post_attention_layernorm for k in members]
        mlps = []
        for k, norm in zip(members, norms, strict=True):
            if post == "rank_mixed" and len(members) == 2:
                gain = norms[rank // (world // 2)].weight  # official HEAD: rank's own member's N2
            elif post == "averaged" and len(members) == 2:
                gain = 0.5 * (norms[0].weight + norms[1].weight)
            else:
                gain = norm.weight
            mlp = layers[k].mlp
            mlps.append((_slice(mlp.gate_proj, rows, gain=gain), _slice(mlp.up_proj, rows, gain=gain),
                         _slice(mlp.down_proj, cols=rows)))  # fmt: skip
        step["eps2"] = min(n.variance_epsilon for n in norms)
        step["mlps"] = mlps
        steps.append({k: _to(v, device) for k, v in step.items()})
    return steps


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.to(device)
    if isinstance(v, list):
        return [tuple(t.to(device) for t in m) for m in v]
    return v


@torch.no_grad()
def tp_forward(model, steps, ids, pos, cache: dict, comm: Comm) -> torch.Tensor:
    """One TP forward over new tokens ``ids`` at positions ``pos`` with a per-layer KV cache."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(x, pos)
    b, t, _ = x.shape
    for s in steps:
        u = rms_normalize(x, s["eps1"])
        q = F.linear(u, s["q"]).view(b, t, s["hq"], s["hd"]).transpose(1, 2)
        k = F.linear(u, s["k"]).view(b, t, s["hkv"], s["hd"]).transpose(1, 2)
        v = F.linear(u, s["v"]).view(b, t, s["hkv"], s["hd"]).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if s["cache_idx"] in cache:  # cache per original layer index, as in the HF wrapper
            pk, pv = cache[s["cache_idx"]]
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        cache[s["cache_idx"]] = (k, v)
        # Causal mask aligned bottom-right: query i of this chunk sits at key position
        # past + i, so it sees keys 0..past + i (is_causal=True would align it top-left, wrong
        # for a chunk after a prefill: layer-parallel spec quirk 3). One query sees every key.
        past, mask = k.shape[2] - t, None
        if t > 1:
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=s["hq"] != s["hkv"]
        )
        h = x + comm(F.linear(att.transpose(1, 2).reshape(b, t, -1), s["o"]))
        u2 = rms_normalize(h, s["eps2"])
        part = sum(
            F.linear(F.silu(F.linear(u2, g)) * F.linear(u2, up), d) for g, up, d in s["mlps"]
        )
        x = h + comm(part)
    return model.lm_head(model.model.norm(x))


# (report name, plan (None: the run's plan), post-attention norm of the pairs); spec quirk 1's two
# code-faithful variants beside the exact per-member norms.
VARIANTS = (
    ("sequential", LayerParallelPlan(), "per_member"),
    ("lp_per_member", None, "per_member"),
    ("lp_rank_mixed", None, "rank_mixed"),
    ("lp_averaged", None, "averaged"),
)
CHUNK = 3  # tokens of the cached multi-token chunk


def tp_worker(rank: int, world: int, args, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world and not args.tiny
    dist.init_process_group("nccl" if use_nccl else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if use_nccl else torch.device("cpu")
    torch.set_num_threads(max(1, args.threads))
    model = build(args)
    plan = LayerParallelPlan.parse(args.plan)
    L = args.layers
    ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    result: dict = {"backend": "nccl" if use_nccl else "gloo", "world": world}
    for name, p, post in VARIANTS:
        p = p or plan
        steps = shard(model, p, rank, world, post, device)
        model_d = model.to(device)
        comm, cache = Comm(), {}
        pos = torch.arange(args.prompt, device=device)[None]
        # The last CHUNK prompt tokens as one chunk after a prefill of the rest: checks the
        # cached multi-token mask against the same positions of the one-pass logits.
        chunk_cache = {}
        tp_forward(model_d, steps, ids[:, :-CHUNK].to(device), pos[:, :-CHUNK], chunk_cache, comm)
        chunk = tp_forward(model_d, steps, ids[:, -CHUNK:].to(device), pos[:, -CHUNK:], chunk_cache, comm)  # fmt: skip
        logits = tp_forward(model_d, steps, ids.to(device), pos, cache, comm)
        comm.count = 0
        token = logits[:, -1:].argmax(-1)
        tp_forward(model_d, steps, token, pos[:, -1:] + 1, cache, comm)
        entry = {"allreduces_per_step": comm.count, "expected": count_allreduces(p, L)}
        times = []
        for r in range(args.new_tokens):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            token = tp_forward(model_d, steps, token, pos[:, -1:] + 2 + r, cache, comm)[
                :, -1:
            ].argmax(-1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        entry["ms_per_token"] = 1e3 * statistics.median(times)
        entry["prefill_logits"] = logits.float().cpu()
        entry["chunk_logits"] = chunk.float().cpu()
        result[name] = entry
        model = model_d.cpu()
    if rank == 0:
        torch.save(result, out_file)
    # Every rank done communicating before teardown: a rank destroying its gloo group while the
    # other still holds the connection aborted the process now and then (SIGABRT at exit).
    dist.barrier()
    dist.destroy_process_group()


def tp_check(args) -> dict:
    """Spawn the TP emulation and compare its logits with single-process references."""
    import tempfile

    from modules.layer_parallel_model import apply_layer_parallelism

    world = args.world
    cfg_ok = args.heads % world == 0 and args.kv_heads % world == 0 and world % 2 == 0
    if not cfg_ok:
        raise ValueError(f"TP needs heads ({args.heads}) and kv_heads ({args.kv_heads}) divisible "
                         f"by world={world}, and an even world")  # fmt: skip
    # a port the OS reports free (a pid-derived one could collide with a concurrent DDP run)
    port = find_free_network_port()
    with tempfile.TemporaryDirectory(prefix="mlo-tp-check-") as scratch:
        out_file = os.path.join(scratch, "result.pt")
        torch.multiprocessing.spawn(tp_worker, args=(world, args, port, out_file), nprocs=world)
        res = torch.load(out_file, weights_only=True)
    ids = torch.randint(0, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    refs = {}
    with torch.no_grad():
        for name, plan, post in VARIANTS:
            model = build(args)
            if plan is None:
                model = apply_layer_parallelism(model, args.plan, "reference", post)
            refs[name] = model(ids).logits
    report = {"backend": res["backend"], "world": world, "plan": args.plan}
    for name, ref in refs.items():
        e = res[name]
        diff = (e.pop("prefill_logits") - ref).abs().max().item()
        chunk_diff = (e.pop("chunk_logits") - ref[:, -CHUNK:]).abs().max().item()
        report[name] = {
            **e,
            "max_abs_diff_vs_single_process": diff,
            "cached_chunk_max_abs_diff": chunk_diff,
        }
    pm = refs["lp_per_member"]
    for variant in ("rank_mixed", "averaged"):
        report[f"{variant}_vs_per_member_max_diff"] = (
            (pm - refs[f"lp_{variant}"]).abs().max().item()
        )
    report["checks"] = {
        "allreduce_counts": all(
            report[n]["allreduces_per_step"] == report[n]["expected"] for n in refs
        ),
        "tp_matches_single_process": all(
            report[n]["max_abs_diff_vs_single_process"] <= args.tol for n in refs
        ),
        "cached_chunk_matches_single_process": all(
            report[n]["cached_chunk_max_abs_diff"] <= args.tol for n in refs
        ),
        "rank_mixed_differs": report["rank_mixed_vs_per_member_max_diff"] > args.tol,
        "averaged_differs": report["averaged_vs_per_member_max_diff"] > args.tol,
    }
    return report


def single_device(args) -> dict:
    """Fused LP vs sequential tokens/s on one device at batch 1 (HF model + KV cache)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from layer_parallel_decode import measure

    from modules.layer_parallel_model import apply_layer_parallelism

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(args, dtype).to(device)
    apply_layer_parallelism(model, args.plan, "fused", keep_originals=True)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), device=device)
    seq, lp = measure(model, prompt, args.new_tokens, args.repeats)
    return {
        "device": device,
        "dtype": str(dtype),
        "seq_tok_s": seq,
        "lp_tok_s": lp,
        "ratio": lp / seq,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument(
        "--plan", type=json.loads, default=None, help='JSON, e.g. \'{"start": 4, "end": 12}\''
    )
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-5, help="fp32 TP vs single-process max |dlogit|")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: 64 wide, 4 layers, gloo")
    p.add_argument("--skip-single", action="store_true", help="only the TP emulation")
    p.add_argument(
        "--skip-tp",
        action="store_true",
        help="only the single-device timing (with fewer GPUs than --world, the emulation falls "
        "back to gloo on the CPU, far too slow for the full-size model)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON report (default docs/results/layer_parallel/gpu_check.json; "
        "runs/layer_parallel/gpu_check_tiny.json with --tiny)",
    )
    args = p.parse_args()
    if args.tiny:
        args.width, args.layers, args.heads, args.kv_heads = 64, 4, 4, 2
        args.intermediate, args.vocab, args.prompt, args.new_tokens, args.repeats = (
            128,
            256,
            8,
            4,
            1,
        )
    if args.out is None:
        name = (
            "runs/layer_parallel/gpu_check_tiny.json"
            if args.tiny
            else "docs/results/layer_parallel/gpu_check.json"
        )
        args.out = REPO / name
    if args.plan is None:  # the middle half of the stack (Delta = L/2), never layer 0 or the last
        delta = max(2, args.layers // 2 // 2 * 2)
        start = (args.layers - delta) // 2
        args.plan = {"start": start, "end": start + delta}
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if not args.skip_tp:
        report["tensor_parallel"] = tp_check(args)
    if not args.skip_single:
        report["single_device"] = single_device(args)
    print(json.dumps(report, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if not args.skip_tp and not all(report["tensor_parallel"]["checks"].values()):
        raise SystemExit(f"TP checks failed: {report['tensor_parallel']['checks']}")


if __name__ == "__main__":
    main()
