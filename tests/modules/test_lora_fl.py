"""FederatedLoRAModule: FedAvg equals SGD, client isolation, SecAgg, DP, memorization (spec
section 7); checkpoints and resume are in test_lora_fl_resume.py."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from datamodules.federated import CharVocab, FederatedTextDataModule
from modules.hf_models import build_causal_lm
from modules.lora_fl import FederatedLoRAModule
from modules.lora_fl_client import ClientTrainer
from modules.lora_fl_settings import (
    GoldfishSettings,
    LoraFLSettings,
    MemorizationSettings,
    NoiseSettings,
    SecureAggregationSettings,
)
from ops import dp as dp_ops
from ops.federated_lora import find_lora_targets
from ops.goldfish import goldfish_drop_mask
from ops.memorization import greedy_continue
from ops.seeding import derive_seed
from tests.federated_testkit import NO_MEM, TINY, VOCAB, tiny_dm, tiny_module, tiny_trainer

# One intra-op thread (tests/conftest.py): threads oversubscribe a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_client_one_step_fedavg_equals_centralized_sgd():
    dm = tiny_dm(sizes=(16,), canaries=0, batch=16)  # one client, one batch = its whole data
    m = tiny_module(
        finetune_mode="full", local_steps=1, local_max_grad_norm=None,
        local_optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        memorization=MemorizationSettings(enabled=False),
    )  # fmt: skip
    reference = build_causal_lm(TINY, vocab_size=VOCAB, dtype="float32")
    reference.load_state_dict(m.net.state_dict())
    tiny_trainer(1).fit(m, dm)
    batch = dm.collate(dm.client_rows[0])
    logits = reference(input_ids=batch["input_ids"]).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    loss.backward()
    with torch.no_grad():
        for (name, p), q in zip(reference.named_parameters(), m.net.parameters(), strict=True):
            torch.testing.assert_close(q, p - 0.1 * p.grad, atol=1e-6, rtol=0, msg=name)


def test_full_finetuning_clients_start_from_global_weights():
    dm = tiny_dm()
    m = tiny_module(finetune_mode="full", local_steps=2)
    trainer = tiny_trainer(0)
    trainer.fit(m, dm)  # attaches trainer/datamodule, runs no round
    run = ClientTrainer(m, dm, 0, dm.client_num_samples)
    theta = m.flat_server_state().clone()
    alone, _ = run.run(1, seed=5)
    run.run(0, seed=4)
    assert torch.equal(m.flat_server_state(), theta)
    after_other, _ = run.run(1, seed=5)
    assert torch.equal(alone, after_other)


@pytest.mark.parametrize("incomplete_window", ["keep", "drop"])
def test_client_loss_applies_the_goldfish_settings(incomplete_window):
    """The local loss is CE over the targets that ``goldfish_drop_mask`` keeps, with the
    module's k, h and ``incomplete_window`` (``drop``: the row's first h-1 targets leave too)."""
    gf = GoldfishSettings(enabled=True, k=3, h=5, incomplete_window=incomplete_window)
    m = tiny_module(goldfish=gf, memorization=MemorizationSettings(enabled=False))
    dm = tiny_dm(canaries=0)
    dm.build()
    batch = dm.collate(dm.client_rows[0][:4])
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        got = ClientTrainer(m, dm, 0, dm.client_num_samples).loss(ids, labels)
        logits = m.net(input_ids=ids).logits[:, :-1]
    targets = labels[:, 1:]
    drop = goldfish_drop_mask(ids[:, 1:], 3, 5, incomplete_window=incomplete_window)
    keep = (targets != -100) & ~drop
    assert bool(drop[:, :4].all()) == (incomplete_window == "drop")
    ce = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(got, ce)


def test_lora_round_changes_only_targets_and_fresh_adapter_is_identity():
    dm = tiny_dm()
    m = tiny_module(local_steps=2)
    ids = torch.randint(2, VOCAB, (2, 20))
    before = m.net(input_ids=ids).logits
    with m.adapter.attached(m.adapter.fresh_factors()):
        assert torch.equal(m.net(input_ids=ids).logits, before)
    state = {k: v.clone() for k, v in m.net.state_dict().items()}
    tiny_trainer(1).fit(m, dm)
    changed = {k for k, v in m.net.state_dict().items() if not torch.equal(v, state[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in m.lora.target_modules for k in changed)
    assert m.last_memorization["n_x10"] == 3.0  # evaluated after the last round


def test_secure_aggregation_matches_plain_within_the_round_to_nearest_bound():
    dm = tiny_dm()
    plain = tiny_module(local_steps=2)
    tiny_trainer(2).fit(plain, dm)
    secure = tiny_module(local_steps=2, secure_aggregation=SecureAggregationSettings(enabled=True))
    trainer = tiny_trainer(2)
    trainer.fit(secure, dm)
    # Spec 3.4c, defaults f = 24, R = 1, round-to-nearest: each of the 3 clients' |u_c| << R is
    # off by at most half a grid step 2^-(f+1), so |secure - plain| <= 3 * 2^-25 per coordinate
    # (stochastic rounding may be off by a full step, up to twice that).
    bound = 3 * 2.0**-25
    assert float(trainer.callback_metrics["secagg/error_bound"]) == bound
    assert float(trainer.callback_metrics["secagg/clipped_coordinates_rank0"]) == 0
    errs = [h["secagg/max_abs_error"] for h in secure.history]  # one per round, unrounded
    assert len(errs) == 2
    assert all(0 < e <= bound + 1e-12 for e in errs), errs  # > 0: the sum was quantized
    diff = (secure.flat_server_state() - plain.flat_server_state()).abs().max()
    assert float(diff) <= 2 * (3 * 2.0**-25) + 1e-6


def test_greedy_with_kv_cache_equals_recomputation():
    torch.manual_seed(1)
    net = build_causal_lm(TINY, vocab_size=VOCAB, dtype="float32").eval()
    prompts = torch.randint(2, VOCAB, (3, 12))
    fast = greedy_continue(net, prompts, 8, frequency_penalty=0.5)
    seq, counts = prompts.clone(), torch.zeros(3, VOCAB)
    with torch.no_grad():
        for _ in range(8):
            logits = net(input_ids=seq).logits[:, -1] - 0.5 * counts
            tok = logits.argmax(-1)
            counts[torch.arange(3), tok] += 1
            seq = torch.cat([seq, tok[:, None]], 1)
    assert torch.equal(fast, seq[:, 12:])


def test_smoke_config_runs_through_the_cli(tmp_path, repo_root):
    import json

    from cli import main

    cli = main(
        [
            "fit", "--config", str(repo_root / "configs/lora_fl/smoke.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    (metrics_file,) = tmp_path.rglob("metrics.json")
    metrics = json.loads(metrics_file.read_text())["metrics"]
    assert metrics["round"] == 2.0 and "mem/exact_x10" in metrics and "val/answer_acc" in metrics
    # A LoRA client uploads its factors A (r x in) and B (out x r) in float32: 4 bytes a value.
    adapter = cli.model.adapter
    factor_values = sum(adapter.rank * (lin.in_features + lin.out_features)
                        for lin in adapter.targets.values())  # fmt: skip
    assert metrics["round/bytes_per_client"] == 4 * factor_values


class _NextTokenOracle(torch.nn.Module):
    """Predicts each next token of its input, except the second answer token of row 0."""

    def __init__(self, vocab: int, spoil: tuple[int, int]):
        super().__init__()
        self.vocab, self.spoil = vocab, spoil

    def forward(self, input_ids):
        nxt = torch.roll(input_ids, -1, dims=1)
        nxt[self.spoil] = (nxt[self.spoil] + 1) % self.vocab
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        return type("Out", (), {"logits": logits})()


def test_validation_logs_utility_per_client_and_first_answer_token():
    dm = tiny_dm()
    dm.build()
    rows = [dm.val_rows[0], dm.val_rows[1], dm.val_rows[4], dm.val_rows[8]]  # clients 0, 0, 1, 2
    assert [r["client"] for r in rows] == [0, 0, 1, 2]
    batch = dm.collate(rows)
    first_answer_target = int((batch["labels"][0, 1:] != -100).int().argmax())
    m = tiny_module(finetune_mode="lora", memorization=MemorizationSettings(enabled=False))
    m.net = _NextTokenOracle(VOCAB, spoil=(0, first_answer_target + 1))
    logged = {}

    def log(name, value, **kw):
        if name != "val/loss":  # a token-weighted MeanMetric (next tests)
            logged[name] = (float(value), kw["batch_size"])

    m.log = log
    m.validation_step(batch, 0)
    assert logged["val/answer_acc"] == (0.75, 4)  # row 0 misses its second answer token
    assert logged["val/answer_first_token_acc"] == (1.0, 4)
    assert logged["val/answer_acc_client0"] == (0.5, 2)
    assert logged["val/answer_acc_client1"] == (1.0, 1)
    assert logged["val/answer_acc_client2"] == (1.0, 1)


def test_factor_mean_is_evaluated_with_its_trained_adapter():
    m = tiny_module(
        local_steps=2, lora_aggregation="factor_mean",
        memorization=MemorizationSettings(enabled=False),
        local_optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )  # fmt: skip
    dm = tiny_dm()
    tiny_trainer(2).fit(m, dm)
    ids = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    m.net.eval()
    with torch.no_grad():
        base = m.net(input_ids=ids).logits
        with m.global_model():
            hooked = m.net(input_ids=ids).logits
        merged = m.merged_model().eval()(input_ids=ids).logits
    assert not torch.allclose(base, hooked)  # the rounds trained the adapter
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-5)
    m.log = lambda *args, **kw: None
    dm.build()
    batch = dm.collate(dm.val_rows[:4])
    m.val_loss.reset()
    m.validation_step(batch, 0)
    labels = batch["labels"]
    with torch.no_grad():
        logits = m.merged_model().eval()(input_ids=batch["input_ids"]).logits
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
        )
    assert float(m.val_loss.compute()) == pytest.approx(float(expected), rel=1e-4)


def test_val_loss_is_the_mean_over_all_answer_tokens_not_over_batches():
    dm = tiny_dm()
    dm.build()
    rows = sorted(dm.val_rows, key=lambda r: sum(x != -100 for x in r["labels"]))
    batches = [dm.collate(rows[:1]), dm.collate(rows[-3:])]  # few vs many answer tokens
    m = tiny_module(memorization=MemorizationSettings(enabled=False))
    m.log = lambda *args, **kw: None
    token_losses = []
    m.net.eval()
    with torch.no_grad():
        for batch in batches:
            m.validation_step(batch, 0)
            targets = batch["labels"][:, 1:].reshape(-1)
            logits = m.net(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, VOCAB)
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            token_losses.append(loss[targets != -100])
    assert len(token_losses[0]) < len(token_losses[1])
    token_mean = float(torch.cat(token_losses).mean())
    batch_mean = float(sum(x.mean() for x in token_losses)) / 2
    assert float(m.val_loss.compute()) == pytest.approx(token_mean, rel=1e-5)
    assert abs(token_mean - batch_mean) > 1e-3  # the two definitions differ on these batches


def test_setup_refuses_a_wrapping_secagg_modulus_and_half_precision_weights():
    wrapping = SecureAggregationSettings(enabled=True, frac_bits=24, modulus_bits=26)
    m = tiny_module(secure_aggregation=wrapping, memorization=MemorizationSettings(enabled=False))
    with pytest.raises(ValueError, match="overflow"):  # 3 clients * 1.0 * 2^24 >= 2^25
        tiny_trainer(1).fit(m, tiny_dm())
    m = tiny_module(memorization=MemorizationSettings(enabled=False))
    with pytest.raises(ValueError, match="bf16-true"):
        tiny_trainer(1, precision="bf16-true").fit(m, tiny_dm())


def test_dp_sgd_through_the_module_reaches_the_target_epsilon():
    dp = NoiseSettings(mode="dp_sgd", target_epsilon=8.0, delta=1e-3)
    m = tiny_module(local_steps=2, noise=dp, memorization=MemorizationSettings(enabled=False))
    plain = tiny_module(local_steps=2, memorization=MemorizationSettings(enabled=False))
    for module in (m, plain):
        tiny_trainer(2).fit(module, tiny_dm(sizes=(12, 16, 20), canaries=0, batch=4))
    assert m.dp_sigma is not None and m.dp_sigma > 0
    assert m.epsilon() == pytest.approx(8.0, rel=0.01)  # sigma was solved for the whole run
    assert len(m.accountant_history) == 3  # one accountant per client
    assert not torch.equal(m.flat_server_state(), plain.flat_server_state())  # noise was added
    # The rounds' (sigma, q) entries compose into one per client (an entry per round made each
    # round's epsilon re-evaluate the whole history), with the same epsilon.
    per_round = []
    for client, history in m.accountant_history.items():
        ((sigma, q, steps),) = history
        assert steps == 2 * ClientTrainer.dp_schedule(m, (12, 16, 20)[client])[1]
        acc = dp_ops.make_accountant()
        acc.history = [(sigma, q, steps // 2)] * 2
        per_round.append(float(acc.get_epsilon(1e-3)))
    assert m.epsilon() == pytest.approx(max(per_round), rel=1e-12)


def _one_epoch(module: FederatedLoRAModule, dm: FederatedTextDataModule) -> None:
    """Fit bounded by max_epochs (max_steps stays -1): the rounds are the datamodule's."""
    L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    ).fit(module, dm)  # fmt: skip


