"""Extraction-style memorization metric (Carlini et al. 2023; official ``src/privacy_benchmark.py``).

For every unique training canary ``x`` (token ids, ``N`` tokens) one split index
``s ~ UniformInt[max(L), N - S)`` is drawn from a single generator (seed 42), reused for every
prefix length ``L``. The model sees ``x[s-L : s]`` and greedily decodes ``S`` tokens with a
frequency penalty ``phi`` (logits ``z_v - phi * c_v``, ``c_v`` = count of ``v`` among the tokens
generated so far, prompt not counted; ties go to the lowest id). Then

* exact memorization: ``LCP(gen[:S], ref[:S]) == S`` on token ids (no re-tokenization);
* approximate memorization: character BLEU-4 of the decoded strings ``>= bleu_threshold``.

Canaries with ``N <= max(L) + S`` are skipped. Results are reported per duplication group.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn


def sample_split_indices(
    lengths: Sequence[int], max_prefix: int, suffix_len: int, seed: int = 42
) -> list[int | None]:
    """One split index per sequence in ``[max_prefix, N - suffix_len)``; ``None`` = skipped."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int | None] = []
    for n in lengths:
        if n <= max_prefix + suffix_len:
            out.append(None)
            continue
        out.append(int(torch.randint(max_prefix, n - suffix_len, (1,), generator=gen)))
    return out


