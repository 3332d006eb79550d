"""PLACEHOLDER - being written"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO = Path(__file__).resolve().parents[1]

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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = (
        REPO
        / "runs"
        / "layer_parallel"
        / f"tiny_llama_s{args.seed}_{args.train_steps}st_b{args.batch}"
    )
    train_tiny_llama(args.seed, args.train_steps, args.batch, args.lr, out)


if __name__ == "__main__":
    main()
