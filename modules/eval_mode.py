"""A context manager that puts a module in eval mode and restores every submodule's own mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` inside, then every submodule's own ``training`` flag back.

    ``module.train(was_training)`` would recurse and flip submodules the user keeps in eval
    (a frozen backbone, BatchNorm, dropout of a pretrained tail) to train mode; Lightning keeps
    each submodule's own mode during fit, so that flip would change training silently.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
