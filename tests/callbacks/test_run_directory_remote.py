"""reserve_next_version leaves a logger on a remote file system (``scheme://``) alone: the
directory is not a local path."""

from __future__ import annotations

from lightning.pytorch.loggers import CSVLogger

from callbacks.run_config import reserve_next_version


def test_a_remote_log_directory_is_left_to_the_logger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = CSVLogger("memory://bucket", name="run")
    reserve_next_version(logger)
    assert logger._version is None  # still Lightning's to resolve
    assert list(tmp_path.iterdir()) == []  # no local "memory:" directory
