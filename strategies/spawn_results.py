"""``ddp_spawn`` / ``ddp_fork`` / ``ddp_notebook`` that cannot hang at the end of a run, nor at
its start when the module or data holds a ``torch.Generator`` (see ``ResultsThroughFileLauncher``).

Lightning's multiprocessing launcher (2.6) waits for every worker to exit before it reads rank
0's results from a pipe. Rank 0 writes ``trainer.callback_metrics`` into that pipe, and the write
blocks once it exceeds the pipe's buffer (64 KiB on Linux): rank 0 never exits, the parent never
reads, the run hangs after its work is done. Around 200 scalars reach that size; the warmup
diagnostics log several per weight tensor (233 for ``tiny-llama``, thousands for SmolLM2).

``ResultsThroughFileLauncher`` sends those metrics through a temporary file instead, as Lightning
already does for the weights, and the pipe carries only the file's path. The strategy names
above are registered again here with a ``DDPStrategy`` subclass that uses it (registration on
import, ``cli.py`` imports ``strategies``); ``popen`` DDP never used this launcher.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from typing_extensions import override

#: The key of the metrics file's path in the launcher's extra results.
METRICS_FILE_KEY = "callback_metrics_file"


class ResultsThroughFileLauncher(_MultiProcessingLauncher):
    """Lightning's multiprocessing launcher; rank 0's ``callback_metrics`` travel in a file, and
    a spawned worker receives the tensors of the trainer, module and data through named
    shared-memory files (``file_system`` sharing) rather than file descriptors.

    With descriptors, any tensor made *while pickling* the worker's arguments breaks the
    launch: a ``torch.Generator`` held by a module or data module pickles its state as a new
    tensor, which is moved to shared memory, its descriptor number recorded for the worker, and
    freed when the pickle is done, before the worker starts. The launcher's next pipe then gets
    that number, the worker dies unpickling a "storage" that is a pipe (``unable to resize file
    ... Invalid argument``) and the parent blocks for good writing the rest of the pickle into
    the dead worker's pipe (pytorch#146828; ``tests/strategies/test_spawn_results.py``). Named
    files are reference-counted until the worker has opened them.
    """

    @override
    def launch(self, function: Any, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any):
        if self._start_method != "spawn":
            return super().launch(function, *args, trainer=trainer, **kwargs)
        previous = torch.multiprocessing.get_sharing_strategy()
        torch.multiprocessing.set_sharing_strategy("file_system")
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        finally:
            torch.multiprocessing.set_sharing_strategy(previous)

    @override
    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        fd, path = tempfile.mkstemp(prefix="mlo-callback-metrics-", suffix=".pt")
        with os.fdopen(fd, "wb") as file:
            file.write(extra.pop("callback_metrics_bytes"))
        return {**extra, METRICS_FILE_KEY: path}

    @override
    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        extra = dict(extra)
        path = extra.pop(METRICS_FILE_KEY)
        try:
            with open(path, "rb") as file:
                extra["callback_metrics_bytes"] = file.read()
        finally:
            os.remove(path)
        super().update_main_process_results(trainer, extra)


class SpawnSafeDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose spawn/fork launcher is ``ResultsThroughFileLauncher``."""

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _MultiProcessingLauncher:
            self._launcher = ResultsThroughFileLauncher(self, start_method=self._start_method)


def register_spawn_safe_names() -> None:
    """Point Lightning's spawn/fork DDP names at ``SpawnSafeDDPStrategy`` (same arguments)."""
    for name in list(StrategyRegistry):
        entry = StrategyRegistry[name]
        start_method = entry["init_params"].get("start_method")
        if entry["strategy"] is DDPStrategy and start_method in ("spawn", "fork", "forkserver"):
            StrategyRegistry.register(
                name,
                SpawnSafeDDPStrategy,
                description=f"{entry['description']} (results through a file: no hang at the end)",
                override=True,
                **entry["init_params"],
            )


register_spawn_safe_names()
