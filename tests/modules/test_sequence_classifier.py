"""LoRAClassifier + NoisyLabelDataModule: peft wiring, memorisation, label flips, YAML via `mlo`."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from datamodules.noisy_labels import NoisyLabelDataModule, flip_labels
from modules.sequence_classifier import LoRAClassifier

# One intra-op thread (tests/conftest.py): threads oversubscribe a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_only_lora_and_head_are_trainable_and_b_starts_at_zero() -> None:
    model = LoRAClassifier(in_features=8, hidden_size=16, num_classes=3, lora_r=2, init_seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "features.base_model.model.hidden.lora_A.default.weight",
        "features.base_model.model.hidden.lora_B.default.weight",
        "head.weight",
    }
    lora_b = dict(model.named_parameters())[
        "features.base_model.model.hidden.lora_B.default.weight"
    ]
    assert lora_b.shape == (16, 2) and lora_b.abs().sum() == 0
    x = torch.randn(5, 8)
    assert model(x).shape == (5, 3)
    loss = model.per_sample_loss({"x": x, "y": torch.tensor([0, 1, 2, 0, 1])})
    assert loss.shape == (5,) and (loss > 0).all()
    same = LoRAClassifier(in_features=8, hidden_size=16, num_classes=3, lora_r=2, init_seed=0)
    torch.testing.assert_close(model(x), same(x))  # init_seed makes the random W0 reproducible


def test_flip_labels_rate_and_always_changes_class() -> None:
    y = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    noisy, mask = flip_labels(y, 10, 0.2, torch.Generator().manual_seed(1))
    assert int(mask.sum()) == 200
    assert (noisy[mask] != y[mask]).all() and (noisy[~mask] == y[~mask]).all()
    with pytest.raises(ValueError, match="noise_rate"):
        flip_labels(y, 10, 1.5, torch.Generator())


@pytest.mark.parametrize("source", ["gaussian_mixture", "digits"])
def test_datamodule_splits_and_determinism(source: str) -> None:
    a = NoisyLabelDataModule(source=source, n_train=300, n_val=100, seed=3)
    b = NoisyLabelDataModule(source=source, n_train=300, n_val=100, seed=3)
    a.setup("fit")
    b.setup("fit")
    assert len(a.train_dataset) == 300 and len(a.val_dataset) == 100
    assert int(a.noisy_mask.sum()) == 60
    torch.testing.assert_close(a.train_dataset.x, b.train_dataset.x)
    assert set(a.train_dataset.sample_id.tolist()).isdisjoint(a.val_dataset.sample_id.tolist())
    item = a.train_dataset[0]
    assert set(item) == {"x", "y", "sample_id"} and item["x"].shape == (a.input_dim,)
    with pytest.raises(ValueError, match="source"):
        NoisyLabelDataModule(source="mnist")  # type: ignore[arg-type]


def test_memorises_flipped_labels_full_batch() -> None:
    torch.manual_seed(0)
    dm = NoisyLabelDataModule(n_train=200, n_val=50, d_in=32, separation=2.0, seed=0)
    dm.setup("fit")
    model = LoRAClassifier(init_seed=0)
    opt = model.configure_optimizers()
    batch = {"x": dm.train_dataset.x, "y": dm.train_dataset.y}
    for _ in range(300):
        opt.zero_grad()
        model.per_sample_loss(batch).mean().backward()
        opt.step()
    with torch.no_grad():
        pred = model(dm.train_dataset.x).argmax(-1)
    assert (pred == dm.train_dataset.y)[dm.noisy_mask].float().mean() > 0.9  # noisy labels fitted


def test_yaml_config_runs_through_mlo_fit(tmp_path, repo_root, monkeypatch) -> None:
    cli = pytest.importorskip("cli")
    monkeypatch.chdir(tmp_path)
    cli.main(
        [
            "fit",
            "--config",
            str(repo_root / "configs/hyperinf/mislabel_gmm.yaml"),
            "--trainer.max_epochs=5",
            "--data.init_args.n_train=80",
            "--data.init_args.n_val=20",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    (run,) = sorted((tmp_path / "hyperinf_gmm").glob("version_*"))
    table = pd.read_csv(run / "influence" / "influence.csv")
    assert len(table) == 80 and "score_hyperinf_mislabel" in table.columns
    assert (run / "influence" / "influence_summary.json").exists()


def _validate(dm: NoisyLabelDataModule, **trainer_kw) -> dict[str, float]:
    import lightning as L

    model = LoRAClassifier(in_features=dm.d_in, init_seed=0)
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    return L.Trainer(accelerator="cpu", **quiet, **trainer_kw).validate(model, dm, verbose=False)[0]


def test_eval_metrics_are_example_means_exact_in_float64_and_keep_nan() -> None:
    dm = NoisyLabelDataModule(n_train=64, n_val=37, d_in=32, batch_size=64, val_batch_size=10)
    dm.setup("fit")
    result = _validate(dm, precision="64-true")
    model = LoRAClassifier(in_features=32, init_seed=0).double()
    with torch.no_grad():  # the whole set at once, by hand: 37 examples in batches of 10
        logits = model(dm.val_dataset.x.double())
    correct = int((logits.argmax(-1) == dm.val_dataset.y).sum())
    assert result["val/acc"] == correct / 37  # float64 accumulation: exactly k / 37
    expected_loss = torch.nn.functional.cross_entropy(logits, dm.val_dataset.y)
    assert result["val/loss"] == pytest.approx(float(expected_loss), rel=1e-12)
    dm.val_dataset.x[36] = float("nan")  # a diverged example must show, not be dropped
    assert torch.isnan(torch.tensor(_validate(dm)["val/loss"]))


def test_an_empty_validation_set_still_fits() -> None:
    import lightning as L

    dm = NoisyLabelDataModule(n_train=64, n_val=0, d_in=32, batch_size=16)
    dm.setup("fit")
    assert len(dm.val_dataloader()) == 0
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(LoRAClassifier(in_features=32, init_seed=0), dm)
    assert trainer.global_step == 4


def test_classifier_whose_constructor_fails_leaves_the_generator_alone():
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    with pytest.raises(RuntimeError):
        LoRAClassifier(in_features=8, hidden_size=-1, init_seed=7)
    torch.testing.assert_close(torch.rand(3), expected_next)
