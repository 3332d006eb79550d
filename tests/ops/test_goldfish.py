"""Goldfish loss masks (spec section 7, Goldfish)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ops.goldfish import TABLE_SIZE, goldfish_cross_entropy, goldfish_drop_mask, goldfish_table


def _ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 100, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_mask_is_deterministic_across_calls_and_rows():
    ids = _ids(4, 64)
    m1 = goldfish_drop_mask(ids, k=4, h=13)
    assert torch.equal(m1, goldfish_drop_mask(ids, k=4, h=13))
    stacked = torch.cat([ids[:1], ids[:1]], 0)
    m2 = goldfish_drop_mask(stacked, k=4, h=13)
    assert torch.equal(m2[0], m2[1]) and torch.equal(m2[0], m1[0])
    # Depends only on the h-token window: a shifted copy gets the shifted mask.
    shifted = torch.cat([torch.tensor([[7, 8, 9]]), ids[:1]], 1)
    assert torch.equal(goldfish_drop_mask(shifted, 4, 13)[0, 3 + 12 :], m1[0, 12:])


def test_drop_rate_within_4_sigma_of_one_over_k():
    k, h = 4, 13
    mask = goldfish_drop_mask(_ids(64, 512, seed=1), k=k, h=h)
    n = mask[:, h - 1 :].numel()
    rate = float(mask[:, h - 1 :].float().mean())
    assert abs(rate - 1 / k) <= 4 * math.sqrt((1 / k) * (1 - 1 / k) / n)


def test_first_positions_never_dropped_and_static_positions():
    h = 5
    mask = goldfish_drop_mask(_ids(32, 40), k=1.5, h=h)
    assert not bool(mask[:, : h - 1].any())
    static = goldfish_drop_mask(_ids(1, 10), k=3, strategy="static")
    assert static[0].nonzero().flatten().tolist() == [2, 5, 8]
    static0 = goldfish_drop_mask(_ids(1, 10), k=3, strategy="static", start=0)
    assert static0[0].nonzero().flatten().tolist() == [0, 3, 6, 9]


def _passage_in_row(passage: torch.Tensor, filler: torch.Tensor, offset: int, length: int):
    """A packed row of ``length`` tokens in which ``passage`` starts at ``offset`` (< 0: the row
    starts mid-passage, as a chunk boundary cuts it)."""
    stream = torch.cat([filler, passage, filler])
    start = len(filler) - offset
    return stream[start : start + length]


def test_incomplete_window_drop_closes_the_packed_row_leak():
    """A replicated passage cut by a row boundary at different offsets (what packing does to a
    x10 canary): with ``drop`` every passage token is either masked exactly as in the passage's
    own hash or left out of the loss, so no replica supervises a hash-dropped token; with
    ``keep`` (reference) the row's first h-1 tokens are trained, and the replicas that straddle a
    boundary together supervise hash-dropped tokens."""
    k, h, length = 4, 13, 48
    gen = torch.Generator().manual_seed(3)
    passage = torch.randint(2, 100, (40,), generator=gen)
    filler = torch.randint(2, 100, (length,), generator=gen)
    own = goldfish_drop_mask(passage, k, h)  # positions >= h-1 of the passage
    hash_dropped = {p for p in range(h - 1, len(passage)) if own[p]}
    assert hash_dropped
    leaked = {"keep": set(), "drop": set()}
    for offset in range(-30, 0):  # the row starts 1..30 tokens into the passage
        row = _passage_in_row(passage, filler, offset, length)
        for mode in leaked:
            mask = goldfish_drop_mask(row, k, h, incomplete_window=mode)
            for p in hash_dropped:
                t = p + offset  # position of passage token p in the row
                if 0 <= t < length and not mask[t]:
                    leaked[mode].add(p)
    assert leaked["drop"] == set()
    assert leaked["keep"] == hash_dropped  # every hash-dropped token is trained by some replica
    mask = goldfish_drop_mask(_ids(2, 30), k, h, incomplete_window="drop")
    assert bool(mask[:, : h - 1].all())
    with pytest.raises(ValueError, match="incomplete_window"):
        goldfish_drop_mask(_ids(1, 30), k, h, incomplete_window="skip")


def test_wrapping_product_matches_mod_product_when_no_overflow():
    ids = torch.randint(2, 5, (3, 30), generator=torch.Generator().manual_seed(2))
    a = goldfish_drop_mask(ids, k=4, h=4, hash_mode="mod_product")
    b = goldfish_drop_mask(ids, k=4, h=4, hash_mode="wrapping_product")
    assert torch.equal(a, b)


def test_k_infinite_is_plain_cross_entropy_and_dropped_tokens_get_no_gradient():
    logits = torch.randn(2, 20, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 20))
    targets[0, :3] = -100
    mask = goldfish_drop_mask(targets.clamp(min=0), k=float("inf"))
    plain = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(goldfish_cross_entropy(logits, targets, mask), plain)
    mask = goldfish_drop_mask(targets.clamp(min=0), k=2, strategy="static")
    goldfish_cross_entropy(logits, targets, mask).backward()
    assert float(logits.grad[mask].abs().sum()) == 0.0


def test_bad_k_raises():
    with pytest.raises(ValueError, match="k must be"):
        goldfish_drop_mask(_ids(1, 10), k=0.5)


def test_hash_window_ends_at_the_target_token():
    # A 7-entry table where only key 6 is below 1/k = 0.5. With h = 2 the key of target t is
    # ids[t-1] * ids[t] mod 7 = 2, 6, 3, 1 for t = 1..4: only t = 2 is dropped (a window ending
    # one token early would drop t = 3 instead).
    table = torch.full((7,), 0.9)
    table[6] = 0.0
    mask = goldfish_drop_mask(torch.tensor([1, 2, 3, 1, 1]), k=2, h=2, table=table)
    assert mask.tolist() == [False, False, True, False, False]


def test_mask_equals_a_loop_over_the_spec_formula():
    # Spec 3.4d: drop target t iff table[prod(y_{t-h+1..t}) mod P] < 1/k; the first h - 1
    # targets of a row have no full window and are kept ("keep").
    table = goldfish_table()
    ids = torch.randint(2, 100, (3, 40), generator=torch.Generator().manual_seed(0))
    for h in (4, 13):
        mask = goldfish_drop_mask(ids, k=4, h=h)
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                expected = False
                if t >= h - 1:
                    key = 1
                    for u in range(t - h + 1, t + 1):
                        key = key * int(ids[b, u]) % TABLE_SIZE
                    expected = bool(table[key] < 0.25)
                assert bool(mask[b, t]) == expected, (h, b, t)


def test_hash_table_is_the_reference_seeded_table_and_the_mask_is_pinned():
    # Compatibility with the official Goldfish hashing (spec lora-fl-memorization.md 3.4d): the
    # table is P = 1_000_003 uniforms from a CPU torch.Generator seeded 2971215073. The spec
    # gives no reference mask, so the table is rebuilt here from the spec's literal constants.
    spec_table = torch.rand(1_000_003, generator=torch.Generator().manual_seed(2971215073))
    assert TABLE_SIZE == 1_000_003
    assert torch.equal(goldfish_table(), spec_table)
    # Golden value (pinned, not derived): the dropped positions for ids 1..59, k = 4, h = 13, as
    # produced by that table with torch 2.13 (CPU mt19937 stream). Any change to the seed, the
    # table size, the key or the window silently changes which canary tokens are trained, i.e.
    # breaks compatibility with masks of the reference code; 11 of the 47 full windows
    # (~ 47/4) are dropped and none of the first h - 1 = 12 positions.
    mask = goldfish_drop_mask(torch.arange(1, 60), k=4, h=13)
    assert mask.nonzero().flatten().tolist() == [18, 21, 32, 33, 40, 45, 49, 52, 54, 56, 57]
