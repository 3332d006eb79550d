"""ExportPretrained: multi-process FSDP is skipped with a warning instead of hanging on rank 0."""

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import FSDPStrategy

from callbacks.export import ExportPretrained


class _Recorder:
    def __init__(self) -> None:
        self.calls: list = []

    def save_pretrained(self, directory, merge_lora=False):
        self.calls.append(directory)
        return directory


def test_multi_process_fsdp_export_is_skipped_with_a_warning():
    module = _Recorder()
    # A real FSDPStrategy object (never set up: that needs CUDA); only its type is read.
    trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), world_size=2)
    with pytest.warns(UserWarning, match="ExportPretrained skipped"):
        ExportPretrained().on_fit_end(trainer, module)
    assert module.calls == []
