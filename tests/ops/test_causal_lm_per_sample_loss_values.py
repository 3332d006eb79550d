"""``causal_lm_per_sample_loss`` against a hand-written next-token cross entropy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ops.per_sample_grads import causal_lm_per_sample_loss


class _TableLM(nn.Module):
    """Logits at position t depend only on the token at t (a lookup table), and the call's
    ``attention_mask`` is recorded."""

    def __init__(self, vocab: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=gen, dtype=torch.float64))
        self.seen_masks: list[object] = []

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> SimpleNamespace:
        self.seen_masks.append(attention_mask)
        return SimpleNamespace(logits=self.table[input_ids])


def _nll(lm: _TableLM, prev: int, nxt: int) -> float:
    """-log p(nxt | prev) from the table, by hand."""
    row = lm.table[prev].detach().tolist()
    return -(row[nxt] - math.log(sum(math.exp(v) for v in row)))


def _approx(value: float):
    # the loss is computed in float32 (``logits.float()``)
    return pytest.approx(value, rel=1e-6)


def test_loss_is_the_mean_of_next_token_nll_over_targets():
    """Position t's logits predict token t+1 (the shift), averaged over the real targets."""
    lm = _TableLM()
    ids = torch.tensor([[1, 4, 2, 0]])
    expected = (_nll(lm, 1, 4) + _nll(lm, 4, 2) + _nll(lm, 2, 0)) / 3
    loss = causal_lm_per_sample_loss(lm, {"input_ids": ids}).detach()
    assert loss.shape == (1,)
    assert float(loss[0]) == _approx(expected)


def test_explicit_labels_are_the_targets():
    """Given ``labels``, they (shifted by one) are the targets, not ``input_ids``; -100 skips."""
    lm = _TableLM()
    ids = torch.tensor([[1, 4, 2, 0]])
    labels = torch.tensor([[-100, 3, -100, 1]])  # targets of positions 0 and 2
    expected = (_nll(lm, 1, 3) + _nll(lm, 2, 1)) / 2
    loss = causal_lm_per_sample_loss(lm, {"input_ids": ids, "labels": labels}).detach()
    assert float(loss[0]) == _approx(expected)


def test_sequence_without_targets_has_zero_loss_not_nan():
    """All labels ignored (e.g. a prompt-only example): loss 0 rather than 0/0 = nan."""
    lm = _TableLM()
    ids = torch.tensor([[1, 4, 2], [2, 3, 1]])
    labels = torch.tensor([[-100, -100, -100], [-100, 3, 1]])
    loss = causal_lm_per_sample_loss(lm, {"input_ids": ids, "labels": labels}).detach()
    assert float(loss[0]) == 0.0
    assert float(loss[1]) == _approx((_nll(lm, 2, 3) + _nll(lm, 3, 1)) / 2)


def test_attention_mask_reaches_the_model():
    """The padding mask must be passed to the model, which needs it to ignore the pads."""
    lm = _TableLM()
    mask = torch.tensor([[1, 1, 1, 0]])
    causal_lm_per_sample_loss(
        lm, {"input_ids": torch.tensor([[1, 4, 2, 0]]), "attention_mask": mask}
    )
    assert len(lm.seen_masks) == 1 and torch.equal(lm.seen_masks[0], mask)
    causal_lm_per_sample_loss(lm, {"input_ids": torch.tensor([[1, 4, 2, 0]])})
    assert lm.seen_masks[1] is None
