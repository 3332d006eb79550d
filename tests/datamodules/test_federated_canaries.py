"""Canary plumbing of the federated data module: sharding, held-out canaries, memorization set,
held-out QA facts and the code-faithful split (spec lora-fl-memorization, sections 3.1 and 4.2).

Expected numbers are derived by hand from the documented rules: duplication groups take
``round(f_k * n)`` canaries (largest factor first), the split is by canary identity before
replication (``round(val_fraction * n)`` held out), and rows are shared over clients in proportion
to their sizes with largest remainders (``proportional_counts``).
"""

from __future__ import annotations

from collections import Counter

from datamodules.federated import FederatedTextDataModule
from datamodules.federated_data import build_canary_rows, synthetic_client_examples
from datamodules.synthetic_corpus import canary_records, entity_table, fact_sentences, qa_pairs

SIZES = [24, 30, 36]  # three clients of different sizes (90 examples)


def _dm(num_canaries: int, val_fraction: float = 0.0) -> FederatedTextDataModule:
    dm = FederatedTextDataModule(
        client_sizes=SIZES, num_entities=20, val_questions_per_client=4,
        num_canaries=num_canaries, canary_val_fraction=val_fraction, batch_size=8,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def test_every_training_canary_lands_in_the_clients_exactly_its_group_count_times():
    # 10 canaries, {1: .7, 10: .3}: 3 canaries x 10 + 7 x 1 = 37 training rows. Shares of 37
    # over sizes 24/30/36: exact 9.87, 12.33, 14.8 -> floors 9, 12, 14 (35); the two largest
    # remainders (.87 client 0, .8 client 2) get one more -> [10, 12, 15].
    dm = _dm(10)
    texts = {r["text"]: r["canary_id"] for r in canary_records(10, 42)}
    groups = {r["canary_id"]: r["dup_group"] for r in dm.canaries.train_unique}
    assert Counter(groups.values()) == {10: 3, 1: 7}
    per_client = [Counter() for _ in SIZES]
    for c, rows in enumerate(dm.client_rows):
        for r in rows:
            text = dm.vocab.decode(r["input_ids"])
            if text in texts:
                per_client[c][texts[text]] += 1
    assert [sum(cnt.values()) for cnt in per_client] == [10, 12, 15] == dm.client_canary_rows
    total = sum(per_client, Counter())
    assert total == groups  # every canary exactly dup_group times over all clients
    assert sum(total.values()) == 37


def test_memorization_set_holds_only_the_training_canaries():
    # 10 canaries, canary_val_fraction=0.2: round(0.2 * 10) = 2 held out by identity, 8 train.
    dm = _dm(10, val_fraction=0.2)
    held_out = {r["canary_id"] for r in dm.canaries.val_rows}
    mem = dm.memorization_set()
    assert len(held_out) == 2
    assert len(mem["canary_ids"]) == len(set(mem["canary_ids"])) == 8
    assert len(mem["ids"]) == len(mem["groups"]) == 8
    assert not set(mem["canary_ids"]) & held_out
    assert set(mem["canary_ids"]) | held_out == {r["canary_id"] for r in canary_records(10, 42)}


def _fact_of(text: str, entities) -> tuple[str, int]:
    """The (entity name, attribute index) a templated question or training example is about."""
    family, _, rest = text.partition(": ")
    if family in ("Open Question", "MCQ"):
        question = rest.split(" The answer is: ")[0].split(" Options: ")[0]
        hits = [
            (e.name, i) for e in entities for i, (q, _) in enumerate(qa_pairs(e)) if q == question
        ]
    else:  # Closed Question: a fact sentence, its value possibly swapped for another entity's
        sentence = rest.split(" True? The answer is: ")[0]
        hits = []
        for e in entities:
            for i, (key, true) in enumerate(zip(e.attributes, fact_sentences(e), strict=True)):
                head, _, tail = true.partition(e.attributes[key])
                if sentence.startswith(head) and sentence.endswith(tail):
                    hits.append((e.name, i))
    assert len(hits) == 1, (text, hits)
    return hits[0]


def test_held_out_questions_ask_only_about_facts_never_used_for_training():
    # 20 entities x 4 attributes = 80 facts; round(0.2 * 80) = 16 are held out, 64 train.
    # 300 draws per client over 64 training facts use every one of them (a given fact is missed
    # with probability (63/64)^900 ~ 1e-6), so the used training facts are exactly 64.
    entities = entity_table(20, 0)
    texts, val = synthetic_client_examples(entities, [300, 300, 300], 20, seed=0)
    trained = {_fact_of(t, entities) for client in texts for t in client}
    assert len(trained) == 64
    for c, pairs in enumerate(val):
        assert len(pairs) == 20
        asked = {_fact_of(prompt, entities) for prompt, _ in pairs}
        assert not asked & trained, f"client {c} asks about training facts {asked & trained}"
    all_asked = {_fact_of(p, entities) for pairs in val for p, _ in pairs}
    assert len(trained | all_asked) <= 80 and len(all_asked) <= 16


def test_clients_held_out_canaries_partition_the_held_out_canary_rows():
    # 20 canaries, canary_val_fraction=0.2: round(0.2 * 20) = 4 held out (one row each, not
    # replicated). Shares of 4 over 24/30/36: exact 1.07, 1.33, 1.6 -> floors 1, 1, 1; the
    # largest remainder (client 2) gets the last -> [1, 1, 2].
    dm = _dm(20, val_fraction=0.2)
    assert len(dm.val_canary_rows) == 4
    parts = [[r for r in rows if "client" not in r] for rows in dm.client_val_rows]
    assert [len(p) for p in parts] == [1, 1, 2]
    assert all(sum("client" in r for r in rows) == 4 for rows in dm.client_val_rows)  # own QA
    ids = {r["text"]: r["canary_id"] for r in dm.canaries.val_rows}
    got = [ids.get(dm.vocab.decode(r["input_ids"])) for p in parts for r in p]
    assert Counter(got) == Counter(ids.values())  # each held-out canary exactly once
    concat = [r["input_ids"] for p in parts for r in p]
    assert concat == [r["input_ids"] for r in dm.val_canary_rows]


def test_code_faithful_split_holds_out_a_tenth_of_the_replicated_rows():
    # 60 canaries, {1: .7, 10: .3}: 42 x 1 + 18 x 10 = 222 rows after replication; the official
    # split takes round(0.1 * 222) = round(22.2) = 22 rows for validation and leaves 200.
    split = build_canary_rows(
        canary_records(60), {1: 0.7, 10: 0.3}, val_fraction=0.1, split_after_replication=True
    )
    assert len(split.val_rows) == 22
    assert len(split.train_rows) == 200
    replicas = Counter(r["canary_id"] for r in split.train_rows + split.val_rows)
    assert sorted(replicas.values()) == [1] * 42 + [10] * 18
    assert {r["canary_id"] for r in split.train_unique} == {
        r["canary_id"] for r in split.train_rows
    }
