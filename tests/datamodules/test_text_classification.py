"""The sentiment noisy-label set: grammar, flipped labels, splits (token ids, no LLM needed)."""

from __future__ import annotations

import torch

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
    # right padding: the last real token sits at length - 1, padding after it
    pad = tr["input_ids"][0, tr["length"][0] :]
    assert pad.numel() == 0 or bool((pad == 1).all())


def test_seed_determines_the_draw(tokenizer_dir):
    a, b, c = _dm(tokenizer_dir, 0), _dm(tokenizer_dir, 0), _dm(tokenizer_dir, 1)
    assert torch.equal(a.train_dataset.tensors["sample_id"], b.train_dataset.tensors["sample_id"])
    assert torch.equal(a.noisy_mask, b.noisy_mask)
    assert not torch.equal(
        a.train_dataset.tensors["sample_id"], c.train_dataset.tensors["sample_id"]
    )
