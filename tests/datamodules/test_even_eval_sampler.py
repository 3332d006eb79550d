"""EvenEvalSampler / PaddedBlocks: equal shard lengths, every real block exactly once, padding
marked unscored. Expectations follow the documented contract (datamodules/even_eval_sampler.py):
rank ``r`` of ``W`` reads ``r, r + W, ...`` below ``W * ceil(N / W)``; indices ``>= N`` are padding.
"""

import math
from collections import Counter

import pytest
import torch

from datamodules.even_eval_sampler import EvenEvalSampler, PaddedBlocks, PaddedItems

CASES = [(1, 1), (5, 1), (1, 2), (2, 2), (5, 2), (139, 2), (2, 3), (7, 3), (9, 3), (10, 4), (3, 8)]


def _blocks(n: int, width: int = 3) -> PaddedBlocks:
    # Block i holds i + 1 everywhere: nonzero, so distinguishable from the zero padding block.
    return PaddedBlocks(torch.arange(1, n + 1).unsqueeze(1).repeat(1, width))


@pytest.mark.parametrize(("n", "world"), CASES)
def test_shards_have_equal_lengths_and_cover_every_block_once(n, world):
    dataset = _blocks(n)
    shards = [list(EvenEvalSampler(dataset, world, rank)) for rank in range(world)]
    per_rank = math.ceil(n / world)
    for rank, shard in enumerate(shards):
        assert len(shard) == per_rank  # the same batch count on every rank
        assert len(EvenEvalSampler(dataset, world, rank)) == per_rank
        # Documented order: strided, ascending, no shuffle.
        assert shard == [rank + world * k for k in range(per_rank)]
    everything = [i for shard in shards for i in shard]
    counts = Counter(i for i in everything if i < n)
    assert counts == Counter(range(n))  # every real block exactly once over the ranks
    padding = [i for i in everything if i >= n]
    assert len(padding) == world * per_rank - n < world  # less than one padding index per rank
    assert len(set(padding)) == len(padding)


@pytest.mark.parametrize(("n", "world"), CASES)
def test_padding_indices_read_as_unscored_zero_blocks(n, world):
    dataset = _blocks(n)
    assert len(dataset) == n  # padding indices lie beyond the dataset's own length
    scored = Counter()
    for rank in range(world):
        for i in EvenEvalSampler(dataset, world, rank):
            ids, is_scored = dataset[i]
            assert ids.shape == (3,)
            if i < n:
                assert is_scored and torch.equal(ids, torch.full((3,), i + 1))
                scored[int(ids[0]) - 1] += 1
            else:
                assert not is_scored and torch.equal(ids, torch.zeros(3, dtype=ids.dtype))
    assert scored == Counter(range(n))


def test_order_ignores_epoch_and_seed():
    dataset = _blocks(11)
    sampler = EvenEvalSampler(dataset, 3, 1)
    first = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == first == [1, 4, 7, 10]


def test_padded_items_flag_padding_and_refuse_an_empty_set():
    items = PaddedItems([{"x": 10}, {"x": 11}, {"x": 12}])
    shards = [[items[i] for i in EvenEvalSampler(items, 2, rank)] for rank in range(2)]
    assert shards[0] == [({"x": 10}, True), ({"x": 12}, True)]
    assert shards[1] == [({"x": 11}, True), ({"x": 10}, False)]  # index 3: item 0, unscored
    with pytest.raises(ValueError, match="empty"):
        PaddedItems([])
