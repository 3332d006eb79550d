import itertools
import json
import re
import shutil
from collections import Counter

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from datamodules.file_checks import count_json_records
from datamodules.text import TextDataModule, _collate, load_tokenizer, pack_blocks


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


def _split_documents(blocks, eos_id):
    """The documents of one packed split: the token runs ended by EOS, and the cut-off tail."""
    docs, current = [], []
    for token in blocks.flatten().tolist():
        if token == eos_id:
            docs.append(tuple(current))
            current = []
        else:
            current.append(token)
    return docs, tuple(current)


def _assert_document_partition(splits, texts, tokenizer, block_size):
    """Check that the packed splits are a partition of the documents ``texts``.

    The expectation is rebuilt from the raw texts with the tokenizer alone: every EOS-ended run
    of a split is a whole document, no document is used twice (within or across splits), and
    the only documents missing are the ones cut off by dropping each split's last partial block
    (fewer than ``block_size`` tokens per split). Returns the documents of each split.
    """
    corpus = Counter(tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    found, used, tails = {}, Counter(), []
    for name, blocks in splits.items():
        assert blocks.shape[1] == block_size
        docs, tail = _split_documents(blocks, tokenizer.eos_token_id)
        assert docs, f"{name}: no whole document"
        assert all(d in corpus for d in docs), f"{name}: a run that is not a corpus document"
        found[name] = docs
        used += Counter(docs)
        tails.append(tail)
    assert not used - corpus, "a document appears in two splits (or twice in one)"
    missing = list((corpus - used).elements())
    assert len(missing) <= len(splits)  # at most the last document of each split
    for tail in tails:  # a cut-off tail is the start of a missing document
        assert not tail or any(d[: len(tail)] == tail for d in missing)
    dropped = sum(len(d) + 1 for d in missing) - sum(len(t) for t in tails)
    assert 0 <= dropped < len(splits) * block_size
    return found


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
    texts = [json.loads(line)["text"] for line in corpus_file.read_text().splitlines()]
    texts = [t for t in texts if t.strip()]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    found = _assert_document_partition(dm.splits, texts, tokenizer, 64)
    # Pairwise disjoint at the document level (documents that occur once in the corpus; a
    # duplicated text may legitimately sit in two splits).
    counts = Counter(tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    unique = {name: {d for d in docs if counts[d] == 1} for name, docs in found.items()}
    for a, b in itertools.combinations(("train", "val", "test"), 2):
        assert not unique[a] & unique[b], f"{a} and {b} share documents"
    # val and test hold about 5% of the documents each (the last one may be cut off).
    for name in ("val", "test"):
        assert abs(len(found[name]) - 0.05 * len(texts)) <= 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64)
    assert torch.equal(batch["input_ids"], batch["labels"])


@pytest.mark.parametrize("suffix", [".parquet", ".txt"])
def test_other_formats_and_saved_datasets(tmp_path, tokenizer_dir, suffix):
    texts = [
        f"Paragraph {i} of a plain text corpus\nabout Python generators." * 4 for i in range(30)
    ]
    ds = datasets.Dataset.from_dict({"text": texts})
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".parquet":
        ds.to_parquet(str(path))
    else:  # documents are paragraphs: separated by blank lines, their line breaks kept
        path.write_text("\n\n".join(texts) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dm = TextDataModule(
        data_files=str(path), tokenizer=str(tokenizer_dir), block_size=32, batch_size=2
    )
    dm.setup("fit")
    assert set(dm.splits) == {"train", "val", "test"}
    _assert_document_partition(dm.splits, texts, tokenizer, 32)
    ds.save_to_disk(str(tmp_path / "saved"))
    dm = TextDataModule(
        data_files=None,
        dataset_dir=str(tmp_path / "saved"),
        tokenizer=str(tokenizer_dir),
        block_size=32,
        val_fraction=0,
        test_fraction=0,
    )
    dm.setup("fit")
    assert set(dm.splits) == {"train"}
    # One split holding everything: exactly the whole blocks of all documents + EOS each.
    total = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    assert dm.splits["train"].numel() == total // 32 * 32
    _assert_document_partition(dm.splits, texts, tokenizer, 32)


def test_missing_file_names_the_path(tmp_path, tokenizer_dir, monkeypatch):
    dm = TextDataModule(data_files=str(tmp_path / "nope.jsonl"), tokenizer=str(tokenizer_dir))
    with pytest.raises(FileNotFoundError, match=r"^data_files: no file matches '.*nope\.jsonl'$"):
        dm.setup("fit")
    # A relative path says where it was looked for (runs started outside the repository).
    monkeypatch.chdir(tmp_path)
    dm = TextDataModule(data_files="data/nope.jsonl", tokenizer=str(tokenizer_dir))
    with pytest.raises(FileNotFoundError, match=f"looked for in the current directory {tmp_path}"):
        dm.setup("fit")
    dm = TextDataModule(data_files=None, dataset_dir="saved", tokenizer=str(tokenizer_dir))
    with pytest.raises(FileNotFoundError, match=r"dataset_dir: no directory 'saved' \(looked for"):
        dm.setup("fit")


def test_missing_tokenizer_names_the_setting_and_the_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = re.escape(f"(looked for in the current directory {tmp_path}: relative paths")
    missing = f"^data.tokenizer: no tokenizer directory 'data/tokenizer' {where}"
    with pytest.raises(FileNotFoundError, match=missing):
        TextDataModule(tokenizer="data/tokenizer").tokenizer  # noqa: B018 (loads lazily)
    # Online, a name that is no local directory is tried on the hub; transformers' error then
    # speaks of the hub only, so the local lookup is named too.
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable_hub(name, *args, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", unreachable_hub)
    with pytest.raises(
        OSError,
        match=f"^model.tokenizer: 'data/tokenizer' is neither a local directory {where}.* nor a loadable hub id: We",
    ):
        load_tokenizer("data/tokenizer", setting="model.tokenizer")


def test_a_damaged_tokenizer_file_is_named_with_the_setting(tmp_path, tokenizer_dir):
    # json's error from inside transformers named a line of no file and no setting.
    damaged = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, damaged)
    text = (damaged / "tokenizer.json").read_text()
    (damaged / "tokenizer.json").write_text(text[: len(text) // 2])
    message = (
        r"^data\.tokenizer: cannot load .*malformed JSON in .*tokenizer\.json: line \d+ column"
    )
    with pytest.raises(ValueError, match=message):
        TextDataModule(tokenizer=str(damaged)).tokenizer  # noqa: B018 (loads lazily)
    (damaged / "tokenizer.json").unlink()  # no file to blame: transformers' own error
    with pytest.raises(ValueError, match=r"^model\.tokenizer: cannot load .*: ValueError: "):
        load_tokenizer(str(damaged), setting="model.tokenizer")


def test_malformed_jsonl_reports_line_number(tmp_path, tokenizer_dir):
    path = _corpus(tmp_path)
    lines = path.read_text().splitlines()
    lines[6] = '{"text": "unterminated'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:7: malformed JSON"):
        count_json_records(path, "text")
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
    with pytest.raises(ValueError, match=r"blank\.jsonl: the corpus is empty"):
        TextDataModule(data_files=str(blank), tokenizer=str(tokenizer_dir)).setup("fit")


def test_a_json_array_file_loads_like_json_lines(tmp_path, tokenizer_dir):
    docs = [f"Array document {i} about dictionaries and sets. " * 6 for i in range(40)]
    array = tmp_path / "corpus.json"
    array.write_text(json.dumps([{"text": t} for t in docs], indent=2))
    assert count_json_records(array, "text") == 40
    from_array = TextDataModule(data_files=str(array), tokenizer=str(tokenizer_dir), block_size=32)
    from_lines = TextDataModule(
        data_files=str(_write_jsonl(tmp_path / "corpus.jsonl", docs)),
        tokenizer=str(tokenizer_dir), block_size=32,
    )  # fmt: skip
    from_array.setup("fit")
    from_lines.setup("fit")
    assert all(torch.equal(from_array.splits[k], from_lines.splits[k]) for k in from_lines.splits)
    array.write_text('[{"text": "a"},\n {"body": "b"}]')
    with pytest.raises(KeyError, match=r"corpus\.json: record 1: record has no text field 'text'"):
        count_json_records(array, "text")
    array.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(ValueError, match=r"corpus\.json:2: malformed JSON array"):
        count_json_records(array, "text")


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_byte_that_is_not_utf8_names_file_and_line(tmp_path, tokenizer_dir, suffix):
    path = tmp_path / f"bad{suffix}"
    good = json.dumps({"text": "fine"}) if suffix == ".jsonl" else "fine"
    path.write_bytes(f"{good}\n{good}\n".encode() + b"\xff\xfe" + f"{good}\n".encode())
    dm = TextDataModule(data_files=str(path), tokenizer=str(tokenizer_dir))
    with pytest.raises(
        ValueError, match=rf"bad\{suffix}:3: not UTF-8 text \(byte 0xff at column 1\)"
    ):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.txt", b"\n   \n", r"notes\.txt: the corpus is empty"),
        ("broken.parquet", b"PAR1 not parquet", r"could not read data_files .*broken\.parquet"),
    ],
)
def test_an_empty_or_unreadable_file_is_named(tmp_path, tokenizer_dir, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        TextDataModule(data_files=str(path), tokenizer=str(tokenizer_dir)).setup("fit")


def test_invalid_arguments(tokenizer_dir):
    with pytest.raises(ValueError, match="block_size"):
        TextDataModule(block_size=1)
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        TextDataModule(data_files=None, tokenizer=str(tokenizer_dir)).setup("fit")


def test_a_batch_larger_than_the_train_split_is_refused(tmp_path, tokenizer_dir):
    # drop_last left no batch: the fit "succeeded" (exit 0) without a single training step.
    dm = TextDataModule(
        data_files=str(_corpus(tmp_path)), tokenizer=str(tokenizer_dir), block_size=32, batch_size=4
    )
    dm.setup("fit")
    n_blocks = len(dm.splits["train"])
    dm.batch_size = n_blocks + 1
    message = (
        rf"train split has {n_blocks} blocks of block_size=32 .* data\.batch_size={n_blocks + 1}"
    )
    with pytest.raises(ValueError, match=message):
        dm.train_dataloader()
    dm.batch_size = n_blocks  # exactly one full batch is enough
    assert len(dm.train_dataloader()) == 1


def test_text_files_split_by_paragraph_line_or_file(tmp_path, tokenizer_dir):
    """A paragraph is one document by default: its line breaks reach the model and no
    paragraph straddles two splits (one document per line dropped every line break and
    drew validation lines from the middle of training paragraphs)."""
    paragraphs = [f"Paragraph {i} starts here,\ngoes on\nand ends with {i}." for i in range(40)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1

    dm = TextDataModule(data_files=str(path), tokenizer=str(tokenizer_dir), block_size=16)
    dm.setup("fit")
    _assert_document_partition(dm.splits, paragraphs, tokenizer, 16)
    assert (dm.splits["train"] == newline[0]).sum() > 0

    lines = [line for p in paragraphs for line in p.split("\n")]
    by_line = TextDataModule(  # blocks shorter than a line: a dropped tail holds no whole line
        data_files=str(path), tokenizer=str(tokenizer_dir), block_size=4, text_sample_by="line"
    )
    by_line.setup("fit")
    _assert_document_partition(by_line.splits, lines, tokenizer, 4)

    with pytest.raises(ValueError, match=r"only 1 documents.*text_sample_by"):
        TextDataModule(
            data_files=str(path), tokenizer=str(tokenizer_dir), text_sample_by="document"
        ).setup("fit")
    with pytest.raises(ValueError, match="text_sample_by"):
        TextDataModule(text_sample_by="sentence")


def test_a_saved_dataset_dict_uses_one_split(tmp_path, tokenizer_dir):
    """Only ``dataset_split`` of a saved ``DatasetDict`` is read: its other splits (an upstream
    test set) never reach training, and a missing split is named with the ones there are."""
    train = [f"Training document {i} about loops and lists." * 3 for i in range(30)]
    held_out = [f"HELDOUT upstream test document {i}." * 3 for i in range(10)]
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": train}),
        test=datasets.Dataset.from_dict({"text": held_out}),
    ).save_to_disk(str(saved))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dm = TextDataModule(
        data_files=None, dataset_dir=str(saved), tokenizer=str(tokenizer_dir), block_size=16
    )
    dm.setup("fit")
    _assert_document_partition(dm.splits, train, tokenizer, 16)

    with pytest.raises(ValueError, match=r"dataset_split='validation'.*\['test', 'train'\]"):
        TextDataModule(
            data_files=None,
            dataset_dir=str(saved),
            dataset_split="validation",
            tokenizer=str(tokenizer_dir),
        ).setup("fit")


def test_padding_blocks_are_not_scored():
    # A rank's padding block (EvenEvalSampler pads the last batch so every rank has as many
    # batches) must add nothing to the loss: its labels are all ignored (-100).
    batch = _collate([(torch.tensor([5, 6, 7]), True), (torch.zeros(3, dtype=torch.long), False)])
    assert batch["labels"][0].tolist() == [5, 6, 7]
    assert batch["labels"][1].tolist() == [-100, -100, -100]
