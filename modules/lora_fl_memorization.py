"""The canary memorization evaluation of ``FederatedLoRAModule`` (spec section 3.2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from modules.lora_fl_settings import MemorizationSettings
from ops.memorization import memorization_counts, memorization_summary, sample_split_indices
from ops.memorization_faithful import (
    TextCodec,
    memorization_counts_code_faithful,
    memorization_summary_code_faithful,
)


@torch.no_grad()
def canary_memorization(
    net: nn.Module,
    datamodule: Any,
    settings: MemorizationSettings,
    rank: int,
    world_size: int,
    all_reduce_sum: Callable[[Tensor], Tensor],
) -> dict[str, float]:
    """Memorization of the datamodule's unique training canaries by ``net`` (in eval mode).

    Each rank scores every ``world_size``-th canary; the counts are summed across ranks with
    ``all_reduce_sum``, so the result does not depend on the rank layout. The split indices are
    drawn over the full list first (one generator, ``settings.seed``).
    """
    mem = datamodule.memorization_set()
    if not mem["ids"]:
        return {}
    splits = sample_split_indices(
        [len(x) for x in mem["ids"]], max(settings.prefix_lengths), settings.suffix_len,
        settings.seed,
    )  # fmt: skip
    if all(split is None for split in splits):
        # Every canary skipped: a 0.0 recall would read as "nothing memorized".
        need = max(settings.prefix_lengths) + settings.suffix_len
        longest = max(len(x) for x in mem["ids"])
        raise ValueError(
            f"memorization: no canary is longer than max(prefix_lengths) + suffix_len = {need} "
            f"tokens (the longest has {longest}); lower memorization.prefix_lengths or "
            "memorization.suffix_len"
        )
    vocab = datamodule.vocab
    common = (net, mem["ids"], splits, mem["groups"], mem["group_values"],
              settings.prefix_lengths, settings.suffix_len)  # fmt: skip
    shard = range(rank, len(mem["ids"]), world_size)
    if settings.code_faithful_retokenize:
        codec = TextCodec(vocab.encode, vocab.encode_prompt, vocab.decode)
        counts = memorization_counts_code_faithful(
            *common, codec, settings.frequency_penalty, settings.bleu_threshold,
            vocab.eos_token_id, vocab.pad_token_id, batch_size=settings.batch_size, subset=shard,
        )  # fmt: skip
        summarize = memorization_summary_code_faithful
    else:
        counts = memorization_counts(
            *common, vocab.decode, settings.frequency_penalty, settings.bleu_threshold,
            vocab.eos_token_id, settings.batch_size, subset=shard,
        )  # fmt: skip
        summarize = memorization_summary
    counts = all_reduce_sum(counts).cpu()
    return summarize(counts, mem["group_values"], settings.prefix_lengths)
