"""``ClientParallelStrategy``: simulate federated clients across processes without a DDP wrapper.

Federated modules (``FederatedLoRAModule``, CoMiGS, CoBo) run *local* optimization of several
clients inside one ``training_step``. Wrapping the module in ``DistributedDataParallel`` would
all-reduce every local backward (wrong and slow), so this strategy keeps DDP's process group,
launcher and device handling but

* does not wrap the module (there is no DDP reducer; the module synchronises explicitly, one
  ``strategy.reduce(buffer, "sum")`` per round);
* broadcasts the global weights from rank 0 at setup, so every rank starts from the same model;
* reports ``num_replicas=1, rank=0`` to the distributed sampler, so every rank iterates the same
  round driver and the ranks never desynchronise.

Each rank simulates its share of the clients (``c % world_size == rank``). Registered as
``strategy: client_parallel`` (``client_parallel_spawn`` uses the spawn launcher).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as torch_dist
from lightning.pytorch.strategies import StrategyRegistry
from typing_extensions import override

from strategies.spawn_results import SpawnSafeDDPStrategy


class ClientParallelStrategy(SpawnSafeDDPStrategy):
    """DDP process group without the DDP wrapper (see the module docstring)."""

    strategy_name = "client_parallel"

    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel: synchronisation is the module's explicit all-reduce.
        assert self.model is not None
        if torch_dist.is_available() and torch_dist.is_initialized() and self.world_size > 1:
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                torch_dist.broadcast(tensor.data, src=0)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": 1, "rank": 0}

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "client_parallel",
            cls,
            description="federated client simulation over DDP processes, no DDP wrapper",
            start_method="popen",
            override=True,
        )
        strategy_registry.register(
            "client_parallel_spawn",
            cls,
            description="client_parallel with the spawn launcher (tests, notebooks)",
            start_method="spawn",
            override=True,
        )


# Registered again on every import (a reloaded module, e.g. IPython's autoreload, must not leave
# the names pointing at the old class, which modules/lora_fl.py's isinstance check would refuse).
ClientParallelStrategy.register_strategies(StrategyRegistry)
