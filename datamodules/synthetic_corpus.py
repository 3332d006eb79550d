"""Deterministic synthetic corpora: web-like documents, facts, QA pairs and canary records.

Everything is a pure function of its arguments and a seed (``random.Random(seed)``), so later
experiments (federated fine-tuning, data compliance, memorization) regenerate identical data.

* ``entity_table``: fictional entities with attributes (the ground truth for facts and QA);
* ``synthetic_documents``: documents with ``url``/``host``, a ``domain`` label (``general`` or
  ``specialised``), a topic, text made of facts, and the QA pairs the text supports;
* ``canary_records``: high-entropy synthetic clinical records (name, date of birth, 8-digit MRN,
  phone) that a model can complete only by memorizing them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ren",
    "ta",
    "vo",
    "shi",
    "dan",
    "el",
    "mor",
    "qui",
    "zan",
    "bel",
    "tor",
)
_FIRST_NAMES = (
    "Ada",
    "Bruno",
    "Chloe",
    "Dario",
    "Elena",
    "Felix",
    "Greta",
    "Hugo",
    "Iris",
    "Jonas",
    "Klara",
    "Luca",
    "Mara",
    "Nils",
    "Olga",
    "Pavel",
    "Rosa",
    "Sven",
    "Tara",
    "Ugo",
)
_LAST_NAMES = (
    "Amsler",
    "Brunner",
    "Caduff",
    "Dubois",
    "Egger",
    "Favre",
    "Gerber",
    "Huber",
    "Imhof",
    "Jost",
    "Keller",
    "Lehmann",
    "Meier",
    "Nussbaum",
    "Oberli",
    "Perrin",
    "Rochat",
    "Suter",
)
_CITIES = (
    "Lausanne",
    "Geneva",
    "Zurich",
    "Basel",
    "Bern",
    "Lugano",
    "Sion",
    "Neuchatel",
    "Fribourg",
    "Chur",
    "Thun",
    "Lucerne",
    "Aarau",
    "Biel",
    "Vevey",
    "Morges",
)
_COLOURS = ("red", "blue", "green", "amber", "violet", "silver", "teal", "ochre")
_GENERAL_TOPICS = {
    "travel": ("trail", "lake", "village", "train", "summit", "ferry"),
    "cooking": ("bread", "cheese", "soup", "oven", "recipe", "herb"),
    "sports": ("match", "team", "league", "coach", "stadium", "season"),
}
_SPECIALISED_TOPICS = {
    "pharmacology": ("dosage", "receptor", "agonist", "half-life", "clearance", "metabolite"),
    "law": ("statute", "plaintiff", "tribunal", "clause", "appeal", "jurisdiction"),
    "chemistry": ("catalyst", "isomer", "reagent", "titration", "ligand", "solvent"),
}  # fmt: skip
_TLDS = ("ch", "com", "org", "net", "io")


@dataclass(frozen=True)
class Entity:
    """A fictional entity and its attributes (ground truth for facts and questions)."""

    name: str
    attributes: dict[str, str] = field(hash=False)


def _invented_word(rng: random.Random, n_syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n_syllables))


_ENTITY_SUFFIXES = ("Labs", "Works", "Institute", "Cooperative", "Foundry", "Society")


@lru_cache(maxsize=1)
def _distinct_words() -> int:
    """How many distinct 2- or 3-syllable invented words exist (concatenations can collide)."""
    two = {a + b for a in _SYLLABLES for b in _SYLLABLES}
    return len(two | {w + c for w in two for c in _SYLLABLES})


def _check_capacity(requested: int, per_word: int, what: str) -> None:
    # The rejection loops below would never end once every distinct name is taken.
    capacity = _distinct_words() * per_word
    if requested > capacity:
        raise ValueError(f"{what}={requested} exceeds the {capacity} distinct names available")


def entity_table(num_entities: int, seed: int = 0) -> list[Entity]:
    """``num_entities`` fictional entities with a city, founding year, colour and product."""
    if num_entities < 1:
        raise ValueError(f"num_entities must be >= 1, got {num_entities}")
    _check_capacity(num_entities, len(_ENTITY_SUFFIXES), "num_entities")
    rng = random.Random(seed)
    names: set[str] = set()
    entities = []
    while len(entities) < num_entities:
        name = (
            _invented_word(rng, rng.randint(2, 3)).capitalize() + " " + rng.choice(_ENTITY_SUFFIXES)
        )
        if name in names:
            continue
        names.add(name)
        attributes = {
            "city": rng.choice(_CITIES),
            "year": str(rng.randint(1850, 2020)),
            "colour": rng.choice(_COLOURS),
            "product": _invented_word(rng, 2),
        }
        entities.append(Entity(name, attributes))
    return entities


def fact_sentences(entity: Entity) -> list[str]:
    """One declarative sentence per attribute of ``entity``."""
    a = entity.attributes
    return [
        f"{entity.name} is based in {a['city']}.",
        f"{entity.name} was founded in {a['year']}.",
        f"The emblem of {entity.name} is {a['colour']}.",
        f"{entity.name} is known for the {a['product']}.",
    ]


def qa_pairs(entity: Entity) -> list[tuple[str, str]]:
    """(question, answer) pairs answerable from ``fact_sentences(entity)``."""
    a = entity.attributes
    return [
        (f"Where is {entity.name} based?", a["city"]),
        (f"When was {entity.name} founded?", a["year"]),
        (f"What colour is the emblem of {entity.name}?", a["colour"]),
        (f"What is {entity.name} known for?", f"the {a['product']}"),
    ]


def _hosts(num_hosts: int, rng: random.Random) -> list[str]:
    _check_capacity(num_hosts, len(_TLDS), "num_hosts")
    hosts: list[str] = []
    while len(hosts) < num_hosts:
        host = f"{_invented_word(rng, rng.randint(2, 3))}.{rng.choice(_TLDS)}"
        if host not in hosts:
            hosts.append(host)
    return hosts


def synthetic_documents(
    num_documents: int,
    num_hosts: int = 20,
    specialised_fraction: float = 0.3,
    num_entities: int = 200,
    facts_per_document: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Web-like documents, each ``{id, url, host, domain, topic, text, facts, qa}``.

    Hosts are either general or specialised (the first ``round(specialised_fraction *
    num_hosts)`` hosts are specialised), so a per-host filter removes whole domains at once, as
    robots.txt opt-outs do. Each document mixes topic vocabulary with facts about entities;
    ``qa`` lists the questions its facts answer.
    """
    if num_documents < 0 or num_hosts < 1:
        raise ValueError(
            f"need num_documents >= 0 and num_hosts >= 1, got {num_documents}, {num_hosts}"
        )
    if not 0.0 <= specialised_fraction <= 1.0:
        raise ValueError(f"specialised_fraction must lie in [0, 1], got {specialised_fraction}")
    rng = random.Random(seed)
    entities = entity_table(num_entities, seed)
    hosts = _hosts(num_hosts, rng)
    n_specialised = round(specialised_fraction * num_hosts)
    documents = []
    for i in range(num_documents):
        host_index = rng.randrange(num_hosts)
        domain = "specialised" if host_index < n_specialised else "general"
        topics = _SPECIALISED_TOPICS if domain == "specialised" else _GENERAL_TOPICS
        topic = rng.choice(sorted(topics))
        words = topics[topic]
        chosen = rng.sample(entities, k=min(facts_per_document, len(entities)))
        sentences, facts, qa = [], [], []
        for entity in chosen:
            sentence_index = rng.randrange(4)
            sentences.append(fact_sentences(entity)[sentence_index])
            facts.append({"entity": entity.name, **entity.attributes})
            qa.append(
                dict(zip(("question", "answer"), qa_pairs(entity)[sentence_index], strict=True))
            )
            sentences.append(
                f"Notes on the {rng.choice(words)} mention the {rng.choice(words)} and the "
                f"{rng.choice(words)} in {rng.choice(_CITIES)}."
            )
        path = "/".join(_invented_word(rng, 2) for _ in range(rng.randint(1, 3)))
        documents.append(
            {
                "id": f"doc-{i:06d}",
                "url": f"https://{hosts[host_index]}/{path}",
                "host": hosts[host_index],
                "domain": domain,
                "topic": topic,
                "text": " ".join(sentences),
                "facts": facts,
                "qa": qa,
            }
        )
    return documents


def canary_records(num_canaries: int, seed: int = 0) -> list[dict]:
    """Synthetic clinical records ``{canary_id, text}`` in one fixed template.

    Every field is drawn at random (name, date of birth, 8-digit MRN, phone), so a model can
    complete a record from its prefix only if it memorized that record.
    """
    rng = random.Random(seed)
    records = []
    for i in range(num_canaries):
        name = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        dob = f"{rng.randint(1930, 2005)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        mrn = f"{rng.randrange(10**8):08d}"
        phone = f"+41 {rng.randint(21, 91)} {rng.randrange(1000):03d} {rng.randrange(100):02d} {rng.randrange(100):02d}"
        text = (
            f"Medical Note: patient {name}, born {dob}, MRN {mrn}, phone {phone}, "
            f"seen in {rng.choice(_CITIES)} for {rng.choice(_SPECIALISED_TOPICS['pharmacology'])} review."
        )
        records.append({"canary_id": f"canary-{i:04d}", "text": text})
    return records


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