def longest_common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading positions where ``a`` and ``b`` agree."""
    m = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        m += 1
    return m


def is_exact_match(generated: Sequence[int], reference: Sequence[int], suffix_len: int) -> bool:
    """Exact memorization: the first ``S`` generated ids equal the first ``S`` reference ids."""
    return longest_common_prefix(generated[:suffix_len], reference[:suffix_len]) == suffix_len


def char_bleu4(hypothesis: str, reference: str) -> float:
    """Sentence BLEU-4 over characters, one reference, no smoothing (NLTK ``sentence_bleu``).

    Clipped n-gram precisions for n = 1..4 with uniform weights and brevity penalty
    ``BP = min(1, exp(1 - r / c))``; the score is 0 if any precision is 0.
    """
    c, r = len(hypothesis), len(reference)
    if c == 0:
        return 0.0
    log_p = 0.0
    for n in range(1, 5):
        hyp = Counter(hypothesis[i : i + n] for i in range(c - n + 1))
        ref = Counter(reference[i : i + n] for i in range(r - n + 1))
        matched = sum(min(count, ref[g]) for g, count in hyp.items())
        total = max(c - n + 1, 0)
        if matched == 0 or total == 0:
            return 0.0
        log_p += 0.25 * math.log(matched / total)
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_p)


@torch.no_grad()
def greedy_continue(
    model: nn.Module,
    prompts: Tensor,
    num_tokens: int,
    frequency_penalty: float = 0.0,
    eos_token_id: int | None = None,
) -> Tensor:
    """Greedy decoding of ``num_tokens`` ids after equal-length ``prompts`` ``[B, L]``.

    Logits at every step are penalised by ``phi * c_v`` (counts of generated tokens only).
    Rows that emit ``eos_token_id`` stop: later positions are filled with -1 (never a match).
    Works for any Hugging Face (v5) causal LM: the KV cache is passed as ``cache``.
    """
    batch = prompts.shape[0]
    out = torch.full((batch, num_tokens), -1, dtype=torch.long, device=prompts.device)
    counts: Tensor | None = None
    done = torch.zeros(batch, dtype=torch.bool, device=prompts.device)
    result = model(input_ids=prompts, use_cache=True)
    cache, logits = result.cache, result.logits[:, -1, :].float()
    for t in range(num_tokens):
        if counts is None:
            counts = torch.zeros_like(logits)
        scores = logits - frequency_penalty * counts if frequency_penalty else logits
        token = scores.argmax(dim=-1)  # first maximal index: ties go to the lowest id
        out[:, t] = torch.where(done, torch.full_like(token, -1), token)
        counts.scatter_add_(1, token[:, None], torch.ones_like(logits[:, :1]))
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                break
        if t + 1 < num_tokens:
            result = model(input_ids=token[:, None], cache=cache, use_cache=True)
            cache, logits = result.cache, result.logits[:, -1, :].float()
    return out


def scored_indices(
    split_indices: Sequence[int | None], subset: Iterable[int] | None = None
) -> list[int]:
    """The canaries to score: all (or ``subset``, a rank's shard) but the skipped ones."""
    candidates = range(len(split_indices)) if subset is None else subset
    return [i for i in candidates if split_indices[i] is not None]


def memorization_counts(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    split_indices: Sequence[int | None],
    groups: Sequence[int],
    group_values: Sequence[int],
    prefix_lengths: Sequence[int],
    suffix_len: int,
    decode: Callable[[Sequence[int]], str],
    frequency_penalty: float = 0.0,
    bleu_threshold: float = 0.75,
    eos_token_id: int | None = None,
    batch_size: int = 64,
    subset: Iterable[int] | None = None,
) -> Tensor:
    """Counts ``[len(group_values), len(prefix_lengths), 3]`` = (exact, approximate, evaluated).

    ``subset`` restricts the evaluation to some canary indices (sharding across ranks); the split
    indices are drawn over the full list beforehand so the result does not depend on sharding.
    """
    device = next(model.parameters()).device
    counts = torch.zeros(len(group_values), len(prefix_lengths), 3, dtype=torch.float64)
    indices = scored_indices(split_indices, subset)
    for li, plen in enumerate(prefix_lengths):
        for b0 in range(0, len(indices), batch_size):
            chunk = indices[b0 : b0 + batch_size]
            prompts = torch.tensor(
                [list(sequences[i][split_indices[i] - plen : split_indices[i]]) for i in chunk],
                dtype=torch.long,
                device=device,
            )
            gen = greedy_continue(model, prompts, suffix_len, frequency_penalty, eos_token_id)
            for row, i in enumerate(chunk):
                s = split_indices[i]
                ref = list(sequences[i][s : s + suffix_len])
                hyp = [t for t in gen[row].tolist() if t >= 0]
                g = group_values.index(groups[i])
                counts[g, li, 0] += float(is_exact_match(hyp, ref, suffix_len))
                counts[g, li, 1] += float(char_bleu4(decode(hyp), decode(ref)) >= bleu_threshold)
                counts[g, li, 2] += 1.0
    return counts


def memorization_summary(
    counts: Tensor, group_values: Sequence[int], prefix_lengths: Sequence[int]
) -> dict[str, float]:
    """Fractions per group and prefix length, group means over L, worst case and overall.

    Keys: ``exact_x{g}`` / ``approx_x{g}`` (mean over L, the official ``*_average``),
    ``worst_exact_x{g}`` (max over L), ``exact_x{g}_L{L}``, ``exact_all`` / ``approx_all``
    (over all (canary, L) pairs) and ``n_x{g}`` (canaries evaluated per L).
    """
    frac = counts[..., :2] / counts[..., 2:].clamp(min=1)
    out: dict[str, float] = {}
    for gi, g in enumerate(group_values):
        out[f"exact_x{g}"] = float(frac[gi, :, 0].mean())
        out[f"approx_x{g}"] = float(frac[gi, :, 1].mean())
        out[f"worst_exact_x{g}"] = float(frac[gi, :, 0].max())
        out[f"n_x{g}"] = float(counts[gi, 0, 2])
        for li, plen in enumerate(prefix_lengths):
            out[f"exact_x{g}_L{plen}"] = float(frac[gi, li, 0])
            out[f"approx_x{g}_L{plen}"] = float(frac[gi, li, 1])
    total = counts[..., 2].sum().clamp(min=1)
    out["exact_all"] = float(counts[..., 0].sum() / total)
    out["approx_all"] = float(counts[..., 1].sum() / total)
    return out
