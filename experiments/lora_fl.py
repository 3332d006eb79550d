"""Validation experiment of lora-fl-memorization (spec section 6): LoRA vs full FT in FedAvg.

    python experiments/lora_fl.py                  # full run (base + 10 arm runs), see docs
    python experiments/lora_fl.py --quick          # smoke version (~2 min)
    python experiments/lora_fl.py --pretrain-only  # only the base model (configs/lora_fl/*.yaml)

1. Pretrain a character-level Llama-style model once (seed 1234) on generic QA text over a fixed
   entity table (``datamodules.federated.base_corpus_texts``); saved with ``save_pretrained``.
2. Fine-tune it with FedAvg on 3 clients (Open / MCQ / Closed question templates) into which 60
   synthetic clinical-record canaries are injected (18 x10, 42 x1), one arm per setting:
   A full FT, B LoRA, C LoRA + Goldfish, D full + Goldfish, E LoRA + SecAgg, F LoRA + DP-SGD.
3. Report utility (held-out answer exact match) and memorization (exact / BLEU per group,
   prefix lengths {16, 32, 48}, S = 24, phi = 0; phi = 1 reported too), write
   ``docs/results/lora_fl/summary.json``, plots, and the measured section of the docs page.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules.federated import (  # noqa: E402
    IGNORE_INDEX,
    CharVocab,
    FederatedTextDataModule,
    base_corpus_texts,
    pad_collate,
)
from datamodules.federated_data import pack_sequences  # noqa: E402
from datamodules.synthetic_corpus import entity_table, qa_pairs  # noqa: E402
from experiments.lora_fl_report import write_report  # noqa: E402
from modules.hf_models import build_causal_lm  # noqa: E402
from modules.lora_fl import FederatedLoRAModule  # noqa: E402
from modules.lora_fl_settings import (  # noqa: E402
    GoldfishSettings,
    LoraFLSettings,
    MemorizationSettings,
    NoiseSettings,
    SecureAggregationSettings,
)
from ops.answer_match import answer_hits  # noqa: E402
from optim.schedules import warmup_cosine_factor  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "lora_fl"
MODEL = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0,
}  # fmt: skip
PACK = 128  # packed sequence length = the model's training context (spec: context 128)
ARMS = {
    "A_full": {"finetune_mode": "full"},
    "B_lora": {"finetune_mode": "lora"},
    "C_lora_goldfish": {"finetune_mode": "lora", "goldfish": True},
    "D_full_goldfish": {"finetune_mode": "full", "goldfish": True},
    "E_lora_secagg": {"finetune_mode": "lora", "secagg": True},
    "F_lora_dpsgd": {"finetune_mode": "lora", "dp": True},
}
# Calibration (spec section 6: recalibrate once on seed 0, then freeze). The first setting
# (clients 200/250/300, 1 local epoch, lr 1e-3 full / 1e-2 LoRA) gave exact_x10 = 0.0 for full
# fine-tuning (docs/results/lora_fl/calibration/), so the setup tested nothing. Frozen now (P3):
# clients 100/125/150, 3 local epochs, full-FT LR 3e-3 (the top of the spec's sweep, chosen by QA
# validation loss) and the spec's LoRA LR 1e-2, i.e. a 3.3x ratio, not the paper's 10x.


def pretrain_base(out: Path, steps: int, num_entities: int, seed: int = 1234) -> Path:
    """Pretrain the shared base once (AdamW 3e-3, batch 32, warmup-cosine); cached on disk."""
    if (out / "config.json").exists():
        return out
    L.seed_everything(seed)
    vocab = CharVocab()
    net = build_causal_lm(MODEL, vocab_size=len(vocab), dtype="float32")
    # Packed like the fine-tuning data: chunks start mid-text, so the base model (and every arm)
    # can continue a window cut from the middle of a record.
    texts = base_corpus_texts(num_entities, seed=0, num_texts=steps * 32 * 4)
    chunks = pack_sequences([[*vocab.encode(t), vocab.eos_token_id] for t in texts], PACK, seed)
    if len(chunks) < steps * 32:
        raise RuntimeError(f"{len(chunks)} pretraining chunks < {steps} steps x 32")
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine_factor(s, 50, steps))
    t0 = time.time()
    for step in range(steps):
        rows = [{"input_ids": c, "labels": c} for c in chunks[step * 32 : (step + 1) * 32]]
        batch = pad_collate(rows, vocab.pad_token_id)
        loss = net(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"  pretrain step {step:5d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out)
    return out


@torch.no_grad()
def base_fact_recall(base: Path, num_entities: int) -> float:
    """Share of the entity table's facts the base model answers in its pretraining format.

    Every (entity, attribute) question as ``Q: ... A: <answer>`` (the held-out facts of the
    fine-tuning clients included), scored like utility: teacher-forced exact match of the answer.
    """
    vocab = CharVocab()
    net = build_causal_lm(str(base), vocab_size=len(vocab), dtype="float32").eval()
    rows = []
    for entity in entity_table(num_entities, seed=0):
        for question, answer in qa_pairs(entity):
            prompt = vocab.encode(f"Q: {question} A: ")
            ids = [*prompt, *vocab.encode(answer)]
            rows.append(
                {"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + ids[len(prompt) :]}
            )
    batch = pad_collate(rows, vocab.pad_token_id)
    correct, _ = answer_hits(net(input_ids=batch["input_ids"]).logits, batch["labels"])
    return float(correct.mean())


def run_arm(name: str, seed: int, base: Path | str, args: argparse.Namespace) -> dict:
    """One federated run; returns utility, memorization (phi=0 and phi=1) and round stats.

    ``base`` is the starting model (directory or preset); ``args`` carries the protocol: rounds,
    local epochs, LRs, client sizes, canaries, ``tokenizer`` (``None`` = characters), LoRA
    ``lora_rank``/``lora_alpha``, ``prefix_lengths``/``suffix_len``, ``batch_size``, ``pack``.
    """
    spec = ARMS[name]
    lr = args.lr_full if spec["finetune_mode"] == "full" else args.lr_lora
    L.seed_everything(seed)
    mem = MemorizationSettings(
        prefix_lengths=list(args.prefix_lengths), suffix_len=args.suffix_len, frequency_penalty=0.0
    )
    module = FederatedLoRAModule(
        model=str(base), finetune_mode=spec["finetune_mode"],
        lora=LoraFLSettings(rank=args.lora_rank, alpha=args.lora_alpha, dropout=0.05),
        local_epochs=args.local_epochs, local_warmup_steps=10, local_max_grad_norm=1.0,
        local_optimizer=lambda p, lr=lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0),
        goldfish=GoldfishSettings(
            enabled=bool(spec.get("goldfish")), k=4, h=args.goldfish_h,
            # Packed rows start mid-record: keep the row-start targets out of the loss, or every
            # x10 canary replica cut by a row boundary is trained unmasked there (ops/goldfish.py).
            incomplete_window="drop" if args.pack else "keep",
        ),
        secure_aggregation=SecureAggregationSettings(enabled=bool(spec.get("secagg"))),
        noise=NoiseSettings(mode="dp_sgd", sigma=1.0, clip_norm=1.0, delta=1e-4)
        if spec.get("dp") else NoiseSettings(),
        memorization=mem, seed=seed,
    )  # fmt: skip
    dm = FederatedTextDataModule(
        num_rounds=args.rounds, client_sizes=args.client_sizes, num_entities=args.num_entities,
        val_questions_per_client=args.val_questions, num_canaries=args.canaries,
        batch_size=args.batch_size, packing_length=args.pack, tokenizer=args.tokenizer, seed=0,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=args.rounds, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    t0 = time.time()
    trainer.fit(module, dm)
    wall = time.time() - t0
    val = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    utility = val.validate(module, dm, verbose=False)[0]
    mem0 = dict(module.last_memorization)
    module.mem.frequency_penalty = 1.0
    module.trainer = trainer
    mem1 = module.evaluate_memorization()
    return {
        "arm": name, "seed": seed, "answer_acc": float(utility["val/answer_acc"]),
        "answer_first_token_acc": float(utility["val/answer_first_token_acc"]),
        "answer_acc_per_client": [
            float(utility[f"val/answer_acc_client{c}"]) for c in range(len(args.client_sizes))
        ],
        "val_loss": float(utility["val/loss"]), "mem_phi0": mem0, "mem_phi1": mem1,
        "rounds": module.history, "wall_s": wall,
        "bytes_per_client_round": module.history[-1]["round/bytes_per_client"],
        "epsilon": module.epsilon() if spec.get("dp") else None,
        "goldfish_h": args.goldfish_h if spec.get("goldfish") else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke version (tiny sizes)")
    parser.add_argument("--pretrain-only", action="store_true")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of A-D (E, F: the first)"
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--client-sizes", type=int, nargs=3, default=[100, 125, 150])
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--lr-full", type=float, default=3e-3, help="local AdamW LR, full FT")
    parser.add_argument("--lr-lora", type=float, default=1e-2, help="local AdamW LR, LoRA (10x)")
    parser.add_argument("--num-entities", type=int, default=100)
    parser.add_argument("--val-questions", type=int, default=50)
    parser.add_argument("--canaries", type=int, default=60)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument(
        "--goldfish-h", type=int, default=13,
        help="Goldfish hash context in tokens (spec: 13; tokens are characters here)",
    )  # fmt: skip
    parser.add_argument(
        "--base-dir", type=Path, default=ROOT / "runs" / "lora_fl" / "base_d128_packed"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--shard", default="", help="run only these arm:seed pairs, e.g. A_full:0")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--merge", action="store_true", help="only merge shard files and report")
    # Fixed parts of the protocol (spec section 6), shared with experiments/lora_fl_smollm2.py.
    parser.set_defaults(
        tokenizer=None, lora_rank=4, lora_alpha=2.0, prefix_lengths=[16, 32, 48], suffix_len=24,
        batch_size=16, pack=PACK,
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.client_sizes, args.canaries = 2, [40, 50, 60], 20
        args.seeds, args.pretrain_steps, args.val_questions = [0], 100, 10
        args.base_dir = args.base_dir.with_name(args.base_dir.name + "_quick")
        args.out = Path("/tmp/lora_fl_quick")
    base = pretrain_base(args.base_dir, args.pretrain_steps, args.num_entities)
    if args.pretrain_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    runs_dir = args.out / "runs"
    runs_dir.mkdir(exist_ok=True)
    if not args.merge:
        jobs = [
            (a, s) for a in args.arms for s in (args.seeds if a[0] in "ABCD" else args.seeds[:1])
        ]
        if args.shard:
            wanted = {tuple(x.split(":")) for x in args.shard.split(",")}
            jobs = [(a, s) for a, s in jobs if (a, str(s)) in wanted]
        for arm, seed in jobs:
            print(f"== {arm} seed {seed}")
            result = run_arm(arm, seed, base, args)
            (runs_dir / f"{arm}_seed{seed}.json").write_text(json.dumps(result, indent=1))
            m = result["mem_phi0"]
            print(
                f"   acc {result['answer_acc']:.3f}  exact_x10 {m['exact_x10']:.3f}  "
                f"exact_x1 {m['exact_x1']:.3f}  ({result['wall_s']:.0f}s)"
            )
    results = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
    command = "python experiments/lora_fl.py " + " ".join(sys.argv[1:])
    if args.merge or args.shard:  # parallel shards produce the same per-run files
        command = (
            "python experiments/lora_fl.py --shard <arm:seed,...> (2 parallel processes), "
            "then python experiments/lora_fl.py --merge"
        )
    # The docs page shows the default output directory only (calibration runs go elsewhere).
    docs = ROOT / "docs" if args.out.resolve() == RESULTS.resolve() else None
    recall = base_fact_recall(base, args.num_entities)
    write_report(results, args, args.out, command, docs=docs, base_fact_recall=recall)


if __name__ == "__main__":
    main()
