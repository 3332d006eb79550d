"""Token-level perplexity that stays finite and reduces correctly across DDP ranks."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torchmetrics import Metric

from modules.weighted_mean import accumulation_dtype
from ops.goldfish import IGNORE_INDEX


def next_token_nll(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and the number of scored tokens (logits at ``t`` predict ``t + 1``).

    Cross-entropy works in log-space (log-softmax): a target with probability below ~e^-103 stays
    a finite NLL, where softmax-then-log (``torchmetrics.text.Perplexity``) underflows to inf.
    """
    # At least fp32 (bf16 logits are upcast), float64 kept under 64-true.
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return nll, (targets != ignore_index).sum()


class TokenPerplexity(Metric):
    """``exp(sum NLL / sum tokens)`` over all batches and, under DDP, all ranks.

    Both sums are reduced across ranks before the division, so ranks with different token counts
    weigh by their tokens (a mean of per-rank perplexities would not).
    """

    full_state_update = False

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.add_state("nll_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        nll, tokens = next_token_nll(logits, labels, self.ignore_index)
        # Lightning casts the state to the half type under *-true half precision; re-widen it
        # (only this state: set_dtype would turn the integer token count into a float too)
        dtype = accumulation_dtype(torch.promote_types(self.nll_sum.dtype, nll.dtype))
        self.nll_sum = self.nll_sum.to(dtype) + nll.to(dtype)
        self.tokens += tokens.to(self.tokens)

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.tokens)
