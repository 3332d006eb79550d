"""The sentiment noisy-label set: grammar, flipped labels, splits (token ids, no LLM needed)."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from datamodules.text_classification import SentimentNoisyDataModule, sentiment_pool


def test_pool_is_distinct_balanced_english():
    pool = sentiment_pool()
    texts = [t for t, _ in pool]
    assert len(pool) == 2000 and len(set(texts)) == 2000
    assert sum(label for _, label in pool) == 1000
    assert ("The hotel room was excellent, and I would happily recommend it.", 1) in pool
    assert ("This laptop was awful; one star.", 0) in pool


def _dm(tokenizer_dir, seed: int) -> SentimentNoisyDataModule:
    dm = SentimentNoisyDataModule(
        tokenizer=str(tokenizer_dir), n_train=40, n_val=10, seed=seed, frozen_prefix_model=None
    )
    dm.setup("fit")
    return dm


def test_exactly_twenty_percent_of_training_labels_flipped(tokenizer_dir):
    dm = _dm(tokenizer_dir, seed=3)
    tr, va = dm.train_dataset.tensors, dm.val_dataset.tensors
    assert int(dm.noisy_mask.sum()) == 8
    flipped = tr["y"] != dm.clean_train_labels
    assert torch.equal(flipped, dm.noisy_mask)
    pool = sentiment_pool()
    assert [pool[i][1] for i in va["sample_id"].tolist()] == va["y"].tolist()  # val clean
    assert not set(tr["sample_id"].tolist()) & set(va["sample_id"].tolist())


def test_every_row_is_its_sentence_right_padded(tokenizer_dir):
    """Each row holds its own sentence's tokens, then pad ids up to the batch width; ``length``
    is the count of real tokens (checked against an independent tokenization of the pool)."""
    dm = _dm(tokenizer_dir, seed=3)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    pad_id = tokenizer.pad_token_id
    assert pad_id is not None
    pool = sentiment_pool()
    padded_rows, widths, lengths_seen = 0, set(), []
    for split in (dm.train_dataset.tensors, dm.val_dataset.tensors):
        ids, lengths = split["input_ids"], split["length"]
        widths.add(ids.shape[1])
        for row, n, sample in zip(ids, lengths.tolist(), split["sample_id"].tolist(), strict=True):
            expected = tokenizer(pool[sample][0])["input_ids"]
            assert n == len(expected)
            assert row[:n].tolist() == expected
            assert (row[n:] == pad_id).all()
            padded_rows += n < ids.shape[1]
            lengths_seen.append(n)
    # one padded batch: the width is the longest sentence, and shorter rows really are padded
    assert widths == {max(lengths_seen)}
    assert padded_rows > 0


def test_seed_determines_the_draw(tokenizer_dir):
    a, b, c = _dm(tokenizer_dir, 0), _dm(tokenizer_dir, 0), _dm(tokenizer_dir, 1)
    assert torch.equal(a.train_dataset.tensors["sample_id"], b.train_dataset.tensors["sample_id"])
    assert torch.equal(a.noisy_mask, b.noisy_mask)
    assert not torch.equal(
        a.train_dataset.tensors["sample_id"], c.train_dataset.tensors["sample_id"]
    )


def test_training_order_depends_on_seed_and_epoch_only(tokenizer_dir):
    # it came from the global RNG, which a checkpoint does not restore: a resumed run trained
    # on other batches than an uninterrupted one
    def first_epoch_ids(seed):
        dm = _dm(tokenizer_dir, seed=0)
        torch.manual_seed(seed)  # the global RNG must not matter
        return torch.cat([b["sample_id"] for b in dm.train_dataloader()])

    order = first_epoch_ids(1)
    assert torch.equal(order, first_epoch_ids(2))
    assert sorted(order.tolist()) != order.tolist()  # still shuffled
