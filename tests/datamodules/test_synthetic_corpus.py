import pytest

from datamodules.synthetic_corpus import (
    canary_records,
    entity_table,
    fact_sentences,
    qa_pairs,
    synthetic_documents,
    write_jsonl,
)


def test_documents_are_deterministic_and_complete():
    a = synthetic_documents(50, num_hosts=10, specialised_fraction=0.3, seed=3)
    b = synthetic_documents(50, num_hosts=10, specialised_fraction=0.3, seed=3)
    assert a == b
    assert a != synthetic_documents(50, num_hosts=10, specialised_fraction=0.3, seed=4)
    for doc in a:
        assert doc["url"].startswith(f"https://{doc['host']}/")
        assert doc["domain"] in {"general", "specialised"}
        for qa in doc["qa"]:
            assert qa["answer"].removeprefix("the ") in doc["text"]
    hosts_by_domain = {}
    for doc in a:
        hosts_by_domain.setdefault(doc["host"], set()).add(doc["domain"])
    assert all(len(domains) == 1 for domains in hosts_by_domain.values())


def test_facts_answer_questions():
    entity = entity_table(5, seed=0)[2]
    for sentence, (question, answer) in zip(fact_sentences(entity), qa_pairs(entity), strict=True):
        assert answer.removeprefix("the ") in sentence
        assert entity.name in question


def test_canaries_unique_and_high_entropy(tmp_path):
    canaries = canary_records(100, seed=7)
    assert len({c["text"] for c in canaries}) == 100
    assert canaries == canary_records(100, seed=7)
    assert all("MRN " in c["text"] for c in canaries)
    path = write_jsonl(canaries, tmp_path / "c.jsonl")
    assert len(path.read_text().splitlines()) == 100


def test_more_names_than_exist_is_an_error_not_an_endless_loop():
    from datamodules.synthetic_corpus import _distinct_words, entity_table

    with pytest.raises(ValueError, match="exceeds the 17640 distinct names"):
        entity_table(6 * _distinct_words() + 1)
