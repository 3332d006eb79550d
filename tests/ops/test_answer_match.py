"""ops.answer_match: teacher-forced exact match of answers and of their first token."""

from __future__ import annotations

import torch

from ops.answer_match import answer_hits


def _logits_predicting(next_ids: torch.Tensor, vocab: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(next_ids, vocab).float()


def test_whole_answer_and_first_token_are_scored_on_answer_positions_only():
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    labels = torch.tensor([[-100, -100, 3, 4, 5]] * 3)
    # Row 0 right everywhere; row 1 wrong on the 2nd answer token; row 2 wrong on the first one
    # and on a prompt position, which must not count.
    pred = torch.roll(ids, -1, dims=1).clone()
    pred[1, 2] = 0  # position 2 predicts target 3 (label index 3) -> 2nd answer token
    pred[2, 1] = 0  # predicts the first answer token
    pred[2, 0] = 9  # a prompt position
    correct, first = answer_hits(_logits_predicting(pred), labels)
    assert correct.tolist() == [1.0, 0.0, 0.0]
    assert first.tolist() == [1.0, 1.0, 0.0]


def test_padding_after_the_answer_is_ignored():
    labels = torch.tensor([[-100, 7, -100, -100]])
    pred = torch.tensor([[7, 0, 0, 0]])  # only position 0 (predicting label index 1) matters
    correct, first = answer_hits(_logits_predicting(pred), labels)
    assert correct.item() == 1.0 and first.item() == 1.0
