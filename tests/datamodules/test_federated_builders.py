"""The federated builders' details: MCQ options and letters, false closed statements, held-out
facts, per-client draws, proportional splits, canary groups and order, IID and Dirichlet
partitions."""

from __future__ import annotations

import random
import re

import pytest

from datamodules.federated_data import (
    _closed,
    _mcq,
    build_canary_rows,
    partition_indices,
    proportional_counts,
    synthetic_client_examples,
)
from datamodules.synthetic_corpus import entity_table, fact_sentences

ENTITIES = entity_table(30, seed=0)
KEYS = ("city", "year", "colour", "product")


@pytest.mark.parametrize("i", [0, 1, 2])
def test_mcq_options_are_answers_to_the_same_question_and_the_letter_names_the_answer(i):
    rng = random.Random(5)
    values = {e.attributes[KEYS[i]] for e in ENTITIES}
    for entity in ENTITIES[:10]:
        prompt, letter = _mcq(entity, i, rng, ENTITIES)
        options = dict(re.findall(r"([ABCD])\) (.+?)(?= [ABCD]\) |\. The answer is: $)", prompt))
        assert sorted(options) == ["A", "B", "C", "D"]
        assert set(options.values()) <= values  # every option answers this question
        assert options[letter] == entity.attributes[KEYS[i]]


def test_closed_statements_are_true_exactly_when_answered_yes():
    rng = random.Random(1)
    answers = []
    for entity in ENTITIES:
        for i in range(4):
            prompt, answer = _closed(entity, i, rng, ENTITIES)
            sentence = prompt.removeprefix("Closed Question: ").removesuffix(
                " True? The answer is: "
            )
            assert (sentence == fact_sentences(entity)[i]) == (answer == "yes"), sentence
            answers.append(answer)
    assert {"yes", "no"} == set(answers)


def test_at_least_one_fact_is_held_out():
    texts, val = synthetic_client_examples(ENTITIES[:3], [4], 2, heldout_fraction=0.0)
    assert len(texts[0]) == 4 and len(val[0]) == 2


def test_clients_of_the_same_template_family_draw_their_own_examples():
    texts, _ = synthetic_client_examples(ENTITIES, [20, 20, 20, 20], 1)
    assert texts[0][0].startswith("Open Question") and texts[3][0].startswith("Open Question")
    assert texts[0] != texts[3]


@pytest.mark.parametrize(("total", "sizes"), [(-1, [1, 1]), (3, [2, -1])])
def test_negative_counts_are_refused(total, sizes):
    with pytest.raises(ValueError, match="cannot split"):
        proportional_counts(total, sizes)


def _records(n):
    return [{"canary_id": i, "text": f"c{i}"} for i in range(n)]


def test_replication_factors_below_one_are_refused():
    with pytest.raises(ValueError, match="factors >= 1"):
        build_canary_rows(_records(4), {0: 0.5, 1: 0.5})


def test_the_largest_factor_takes_the_rounded_up_share():
    # 3 canaries, half each: round(1.5) = 2 get factor 10 (largest first), the last one 1
    split = build_canary_rows(_records(3), {1: 0.5, 10: 0.5})
    assert sorted(r["dup_group"] for r in split.train_unique) == [1, 10, 10]
    assert len(split.train_rows) == 21


def test_replicated_rows_are_shuffled():
    split = build_canary_rows(_records(20), {1: 0.5, 4: 0.5})
    ids = [r["canary_id"] for r in split.train_rows]
    grouped = [r["canary_id"] for r in split.train_unique for _ in range(r["dup_group"])]
    assert sorted(ids) == sorted(grouped) and ids != grouped


def test_an_iid_partition_keeps_every_item():
    parts = partition_indices(list(range(10)), 3, "iid", seed=0)
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert sorted(i for p in parts for i in p) == list(range(10))


def test_a_dirichlet_alpha_of_zero_is_refused():
    with pytest.raises(ValueError, match="dirichlet_alpha must be > 0, got 0"):
        partition_indices([0, 1, 0, 1], 2, "dirichlet", alpha=0)
