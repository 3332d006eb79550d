"""``PrivateSeedDataLoader`` keeps no ``torch.Generator``, also under Lightning's attribute
recorder (which a dataloader hook that raised leaves installed for the rest of the process)."""

from __future__ import annotations

import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from torch.utils.data import DataLoader

from datamodules.private_seed_loader import PrivateSeedDataLoader


def _generators_in(obj, depth=4) -> int:
    if isinstance(obj, torch.Generator):
        return 1
    if depth == 0:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(_generators_in(item, depth - 1) for item in obj)
    if hasattr(obj, "__dict__"):
        return sum(_generators_in(value, depth - 1) for value in vars(obj).values())
    return 0


def test_iterating_under_lightnings_attribute_recorder_keeps_no_generator():
    data = torch.arange(12.0).unsqueeze(1)
    with _replace_dunder_methods(DataLoader, "dataset"):  # as left behind by a failed hook
        loader = PrivateSeedDataLoader(data, batch_size=4, seed=3)
        first = [batch.clone() for batch in loader]
        second = [batch.clone() for batch in loader]
    assert loader.iterators_made == 2 and loader.generator is None
    assert _generators_in(loader) == 0
    assert getattr(loader, "__pl_attrs_record", []) == []  # nothing recorded to replay
    torch.testing.assert_close(torch.cat(first), data)
    torch.testing.assert_close(torch.cat(second), data)


def test_worker_seeds_follow_the_private_seed_not_the_global_rng():
    loader = PrivateSeedDataLoader(torch.arange(4.0), batch_size=2, seed=3)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    list(loader)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global stream is untouched
