"""Teacher-forced answer exact match: the utility metric of the QA experiments (Lightning-free).

With causal-LM logits and labels that are -100 outside the answer, the argmax at every answer
position equals its target exactly when greedy decoding from the prompt reproduces the answer,
so one forward pass scores a whole batch of questions.
"""

from __future__ import annotations

from torch import Tensor

from ops.goldfish import IGNORE_INDEX  # the causal-LM "not a target" label, one definition


def answer_hits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: (whole answer right, first answer token right), as float tensors of shape (B,).

    Args:
        logits: (B, T, V) next-token logits of ``input_ids``.
        labels: (B, T) the input ids on answer positions, ``-100`` elsewhere (unshifted).
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    hits = (logits[:, :-1].argmax(-1) == targets) | ~valid
    # The first answer token is the one a template suffix shared by every question ("The answer
    # is: ") decides alone; its accuracy separates "cannot start the answer" from "does not know".
    first = valid.int().argmax(dim=1)
    return hits.all(dim=1).float(), hits.gather(1, first[:, None]).squeeze(1).float()
