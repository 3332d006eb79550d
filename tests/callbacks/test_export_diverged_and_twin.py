"""ExportPretrained pieces that run without FSDP: the count of non-finite trainable weights, the
divergence warning, and the unwrapped twin the FSDP export loads the gathered state into."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.export import ExportPretrained, non_finite_trainable, unwrapped_twin


class Exportable(L.LightningModule):
    def __init__(self, width: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(width, 1)
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=self.hparams.lr)

    def save_pretrained(self, directory, merge_lora=False):
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), directory / "weights.pt")
        return directory


def test_only_trainable_non_finite_entries_are_counted():
    module = Exportable()
    with torch.no_grad():
        module.layer.weight.copy_(torch.tensor([[float("nan"), float("inf"), -float("inf")]]))
        module.frozen.weight.fill_(float("nan"))  # frozen: not the run's divergence
    assert non_finite_trainable(module) == [("layer.weight", 3)]


def test_a_diverged_export_names_the_first_tensor_and_counts_the_others(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[ExportPretrained()],
    )  # fmt: skip
    # lr NaN: both trainable tensors (3 weights, 1 bias) become NaN after one step
    with pytest.warns(UserWarning, match=r"\(3 entries of layer\.weight and 1 more tensors\)"):
        trainer.fit(Exportable(lr=float("nan")), DataLoader(torch.ones(2, 3), batch_size=2))
    assert (tmp_path / "hf_model" / "weights.pt").is_file()


def test_the_twin_holds_the_state_in_eval_mode_and_leaves_the_global_stream_alone():
    module = Exportable(width=4)
    module.hparams["_class_path"] = "tests.Exportable"  # what LightningCLI adds
    source = Exportable(width=4)
    state = source.state_dict()
    before = torch.get_rng_state()
    twin = unwrapped_twin(module, state)
    assert torch.equal(torch.get_rng_state(), before)  # building it drew its random init
    assert type(twin) is Exportable and twin.hparams.width == 4
    assert not twin.training
    for name, tensor in state.items():
        assert torch.equal(twin.state_dict()[name], tensor), name
