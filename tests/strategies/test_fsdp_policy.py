import pytest
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from modules.causal_lm import LoraSettings, apply_lora
from modules.hf_models import build_causal_lm
from strategies.fsdp import (
    HFFSDPStrategy,
    _should_wrap,
    hf_auto_wrap_policy,
    transformer_block_classes,
)


def _wrapped(model):
    policy = hf_auto_wrap_policy(model)
    return [
        name
        for name, m in model.named_modules()
        if policy(module=m, recurse=False, nonwrapped_numel=0)
    ]


def test_full_finetuning_wraps_decoder_layers_only():
    model = build_causal_lm("micro-llama", vocab_size=64)
    assert transformer_block_classes(model) == {LlamaDecoderLayer}
    wrapped = _wrapped(model)
    assert wrapped == ["model.layers.0", "model.layers.1"]


def test_lora_adapters_get_their_own_units():
    model = apply_lora(
        build_causal_lm("micro-llama", vocab_size=64), LoraSettings(r=2, target_modules=["q_proj"])
    )
    wrapped = _wrapped(model)
    assert sum(name.endswith("layers.0") for name in wrapped) == 1
    lora_units = [n for n in wrapped if "lora_" in n]
    assert lora_units and all(n.endswith(("lora_A.default", "lora_B.default")) for n in lora_units)
    assert len(lora_units) == 4  # A and B of q_proj in two layers


def test_gpt2_blocks_and_non_hf_models():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    assert transformer_block_classes(build_causal_lm("tiny-gpt2", vocab_size=64)) == {GPT2Block}
    with pytest.raises(ValueError, match="no transformer block classes"):
        transformer_block_classes(nn.Linear(2, 2))
    assert not _should_wrap(nn.Linear(2, 2), blocks=(LlamaDecoderLayer,), lora=False)


def test_strategy_is_registered_and_configurable():
    from lightning.pytorch.strategies import StrategyRegistry

    assert "fsdp_hf" in StrategyRegistry
    strategy = HFFSDPStrategy(activation_checkpointing=True, state_dict_type="full")
    assert strategy.activation_checkpointing and strategy._state_dict_type == "full"


def test_hybrid_shard_builds_before_the_model_is_known():
    from strategies.fsdp import DeferredHFWrapPolicy

    # Lightning demands a policy at construction for HYBRID_SHARD; the CLI passes None.
    strategy = HFFSDPStrategy(sharding_strategy="HYBRID_SHARD", auto_wrap_policy=None)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, DeferredHFWrapPolicy)
    with pytest.raises(RuntimeError, match="before bind"):
        policy(module=nn.Linear(2, 2), recurse=False, nonwrapped_numel=0)
    model = build_causal_lm("micro-llama", vocab_size=64)
    policy.bind(model)
    wrapped = [n for n, m in model.named_modules() if policy(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == _wrapped(model) == ["model.layers.0", "model.layers.1"]


def test_generation_and_shard_math_are_refused_only_on_several_fsdp_processes():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from strategies.fsdp import refuse_under_sharded_fsdp

    fsdp = FSDPStrategy.__new__(FSDPStrategy)  # only its type is read
    with pytest.raises(RuntimeError, match="mlo predict does not run under multi-process FSDP"):
        refuse_under_sharded_fsdp(SimpleNamespace(strategy=fsdp, world_size=2), "mlo predict", "x")
    refuse_under_sharded_fsdp(SimpleNamespace(strategy=fsdp, world_size=1), "mlo predict", "x")
    ddp = DDPStrategy.__new__(DDPStrategy)
    refuse_under_sharded_fsdp(SimpleNamespace(strategy=ddp, world_size=2), "mlo predict", "x")


def test_full_state_dicts_are_refused_on_cpu_processes():
    import torch

    # gathering them segfaults CPU processes (torch's offload of CPU shards to the CPU)
    from lightning.fabric.plugins.environments import LightningEnvironment

    two_processes = LightningEnvironment()
    two_processes.set_world_size(2)
    strategy = HFFSDPStrategy(
        state_dict_type="full",
        parallel_devices=[torch.device("cpu")] * 2,
        cluster_environment=two_processes,
    )
    with pytest.raises(ValueError, match=r"state_dict_type='full'.* on CPU processes"):
        strategy._setup_model(build_causal_lm("micro-llama", vocab_size=64))
