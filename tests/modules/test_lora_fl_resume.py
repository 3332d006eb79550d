"""FederatedLoRAModule checkpoints: bit-identical resume, saves from inside a round, and resumes
that change the noise plan or the vocabulary."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.federated import FederatedTextDataModule
from modules.lora_fl import FederatedLoRAModule
from modules.lora_fl_client import ClientTrainer
from modules.lora_fl_settings import MemorizationSettings, NoiseSettings
from tests.federated_testkit import NO_MEM, TINY, tiny_dm, tiny_module, tiny_trainer

# One intra-op thread (tests/conftest.py): threads oversubscribe a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("aggregation", ["merged_delta_mean", "factor_mean"])
def test_resume_from_mid_training_checkpoint_is_bit_identical(tmp_path, aggregation):
    def make():
        return tiny_module(
            local_steps=2, lora_aggregation=aggregation,
            server_optimizer=lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99), eps=1e-3),
            memorization=MemorizationSettings(enabled=False),
        )  # fmt: skip

    full = make()
    tiny_trainer(4).fit(full, tiny_dm())
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    first = make()
    tiny_trainer(2, callbacks=[ckpt], enable_checkpointing=True).fit(first, tiny_dm())
    path = next(tmp_path.glob("*step=2.ckpt"))
    resumed = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(4).fit(resumed, tiny_dm(), ckpt_path=str(path))
    assert torch.equal(resumed.flat_server_state(), full.flat_server_state())
    # The round driver resumes through global_step, and tells Lightning so.
    assert not [w for w in caught if "dataloader is not resumable" in str(w.message)]


def _full_ft_after_one_round(tmp_path) -> dict[str, torch.Tensor]:
    """State dict of a full fine-tuning module after round 1 (the round-2 start weights)."""
    every_round = ModelCheckpoint(dirpath=tmp_path / "ref", every_n_train_steps=1, save_top_k=-1)
    tiny_trainer(1, callbacks=[every_round], enable_checkpointing=True).fit(
        tiny_module(finetune_mode="full", local_steps=2, memorization=MemorizationSettings(False)),
        tiny_dm(),
    )
    (path,) = (tmp_path / "ref").glob("*step=1.ckpt")
    return torch.load(path, weights_only=False)["state_dict"]


def _during_round_two(monkeypatch, action) -> None:
    """Run ``action(client_trainer)`` at round 2's second client, after its first local step."""
    original, calls = ClientTrainer.loss, [0]

    def loss(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3 * 2 + 2 + 2:  # 3 clients x 2 local steps, then client 2, step 2
            action(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ClientTrainer, "loss", loss)


def test_full_ft_checkpoint_saved_mid_round_holds_the_round_start_weights(tmp_path, monkeypatch):
    expected = _full_ft_after_one_round(tmp_path)
    mid_round = tmp_path / "mid_round.ckpt"
    _during_round_two(monkeypatch, lambda ct: ct.m.trainer.save_checkpoint(mid_round))
    module = tiny_module(
        finetune_mode="full", local_steps=2, memorization=MemorizationSettings(False)
    )
    tiny_trainer(2).fit(module, tiny_dm())
    saved = torch.load(mid_round, weights_only=False)
    assert saved["global_step"] == 1
    assert saved["state_dict"].keys() == expected.keys()
    for key, tensor in expected.items():  # tied embedding and head included
        assert torch.equal(saved["state_dict"][key], tensor), key


def test_full_ft_exception_mid_client_leaves_the_round_start_weights(tmp_path, monkeypatch):
    expected = _full_ft_after_one_round(tmp_path)

    def fail(_):
        raise RuntimeError("interrupted mid-client")

    _during_round_two(monkeypatch, fail)
    module = tiny_module(
        finetune_mode="full", local_steps=2, memorization=MemorizationSettings(False)
    )
    with pytest.raises(RuntimeError, match="interrupted mid-client"):
        tiny_trainer(2).fit(module, tiny_dm())
    for key, tensor in module.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    assert module.round_start_weights is None


def _dp_checkpoint(tmp_path, rounds: int = 2) -> str:
    every_round = ModelCheckpoint(dirpath=tmp_path / "dp", every_n_train_steps=1, save_top_k=-1)
    noise = NoiseSettings(mode="dp_sgd", target_epsilon=8.0, delta=1e-3)
    tiny_trainer(rounds, callbacks=[every_round], enable_checkpointing=True).fit(
        tiny_module(local_steps=1, noise=noise, memorization=NO_MEM), tiny_dm()
    )
    (path,) = (tmp_path / "dp").glob("*step=1.ckpt")
    return str(path)


def test_resume_refuses_a_target_epsilon_plan_the_restored_sigma_was_not_solved_for(tmp_path):
    """Resumed with more rounds, the restored sigma (solved for 2) ended at epsilon 10.3 for a
    target of 8 without a word."""
    path = _dp_checkpoint(tmp_path)
    noise = NoiseSettings(mode="dp_sgd", target_epsilon=8.0, delta=1e-3)
    module = tiny_module(local_steps=1, noise=noise, memorization=NO_MEM)
    with pytest.raises(ValueError, match=r"planned_rounds 2 -> 4.*noise.sigma=0\.\d+ keeps"):
        tiny_trainer(4).fit(module, tiny_dm(), ckpt_path=path)
    same_plan = tiny_module(local_steps=1, noise=noise, memorization=NO_MEM)
    tiny_trainer(2).fit(same_plan, tiny_dm(), ckpt_path=path)
    assert same_plan.epsilon() == pytest.approx(8.0, rel=0.01)


def test_resume_with_an_explicit_sigma_uses_it_and_accounts_for_both(tmp_path):
    path = _dp_checkpoint(tmp_path)
    solved = torch.load(path, weights_only=False)["lora_fl"]["dp_sigma"]
    noise = NoiseSettings(mode="dp_sgd", sigma=2 * solved, delta=1e-3)
    module = tiny_module(local_steps=1, noise=noise, memorization=NO_MEM)
    with pytest.warns(UserWarning, match=rf"noise.sigma {solved:.4g} -> {2 * solved:.4g}"):
        tiny_trainer(4).fit(module, tiny_dm(), ckpt_path=path)
    sigmas = {sigma for history in module.accountant_history.values() for sigma, *_ in history}
    assert sigmas == {solved, 2 * solved}


def test_resume_with_another_vocabulary_names_the_tokenizer(tmp_path, tokenizer_dir):
    every_round = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    char_level = FederatedLoRAModule(model=TINY, local_steps=1, memorization=NO_MEM)
    tiny_trainer(1, callbacks=[every_round], enable_checkpointing=True).fit(char_level, tiny_dm())
    (path,) = tmp_path.glob("*step=1.ckpt")
    bpe_data = FederatedTextDataModule(
        client_sizes=[24, 30, 36], num_entities=20, val_questions_per_client=4,
        num_canaries=10, batch_size=8, tokenizer=str(tokenizer_dir),
    )  # fmt: skip
    bpe = FederatedLoRAModule(model=TINY, local_steps=1, memorization=NO_MEM)
    with pytest.raises(ValueError, match=r"vocabulary of 98 tokens, this run's data gives \d+"):
        tiny_trainer(2).fit(bpe, bpe_data, ckpt_path=str(path))
