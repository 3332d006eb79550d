"""A tiny federated setup shared by the FederatedLoRAModule tests: a 2-layer character Llama,
3 clients with canaries, and a fast single-process Trainer (imported as ``tests.federated_testkit``)."""

from __future__ import annotations

import lightning as L
import torch

from datamodules.federated import CharVocab, FederatedTextDataModule
from modules.hf_models import TINY_PRESETS, special_token_ids
from modules.lora_fl import FederatedLoRAModule
from modules.lora_fl_settings import LoraFLSettings, MemorizationSettings

VOCAB = len(CharVocab())
# The micro-llama preset with the character vocabulary's size (``vocab_size=VOCAB``) and token ids.
TINY = {
    **{
        key: value
        for key, value in TINY_PRESETS["micro-llama"].items()
        if key != "vocab_size" and not key.endswith("_token_id")
    },
    **special_token_ids(CharVocab()),
}
MEM = MemorizationSettings(prefix_lengths=[16, 32], suffix_len=16, frequency_penalty=0.0)
NO_MEM = MemorizationSettings(enabled=False)


def tiny_dm(sizes=(24, 30, 36), canaries: int = 10, batch: int = 8) -> FederatedTextDataModule:
    return FederatedTextDataModule(
        client_sizes=list(sizes), num_entities=20, val_questions_per_client=4,
        num_canaries=canaries, batch_size=batch,
    )  # fmt: skip


def tiny_trainer(rounds: int, **kw) -> L.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_steps=rounds, accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kw,
    )  # fmt: skip


def tiny_module(**kw) -> FederatedLoRAModule:
    torch.manual_seed(0)
    kw.setdefault("lora", LoraFLSettings(rank=4, alpha=2.0, dropout=0.0))
    kw.setdefault("memorization", MEM)
    return FederatedLoRAModule(model=TINY, vocab_size=VOCAB, local_warmup_steps=0, **kw)
