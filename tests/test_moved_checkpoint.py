"""A checkpoint used from another working directory, or after its files moved: the paths it
saved (relative to where it was trained) gave way to the config's existing ones instead of
ending in "no tokenizer directory 'data/tokenizer'" although the user had passed an absolute
one."""

from __future__ import annotations

import pytest

from cli import main, moved_path


def test_a_saved_path_missing_here_gives_way_to_the_configs_existing_one(
    tmp_path, repo_root, monkeypatch
):
    def args(subcommand: str) -> list[str]:
        return [
            subcommand, "--config", str(repo_root / "configs" / "quickstart.yaml"),
            "--model.init_args.model=micro-llama", "--data.init_args.block_size=32",
            "--data.init_args.batch_size=4", "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]  # fmt: skip

    monkeypatch.chdir(repo_root)  # trained where the config's relative paths resolve
    main([*args("fit"), "--trainer.max_steps=1"])
    (checkpoint,) = (tmp_path / "runs").glob("quickstart/version_0/checkpoints/last.ckpt")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tokenizer, corpus = repo_root / "data" / "tokenizer", repo_root / "data" / "corpus"
    given = [
        f"--model.init_args.tokenizer={tokenizer}", f"--data.init_args.tokenizer={tokenizer}",
        f"--data.init_args.data_files={corpus / 'python_docs.jsonl'}",
    ]  # fmt: skip
    with pytest.warns(UserWarning, match=r"model.init_args.tokenizer='data/tokenizer', which"):
        cli = main([*args("validate"), *given, f"--ckpt_path={checkpoint}"])
    assert cli.model.hparams.tokenizer == str(tokenizer)
    assert cli.trainer.callback_metrics["val/loss"] > 0


def test_only_a_missing_saved_path_gives_way(tmp_path):
    existing = str(tmp_path)
    assert moved_path(existing, "data/gone")
    assert not moved_path(existing, str(tmp_path))  # both exist: the checkpoint's stays
    assert not moved_path("data/gone", "data/also-gone")
    assert not moved_path(existing, "micro-llama")  # a preset name, not a path
