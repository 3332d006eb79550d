"""Federated data: canary replication/split/sharding, partitions, templates (spec section 7)."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from datamodules.federated import CharVocab, FederatedTextDataModule
from datamodules.federated_data import (
    build_canary_rows,
    pack_sequences,
    partition_indices,
    proportional_counts,
)
from datamodules.synthetic_corpus import canary_records


def test_sixty_canaries_give_222_rows_and_group_sizes():
    split = build_canary_rows(canary_records(60), {1: 0.7, 10: 0.3})
    assert len(split.train_rows) == 18 * 10 + 42 == 222
    groups = Counter(r["dup_group"] for r in split.train_unique)
    assert groups == {10: 18, 1: 42}
    per_id = Counter(r["canary_id"] for r in split.train_rows)
    assert all(per_id[r["canary_id"]] == r["dup_group"] for r in split.train_unique)


def test_default_split_by_identity_has_no_leak_and_code_faithful_split_leaks():
    recs = canary_records(60)
    split = build_canary_rows(recs, {1: 0.7, 10: 0.3}, val_fraction=0.1)
    train_ids = {r["canary_id"] for r in split.train_rows}
    val_ids = {r["canary_id"] for r in split.val_rows}
    assert len(val_ids) == 6 and not train_ids & val_ids
    leaky = build_canary_rows(
        recs, {1: 0.7, 10: 0.3}, val_fraction=0.1, split_after_replication=True
    )
    assert {r["canary_id"] for r in leaky.train_rows} & {r["canary_id"] for r in leaky.val_rows}


def test_sharding_is_proportional_and_exact():
    assert proportional_counts(222, [800, 1000, 1200]) == [59, 74, 89]
    assert sum(proportional_counts(7, [1, 1, 1])) == 7
    with pytest.raises(ValueError, match="cannot split"):
        proportional_counts(3, [0, 0])


def test_partitions_cover_everything_once():
    labels = [i % 3 for i in range(300)]
    for mode in ("iid", "dirichlet"):
        parts = partition_indices(labels, 4, mode, alpha=0.3, seed=1)
        flat = sorted(i for p in parts for i in p)
        assert flat == list(range(300))
        assert parts == partition_indices(labels, 4, mode, alpha=0.3, seed=1)
    iid = partition_indices(labels, 4, "iid")
    assert all(len(p) == 75 for p in iid)


def _label_distributions(labels, parts, num_labels):
    """Each non-empty client's label histogram, normalised to a distribution."""
    hists = [np.bincount([labels[i] for i in p], minlength=num_labels) for p in parts]
    return [h / h.sum() for h in hists if h.sum() > 0]


def _total_variation(p, q) -> float:
    return 0.5 * float(np.abs(p - q).sum())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dirichlet_alpha_controls_label_skew(seed):
    """Dirichlet(alpha) label proportions per client: a small alpha concentrates each label on
    few clients (clients dominated by one label, very different label mixes); a large alpha
    gives every client nearly the global mix and an equal share of the data."""
    num_labels = num_clients = 5
    labels = [i % num_labels for i in range(200 * num_labels)]  # global mix: uniform
    uniform = np.full(num_labels, 1 / num_labels)

    skewed = _label_distributions(
        labels, partition_indices(labels, num_clients, "dirichlet", alpha=0.1, seed=seed),
        num_labels,
    )  # fmt: skip
    pairwise = [_total_variation(p, q) for p, q in itertools.combinations(skewed, 2)]
    # Dirichlet(0.1) over 5 clients: the mean TV between two clients' mixes is typically 0.6-0.9;
    # identical mixes (one proportion row reused for every label) would give exactly 0.
    assert np.mean(pairwise) > 0.5
    assert max(float(d.max()) for d in skewed) > 0.8  # some client is dominated by one label

    parts = partition_indices(labels, num_clients, "dirichlet", alpha=1000.0, seed=seed)
    mixed = _label_distributions(labels, parts, num_labels)
    assert len(mixed) == num_clients
    # Dirichlet(1000): each share is 0.2 +- ~0.006, so every mix is within a few % of uniform.
    assert max(_total_variation(d, uniform) for d in mixed) < 0.05
    assert all(abs(len(p) - 200) <= 20 for p in parts)


