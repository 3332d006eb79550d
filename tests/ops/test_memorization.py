"""Memorization metric on hand-made cases (spec section 7, Metric / Frequency penalty / Split)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ops.memorization import (
    char_bleu4,
    greedy_continue,
    is_exact_match,
    longest_common_prefix,
    memorization_counts,
    memorization_summary,
    sample_split_indices,
)


def test_lcp_and_exact_match_with_truncation():
    assert longest_common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert not is_exact_match([1, 2, 3, 4], [1, 2, 9, 4], 4)
    assert is_exact_match([1, 2, 3, 4], [1, 2, 3, 4], 4)
    assert is_exact_match([1, 2, 7, 7], [1, 2, 9, 9], 2)  # only the first S tokens count


def test_char_bleu4_cases():
    assert char_bleu4("MRN 12345678", "MRN 12345678") == pytest.approx(1.0)
    assert char_bleu4("abcdef", "uvwxyz") == 0.0
    # Brevity penalty by hand: hyp "abcde" (c=5) is a prefix of ref "abcdefghij" (r=10):
    # every n-gram matches, so BLEU = exp(1 - 10/5) = e^-1.
    assert char_bleu4("abcde", "abcdefghij") == pytest.approx(torch.e**-1)
    assert char_bleu4("", "abc") == 0.0


def test_char_bleu4_matches_nltk():
    bleu = pytest.importorskip("nltk.translate.bleu_score")
    pairs = [
        ("patient Ada Meier, MRN 12345678", "patient Ada Meier, MRN 12845679"),
        ("phone +41 21 555 10 20", "phone +41 21 555 10 20, seen"),
        ("born 1970-02-03 in Bern", "born 1971-02-03 in Bern"),
    ]
    for hyp, ref in pairs:
        assert char_bleu4(hyp, ref) == pytest.approx(bleu.sentence_bleu([ref], hyp), abs=1e-12)


class _FixedLogits(nn.Module):
    """Toy LM: the same logits at every position; token 3 leads token 5 by 0.5."""

    def __init__(self, vocab: int = 8) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.logits[3], self.logits[5] = 1.0, 0.5

    def forward(self, input_ids, cache=None, use_cache=True):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(b, t, -1), cache=None)


def test_frequency_penalty_switches_after_one_step():
    model, prompt = _FixedLogits(), torch.tensor([[1, 2, 3]])
    assert greedy_continue(model, prompt, 4, 0.0).tolist() == [[3, 3, 3, 3]]
    # phi=1: after one 3 its logit is 0.0 < 0.5, so 5 wins; then both are penalised ...
    assert greedy_continue(model, prompt, 2, 1.0).tolist() == [[3, 5]]


def test_eos_stops_generation():
    model = _FixedLogits()
    assert greedy_continue(model, torch.tensor([[1]]), 3, 0.0, eos_token_id=3).tolist() == [
        [3, -1, -1]
    ]


def test_split_indices_deterministic_in_range_and_short_skipped():
    lengths = [100, 60, 90, 200, 30]
    a = sample_split_indices(lengths, max_prefix=48, suffix_len=24, seed=42)
    assert a == sample_split_indices(lengths, 48, 24, 42)
    assert a[1] is None and a[4] is None  # N <= 48 + 24
    for n, s in zip(lengths, a, strict=True):
        if s is not None:
            assert 48 <= s < n - 24


class _Copier(nn.Module):
    """Memorized one sequence: predicts next = memory[current position in memory]."""

    def __init__(self, memory: list[int], vocab: int = 30) -> None:
        super().__init__()
        self.memory, self.vocab = memory, vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache=None, use_cache=True):
        hist = input_ids if cache is None else torch.cat([cache, input_ids], 1)
        logits = torch.zeros(hist.shape[0], hist.shape[1], self.vocab)
        for b in range(hist.shape[0]):
            seq = hist[b].tolist()
            for i in range(len(self.memory) - len(seq)):
                if self.memory[i : i + len(seq)] == seq:
                    logits[b, -1, self.memory[i + len(seq)]] = 1.0
                    break
        return SimpleNamespace(logits=logits, cache=hist)


def test_memorization_counts_on_a_copier():
    g = torch.Generator().manual_seed(0)
    memorized = torch.randint(1, 30, (40,), generator=g).tolist()
    other = torch.randint(1, 30, (40,), generator=g).tolist()
    seqs, groups = [memorized, other], [10, 1]
    splits = sample_split_indices([40, 40], max_prefix=8, suffix_len=6)
    counts = memorization_counts(
        _Copier(memorized), seqs, splits, groups, [1, 10], [4, 8], 6, decode=lambda ids: str(ids)
    )
    summary = memorization_summary(counts, [1, 10], [4, 8])
    assert summary["exact_x10"] == 1.0 and summary["approx_x10"] == 1.0
    assert summary["exact_x1"] == 0.0
    assert summary["exact_all"] == 0.5 and summary["n_x1"] == 1.0


def test_exact_match_needs_all_s_suffix_tokens():
    assert not is_exact_match([1, 2, 3, 5], [1, 2, 3, 4], 4)  # LCP 3 < S = 4
    ref = list(range(50))
    assert not is_exact_match([*ref[:-1], 999], ref, 50)  # only the last of 50 differs


def test_split_skips_a_canary_of_exactly_max_prefix_plus_suffix_tokens():
    # Spec 3.2: skip iff N <= max(L) + S; s ~ UniformInt[max(L), N - S) has one value at N = 73.
    assert sample_split_indices([72], max_prefix=48, suffix_len=24) == [None]
    assert sample_split_indices([73], max_prefix=48, suffix_len=24) == [48]


def test_worst_case_is_the_max_over_prefix_lengths():
    counts = torch.zeros(1, 2, 3, dtype=torch.float64)  # (group, L, [exact, approx, total])
    counts[0, 0] = torch.tensor([0.0, 0.0, 4.0])  # L = 16: 0 of 4 exact
    counts[0, 1] = torch.tensor([4.0, 4.0, 4.0])  # L = 32: 4 of 4 exact
    summary = memorization_summary(counts, [10], [16, 32])
    assert summary["exact_x10"] == 0.5 and summary["worst_exact_x10"] == 1.0


def test_split_upper_bound_is_exclusive():
    # Spec 3.2: s ~ UniformInt[max(L), N - S), N - S excluded. N = 10, max(L) = 4, S = 5 gives
    # [4, 5) = {4}: the split is 4 for every seed (an inclusive bound would also draw 5, the
    # chance of 50 draws all missing it being 2^-50).
    assert {
        sample_split_indices([10], max_prefix=4, suffix_len=5, seed=s)[0] for s in range(50)
    } == {4}


def test_bleu_exactly_at_the_threshold_counts_as_approximately_memorized():
    # Spec: approximate memorization is BLEU >= threshold. A perfect copy has every n-gram
    # precision 1 and BP = exp(0) = 1, so BLEU = exp(0) = 1.0 exactly: with threshold 1.0 it
    # must count (exact, approximate, evaluated) = (1, 1, 1).
    memory = list(range(1, 21))  # distinct tokens: the copier's continuation is unambiguous
    assert char_bleu4(str(memory[10:16]), str(memory[10:16])) == 1.0
    counts = memorization_counts(
        _Copier(memory), [memory], [10], [1], [1], [4], 6, decode=str, bleu_threshold=1.0
    )
    assert counts[0, 0].tolist() == [1.0, 1.0, 1.0]