def test_final_memorization_runs_when_epochs_bound_the_run():
    m = tiny_module(local_steps=1)
    dm = FederatedTextDataModule(
        num_rounds=2, client_sizes=[24, 30, 36], num_entities=20, val_questions_per_client=4,
        num_canaries=10, batch_size=8,
    )  # fmt: skip
    _one_epoch(m, dm)
    assert m.global_step == 2 and "exact_x10" in m.last_memorization


def test_the_code_faithful_metric_is_wired_to_the_datamodules_vocabulary():
    from dataclasses import replace

    m, dm = tiny_module(local_steps=2), tiny_dm()
    tiny_trainer(1).fit(m, dm)
    default = m.last_memorization
    m.mem = replace(m.mem, code_faithful_retokenize=True)
    faithful = m.evaluate_memorization()
    # Character ids survive the text round trip: exact memorization is the same number.
    exact = [k for k in default if k.startswith("exact_")]
    assert exact and {k: faithful[k] for k in exact} == {k: default[k] for k in exact}
    assert "worst_approx_all" in faithful and "worst_exact_x10" not in faithful


def test_fedavg_weights_client_updates_by_their_training_sequences():
    kw = {
        "finetune_mode": "full", "local_steps": 1, "local_max_grad_norm": None,
        "local_optimizer": lambda p: torch.optim.SGD(p, lr=0.1), "memorization": NO_MEM,
    }  # fmt: skip
    sizes = (8, 16, 24)
    probe, dm = tiny_module(**kw), tiny_dm(sizes=sizes, canaries=0, batch=8)
    tiny_trainer(0).fit(probe, dm)  # attaches trainer and datamodule, runs no round
    run = ClientTrainer(probe, dm, 0, dm.client_num_samples)
    deltas = [run.run(c, derive_seed(0, 0, c))[0] for c in range(3)]
    n = torch.tensor(dm.client_num_samples, dtype=torch.float32)
    expected = sum(w * d for w, d in zip(n / n.sum(), deltas, strict=True))
    assert not torch.allclose(expected, sum(deltas) / 3, atol=1e-6)  # the weighting matters
    m = tiny_module(**kw)
    theta0 = m.flat_server_state().clone()
    tiny_trainer(1).fit(m, tiny_dm(sizes=sizes, canaries=0, batch=8))
    torch.testing.assert_close(m.flat_server_state() - theta0, expected, atol=1e-6, rtol=0)


