"""Local text corpora for causal language modelling: load, validate, tokenize, pack, split.

Files are read through ``datasets`` (``json``/``jsonl``/``parquet``/``text`` builders, or a
``load_from_disk`` directory, or a hub id when online); a ``.txt``/``.md`` file holds one
document per paragraph by default (``text_sample_by``). Documents are split into train / val /
test deterministically *before* packing, so no document straddles two splits; each split is
tokenized (cached by ``datasets``), joined with EOS and cut into ``block_size`` blocks.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Literal

import datasets
import lightning as L
import pyarrow
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from datamodules.even_eval_sampler import EvenEvalSampler, PaddedBlocks
from datamodules.file_checks import (
    count_json_records,
    count_text_lines,
    malformed_json_file,
    where_relative_paths_resolve,
)
from datamodules.private_seed_loader import PrivateSeedDataLoader
from datamodules.resumable_sampler import resumable_train_loader
from ops.goldfish import IGNORE_INDEX

_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}

#: How the ``text`` builder cuts ``.txt``/``.md`` files into documents (``datasets``' names).
TEXT_SAMPLE_BY = ("paragraph", "line", "document")


def resolve_data_files(data_files: str | list[str]) -> list[Path]:
    """Expand globs, check existence and a supported suffix for every data file."""
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    if not patterns:
        raise ValueError("data_files is empty: name at least one file")
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise FileNotFoundError(
                f"data_files: no file matches {pattern!r}{where_relative_paths_resolve(pattern)}"
            )
        paths.extend(Path(m) for m in matches)
    suffixes = {p.suffix for p in paths}
    unsupported = suffixes - set(_BUILDERS)
    if unsupported:
        raise ValueError(
            f"unsupported data file type(s) {sorted(unsupported)}; use one of {sorted(_BUILDERS)}"
        )
    if len({_BUILDERS[s] for s in suffixes}) > 1:
        raise ValueError(f"data_files mix formats {sorted(suffixes)}: use one format per run")
    return paths


def load_documents(
    data_files: str | list[str] | None,
    dataset_dir: str | None,
    hub_dataset: str | None,
    text_field: str,
    text_sample_by: Literal["paragraph", "line", "document"] = "paragraph",
    dataset_split: str = "train",
) -> datasets.Dataset:
    """Load the raw documents as a ``datasets.Dataset`` with a ``text_field`` column.

    ``text_sample_by`` cuts ``.txt``/``.md`` files into documents: ``paragraph`` (separated by
    blank lines, line breaks kept), ``line`` (one per line, no line break reaches the model) or
    ``document`` (one per file). ``dataset_split`` is the split read from a saved
    ``DatasetDict`` or a hub dataset; its other splits are never read.
    """
    if text_sample_by not in TEXT_SAMPLE_BY:
        raise ValueError(f"text_sample_by={text_sample_by!r} is not one of {TEXT_SAMPLE_BY}")
    sources = [s is not None for s in (data_files, dataset_dir, hub_dataset)]
    if sum(sources) != 1:
        raise ValueError("set exactly one of data.data_files, data.dataset_dir, data.hub_dataset")
    if data_files is not None:
        paths = resolve_data_files(data_files)
        builder = _BUILDERS[paths[0].suffix]
        for path in paths:
            if builder == "json" and count_json_records(path, text_field) == 0:
                raise ValueError(f"{path}: the corpus is empty (no records)")
            if builder == "text" and count_text_lines(path) == 0:
                raise ValueError(f"{path}: the corpus is empty (no non-blank lines)")
        try:
            options = {"sample_by": text_sample_by} if builder == "text" else {}
            files = [str(p) for p in paths]
            ds = datasets.load_dataset(builder, data_files=files, split="train", **options)
            if builder == "text" and text_sample_by == "paragraph":
                # the file's last paragraph keeps the final line break, the others none
                ds = ds.map(lambda r: {"text": r["text"].rstrip("\n")}, desc="paragraphs")
        except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException) as err:
            # e.g. a corrupt parquet file: datasets' own message names no file
            raise ValueError(
                f"could not read data_files {[str(p) for p in paths]} with the {builder!r} "
                f"builder: {err.__cause__ or err}"
            ) from err
    elif dataset_dir is not None:
        if not Path(dataset_dir).is_dir():
            raise FileNotFoundError(
                f"dataset_dir: no directory {dataset_dir!r}"
                f"{where_relative_paths_resolve(dataset_dir)}"
            )
        ds = datasets.load_from_disk(dataset_dir)
        if isinstance(ds, datasets.DatasetDict):
            # One split only: merging them all trained on the dictionary's own test split.
            if dataset_split not in ds:
                raise ValueError(
                    f"dataset_dir {dataset_dir!r} has no split dataset_split={dataset_split!r} "
                    f"(its splits: {sorted(ds)})"
                )
            ds = ds[dataset_split]
    else:
        ds = datasets.load_dataset(hub_dataset, split=dataset_split)
    if text_field not in ds.column_names:
        raise KeyError(f"no text column {text_field!r} in the data (columns: {ds.column_names})")
    ds = ds.filter(lambda r: bool(r[text_field] and r[text_field].strip()))
    if len(ds) == 0:
        source = data_files if data_files is not None else dataset_dir or hub_dataset
        raise ValueError(f"{source}: the corpus is empty (no non-blank {text_field!r} documents)")
    return ds


def _is_text(data_files: str | list[str]) -> bool:
    patterns = [data_files] if isinstance(data_files, str) else data_files
    return any(_BUILDERS.get(Path(p).suffix) == "text" for p in patterns)


def pack_blocks(
    token_lists: list[list[int]], block_size: int, eos_id: int | None
) -> list[list[int]]:
    """Join documents (EOS after each) and cut into full ``block_size`` blocks; drop the tail."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    n_blocks = len(stream) // block_size
    return [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]


