"""Client-side knobs of FederatedLoRAModule that a mutation audit found unchecked: the
factor_mean update, local clipping, the local LR schedule, per-client LRs, client sampling,
the logged round statistics, the memorization cadence and the local steps per epoch (spec
shared/methods/lora-fl-memorization.md). Every expected value is derived by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from modules.lora_fl import FederatedLoRAModule
from modules.lora_fl_client import ClientTrainer
from modules.lora_fl_settings import LoraFLSettings
from ops.seeding import derive_seed
from tests.federated_testkit import MEM, NO_MEM, TINY, VOCAB, tiny_dm, tiny_module, tiny_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


def _probe(module: FederatedLoRAModule, dm) -> ClientTrainer:
    """Attach trainer and datamodule (a fit of 0 rounds) and return round 0's client runner."""
    tiny_trainer(0).fit(module, dm)
    return ClientTrainer(module, dm, 0, dm.client_num_samples)


# ---------------------------------------------------------------- 1. factor_mean update
def test_factor_mean_clients_that_do_not_move_leave_the_server_factors_unchanged():
    """factor_mean (spec: A_bar = sum w_c A_c) uploads Delta_c = A_c - A_r per factor: with a
    local LR of 0 every client's factors stay A_r, so Delta_c = 0 and FedAvg (server SGD lr 1 on
    -sum w_c Delta_c) leaves the server factors bit-identical (theta - 1 * (-0) = theta)."""
    m = tiny_module(
        lora_aggregation="factor_mean", local_steps=1, local_optimizer=_sgd(0.0),
        memorization=NO_MEM,
    )  # fmt: skip
    before = m.flat_server_state().clone()
    assert before.abs().sum() > 0  # the persistent A factors are non-zero (Kaiming init)
    tiny_trainer(1).fit(m, tiny_dm())
    assert m.global_step == 1
    assert torch.equal(m.flat_server_state(), before)


# ---------------------------------------------------------------- 2. local gradient clipping
def test_local_gradient_clipping_bounds_a_one_step_update():
    """Full fine-tuning, one local SGD step with lr 1 (warmup 0, total 1 step: cosine factor
    at step 0 = 1): Delta = -clip(g), so |Delta| = min(|g|, max_norm) = 1e-3 when clipped, and
    Delta = -g (|Delta| = |g| >> 1e-3) without clipping, in the same direction."""
    max_norm = 1e-3
    m = tiny_module(
        finetune_mode="full", local_steps=1, local_optimizer=_sgd(1.0),
        local_max_grad_norm=max_norm, memorization=NO_MEM,
    )  # fmt: skip
    run = _probe(m, tiny_dm())
    clipped, _ = run.run(0, seed=7)
    m.hparams.local_max_grad_norm = None
    unclipped, _ = run.run(0, seed=7)  # same batch: the client restarts from theta_r
    # fp32 rounding of (p - lr g) - p over the weights: well under 1 % of 1e-3.
    assert float(clipped.norm()) <= max_norm * 1.01
    assert float(clipped.norm()) >= max_norm * 0.99  # scaled down to the bound, not to zero
    assert float(unclipped.norm()) > 100 * max_norm  # the raw gradient is far larger
    cosine = torch.nn.functional.cosine_similarity(clipped, unclipped, dim=0)
    assert float(cosine) > 0.999


