"""ClientParallelStrategy's registry entries and its sampler arguments on several processes."""

from __future__ import annotations

import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import StrategyRegistry

from strategies.client_parallel import ClientParallelStrategy


def test_both_names_are_registered_with_their_launchers():
    assert StrategyRegistry["client_parallel"]["init_params"]["start_method"] == "popen"
    spawn = StrategyRegistry["client_parallel_spawn"]
    assert spawn["strategy"] is ClientParallelStrategy
    assert spawn["init_params"]["start_method"] == "spawn"


def test_every_rank_reads_the_whole_dataset():
    environment = LightningEnvironment()
    environment.set_world_size(4)
    environment.set_global_rank(3)
    strategy = ClientParallelStrategy(
        parallel_devices=[torch.device("cpu")] * 4, cluster_environment=environment
    )
    assert strategy.world_size == 4 and strategy.global_rank == 3
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}