class TextDataModule(L.LightningDataModule):
    """Packed next-token-prediction blocks from local text files, a saved dataset or a hub id.

    Args:
        data_files: file path(s) or glob(s): ``.jsonl``/``.json``/``.parquet``/``.txt``.
        dataset_dir: a ``datasets.save_to_disk`` directory (alternative to ``data_files``).
        hub_dataset: a Hugging Face hub dataset id (needs network access).
        dataset_split: the split of ``dataset_dir`` (a saved ``DatasetDict``) or of
            ``hub_dataset`` to read; val and test are drawn from it, other splits are unused.
        text_field: the column holding the text.
        text_sample_by: the documents of ``.txt``/``.md`` files: ``paragraph`` (blank-line
            separated, line breaks kept), ``line`` (one per line, line breaks dropped) or
            ``document`` (one per file).
        tokenizer: tokenizer directory or hub id for ``AutoTokenizer.from_pretrained``.
        block_size: tokens per training block.
        batch_size: blocks per batch and per process.
        val_fraction: fraction of documents held out for validation.
        test_fraction: fraction of documents held out for testing.
        split_seed: seed of the document-level split (independent of the training seed).
        shuffle_seed: seed of the per-epoch shuffle of training blocks.
        num_workers: DataLoader worker processes, kept alive across epochs and validations
            (under the ``spawn`` start method of macOS and Windows each new worker re-imports
            the application, seconds per worker).
        predict_prompts: prompts for ``mlo predict`` (text generation).
    """

    def __init__(
        self,
        data_files: str | list[str] | None = "data/corpus/python_docs.jsonl",
        dataset_dir: str | None = None,
        hub_dataset: str | None = None,
        dataset_split: str = "train",
        text_field: str = "text",
        text_sample_by: Literal["paragraph", "line", "document"] = "paragraph",
        tokenizer: str = "data/tokenizer",
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 1234,
        shuffle_seed: int = 0,
        num_workers: int = 0,
        predict_prompts: list[str] | None = None,
    ) -> None:
        super().__init__()
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if text_sample_by not in TEXT_SAMPLE_BY:
            raise ValueError(f"text_sample_by={text_sample_by!r} is not one of {TEXT_SAMPLE_BY}")
        if not (
            0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1
        ):
            raise ValueError(
                f"need 0 <= val_fraction, test_fraction and their sum < 1, got {val_fraction}, {test_fraction}"
            )
        # Saved (checkpoints, self.hparams) but not logged: Lightning refuses to log module and
        # datamodule hparams that share a name with different values, and the module's
        # tokenizer may rightly be None (the model's own) or spelled otherwise. The module
        # checks the real consistency (vocabulary, tail layers) in its setup; mlo's HPARAMS
        # tab shows the data settings from the config (callbacks/hparams_summary.py).
        self.save_hyperparameters(logger=False)
        self.block_size, self.batch_size = block_size, batch_size
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.splits: dict[str, torch.Tensor] = {}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer, setting="data.tokenizer")
        return self._tokenizer

    def prepare_data(self) -> None:
        # Local rank 0 tokenizes first so the other ranks read the datasets cache.
        self._build_splits()

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self._build_splits()

    def _build_splits(self) -> None:
        hp = self.hparams
        docs = load_documents(
            hp.data_files, hp.dataset_dir, hp.hub_dataset, hp.text_field, hp.text_sample_by,
            hp.dataset_split,
        )  # fmt: skip
        order = torch.randperm(
            len(docs), generator=torch.Generator().manual_seed(hp.split_seed)
        ).tolist()
        n_val, n_test = round(hp.val_fraction * len(docs)), round(hp.test_fraction * len(docs))
        if hp.val_fraction > 0:
            n_val = max(1, n_val)
        if hp.test_fraction > 0:
            n_test = max(1, n_test)
        if n_val + n_test >= len(docs):
            raise ValueError(
                f"only {len(docs)} documents: too few for the val/test fractions"
                + (
                    f" (text files are cut by text_sample_by={hp.text_sample_by!r})"
                    if hp.data_files is not None and _is_text(hp.data_files)
                    else ""
                )
            )
        parts = {
            "val": order[:n_val],
            "test": order[n_val : n_val + n_test],
            "train": order[n_val + n_test :],
        }
        tokenizer, field = self.tokenizer, hp.text_field
        tokenized = docs.map(
            lambda batch: {"ids": tokenizer(batch[field], add_special_tokens=False)["input_ids"]},
            batched=True,
            remove_columns=docs.column_names,
            desc="tokenizing",
        )
        for name, indices in parts.items():
            if not indices:
                continue
            blocks = pack_blocks(
                tokenized.select(indices)["ids"], self.block_size, tokenizer.eos_token_id
            )
            if not blocks:
                raise ValueError(
                    f"the {name} split has fewer than block_size={self.block_size} tokens: "
                    "lower data.block_size or the split fraction"
                )
            self.splits[name] = torch.tensor(blocks, dtype=torch.long)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.splits:
            raise RuntimeError(f"no {name} split: its fraction is 0 or setup() did not run")
        dataset = PaddedBlocks(self.splits[name])
        kwargs = {
            "batch_size": self.batch_size,
            "num_workers": self.hparams.num_workers,
            "collate_fn": _collate,
            "persistent_workers": self.hparams.num_workers > 0,
        }
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if not shuffle:
            # Every block exactly once over the ranks, the same batch count on every rank.
            sampler = EvenEvalSampler(dataset, world, rank) if world > 1 else None
            # Its iterators do not draw from the global RNG (a validation inside fit shifted
            # the training dropout masks).
            return PrivateSeedDataLoader(dataset, sampler=sampler, **kwargs)
        check_train_batches(len(dataset), self.batch_size, world, self.block_size)
        return resumable_train_loader(
            self, dataset, seed=self.hparams.shuffle_seed, drop_last=True, **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        prompts = self.hparams.predict_prompts
        if not prompts:
            raise ValueError("mlo predict needs prompts: set data.predict_prompts")
        return DataLoader(prompts, batch_size=1, shuffle=False, collate_fn=lambda p: {"prompts": p})


def check_train_batches(n_blocks: int, batch_size: int, world_size: int, block_size: int) -> None:
    """Refuse a train split too small for one full batch on every process.

    The train loader drops the last partial batch, so ``data.batch_size`` above a process's
    share of the blocks left no batch at all: Lightning stopped with "No training batches",
    ``mlo fit`` exited 0 and exported the untrained model.
    """
    if n_blocks // world_size >= batch_size:
        return
    raise ValueError(
        f"the train split has {n_blocks} blocks of block_size={block_size} tokens "
        f"({n_blocks // world_size} per process on {world_size}), fewer than "
        f"data.batch_size={batch_size}: no full batch, nothing would train; lower "
        "data.batch_size or data.block_size, or use more data"
    )


def _collate(rows: list[tuple[torch.Tensor, bool]]) -> dict[str, torch.Tensor]:
    input_ids = torch.stack([ids for ids, _ in rows])
    labels = input_ids.clone()
    labels[torch.tensor([not scored for _, scored in rows])] = IGNORE_INDEX  # padding blocks
    return {"input_ids": input_ids, "labels": labels}


def load_tokenizer(name_or_path: str, setting: str = "tokenizer") -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with a clear error when the directory is missing.

    A pretrained preset name (``modules.pretrained_presets.PRETRAINED_PRESETS``, e.g.
    ``smollm2-135m-instruct``) resolves to its cached directory, built on first use.
    ``setting`` names the config key in errors (``model.tokenizer``, ``data.tokenizer``).
    """
    from modules.pretrained_presets import PRETRAINED_PRESETS, resolve_pretrained_preset

    if name_or_path in PRETRAINED_PRESETS:
        name_or_path = str(resolve_pretrained_preset(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
            # transformers' errors name no setting, and a damaged file not even the file
            broken = malformed_json_file(path)
            cause = f"malformed JSON in {broken}" if broken else f"{type(err).__name__}: {err}"
            raise ValueError(
                f"{setting}: cannot load a tokenizer from {name_or_path!r}: {cause}"
            ) from err
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(
            f"{setting}: no tokenizer directory {name_or_path!r}"
            f"{where_relative_paths_resolve(name_or_path)}, and HF_HUB_OFFLINE=1 rules out a "
            "hub lookup"
        )
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as err:  # transformers' message is about the hub only
            raise OSError(
                f"{setting}: {name_or_path!r} is neither a local directory"
                f"{where_relative_paths_resolve(name_or_path)} nor a loadable hub id: {err}"
            ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