# ---------------------------------------------------------------- 3. local LR schedule
def test_the_local_lr_follows_the_warmup_cosine_schedule_step_by_step():
    """optim.schedules.warmup_cosine_factor(s, W=1, T=4) (T = local_steps, the client's total):
    s=0 warmup (0+1)/1 = 1; then cosine over T-W = 3 decay steps, progress (s-1)/3:
    s=1 -> 1, s=2 -> (1 + cos(pi/3))/2 = 0.75, s=3 -> (1 + cos(2 pi/3))/2 = 0.25.
    Base LR 0.1: the four steps run at 0.1, 0.1, 0.075, 0.025."""
    seen = []

    class SpySGD(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    torch.manual_seed(0)
    m = FederatedLoRAModule(
        model=TINY, vocab_size=VOCAB, local_warmup_steps=1, local_steps=4,
        local_optimizer=lambda p: SpySGD(p, lr=0.1), memorization=NO_MEM,
        lora=LoraFLSettings(rank=4, alpha=2.0, dropout=0.0),
    )  # fmt: skip
    run = _probe(m, tiny_dm())
    run.run(0, seed=3)
    assert seen == pytest.approx([0.1, 0.1, 0.075, 0.025], rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------- 4. per-client LR
def test_each_client_trains_with_its_own_learning_rate():
    """local_lr_per_client=[0.1, 0, 0]: client 1 steps with lr 0, so its weights never move and
    Delta_1 = theta_r - theta_r = 0 exactly; client 0 (lr 0.1) moves."""
    m = tiny_module(
        finetune_mode="full", local_steps=1, local_optimizer=_sgd(0.5),
        local_lr_per_client=[0.1, 0.0, 0.0], memorization=NO_MEM,
    )  # fmt: skip
    run = _probe(m, tiny_dm())
    delta0, _ = run.run(0, derive_seed(0, 0, 0))
    delta1, _ = run.run(1, derive_seed(0, 0, 1))
    assert torch.equal(delta1, torch.zeros_like(delta1))
    assert float(delta0.abs().max()) > 0


# ---------------------------------------------------------------- 5. client sampling
def test_sampled_clients_are_drawn_per_round():
    """Spec section 5: sampled clients come from a generator seeded by (seed, round); the code
    documents it as derive_seed(seed, round, -1) and takes the first k of a permutation.
    Seeds that change with the round give different clients across 10 rounds."""
    m = tiny_module(clients_per_round=1, memorization=NO_MEM)
    got = [m.sample_clients(r, 3) for r in range(10)]
    expected = []
    for r in range(10):
        gen = torch.Generator().manual_seed(derive_seed(0, r, -1))
        expected.append(sorted(torch.randperm(3, generator=gen)[:1].tolist()))
    assert got == expected
    assert all(len(s) == 1 and 0 <= s[0] < 3 for s in got)
    assert len({s[0] for s in got}) > 1  # not the same client every round


# ---------------------------------------------------------------- 6./7. round statistics
def _full_ft_module():
    return tiny_module(
        finetune_mode="full", local_steps=1, local_max_grad_norm=None,
        local_optimizer=_sgd(0.1), memorization=NO_MEM,
    )  # fmt: skip


def test_round_train_loss_is_the_size_weighted_mean_of_the_client_losses():
    """Sizes (8, 16, 24), batch 24: each client's single local step sees its whole data, so its
    logged loss is the token-mean CE of theta_0 on its rows, whatever the shuffle. FedAvg
    weights n_c / sum n = 8/48, 16/48, 24/48 = 1/6, 2/6, 3/6."""
    sizes = (8, 16, 24)
    dm = tiny_dm(sizes=sizes, canaries=0, batch=24)
    dm.build()
    m = _full_ft_module()
    with torch.no_grad():
        # Sharper random logits so the clients' losses differ enough for the weighting to show.
        m.net.get_output_embeddings().weight.mul_(30.0)
        losses = []
        for c in range(3):
            batch = dm.collate(dm.client_rows[c])
            logits = m.net(input_ids=batch["input_ids"]).logits[:, :-1]
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
            )
            losses.append(float(ce))
    expected = losses[0] / 6 + 2 * losses[1] / 6 + 3 * losses[2] / 6
    tiny_trainer(1).fit(m, dm)
    got = m.last_round_stats["round/train_loss"]
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(expected - sum(losses) / 3) > 1e-3  # the weighting is visible here


def test_round_local_steps_is_the_mean_per_client():
    """local_steps=1 and 3 clients: every client takes 1 step, so the per-client mean is 1.0
    (the sum over clients would be 3.0)."""
    m = _full_ft_module()
    tiny_trainer(1).fit(m, tiny_dm(sizes=(8, 16, 24), canaries=0, batch=8))
    assert m.last_round_stats["round/clients"] == 3.0
    assert m.last_round_stats["round/local_steps"] == 1.0


# ---------------------------------------------------------------- 8. memorization cadence
def test_memorization_runs_every_n_rounds_and_after_the_last():
    """Spec section 5 / MemorizationSettings.every_n_rounds: evaluated every n rounds and always
    after the last round; rounds counted from 1, so n=2 over 3 rounds gives rounds 2 and 3."""
    m = tiny_module(local_steps=1, memorization=replace(MEM, every_n_rounds=2))
    rounds = []

    def evaluate():
        rounds.append(len(m.history))  # the round's stats are recorded before the evaluation
        return {}

    m.evaluate_memorization = evaluate
    tiny_trainer(3).fit(m, tiny_dm())
    assert len(m.history) == 3
    assert rounds == [2, 3]


# ---------------------------------------------------------------- 9. steps per epoch
def test_an_epoch_counts_the_last_partial_batch():
    """local_epochs=1, batch 8: client sizes 20, 8, 8 give ceil(20/8) = 3 batches (8, 8, 4;
    the DataLoader keeps the last partial batch) and ceil(8/8) = 1."""
    m = tiny_module(local_epochs=1, memorization=NO_MEM)
    run = _probe(m, tiny_dm(sizes=(20, 8, 8), canaries=0, batch=8))
    assert ClientTrainer.dp_schedule(m, 20) == (0.4, 3)
    for c in range(3):
        run.run(c, derive_seed(0, 0, c))
    assert run.local_steps == {0: 3, 1: 1, 2: 1}
