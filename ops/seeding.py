"""Seeds derived from integers, identical in every process.

Per-client and per-task randomness must not depend on which rank (or how many ranks) runs the
client or task, so that 1 and N processes give the same results: derive it from stable
identifiers (seed, step, global index) rather than from the rank or a process-local RNG.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def run_seed() -> int:
    """The run's global seed (``seed_everything``, which Lightning exports as
    ``PL_GLOBAL_SEED`` to every process of the run); 0 when the run set none."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


@contextmanager
def seeded_cpu_init(seed: int | None) -> Iterator[None]:
    """Run the block with the CPU generator seeded with ``seed`` (``None``: untouched), then put
    the generator back, also when the block raises.

    Only the CPU generator is seeded (``torch.manual_seed`` would also queue the seed for every
    GPU, leaving the run's GPU randomness at ``seed`` whatever ``seed_everything`` said): modules
    are built on the CPU.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
