"""cli.py helpers: missing config files left to the parser, changed settings with keys the
checkpoint lacks, equal settings, a predict-by-forward module, a key given twice in a config,
a checkpoint of another model class."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from cli import (
    _same_kind,
    _same_setting,
    changed_settings,
    check_config_syntax,
    check_subcommand_is_supported,
    main,
)


def test_a_missing_config_file_is_left_to_the_parser(tmp_path):
    check_config_syntax(["fit", "--config", str(tmp_path / "missing.yaml")])  # no exception


def test_keys_the_checkpoint_lacks_are_no_change():
    before = {"model": "micro-llama", "lora": {"r": 4, "alpha": 8}}
    after = {"model": "micro-llama", "lora": {"r": 8}}
    assert changed_settings(before, after) == [("lora.r", 4, 8)]


def test_numbers_are_equal_to_float_precision_and_booleans_are_not_numbers():
    assert _same_setting(0.1 + 0.2, 0.3)
    assert _same_setting([0.9, 0.1 + 0.2], (0.9, 0.3))
    assert not _same_setting(1, True) and not _same_setting(1.0, True)
    assert not _same_kind(True, 1.0) and _same_kind(1, 2.5) and _same_kind(True, False)


class ForwardOnly(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def forward(self, x):
        return self.layer(x)


def test_a_module_with_forward_predicts():
    check_subcommand_is_supported("predict", ForwardOnly())  # Lightning's predict_step calls it


def test_a_key_given_twice_in_a_config_is_named(tmp_path):
    # PyYAML keeps the last of two equal keys: `mlo fit` ran 3 steps without a word.
    bad = tmp_path / "twice.yaml"
    bad.write_text("trainer:\n  max_steps: 2\n  max_steps: 3\n")
    with pytest.raises(
        SystemExit,
        match=r"(?s)twice\.yaml: invalid YAML.*duplicate key 'max_steps' \(first given on line 2\).*line 3",
    ):
        check_config_syntax(["fit", "--config", str(bad)])


def test_a_checkpoint_of_another_model_class_is_refused(tmp_path):
    # LightningCLI swapped in the checkpoint's class: a language model then validated on the
    # saddle problem's data and failed with "list indices must be integers or slices, not str".
    ckpt = tmp_path / "causal_lm.ckpt"
    hparams = {"_class_path": "modules.causal_lm.CausalLMModule", "model": "micro-llama"}
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, ckpt)
    saddle = ["validate", "--config", "configs/cubic_newton/saddle.yaml", f"--ckpt_path={ckpt}",
              f"--trainer.logger.init_args.save_dir={tmp_path}"]  # fmt: skip
    message = (
        r"causal_lm\.ckpt holds a modules\.causal_lm\.CausalLMModule, but the config's model is "
        r"modules\.cubic_newton\.CubicNewtonModule: was it trained with another config\?"
    )
    with pytest.raises(SystemExit, match=message):
        main(saddle)
