"""The official metric's text round trip (``code_faithful_retokenize``, spec 4.4)."""

from __future__ import annotations

import pytest
import torch

from datamodules.federated import CharVocab, _HFVocab
from ops.memorization import (
    char_bleu4,
    is_exact_match,
    memorization_counts,
    sample_split_indices,
)
from ops.memorization_faithful import (
    TextCodec,
    cut_at_stop_strings,
    memorization_counts_code_faithful,
    memorization_summary_code_faithful,
    round_trip_scores,
)
from tests.ops.test_memorization import _Copier


def _codec(vocab) -> TextCodec:
    return TextCodec(vocab.encode, vocab.encode_prompt, vocab.decode)


def test_ids_that_spell_the_answer_match_after_the_round_trip(tokenizer_dir):
    """The official script compares re-tokenized text: a generation that spells the answer
    with other tokens (one per character) is exact there, and not on token ids."""
    vocab = _HFVocab(str(tokenizer_dir))
    answer = " the record lists the phone number and the address"
    reference = vocab.encode(answer)
    spelled = [i for ch in answer for i in vocab.encode(ch)]
    assert vocab.decode(spelled) == answer and len(spelled) > len(reference)
    suffix_len = 6
    assert not is_exact_match(spelled, reference, suffix_len)  # the project's default metric
    matching, bleu = round_trip_scores(vocab.decode(spelled), answer, suffix_len, _codec(vocab))
    assert matching == suffix_len and bleu == 1.0


def test_bleu_is_rounded_before_the_threshold():
    reference = "Patient Ada Meier, MRN 12345678, phone +41 21 555 10 20"
    generation = "PatientaAda Meier, M7N 12345278, phonec+41 21 555 19620"
    assert 0.745 <= char_bleu4(generation, reference) < 0.75  # below the default's threshold
    vocab = CharVocab()
    _, bleu = round_trip_scores(generation, reference, len(reference), _codec(vocab))
    assert bleu == 0.75


def test_stop_strings_cut_the_generation():
    assert cut_at_stop_strings("MRN 1234### next record") == "MRN 1234"
    assert cut_at_stop_strings("no stop here") == "no stop here"


def test_a_lossless_vocabulary_gives_the_default_exact_counts():
    """Character ids decode and re-encode to themselves (no BOS): the round trip changes
    nothing about exact memorization, for a model that memorized one canary."""
    vocab = CharVocab()
    g = torch.Generator().manual_seed(0)
    memorized = torch.randint(2, len(vocab), (60,), generator=g).tolist()
    other = torch.randint(2, len(vocab), (60,), generator=g).tolist()
    seqs, groups, group_values, lengths = [memorized, other], [10, 1], [1, 10], [4, 8]
    splits = sample_split_indices([60, 60], max_prefix=8, suffix_len=6)
    model = _Copier(memorized, vocab=len(vocab))
    default = memorization_counts(model, seqs, splits, groups, group_values, lengths, 6,
                                  decode=vocab.decode)  # fmt: skip
    faithful = memorization_counts_code_faithful(model, seqs, splits, groups, group_values,
                                                 lengths, 6, _codec(vocab))  # fmt: skip
    assert torch.equal(faithful[..., [0, 2]], default[..., [0, 2]])
    assert faithful[1, :, 0].tolist() == [1.0, 1.0] and faithful[0, :, 0].tolist() == [0.0, 0.0]


def test_the_summary_aggregates_as_the_official_script():
    # (group, L, [exact, approx >=, evaluated, approx >]); groups x1, x10; L = 16, 32
    counts = torch.zeros(2, 2, 4, dtype=torch.float64)
    counts[0, 0] = torch.tensor([1.0, 2.0, 4.0, 1.0])
    counts[0, 1] = torch.tensor([2.0, 2.0, 4.0, 2.0])
    counts[1, 0] = torch.tensor([4.0, 4.0, 4.0, 4.0])
    counts[1, 1] = torch.tensor([3.0, 4.0, 4.0, 3.0])
    summary = memorization_summary_code_faithful(counts, [1, 10], [16, 32])
    assert summary["exact_x10"] == 0.875 and summary["approx_x1"] == 0.5
    assert summary["worst_exact_x1"] == 0.5 and "worst_exact_x10" not in summary
    assert summary["approx_all"] == pytest.approx(10 / 16)  # strict > in the overall fraction
    assert summary["worst_approx_all"] == 1.0


def test_generation_stops_at_the_pad_token():
    """vLLM's stop list in the official script holds the pad token: a generation reaching it
    ends there (decoding alone would just drop it and read on)."""
    vocab = CharVocab()
    g = torch.Generator().manual_seed(0)
    memorized = torch.randint(2, len(vocab), (60,), generator=g).tolist()
    splits = sample_split_indices([60], max_prefix=8, suffix_len=6)
    memorized[splits[0] + 3] = vocab.pad_token_id  # inside the suffix
    model = _Copier(memorized, vocab=len(vocab))
    args = (model, [memorized], splits, [10], [10], [8], 6, _codec(vocab))
    assert memorization_counts_code_faithful(*args)[0, 0, 0] == 1.0  # pad decoded away
    stopped = memorization_counts_code_faithful(*args, pad_token_id=vocab.pad_token_id)
    assert stopped[0, 0, 0] == 0.0