def test_client_dataloader_shuffles_by_generator_and_covers_the_client_once():
    dm = FederatedTextDataModule(
        client_sizes=[20, 30, 25], num_entities=20, num_canaries=10, batch_size=4,
        val_questions_per_client=2,
    )  # fmt: skip
    dm.setup("fit")
    client = 1
    expected = [tuple(r["input_ids"]) for r in dm.client_rows[client]]

    def epoch(seed: int) -> list[tuple[int, ...]]:
        rows = []
        for batch in dm.client_dataloader(client, torch.Generator().manual_seed(seed)):
            for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
                rows.append(tuple(ids[labels != -100].tolist()))  # drop the right padding
        return rows

    a, b, a_again = epoch(3), epoch(4), epoch(3)
    for order in (a, b):
        assert Counter(order) == Counter(expected)  # every example exactly once per epoch
    assert a == a_again  # the order is fixed by the generator alone
    assert a != b  # and a different generator gives a different order
    assert a != expected and b != expected  # shuffled, not the stored order


def test_datamodule_builds_clients_with_canaries_and_eval_sets():
    dm = FederatedTextDataModule(
        client_sizes=[80, 100, 120], num_entities=50, val_questions_per_client=10
    )
    dm.setup("fit")
    assert dm.num_clients == 3
    assert dm.client_canary_rows == [59, 74, 89]
    assert dm.client_num_samples == [80 + 59, 100 + 74, 120 + 89]
    mem = dm.memorization_set()
    assert len(mem["ids"]) == 60 and Counter(mem["groups"]) == {10: 18, 1: 42}
    vocab = CharVocab()
    assert vocab.decode(mem["ids"][0]).startswith("Medical Note:")
    assert len(dm.val_rows) == 30
    texts = [vocab.decode(dm.client_rows[c][0]["input_ids"]) for c in range(3)]
    assert texts[0].startswith("Open Question:") and texts[1].startswith("MCQ:")
    assert texts[2].startswith("Closed Question:")
    b1 = next(iter(dm.client_dataloader(1, torch.Generator().manual_seed(3))))
    b2 = next(iter(dm.client_dataloader(1, torch.Generator().manual_seed(3))))
    assert torch.equal(b1["input_ids"], b2["input_ids"])
    assert b1["input_ids"].shape[0] == dm.batch_size


def test_char_vocab_round_trip_and_error():
    v = CharVocab()
    assert v.decode(v.encode("MRN 12345678\n")) == "MRN 12345678\n"
    with pytest.raises(ValueError, match="not in CharVocab"):
        v.encode("é")


def test_clients_from_local_files_with_hf_tokenizer(tmp_path, tokenizer_dir):
    import json

    files = []
    for c in range(2):
        path = tmp_path / f"client{c}.jsonl"
        path.write_text(
            "".join(json.dumps({"text": f"client {c} line {i}"}) + "\n" for i in range(5 + c))
        )
        files.append(str(path))
    dm = FederatedTextDataModule(
        source="files", client_files=files, tokenizer=str(tokenizer_dir), num_canaries=4,
        replication={1: 0.5, 10: 0.5},
    )  # fmt: skip
    dm.setup("fit")
    assert dm.num_clients == 2 and sum(dm.client_canary_rows) == 2 * 10 + 2 * 1
    assert dm.vocab.decode(dm.client_rows[0][0]["input_ids"]).startswith("client 0 line 0")
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        FederatedTextDataModule(
            source="files", client_files=[str(tmp_path / "missing.jsonl")]
        ).setup()
    blank = tmp_path / "blank_client.jsonl"
    blank.write_text('{"text": "  "}\n')
    with pytest.raises(ValueError, match=r"blank_client\.jsonl: the corpus is empty"):
        FederatedTextDataModule(source="files", client_files=[files[0], str(blank)]).setup()
    unsupported = tmp_path / "client.csv"  # was silently read as plain text
    unsupported.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported data file type\(s\) \['\.csv'\]"):
        FederatedTextDataModule(source="files", client_files=[str(unsupported)]).setup()


def test_dirichlet_repartition_keeps_every_example():
    dm = FederatedTextDataModule(
        client_sizes=[30, 30, 30], num_entities=20, num_canaries=0, partition="dirichlet",
        dirichlet_alpha=0.2, val_questions_per_client=2,
    )  # fmt: skip
    dm.setup("fit")
    assert sum(dm.client_num_samples) == 90 and dm.client_num_samples != [30, 30, 30]
    by_client = FederatedTextDataModule(
        client_sizes=[30, 30, 30], num_entities=20, num_canaries=0, val_questions_per_client=2,
    )  # fmt: skip
    by_client.setup("fit")

    def examples(rows_per_client):
        return Counter(tuple(r["input_ids"]) for rows in rows_per_client for r in rows)

    assert examples(dm.client_rows) == examples(by_client.client_rows)  # the same examples
    # Label skew: the label is the template family (30 each). Reusing one Dirichlet row for
    # every family would give every client exactly a third of each family.
    shares = []
    for rows in dm.client_rows:
        families = Counter(dm.vocab.decode(r["input_ids"]).split(":")[0] for r in rows)
        if rows:
            shares.append(max(families.values()) / len(rows))
    assert max(shares) >= 0.6


