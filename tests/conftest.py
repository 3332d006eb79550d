"""Test-wide settings: offline Hugging Face, few threads, shared tiny assets."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return REPO_ROOT / "data" / "tokenizer"


@pytest.fixture(scope="session")
def corpus_file() -> Path:
    return REPO_ROOT / "data" / "corpus" / "python_docs.jsonl"


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: several threads oversubscribe a shared 2-core
    machine (measured 30x slower full-batch steps). Use ``pytest.mark.usefixtures``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _same_global_rng_state_for_every_test():
    """Seed the global RNGs before each test: a test that draws its data from them would
    otherwise see data that depend on which tests ran before it in the process (a file run
    alone vs the whole suite), so its tolerances would be checked on a different draw."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def fake_scontrol(tmp_path) -> tuple[Path, Path]:
    """``(bin directory, log)``: an ``scontrol`` for PATH that appends its arguments to the log
    (the SLURM requeue tests; the machine has no SLURM)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    scontrol.chmod(0o755)
    return bin_dir, log


@pytest.fixture
def slurm_env(monkeypatch) -> None:
    """The environment of one SLURM task of job 4242 (no array job), as Lightning reads it."""
    for key, value in {
        "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "mlo-test", "SLURM_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function returning a TCP port free right now (``MASTER_PORT`` of a multi-process run
    started by a test: several tests' runs must not share one)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