def test_dp_sgd_noise_reaches_the_update():
    """Same seed, sigma 0 vs 1: batches and clipping come from other generators, so only the
    noise differs (the official code's DP noise was a no-op, spec section 3.4b)."""
    states = []
    for sigma in (0.0, 1.0):
        noise = NoiseSettings(mode="dp_sgd", sigma=sigma)
        m = tiny_module(local_steps=2, noise=noise, memorization=NO_MEM)
        tiny_trainer(1).fit(m, tiny_dm(sizes=(12, 16, 20), canaries=0, batch=4))
        states.append(m.flat_server_state())
    again = tiny_module(
        local_steps=2, noise=NoiseSettings(mode="dp_sgd", sigma=0.0), memorization=NO_MEM
    )
    tiny_trainer(1).fit(again, tiny_dm(sizes=(12, 16, 20), canaries=0, batch=4))
    assert torch.equal(again.flat_server_state(), states[0])  # deterministic without noise
    assert not torch.allclose(states[0], states[1], atol=1e-6)


def test_dp_sgd_update_noise_has_std_lr_sigma_c_over_b():
    """Full fine-tuning, one local SGD step (lr eta) per round, FedAvg (server SGD lr 1): the
    round's update is ``sum_c w_c * -eta (sum_i clip(g_i) + sigma C n_c) / B`` with
    ``B = q n_c = batch`` (``q = batch / n_c``) and ``n_c ~ N(0, I)`` drawn per client. Runs with
    sigma and with 0 share the Poisson batches and clipped gradients (other generators), so their
    difference is ``-eta sigma C / B sum_c w_c n_c``: per coordinate mean 0 and std
    ``eta sigma C sqrt(sum_c w_c^2) / B``."""
    lr, sigma, clip, batch, sizes = 0.05, 2.0, 0.5, 4, (12, 16, 20)
    states = []
    for s in (0.0, sigma):
        m = tiny_module(
            finetune_mode="full", local_steps=1, memorization=NO_MEM,
            local_optimizer=lambda p: torch.optim.SGD(p, lr=lr),
            noise=NoiseSettings(mode="dp_sgd", sigma=s, clip_norm=clip),
        )  # fmt: skip
        dm = tiny_dm(sizes=sizes, canaries=0, batch=batch)
        tiny_trainer(1).fit(m, dm)
        assert list(dm.client_num_samples) == list(sizes)  # FedAvg weights n_c / sum n
        states.append(m.flat_server_state().double())
    diff = states[1] - states[0]
    w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)  # 12/48, 16/48, 20/48
    expected_std = lr * sigma * clip / batch * float(w.pow(2).sum().sqrt())  # 0.0125 * 0.589
    n = diff.numel()
    # Standard errors of the mean / std of n iid normals: std / sqrt(n), std / sqrt(2 (n - 1)).
    assert abs(float(diff.mean())) <= 5 * expected_std / math.sqrt(n)
    assert abs(float(diff.std()) - expected_std) <= 5 * expected_std / math.sqrt(2 * (n - 1))


