"""Sentiment data pieces: how many labels a rate flips, the pool-size limit, and the dataset's
length check."""

from __future__ import annotations

import pytest
import torch

from datamodules.text_classification import (
    SentimentNoisyDataModule,
    TensorDictDataset,
    flip_binary,
)


def test_the_flipped_count_is_rounded_to_nearest():
    mask = flip_binary(torch.zeros(9), 0.3, torch.Generator().manual_seed(0))  # 2.7 -> 3
    assert int(mask.sum()) == 3


def test_more_sentences_than_the_pool_holds_are_refused():
    # 20 subjects x 10 opinions x 5 endings, positive and negative: 2000 sentences
    dm = SentimentNoisyDataModule(n_train=1990, n_val=11, frozen_prefix_model=None)
    with pytest.raises(ValueError, match=r"n_train \+ n_val = 2001 > pool size 2000"):
        dm.setup()


def test_tensors_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="tensors of different lengths"):
        TensorDictDataset({"a": torch.zeros(3), "b": torch.zeros(4)})
