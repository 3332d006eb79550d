"""Local early stopping of federated clients (``local_early_stopping``, official scripts)."""

from __future__ import annotations

import random
import types

import pytest
import torch
from transformers import EarlyStoppingCallback

from modules.lora_fl_client import ClientTrainer
from modules.lora_fl_early_stopping import PatienceRule
from modules.lora_fl_settings import LocalEarlyStoppingSettings, LoraFLSettings, NoiseSettings
from modules.token_perplexity import next_token_nll
from ops.federated import flatten_tensors
from tests.federated_testkit import NO_MEM, tiny_dm, tiny_module, tiny_trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _hugging_face_decisions(losses, patience, threshold):
    """``(is the new best, stop)`` per evaluation as Hugging Face's ``Trainer`` decides them:
    ``EarlyStoppingCallback.on_evaluate`` first, then ``Trainer._determine_best_metric``."""
    callback = EarlyStoppingCallback(patience, threshold)
    args = types.SimpleNamespace(greater_is_better=False, metric_for_best_model="eval_loss")
    state = types.SimpleNamespace(best_metric=None)
    control = types.SimpleNamespace(should_training_stop=False)
    decisions = []
    for loss in losses:
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss})
        is_best = state.best_metric is None or loss < state.best_metric
        if is_best:
            state.best_metric = loss
        decisions.append((is_best, control.should_training_stop))
        if control.should_training_stop:
            break
    return decisions


@pytest.mark.parametrize("seed", range(20))
def test_patience_rule_decides_as_hugging_faces_early_stopping(seed):
    rng = random.Random(seed)
    # A slowly falling noisy loss: small gains below the threshold, plateaus and rises.
    losses = [3.0 - 0.002 * i + rng.gauss(0, 0.002) for i in range(40)]
    patience, threshold = rng.choice([1, 2, 3]), rng.choice([0.0, 1e-3, 3e-3])
    rule, ours = PatienceRule(patience, threshold), []
    for loss in losses:
        ours.append(rule.observe(loss))
        if ours[-1][1]:
            break
    assert ours == _hugging_face_decisions(losses, patience, threshold)


def test_gains_below_the_threshold_count_against_the_patience():
    rule = PatienceRule(patience=3, min_delta=1e-3)
    decisions = [rule.observe(x) for x in (3.0, 2.9995, 2.999, 2.9985)]
    assert decisions == [(True, False), (True, False), (True, False), (True, True)]


def _client_run(monkeypatch, stopping, scripted=None, steps=8, **module_kw):
    """Full fine-tuning client 0 for ``steps`` local steps; with ``scripted`` validation
    losses, also the client's update at every evaluation (the weights minus theta_r)."""
    module_kw.setdefault("finetune_mode", "full")
    m = tiny_module(local_steps=steps, memorization=NO_MEM, local_early_stopping=stopping,
                    **module_kw)  # fmt: skip
    dm = tiny_dm()
    tiny_trainer(0).fit(m, dm)  # attaches trainer and datamodule, runs no round
    run = ClientTrainer(m, dm, 0, dm.client_num_samples)
    theta = m.flat_server_state().clone()
    at_evaluation = []
    if scripted is not None:
        losses = iter(scripted)

        def scripted_loss(self, client):
            at_evaluation.append(flatten_tensors(p.detach() for p in m.net.parameters()) - theta)
            return next(losses)

        monkeypatch.setattr(ClientTrainer, "validation_loss", scripted_loss)
    delta, _ = run.run(0, seed=3)
    return delta, run.local_steps[0], at_evaluation


@pytest.mark.parametrize("load_best", [True, False])
def test_the_client_stops_on_its_patience_and_ends_on_its_best_weights(monkeypatch, load_best):
    stopping = LocalEarlyStoppingSettings(every_n_steps=2, patience=2, min_delta=0.0,
                                          load_best=load_best)  # fmt: skip
    # Evaluations after steps 2, 4, 6, 8: best at step 4, two without a gain, stop at step 8.
    delta, steps, updates = _client_run(monkeypatch, stopping, [3.0, 2.5, 2.6, 2.7], steps=12)
    assert steps == 8 and len(updates) == 4
    expected = updates[1] if load_best else updates[3]
    torch.testing.assert_close(delta, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["full", "lora_with_dropout"])
