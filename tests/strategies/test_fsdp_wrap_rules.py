"""HFFSDPStrategy's CPU-testable rules: block classes found below a wrapper, which leaves get
their own unit, full state dicts on one CPU process, frozen parameters kept out of unsharded
FSDP, and activation checkpointing only when asked for."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from modules.hf_models import build_causal_lm
from strategies.fsdp import HFFSDPStrategy, _should_wrap, transformer_block_classes


def _strategy(processes: int, **kwargs) -> HFFSDPStrategy:
    environment = LightningEnvironment()
    environment.set_world_size(processes)
    return HFFSDPStrategy(
        parallel_devices=[torch.device("cpu")] * processes, cluster_environment=environment,
        **kwargs,
    )  # fmt: skip


def test_block_classes_are_found_below_a_plain_wrapper():
    # the strategy sees the LightningModule, which holds the Hugging Face model
    wrapper = nn.ModuleDict({"lm": build_causal_lm("micro-llama", vocab_size=64)})
    assert transformer_block_classes(wrapper) == {LlamaDecoderLayer}


def test_only_trainable_leaves_get_their_own_unit():
    blocks = (LlamaDecoderLayer,)
    assert _should_wrap(nn.Linear(2, 2), blocks=blocks, lora=True)
    assert not _should_wrap(nn.Linear(2, 2).requires_grad_(False), blocks=blocks, lora=True)
    parent = nn.Module()
    parent.weight = nn.Parameter(torch.zeros(2))
    parent.child = nn.Linear(2, 2)
    assert not _should_wrap(parent, blocks=blocks, lora=True)  # not a leaf


def test_full_state_dicts_are_allowed_on_one_cpu_process(monkeypatch):
    strategy = _strategy(1, state_dict_type="full")
    monkeypatch.setattr(strategy, "_wrap_on_cpu", lambda model: model)
    model = build_causal_lm("micro-llama", vocab_size=64)
    assert strategy._setup_model(model) is model


@pytest.mark.parametrize(
    ("processes", "sharding", "kept_out"),
    [(1, "FULL_SHARD", True), (2, "NO_SHARD", True), (2, "FULL_SHARD", False)],
)
def test_frozen_parameters_stay_out_of_unsharded_fsdp(monkeypatch, processes, sharding, kept_out):
    strategy = _strategy(processes, sharding_strategy=sharding, auto_wrap_policy={nn.Linear})
    monkeypatch.setattr(strategy, "_wrap_on_cpu", lambda model: model)
    model = nn.Sequential(nn.Linear(2, 2).requires_grad_(False), nn.Linear(2, 2))
    strategy._setup_model(model)
    frozen = [model[0].weight, model[0].bias]
    if kept_out:
        assert strategy.kwargs["ignored_states"] == frozen
    else:
        assert "ignored_states" not in strategy.kwargs


def test_ignored_states_the_config_names_are_kept(monkeypatch):
    model = nn.Sequential(nn.Linear(2, 2).requires_grad_(False), nn.Linear(2, 2))
    strategy = _strategy(1, ignored_states=[model[1].weight], auto_wrap_policy={nn.Linear})
    monkeypatch.setattr(strategy, "_wrap_on_cpu", lambda model: model)
    strategy._setup_model(model)
    assert strategy.kwargs["ignored_states"] == [model[1].weight]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_checkpointing_wraps_the_blocks_only_when_asked(monkeypatch, checkpointing):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        strategy = _strategy(1, activation_checkpointing=checkpointing)
        wrapped = strategy._setup_model(build_causal_lm("micro-llama", vocab_size=64))
        n_wrappers = sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules())
        assert n_wrappers == (2 if checkpointing else 0)  # micro-llama has two decoder layers
    finally:
        dist.destroy_process_group()