def test_target_epsilon_with_epoch_bounded_runs_uses_the_planned_rounds():
    noise = NoiseSettings(mode="dp_sgd", target_epsilon=8.0, delta=1e-3)
    m = tiny_module(local_steps=1, noise=noise, memorization=NO_MEM)
    dm = FederatedTextDataModule(
        num_rounds=2, client_sizes=[12, 16, 20], num_entities=20, val_questions_per_client=4,
        num_canaries=0, batch_size=4,
    )  # fmt: skip
    _one_epoch(m, dm)
    assert m.global_step == 2
    assert m.epsilon() == pytest.approx(8.0, rel=0.01)  # sigma solved for the 2 rounds run


def test_bad_noise_and_client_settings_are_named():
    with pytest.raises(ValueError, match=r"noise\.mode='dp-sgd'"):
        NoiseSettings(mode="dp-sgd")
    # at construction: a client's first noise draw came after the other ranks entered the
    # round's all-reduce (2 processes, 1 client per round: one rank raised, the other waited)
    for mode in ("output_perturbation", "dp_sgd"):
        with pytest.raises(ValueError, match=f"'{mode}' needs noise.sigma or noise.target_eps"):
            NoiseSettings(mode=mode)
    with pytest.raises(ValueError, match="local_lr_per_client has 2 entries for 3 clients"):
        tiny_trainer(1).fit(
            tiny_module(local_lr_per_client=[0.1, 0.1], memorization=NO_MEM), tiny_dm()
        )
    with pytest.raises(ValueError, match="clients_per_round=4 exceeds the 3 clients"):
        tiny_trainer(1).fit(tiny_module(clients_per_round=4, memorization=NO_MEM), tiny_dm())
    # each used to run: 0 fell back to epochs (local_steps) or sampled nothing, < 0 trained nothing
    for key in ("clients_per_round", "local_steps", "local_epochs"):
        for bad in (0, -3):
            with pytest.raises(ValueError, match=f"{key} must be >= 1 .*got {bad}"):
                tiny_module(**{key: bad})


