"""``seeded_cpu_init``: a seeded block leaves every global generator as it found it."""

from __future__ import annotations

import pytest
import torch

from ops.seeding import seeded_cpu_init


def test_seeded_block_is_reproducible_and_restores_the_cpu_generator():
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    with seeded_cpu_init(7):
        inside = torch.rand(2)
    torch.testing.assert_close(inside, torch.rand(2, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(torch.rand(3), expected_next)


def test_seeded_block_restores_the_generator_when_it_raises():
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    with pytest.raises(ValueError, match="boom"), seeded_cpu_init(7):
        raise ValueError("boom")
    torch.testing.assert_close(torch.rand(3), expected_next)


def test_seeded_block_queues_no_gpu_seed():
    # torch.manual_seed queues its seed for every GPU (applied when CUDA initializes): the GPU
    # randomness of the run would start from init_seed whatever seed_everything said.
    from torch.cuda import _lazy_seed_tracker

    torch.manual_seed(1234)
    before = _lazy_seed_tracker.get_calls()
    with seeded_cpu_init(7):
        pass
    assert _lazy_seed_tracker.get_calls() == before
