"""Pure builders behind ``FederatedTextDataModule``: client templates, canaries, partitions.

Every function is deterministic given its seed, so all ranks and all arms of an experiment see
identical data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from datamodules.synthetic_corpus import Entity, fact_sentences, qa_pairs

_KEYS = ("city", "year", "colour", "product")
TEMPLATE_FAMILIES = ("open", "mcq", "closed")


def _open(e: Entity, i: int, rng: random.Random, entities: Sequence[Entity]) -> tuple[str, str]:
    q, a = qa_pairs(e)[i]
    return f"Open Question: {q} The answer is: ", a


def _mcq(e: Entity, i: int, rng: random.Random, entities: Sequence[Entity]) -> tuple[str, str]:
    q, a = qa_pairs(e)[i]
    options = {a}
    while len(options) < 4:
        options.add(qa_pairs(rng.choice(entities))[i][1])
    ordered = sorted(options)
    rng.shuffle(ordered)
    letters = "ABCD"
    listed = " ".join(f"{letters[j]}) {o}" for j, o in enumerate(ordered))
    return f"MCQ: {q} Options: {listed}. The answer is: ", letters[ordered.index(a)]


def _closed(e: Entity, i: int, rng: random.Random, entities: Sequence[Entity]) -> tuple[str, str]:
    value = e.attributes[_KEYS[i]]
    sentence = fact_sentences(e)[i]
    truthful = rng.random() < 0.5
    if not truthful:
        other = value
        while other == value:
            other = rng.choice(entities).attributes[_KEYS[i]]
        sentence = sentence.replace(value, other)
    return f"Closed Question: {sentence} True? The answer is: ", "yes" if truthful else "no"


_TEMPLATES = {"open": _open, "mcq": _mcq, "closed": _closed}


def synthetic_client_examples(
    entities: Sequence[Entity],
    client_sizes: Sequence[int],
    val_questions_per_client: int,
    heldout_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[list[str]], list[list[tuple[str, str]]]]:
    """Training texts and held-out ``(prompt, answer)`` pairs for each client.

    Client ``c`` uses template family ``TEMPLATE_FAMILIES[c % 3]``. A fraction
    ``heldout_fraction`` of the (entity, attribute) facts is never used for training: the
    held-out questions ask about those facts (utility = answer exact match).
    """
    rng = random.Random(seed)
    facts = [(e, i) for e in entities for i in range(4)]
    rng.shuffle(facts)
    n_held = max(1, round(heldout_fraction * len(facts)))
    held, train = facts[:n_held], facts[n_held:]
    texts, val = [], []
    for c, size in enumerate(client_sizes):
        make = _TEMPLATES[TEMPLATE_FAMILIES[c % len(TEMPLATE_FAMILIES)]]
        crng = random.Random(seed * 1000 + c)
        client = []
        for _ in range(size):
            prompt, answer = make(*crng.choice(train), crng, entities)
            client.append(prompt + answer)
        texts.append(client)
        val.append(
            [make(*crng.choice(held), crng, entities) for _ in range(val_questions_per_client)]
        )
    return texts, val


def proportional_counts(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` items in proportion to ``sizes`` (largest remainder, sums exactly)."""
    if total < 0 or not sizes or any(s < 0 for s in sizes) or sum(sizes) == 0:
        raise ValueError(f"cannot split {total} items over client sizes {list(sizes)}")
    exact = [total * s / sum(sizes) for s in sizes]
    counts = [int(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class CanarySplit:
    """Canary rows after split and replication (each row carries ``canary_id``, ``dup_group``)."""

    train_rows: list[dict] = field(default_factory=list)
    val_rows: list[dict] = field(default_factory=list)
    train_unique: list[dict] = field(default_factory=list)


def build_canary_rows(
    records: Sequence[dict],
    replication: dict[int, float],
    val_fraction: float = 0.0,
    split_after_replication: bool = False,
    seed: int = 42,
) -> CanarySplit:
    """Shuffle, assign duplication groups, split train/val and replicate (spec section 3.1).

    Groups: after a shuffle with ``seed`` the first ``round(f_k * n)`` canaries get factor ``k``
    (largest factor first; the last group takes the remainder). The default splits *by identity
    before replication*; ``split_after_replication=True`` is the official code's 90/10 split of
    the replicated rows, which leaks replicas into validation.
    """
    if abs(sum(replication.values()) - 1.0) > 1e-6 or any(k < 1 for k in replication):
        raise ValueError(
            f"replication {replication} must map factors >= 1 to fractions summing to 1"
        )
    rng = random.Random(seed)
    recs = list(records)
    rng.shuffle(recs)
    factors = sorted(replication, reverse=True)
    counts = proportional_counts(len(recs), [replication[k] for k in factors])
    grouped, start = [], 0
    for k, n in zip(factors, counts, strict=True):
        grouped += [{**r, "dup_group": int(k)} for r in recs[start : start + n]]
        start += n
    out = CanarySplit()
    if split_after_replication:
        rows = [r for r in grouped for _ in range(r["dup_group"])]
        rng.shuffle(rows)
        n_val = round(val_fraction * len(rows))
        out.val_rows, out.train_rows = rows[:n_val], rows[n_val:]
        seen = {}
        for r in out.train_rows:
            seen.setdefault(r["canary_id"], r)
        out.train_unique = sorted(seen.values(), key=lambda r: r["canary_id"])
        return out
    order = list(range(len(grouped)))
    rng.shuffle(order)
    n_val = round(val_fraction * len(grouped))
    val_ids = {grouped[i]["canary_id"] for i in order[:n_val]}
    out.train_unique = [r for r in grouped if r["canary_id"] not in val_ids]
    out.val_rows = [r for r in grouped if r["canary_id"] in val_ids]
    out.train_rows = [r for r in out.train_unique for _ in range(r["dup_group"])]
    rng.shuffle(out.train_rows)
    return out


def partition_indices(
    labels: Sequence[int], num_clients: int, mode: str, alpha: float = 0.5, seed: int = 0
) -> list[list[int]]:
    """IID or Dirichlet(alpha) label-skew partition of ``len(labels)`` items over clients."""
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    if mode == "iid":
        perm = torch.randperm(n, generator=gen).tolist()
        return [perm[c::num_clients] for c in range(num_clients)]
    if mode != "dirichlet":
        raise ValueError(f"partition must be 'iid' or 'dirichlet', got {mode!r}")
    if alpha <= 0:
        raise ValueError(f"dirichlet_alpha must be > 0, got {alpha}")
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    proportions = np.random.default_rng(seed).dirichlet([alpha] * num_clients, len(set(labels)))
    for li, label in enumerate(sorted(set(labels))):
        idx = [i for i, y in enumerate(labels) if y == label]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=gen).tolist()]
        counts = proportional_counts(len(idx), [max(p, 1e-12) for p in proportions[li]])
        start = 0
        for c, k in enumerate(counts):
            parts[c] += idx[start : start + k]
            start += k
    return parts


def pack_sequences(sequences: Sequence[Sequence[int]], length: int, seed: int) -> list[list[int]]:
    """Shuffle token sequences with ``seed``, concatenate them and cut chunks of ``length``.

    This is the packing of the official fine-tuning scripts (seq len 1024 with packing): every
    example, canaries included, lands at an arbitrary offset of a chunk, and chunks start in the
    middle of an example. A model trained on one example per row (always starting at position 0)
    only learns to continue a record from its beginning, so the extraction prompt ``x[s-L:s]``
    would test position-0 behaviour rather than memorization. Sequences should end with the EOS
    separator. The last, shorter chunk is kept so no token is dropped.
    """
    if length < 2:
        raise ValueError(f"packing length must be >= 2, got {length}")
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    stream = [t for i in order for t in sequences[i]]
    return [stream[i : i + length] for i in range(0, len(stream), length)]
