import json

import datasets
import pytest
import torch

from datamodules.text import TextDataModule, pack_blocks, validate_jsonl


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _corpus(tmp_path, n_docs=40):
    texts = [
        f"Document {i} talks about lists, loops and functions number {i}. " * 6
        for i in range(n_docs)
    ]
    return _write_jsonl(tmp_path / "corpus.jsonl", texts)


def test_pack_blocks_joins_with_eos_and_drops_tail():
    blocks = pack_blocks([[1, 2, 3], [4, 5]], block_size=3, eos_id=0)
    assert blocks == [[1, 2, 3], [0, 4, 5]]  # stream 1 2 3 0 4 5 0 -> tail [0] dropped


def test_bundled_corpus_splits_are_disjoint_and_deterministic(corpus_file, tokenizer_dir):
    dm = TextDataModule(
        data_files=str(corpus_file), tokenizer=str(tokenizer_dir), block_size=64, batch_size=4
    )
    dm.setup("fit")
    again = TextDataModule(
        data_files=str(corpus_file), tokenizer=str(tokenizer_dir), block_size=64, batch_size=4
    )
    again.setup("fit")
    for name in ("train", "val", "test"):
        assert torch.equal(dm.splits[name], again.splits[name])
        assert dm.splits[name].shape[1] == 64
    train_rows = {tuple(r.tolist()) for r in dm.splits["train"]}
    assert not train_rows & {tuple(r.tolist()) for r in dm.splits["val"]}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64)
    assert torch.equal(batch["input_ids"], batch["labels"])


@pytest.mark.parametrize("suffix", [".parquet", ".txt"])
def test_other_formats_and_saved_datasets(tmp_path, tokenizer_dir, suffix):
    texts = [f"Line {i} of a plain text corpus about Python generators." * 4 for i in range(30)]
    ds = datasets.Dataset.from_dict({"text": texts})
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        path.write_text("\n".join(texts) + "\n")
    dm = TextDataModule(
        data_files=str(path), tokenizer=str(tokenizer_dir), block_size=32, batch_size=2
    )
    dm.setup("fit")
    assert len(dm.splits["train"]) > 0
    ds.save_to_disk(str(tmp_path / "saved"))
    dm = TextDataModule(
        data_files=None,
        dataset_dir=str(tmp_path / "saved"),
        tokenizer=str(tokenizer_dir),
        block_size=32,
    )
    dm.setup("fit")
    assert len(dm.splits["train"]) > 0


def test_missing_file_names_the_path(tmp_path, tokenizer_dir):
    dm = TextDataModule(data_files=str(tmp_path / "nope.jsonl"), tokenizer=str(tokenizer_dir))
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        dm.setup("fit")


def test_malformed_jsonl_reports_line_number(tmp_path, tokenizer_dir):
    path = _corpus(tmp_path)
    lines = path.read_text().splitlines()
    lines[6] = '{"text": "unterminated'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:7: malformed JSON"):
        validate_jsonl(path, "text")
    dm = TextDataModule(data_files=str(path), tokenizer=str(tokenizer_dir))
    with pytest.raises(ValueError, match=":7:"):
        dm.setup("fit")


def test_missing_text_field_and_empty_corpus(tmp_path, tokenizer_dir):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "x"}\n')
    with pytest.raises(KeyError, match=r"c\.jsonl:1: record has no text field 'text'"):
        TextDataModule(data_files=str(path), tokenizer=str(tokenizer_dir)).setup("fit")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        TextDataModule(data_files=str(empty), tokenizer=str(tokenizer_dir)).setup("fit")
    blank = _write_jsonl(tmp_path / "blank.jsonl", ["   ", ""])
    with pytest.raises(ValueError, match="empty"):
        TextDataModule(data_files=str(blank), tokenizer=str(tokenizer_dir)).setup("fit")


def test_invalid_arguments(tokenizer_dir):
    with pytest.raises(ValueError, match="block_size"):
        TextDataModule(block_size=1)
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        TextDataModule(data_files=None, tokenizer=str(tokenizer_dir)).setup("fit")
