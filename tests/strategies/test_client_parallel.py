"""ClientParallelStrategy: 2 CPU processes give the 1-process federated result (spec section 7)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

from datamodules.federated import CharVocab, FederatedTextDataModule
from modules.lora_fl import FederatedLoRAModule
from modules.lora_fl_settings import (
    LoraFLSettings,
    MemorizationSettings,
    NoiseSettings,
    SecureAggregationSettings,
)
from strategies.client_parallel import ClientParallelStrategy
from tests.federated_testkit import TINY


class PerturbNonZeroRanks(L.Callback):
    """Add noise to every weight on the ranks other than 0, before the strategy's setup.

    ``Callback.setup`` runs before ``strategy.setup`` -> ``configure_ddp``, so only the rank-0
    broadcast there can bring the ranks back to the same model (spawn pickles identical modules
    to every rank, which would hide a missing broadcast). Leaves a marker file per perturbed rank.
    """

    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = marker_dir

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        rank = trainer.global_rank
        if rank == 0:
            return
        gen = torch.Generator().manual_seed(1000 + rank)
        with torch.no_grad():
            for t in [*pl_module.parameters(), *pl_module.buffers()]:
                if t.is_floating_point():
                    t.add_(0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
        (Path(self.marker_dir) / f"perturbed_rank{rank}").touch()


def _run(
    devices: int, secure: bool, marker_dir: Path, noise: NoiseSettings | None = None
) -> tuple[torch.Tensor, dict]:
    L.seed_everything(0)
    module = FederatedLoRAModule(
        model=TINY, vocab_size=len(CharVocab()), local_steps=2, local_warmup_steps=0,
        lora=LoraFLSettings(rank=4, alpha=2.0, dropout=0.05),
        server_optimizer=partial(torch.optim.Adam, lr=1e-2, betas=(0.9, 0.99), eps=1e-3),
        secure_aggregation=SecureAggregationSettings(enabled=secure), noise=noise,
        memorization=MemorizationSettings(prefix_lengths=[16], suffix_len=16, frequency_penalty=0),
    )  # fmt: skip
    dm = FederatedTextDataModule(
        client_sizes=[16, 20, 24, 28], num_entities=20, val_questions_per_client=2,
        num_canaries=8, batch_size=8,
    )  # fmt: skip
    strategy = ClientParallelStrategy(start_method="spawn") if devices > 1 else "auto"
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[PerturbNonZeroRanks(str(marker_dir))],
    )  # fmt: skip
    trainer.fit(module, dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return module.flat_server_state(), metrics


def test_registered_by_name():
    assert "client_parallel" in StrategyRegistry
    assert StrategyRegistry["client_parallel"]["strategy"] is ClientParallelStrategy
    assert ClientParallelStrategy().distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}


WEIGHT_NOISE = NoiseSettings(mode="weight_noise", sigma=0.05)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("secure", "noise"),
    [(False, None), pytest.param(True, None, marks=pytest.mark.slow), (False, WEIGHT_NOISE)],
    ids=["plain", "secagg", "weight_noise"],
)
def test_two_processes_match_one_process(secure, noise, monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    one, m1 = _run(1, secure, tmp_path, noise)
    two, m2 = _run(2, secure, tmp_path, noise)
    if noise is not None:  # every rank merged the same post-hoc noise
        assert m1["noise/weight_noise_norm"] == m2["noise/weight_noise_norm"] > 0
    # Rank 1 started from perturbed weights (rank 0 never is): the setup broadcast undid it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perturbed_rank1"]
    assert m2["round/rank_desync"] == 0.0
    assert m2["round/clients"] == 4.0
    if secure:
        # Integer sums mod 2^m are associative: the aggregate is bit-identical.
        assert torch.equal(one, two)
    else:
        # Float sums are re-associated across ranks (c0+c2, c1+c3): fp32 rounding only.
        torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-5)
    assert m1["mem/exact_all"] == m2["mem/exact_all"]
    # Recall is 0 for this random-init model; the counts show both ranks' canaries were summed.
    assert m1["mem/n_x10"] == m2["mem/n_x10"] > 0 and m1["mem/n_x1"] == m2["mem/n_x1"] > 0
    torch.set_num_threads(before)


@pytest.mark.distributed
def test_plain_ddp_is_refused_with_the_strategy_to_use():
    # A DDP wrapper would all-reduce every local client step; with LoRA (frozen weights) torch
    # refused to wrap with "DistributedDataParallel is not needed when a module doesn't have any
    # parameter that requires a gradient", which does not say what to do.
    module = FederatedLoRAModule(
        model=TINY, vocab_size=len(CharVocab()), local_steps=1, local_warmup_steps=0,
        memorization=MemorizationSettings(enabled=False),
    )  # fmt: skip
    dm = FederatedTextDataModule(
        client_sizes=[8, 8], num_entities=10, val_questions_per_client=1, num_canaries=0,
        batch_size=4,
    )  # fmt: skip
    # Also on one device: DDP would still wrap (and refuse LoRA's frozen model). Spawned, so the
    # process group (and its port) dies with the workers instead of living on in pytest.
    for devices in (2, 1):
        trainer = L.Trainer(
            max_steps=1, accelerator="cpu", devices=devices, strategy="ddp_spawn", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        with pytest.raises(Exception, match="needs strategy 'client_parallel'"):
            trainer.fit(module, dm)