def test_memorization_refuses_settings_that_skip_every_canary():
    long = MemorizationSettings(prefix_lengths=[500], suffix_len=50)
    with pytest.raises(ValueError, match="no canary is longer than"):
        tiny_trainer(1).fit(tiny_module(local_steps=1, memorization=long), tiny_dm())


@pytest.mark.parametrize("aggregation", ["merged_delta_mean", "factor_mean"])
def test_save_pretrained_writes_the_merged_global_model(tmp_path, aggregation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = tiny_module(local_steps=1, memorization=NO_MEM, lora_aggregation=aggregation)
    tiny_trainer(1).fit(m, tiny_dm())
    out = m.save_pretrained(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        expected = m.merged_model().eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    # The character vocabulary is saved as a tokenizer AutoTokenizer loads (there was none).
    tokenizer, vocab = AutoTokenizer.from_pretrained(out), CharVocab()
    text = "Q: Where does Ada live?\n A: in Lausanne."
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == vocab.encode(text)
    assert tokenizer.decode(vocab.encode(text)) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    # a module on a pretrained base starts in train mode (from_pretrained returns eval mode)
    on_base = FederatedLoRAModule(model=str(out), memorization=NO_MEM)
    assert all(module.training for module in on_base.net.modules())


@pytest.mark.parametrize("finetune_mode", ["lora", "full"])
def test_weight_noise_merges_a_noised_fresh_adapter_once_before_the_final_memorization(
    finetune_mode,
):
    rank, alpha, sigma = 2, 4.0, 0.05
    states, seen_at_memorization = [], []
    for noise in (NoiseSettings(), NoiseSettings(mode="weight_noise", sigma=sigma)):
        m = tiny_module(
            finetune_mode=finetune_mode, local_steps=1, noise=noise,
            lora=LoraFLSettings(rank=rank, alpha=alpha, dropout=0.0),
        )  # fmt: skip
        evaluate = m.evaluate_memorization
        m.evaluate_memorization = lambda m=m, evaluate=evaluate: (
            seen_at_memorization.append(m.weight_noise_round is not None) or evaluate()
        )
        trainer = tiny_trainer(2)
        trainer.fit(m, tiny_dm())
        states.append({k: v.detach().clone() for k, v in m.net.named_parameters()})
    assert seen_at_memorization == [False, True]  # plain run; noised run noised before it
    targets = m.lora.target_modules
    diffs = {k: states[1][k] - states[0][k] for k in states[0]}
    for name, diff in diffs.items():
        if name.rsplit(".", 2)[-2] in targets:  # ...self_attn.q_proj.weight
            assert torch.linalg.matrix_rank(diff.double(), atol=1e-7) == rank  # s N_B (A + N_A)
        else:
            assert torch.equal(diff, torch.zeros_like(diff))
    total = math.sqrt(sum(float(d.double().pow(2).sum()) for d in diffs.values()))
    assert total == pytest.approx(
        trainer.callback_metrics["noise/weight_noise_norm"].item(), rel=1e-4
    )
    # Expected size: E|s N_B (A + N_A)|^2 = s^2 sigma^2 out (|A|^2 + sigma^2 r in), with
    # E|A|^2 = r in * in^-1 / 3 (Kaiming-uniform bound 1/sqrt(in)); checked to 20 % in total.
    expected = sum(
        (alpha / rank) ** 2
        * sigma**2
        * lin.out_features
        * (rank / 3 + sigma**2 * rank * lin.in_features)
        for lin in find_lora_targets(m.net, targets).values()
    )
    assert total**2 == pytest.approx(expected, rel=0.2)


def test_weight_noise_needs_sigma():
    with pytest.raises(ValueError, match=r"weight_noise' needs noise\.sigma"):
        NoiseSettings(mode="weight_noise")


class _StopAfterFirstRound(L.Callback):
    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = True


def test_weight_noise_is_merged_at_the_end_of_a_run_stopped_early():
    states = []
    for noise in (NoiseSettings(), NoiseSettings(mode="weight_noise", sigma=0.05)):
        m = tiny_module(local_steps=1, noise=noise, memorization=NO_MEM)
        trainer = tiny_trainer(3, callbacks=[_StopAfterFirstRound()])
        if noise.mode == "weight_noise":
            with pytest.warns(UserWarning, match="stopped after round 1"):
                trainer.fit(m, tiny_dm())
        else:
            trainer.fit(m, tiny_dm())
        assert m.global_step == 1
        states.append(m.flat_server_state())
    assert m.weight_noise_round == 0
    assert not torch.equal(states[0], states[1])  # the exported model carries the noise