def test_pack_sequences_keeps_every_token_in_chunks_of_the_given_length():
    seqs = [[i] * n + [0] for i, n in enumerate([5, 1, 9, 3, 7], start=1)]  # 0 = EOS separator
    chunks = pack_sequences(seqs, 4, seed=3)
    assert all(len(c) == 4 for c in chunks[:-1]) and 1 <= len(chunks[-1]) <= 4
    stream = [t for c in chunks for t in c]
    assert Counter(stream) == Counter(t for s in seqs for t in s)
    # Examples stay contiguous (only their order is shuffled): the stream splits back at EOS.
    examples, current = [], []
    for t in stream:
        current.append(t)
        if t == 0:
            examples.append(current)
            current = []
    assert sorted(examples) == sorted(seqs) and examples != seqs
    assert pack_sequences(seqs, 4, seed=3) == chunks and pack_sequences(seqs, 4, seed=4) != chunks
    with pytest.raises(ValueError, match="packing length"):
        pack_sequences(seqs, 1, seed=0)


def test_packed_clients_hold_the_same_tokens_as_unpacked_ones():
    kwargs = dict(client_sizes=[20, 25, 30], num_entities=20, num_canaries=10,
                  val_questions_per_client=2)  # fmt: skip
    plain, packed = (
        FederatedTextDataModule(**kwargs),
        FederatedTextDataModule(**kwargs, packing_length=64),
    )
    plain.setup("fit")
    packed.setup("fit")
    for rows, chunks in zip(plain.client_rows, packed.client_rows, strict=True):
        assert Counter(t for r in rows for t in r["input_ids"]) == Counter(
            t for r in chunks for t in r["input_ids"]
        )
        assert all(len(r["input_ids"]) <= 64 and r["labels"] == r["input_ids"] for r in chunks)
    assert packed.client_canary_rows == plain.client_canary_rows


def test_held_out_labels_cover_exactly_the_answer_with_a_bpe_tokenizer(tokenizer_dir):
    from datamodules.federated_data import synthetic_client_examples
    from datamodules.synthetic_corpus import entity_table

    dm = FederatedTextDataModule(
        client_sizes=[10, 10, 10], num_entities=20, val_questions_per_client=10,
        num_canaries=0, tokenizer=str(tokenizer_dir),
    )  # fmt: skip
    dm.build()
    _, val = synthetic_client_examples(entity_table(20, 0), [10, 10, 10], 10, seed=0)
    pairs = [qa for client in val for qa in client]
    merged = 0
    for row, (question, answer) in zip(dm.val_rows, pairs, strict=True):
        scored = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label >= 0]
        assert scored[-1] == dm.vocab.eos_token_id
        # The scored tokens spell the answer; BPE may carry the prompt's trailing space with it.
        assert dm.vocab.decode(scored[:-1]).strip() == answer
        merged += dm.vocab.prompt_tokens(question, question + answer) < len(
            dm.vocab.encode(question)
        )
    assert merged > 0  # the case that counting the prompt's own tokens got wrong


@pytest.mark.parametrize("key", ["num_rounds", "batch_size", "max_length"])
def test_sizes_below_one_are_refused(key):
    with pytest.raises(ValueError, match=f"{key} must be >= 1, got 0"):
        FederatedTextDataModule(**{key: 0})


def test_code_faithful_canary_split_needs_a_validation_fraction():
    with pytest.raises(ValueError, match="canary_val_fraction"):
        FederatedTextDataModule(canary_split_after_replication=True)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"client_sizes": []}, r"client_sizes=\[\] names no client"),
        ({"num_canaries": -1}, r"num_canaries must be >= 0 .*got -1"),
    ],
)
def test_no_clients_or_negative_canaries_are_refused(setting, message):
    # [] was read as unset (three default clients) and -1 as no canaries, without a word
    with pytest.raises(ValueError, match=message):
        FederatedTextDataModule(**setting)
