"""Every project package makes a rank destroy its process group before interpreter finalization.

A gloo group left alive into finalization aborted spawned ranks now and then with SIGABRT
("terminate called without an active exception"); see ``strategies/process_group_exit.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# The probe's handler is registered before the project import, so it runs after the project's
# handler (atexit runs last-in first-out) and sees the state the interpreter finalizes with.
PROBE = """
import atexit, sys
import torch.distributed as dist
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
import {package}
dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
assert dist.is_initialized()
"""


@pytest.mark.parametrize("package", ["strategies", "modules", "datamodules", "callbacks"])
def test_importing_a_project_package_destroys_the_group_at_exit(tmp_path, repo_root, package):
    store = f"file://{tmp_path / 'store'}"
    probe = PROBE.format(package=package)
    out = subprocess.run(
        [sys.executable, "-c", probe, store], cwd=repo_root, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "initialized at exit: False"


def test_without_the_project_the_group_outlives_atexit(tmp_path, repo_root):
    """The probe can tell: plain torch leaves the gloo group alive into finalization."""
    probe = PROBE.replace("import {package}\n", "")
    out = subprocess.run(
        [sys.executable, "-c", probe, f"file://{tmp_path / 'store'}"], cwd=repo_root,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "initialized at exit: True"
