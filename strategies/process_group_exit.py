"""Destroy the default process group before the interpreter finalizes, whatever its backend.

Lightning registers this clean-up for NCCL only. A gloo rank that returns with its group still
alive (``ddp_spawn`` workers, CPU ``ddp``) finalizes the interpreter while gloo's C++ threads may
still own tensors with Python references. Freeing one of them then takes the GIL; during
finalization CPython ends such a thread with ``pthread_exit``, and its forced unwind through a
``noexcept`` destructor aborts the process ("terminate called without an active exception",
SIGABRT) after all its work is done. That is the likely cause of the rare abort seen at the exit
of spawned test ranks (CONTRIBUTING.md). Destroying the group from an ``atexit`` handler, while
the interpreter is fully alive, lets those threads release the tensors normally.

The handler is registered when this module is first imported; the project's packages import it
(``strategies``, ``modules``, ``datamodules``, ``callbacks``), so every rank that unpickles or
builds a project object has it, including ``ddp_spawn`` workers.
"""

from __future__ import annotations

import atexit

import torch.distributed as dist


def destroy_default_process_group() -> None:
    """Destroy the default process group if this process still has one (no-op otherwise).

    No barrier: an exiting rank must not wait on a peer that may already be gone. Lightning's
    own NCCL handler may have run first, hence the check.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


atexit.register(destroy_default_process_group)
