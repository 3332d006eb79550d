"""A failed checkpoint save leaves the previous checkpoint loadable (strategies/atomic_checkpoint_io.py)."""

import errno
import subprocess
from pathlib import Path

import fsspec
import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy

import cli
from strategies.atomic_checkpoint_io import AtomicCheckpointIO, replace_file_atomically


def _full_disk(stream) -> None:
    stream.write(b"half of a new checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"the good checkpoint")
    with pytest.raises(OSError, match="No space left"):
        replace_file_atomically(target, _full_disk)
    assert target.read_bytes() == b"the good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_successful_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")
    replace_file_atomically(target, lambda stream: stream.write(b"new"))
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_checkpoint_round_trips_into_a_new_directory(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "step=3.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(4.0), "global_step": 3}, path)
    loaded = TorchCheckpointIO().load_checkpoint(path)
    assert torch.equal(loaded["w"], torch.arange(4.0)) and loaded["global_step"] == 3


def test_a_remote_path_keeps_lightnings_save():
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, "memory://bucket/last.ckpt")
    with fsspec.open("memory://bucket/last.ckpt", "rb") as stream:
        assert torch.equal(torch.load(stream)["w"], torch.ones(2))


def test_the_cli_adds_it_unless_the_config_names_a_checkpoint_io():
    plugins = cli.with_atomic_checkpoint_io({"plugins": None})["plugins"]
    assert [type(p) for p in plugins] == [AtomicCheckpointIO]
    own = TorchCheckpointIO()
    assert cli.with_atomic_checkpoint_io({"plugins": own})["plugins"] is own
    assert cli.with_atomic_checkpoint_io({"plugins": [own]})["plugins"] == [own]
    # Lightning refuses a CheckpointIO given both on the strategy and in plugins
    strategy = DDPStrategy(checkpoint_io=own)
    assert cli.with_atomic_checkpoint_io({"strategy": strategy, "plugins": None})["plugins"] is None


@pytest.fixture
def six_megabyte_disk(tmp_path):
    """A real 6 MB filesystem (tmpfs) that is not the one of ``$TMPDIR``, where Lightning's
    own save copies its temporary file across filesystems. Needs permission to mount."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_keeps_the_last_checkpoint(six_megabyte_disk: Path):
    # The trainer as `mlo` builds it. With Lightning's TorchCheckpointIO the failed copy
    # truncated last.ckpt to the disk's size ("failed finding central directory" on load).
    trainer = L.Trainer(
        **cli.with_atomic_checkpoint_io({"plugins": None}),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    last = six_megabyte_disk / "last.ckpt"
    trainer.strategy.checkpoint_io.save_checkpoint({"w": torch.ones(500_000)}, last)  # 2 MB
    with pytest.raises(OSError) as failure:
        trainer.strategy.checkpoint_io.save_checkpoint({"w": torch.ones(1_800_000)}, last)  # 7 MB
    assert failure.value.errno == errno.ENOSPC and str(last) in str(failure.value)
    assert torch.equal(torch.load(last)["w"], torch.ones(500_000))
    assert [p.name for p in six_megabyte_disk.iterdir()] == ["last.ckpt"]
