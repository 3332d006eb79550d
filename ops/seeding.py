"""Seeds derived from integers, identical in every process.

Per-client and per-task randomness must not depend on which rank (or how many ranks) runs the
client or task, so that 1 and N processes give the same results: derive it from stable
identifiers (seed, step, global index) rather than from the rank or a process-local RNG.
"""

from __future__ import annotations

import hashlib
import os


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def run_seed() -> int:
    """The run's global seed (``seed_everything``, which Lightning exports as
    ``PL_GLOBAL_SEED`` to every process of the run); 0 when the run set none."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))
