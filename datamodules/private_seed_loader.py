"""A DataLoader whose iterators leave the global random stream alone.

Every new DataLoader iterator draws a worker base seed, from the loader's ``generator`` if it
has one, else from the global torch RNG. That global draw shifted the training stream (dropout
masks): at every validation inside ``fit``, at every epoch start, and, after a resume at an
epoch boundary, differently from the uninterrupted run. Holding a ``torch.Generator`` in the
loader avoids it but makes the loader unpicklable through ``torch.multiprocessing`` (a
``ddp_spawn`` run that pickles a datamodule holding such a loader failed to start its workers),
so the generator is made only while an iterator is created, from a seed and a count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from ops.seeding import derive_seed


class PrivateSeedDataLoader(DataLoader):
    """``DataLoader`` drawing each iterator's worker base seed from ``(seed, iterators so
    far)`` instead of the global RNG (a sampler that draws from the global RNG still does).

    Args:
        seed: seed of the worker base seeds (workers of the n-th iterator get
            ``derive_seed(seed, n)``-based seeds).
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.private_seed, self.iterators_made = seed, 0

    def _get_iterator(self) -> Any:
        if self.generator is not None:  # the caller chose a generator: use it
            return super()._get_iterator()
        # ``object.__setattr__``: Lightning records every attribute set on a DataLoader while
        # its dataloader hooks run, to replay them on re-instantiation, and a hook that raised
        # leaves that recorder installed for the rest of the process (its context manager
        # restores only on success). The record would keep the Generator alive in the loader,
        # which then cannot reach ``ddp_spawn`` workers, and grow with every iterator.
        # DataLoader's own ``__setattr__`` guards other attributes, not these.
        generator = torch.Generator().manual_seed(
            derive_seed(self.private_seed, self.iterators_made)
        )
        object.__setattr__(self, "iterators_made", self.iterators_made + 1)
        object.__setattr__(self, "generator", generator)
        try:
            return super()._get_iterator()
        finally:
            object.__setattr__(self, "generator", None)