def test_evaluating_does_not_change_the_training(monkeypatch, mode):
    """The real validation loss runs (dropout off, a fixed order): with a patience the client
    never reaches, its update equals the one without early stopping, bit for bit, also when
    the client's LoRA dropout draws from the random stream the evaluations must not shift."""
    kw = {} if mode == "full" else {
        "finetune_mode": "lora", "lora": LoraFLSettings(rank=4, alpha=2.0, dropout=0.05)
    }  # fmt: skip
    never = LocalEarlyStoppingSettings(every_n_steps=2, patience=100, load_best=False)
    with_evaluations, steps, _ = _client_run(monkeypatch, never, **kw)
    without, _, _ = _client_run(monkeypatch, None, **kw)
    assert steps == 8
    torch.testing.assert_close(with_evaluations, without, rtol=0, atol=0)


def test_the_validation_loss_is_the_token_mean_over_the_clients_held_out_rows():
    m = tiny_module(memorization=NO_MEM)
    dm = tiny_dm()
    tiny_trainer(0).fit(m, dm)
    rows = dm.client_val_rows[1]
    total, count = 0.0, 0
    with torch.no_grad():
        m.net.eval()
        for row in rows:  # one row at a time: no padding involved
            batch = dm.collate([row])
            nll, n = next_token_nll(m.net(input_ids=batch["input_ids"]).logits, batch["labels"])
            total, count = total + float(nll), count + int(n)
        m.net.train()
    got = ClientTrainer(m, dm, 0, dm.client_num_samples).validation_loss(1)
    assert got == pytest.approx(total / count, rel=1e-5)
    assert m.net.training  # the training mode is back


def test_each_client_holds_its_questions_and_a_share_of_the_held_out_canaries():
    dm = tiny_dm()
    dm.canary_val_fraction = 0.2
    dm.build()
    questions = [[r for r in rows if "client" in r] for rows in dm.client_val_rows]
    assert [len(q) for q in questions] == [4, 4, 4]
    assert all(r["client"] == c for c, q in enumerate(questions) for r in q)
    canaries = [r for rows in dm.client_val_rows for r in rows if "client" not in r]
    assert canaries == dm.val_canary_rows and len(canaries) == 2


def test_a_client_without_held_out_rows_is_named():
    dm = tiny_dm()
    dm.val_questions = 0
    with pytest.raises(
        ValueError, match=r"client 0 has no held-out rows.*val_questions_per_client"
    ):
        dm.client_val_dataloader(0)


def test_a_client_without_held_out_rows_fails_at_setup_on_every_rank(monkeypatch):
    """Inside a round the error would stop only the rank running that client, while the
    others wait in the round's all-reduce: it must come before any client trains."""
    module = tiny_module(local_steps=2, memorization=NO_MEM,
                         local_early_stopping=LocalEarlyStoppingSettings(every_n_steps=1))  # fmt: skip
    dm = tiny_dm()
    dm.val_questions = 0
    clients_run = []
    original = ClientTrainer.run
    monkeypatch.setattr(
        ClientTrainer, "run", lambda self, c, seed: clients_run.append(c) or original(self, c, seed)
    )
    with pytest.raises(ValueError, match="client 0 has no held-out rows"):
        tiny_trainer(1).fit(module, dm)
    assert clients_run == []


def test_settings_are_checked():
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        LocalEarlyStoppingSettings(every_n_steps=0)
    with pytest.raises(ValueError, match="min_delta must be >= 0"):
        LocalEarlyStoppingSettings(min_delta=-1.0)
    with pytest.raises(ValueError, match="dp_sgd"):
        tiny_module(local_early_stopping=LocalEarlyStoppingSettings(),
                    noise=NoiseSettings(mode="dp_sgd", sigma=1.0))  # fmt: skip


def test_an_improvement_of_exactly_min_delta_does_not_count():
    # Hugging Face's EarlyStoppingCallback needs an improvement strictly above the threshold:
    # 1.0 -> 0.5 with min_delta 0.5 is a new best loss but not a significant one.
    rule = PatienceRule(patience=1, min_delta=0.5)
    assert rule.observe(1.0) == (True, False)
    assert rule.observe(0.5) == (True, True)
