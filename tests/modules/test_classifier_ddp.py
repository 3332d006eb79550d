"""HyperINF classifiers under 2-process DDP (gloo, CPU): validation/test metrics are sample-exact.

``LoRAClassifier`` + ``NoisyLabelDataModule`` and ``LoRATailClassifier`` +
``SentimentNoisyDataModule`` on odd evaluation sets whose shards end in a short batch and, on
rank 1, a batch of padding only: the loss and accuracy of 2 processes must equal those of one
process (and a direct computation on the whole set), on every rank. Before the fix each rank
logged the metrics of its own shard, and Lightning's ``DistributedSampler`` counted a repeated
example twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules.noisy_labels import NoisyLabelDataModule
from datamodules.text_classification import SentimentNoisyDataModule
from modules.llm_tail_classifier import LoRATailClassifier
from modules.sequence_classifier import LoRAClassifier

# One intra-op thread (tests/conftest.py): threads oversubscribe a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")

N_SEQ, BS_SEQ = 101, 25  # 2 ranks x 51 rows: batches 25, 25, 1 (rank 1's last: padding only)
N_TAIL, BS_TAIL = 7, 3  # 2 ranks x 4 rows: batches 3, 1 (rank 1's last: padding only)


class RecordEval(L.Callback):
    """Every rank writes its final metrics and, per batch, its rows and scored rows."""

    def __init__(self, out: str) -> None:
        self.out, self.rows, self.scored = out, [], []

    def _batch(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        scored = batch.get("scored", torch.ones_like(batch["y"], dtype=torch.bool))
        self.rows.append(int(batch["y"].numel()))
        self.scored.append(int(scored.sum()))

    on_validation_batch_end = _batch
    on_test_batch_end = _batch

    def _end(self, trainer, pl_module) -> None:
        record = {k: float(v) for k, v in trainer.callback_metrics.items()}
        record.update(rows=self.rows, scored=self.scored)
        name = f"ws{trainer.world_size}_rank{trainer.global_rank}.json"
        (Path(self.out) / name).write_text(json.dumps(record))

    on_validation_end = _end
    on_test_end = _end


def _evaluate(module, dm, stage: str, devices: int, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[RecordEval(str(out))], default_root_dir=str(out),
    )  # fmt: skip
    returned = getattr(trainer, stage)(module, dm, verbose=False)[0]
    ranks = [json.loads((out / f"ws{devices}_rank{r}.json").read_text()) for r in range(devices)]
    for record in ranks:  # every rank logs the global value, which the trainer returns
        for key, value in returned.items():
            assert record[key] == pytest.approx(value, rel=1e-6), key
    return ranks


def _check(module, dm, stage: str, n: int, reference: dict[str, float], tmp_path: Path) -> None:
    """``stage``: ``validate`` or ``test``; ``reference``: loss and accuracy on the whole set.

    ``n`` is odd, so rank 1's shard ends in one padding row; with several batches per rank that
    row is a batch of its own.
    """
    (one,) = _evaluate(module, dm, stage, 1, tmp_path / "one")
    two = _evaluate(module, dm, stage, 2, tmp_path / "two")
    prefix = "val" if stage == "validate" else "test"
    for key, value in reference.items():
        assert one[f"{prefix}/{key}"] == pytest.approx(value, rel=1e-6), key
        assert two[0][f"{prefix}/{key}"] == pytest.approx(one[f"{prefix}/{key}"], rel=1e-6), key
    assert sum(one["scored"]) == sum(one["rows"]) == n
    # Every example scored exactly once over the ranks, the same batch count on every rank.
    assert sum(sum(r["scored"]) for r in two) == n
    assert len(two[0]["rows"]) == len(two[1]["rows"])
    assert two[1]["rows"][-1] - two[1]["scored"][-1] == 1
    if len(two[0]["rows"]) > 1:  # a short last batch, on rank 1 one of padding only
        assert len(set(two[0]["rows"])) > 1 and two[1]["rows"][-1] == 1


def _reference(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {
        "loss": float(F.cross_entropy(logits, y)),
        "acc": float((logits.argmax(-1) == y).float().mean()),
    }


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_loader_shards_evenly_and_flags_padding(world):
    dm = NoisyLabelDataModule(d_in=8, n_train=10, n_val=N_SEQ, val_batch_size=BS_SEQ, seed=0)
    dm.setup("fit")
    ids = dm.val_dataset.sample_id
    scored_ids, batch_counts = [], set()
    for rank in range(world):
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        batches = list(dm.val_dataloader())
        batch_counts.add(len(batches))
        for batch in batches:
            assert set(batch) == {"x", "y", "sample_id", "scored"}
            assert batch["scored"].dtype == torch.bool
            scored_ids += batch["sample_id"][batch["scored"]].tolist()
            assert (batch["sample_id"][~batch["scored"]] == ids[0]).all()  # padding: item 0
    assert len(batch_counts) == 1  # the same number of batches on every rank
    assert sorted(scored_ids) == sorted(ids.tolist())  # every example exactly once
    # HyperINF reads the plain datasets (``val_dataset`` attribute): unchanged.
    assert type(dm.val_dataset).__name__ == "LabeledDataset" and len(dm.val_dataset) == N_SEQ


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("stage", "batch_kw"), [("validate", {"val_batch_size": BS_SEQ}), ("test", {})]
)  # batches of 25 with a padding-only one; the default full batch: 51 rows per rank
def test_lora_classifier_ddp_metrics_equal_single_process(tmp_path, stage, batch_kw):
    dm = NoisyLabelDataModule(d_in=8, n_train=20, n_val=N_SEQ, seed=0, **batch_kw)
    dm.setup("fit")
    module = LoRAClassifier(in_features=8, hidden_size=16, lora_r=2, init_seed=0).eval()
    with torch.no_grad():  # B off zero: the adapter takes part in the evaluated function
        lora_b = module.features.base_model.model.hidden.lora_B.default.weight
        lora_b.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        reference = _reference(module(dm.val_dataset.x), dm.val_dataset.y)
    _check(module, dm, stage, N_SEQ, reference, tmp_path)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_lora_tail_classifier_ddp_metrics_equal_single_process(
    tmp_path, stage, tiny_llama_dir, tokenizer_dir
):
    dm = SentimentNoisyDataModule(
        tokenizer=str(tokenizer_dir), n_train=4, n_val=N_TAIL, batch_size=BS_TAIL,
        frozen_prefix_model=str(tiny_llama_dir), tail_layers=2,
    )  # fmt: skip
    dm.setup("fit")
    module = LoRATailClassifier(model=str(tiny_llama_dir), tail_layers=2, init_seed=0).eval()
    va = dm.val_dataset.tensors
    with torch.no_grad():
        reference = _reference(module(va["hidden"], va["length"]), va["y"])
    _check(module, dm, stage, N_TAIL, reference, tmp_path)
