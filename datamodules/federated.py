"""Per-client text data for federated fine-tuning, with injected canaries (Bossy et al. 2025).

``FederatedTextDataModule`` builds, deterministically from its seeds:

* per-client training sets, either from local files (one json/jsonl/text file per client, read
  with ``datasets``) or from the synthetic generator: three QA template families over a fixed
  entity table (``Open Question``, ``MCQ``, ``Closed Question``; spec section 6);
* canaries (``synthetic_corpus.canary_records``): shuffled with ``canary_seed``, split train/val
  *by identity before replication* (``canary_split_after_replication`` restores the official
  code's leak), replicated by group (``replication: {1: 0.7, 10: 0.3}``) and sharded across
  clients in proportion to their sizes; each row keeps its ``dup_group``;
* the memorization evaluation set (unique training canaries as token ids, with their group) and
  held-out QA questions for utility (answer exact match).

Text is tokenized per character by default (``CharVocab``), or with a Hugging Face tokenizer
directory. ``train_dataloader`` is a round driver: one item per federated round, identical on
every rank; clients' batches come from ``client_dataloader(c, generator)``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.federated_data import (
    build_canary_rows,
    pack_sequences,
    partition_indices,
    proportional_counts,
    synthetic_client_examples,
)
from datamodules.private_seed_loader import PrivateSeedDataLoader
from datamodules.resumable_sampler import LoopResumedDataLoader
from datamodules.synthetic_corpus import canary_records, entity_table

IGNORE_INDEX = -100


class CharVocab:
    """Character vocabulary: ``pad = 0``, ``eos = 1``, printable ASCII from id 2."""

    chars = string.printable[:95] + "\n"

    def __init__(self) -> None:
        self.pad_token_id, self.eos_token_id = 0, 1
        self._index = {ch: i + 2 for i, ch in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 2

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[ch] for ch in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} in {text[:40]!r} is not in CharVocab"
            ) from err

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 2] for i in ids if i >= 2)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as an inference engine tokenizes it: no BOS in this vocabulary."""
        return self.encode(text)

    def hf_tokenizer(self) -> Any:
        """This vocabulary as a Hugging Face tokenizer, saved with exports so that
        ``AutoTokenizer.from_pretrained`` loads them: one token per character, pad 0, eos 1."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        ids = {"<pad>": self.pad_token_id, "</s>": self.eos_token_id, **self._index}
        tokenizer = Tokenizer(models.WordLevel(ids, unk_token=None))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()  # characters join without spaces
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>"
        )

    def prompt_tokens(self, prompt: str, text: str) -> int:
        """Tokens of ``encode(text)`` inside its first ``len(prompt)`` characters: one per char."""
        return len(prompt)


class _HFVocab:
    """Adapter giving a Hugging Face tokenizer the ``encode/decode/len`` interface."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.eos_token_id = self.tok.eos_token_id
        self.pad_token_id = (
            self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_token_id
        )

    def __len__(self) -> int:
        return len(self.tok)

    def hf_tokenizer(self) -> Any:
        return self.tok

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([i for i in ids if i >= 0], skip_special_tokens=True)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as an inference engine (vLLM) tokenizes it: with the tokenizer's special
        tokens, e.g. a BOS (``memorization.code_faithful_retokenize``)."""
        return self.tok(text)["input_ids"]

    def prompt_tokens(self, prompt: str, text: str) -> int:
        """Tokens of ``encode(text)`` that end inside its first ``len(prompt)`` characters.

        ``len(encode(prompt))`` is wrong for BPE: the prompt's trailing space merges into the
        first answer token (" D", " ochre"), so that token must count as answer.
        """
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return sum(1 for _, end in enc["offset_mapping"] if end <= len(prompt))


def pad_collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with ``pad_id`` and ``labels`` with -100 to the longest row.

    Rows that all carry a ``client`` index (held-out questions) also give a ``client`` tensor.
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
    batch = {"input_ids": ids, "labels": labels}
    if all("client" in r for r in rows):
        batch["client"] = torch.tensor([r["client"] for r in rows], dtype=torch.long)
    return batch


def check_client_counts(client_sizes: list[int] | None, num_canaries: int) -> None:
    """Refuse an empty ``client_sizes`` and a negative ``num_canaries``: the first silently became
    the default three clients (``[]`` read as unset), the second silently meant no canaries."""
    if client_sizes is not None and not client_sizes:
        raise ValueError(
            "data.client_sizes=[] names no client: list one size per client, or null for the "
            "default [800, 1000, 1200]"
        )
    if num_canaries < 0:
        raise ValueError(f"data.num_canaries must be >= 0 (0 = no canaries), got {num_canaries}")


class FederatedTextDataModule(L.LightningDataModule):
    """Federated clients with canaries (see module docstring).

    Args:
        num_rounds: length of the round driver (set ``trainer.max_steps`` to the rounds to run).
        source: ``synthetic`` (three QA template families) or ``files`` (``client_files``).
        client_files: one local json/jsonl/txt file per client (field ``text_field``; a text
            file holds one example per line).
        text_field: the text column of ``client_files``.
        client_sizes: examples per client for the synthetic source.
        num_entities: size of the synthetic entity table (facts the base model pretrains on).
        val_questions_per_client: held-out QA questions per client for utility.
        partition: ``by_client`` keeps each client's own data (template families / files),
            ``iid`` pools and splits uniformly, ``dirichlet`` splits each family with
            ``Dirichlet(dirichlet_alpha)`` proportions.
        dirichlet_alpha: concentration of the Dirichlet partition.
        num_canaries: number of unique canaries (0 = no injection).
        replication: duplication factor -> fraction of canaries, e.g. ``{1: 0.7, 10: 0.3}``.
        canary_val_fraction: fraction of canaries held out (by identity) from training.
        canary_split_after_replication: code-faithful mode of the official repo: split 90/10
            *after* replication, so replicas leak into validation (spec section 4.2).
        canary_seed: seed of canary generation and of the shuffle (official 42).
        seed: seed of the synthetic data and partitions.
        max_length: longest sequence in tokens; longer examples raise.
        packing_length: ``None`` = one example per row (padded). An int packs each client's
            shuffled examples (canaries included, EOS-separated) into chunks of this many tokens,
            as the official scripts do; memorization prompts cut from the middle of a record
            are only in-distribution for a model trained this way (``pack_sequences``).
        batch_size: local batch size of every client.
        tokenizer: ``None`` = ``CharVocab``; else a local Hugging Face tokenizer directory.
    """

    def __init__(
        self,
        num_rounds: int = 5,
        source: Literal["synthetic", "files"] = "synthetic",
        client_files: list[str] | None = None,
        text_field: str = "text",
        client_sizes: list[int] | None = None,
        num_entities: int = 300,
        val_questions_per_client: int = 100,
        partition: Literal["by_client", "iid", "dirichlet"] = "by_client",
        dirichlet_alpha: float = 0.5,
        num_canaries: int = 60,
        replication: dict[int, float] | None = None,
        canary_val_fraction: float = 0.0,
        canary_split_after_replication: bool = False,
        canary_seed: int = 42,
        seed: int = 0,
        max_length: int = 256,
        packing_length: int | None = None,
        batch_size: int = 16,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        if source == "files" and not client_files:
            raise ValueError("source='files' needs client_files: one local file per client")
        sizes = {"num_rounds": num_rounds, "batch_size": batch_size, "max_length": max_length}
        for key, value in sizes.items():
            if value < 1:
                raise ValueError(f"FederatedTextDataModule {key} must be >= 1, got {value}")
        self.num_rounds, self.source, self.client_files = num_rounds, source, client_files
        self.text_field = text_field
        check_client_counts(client_sizes, num_canaries)
        self.client_sizes_arg = client_sizes if client_sizes is not None else [800, 1000, 1200]
        self.num_entities, self.val_questions = num_entities, val_questions_per_client
        self.partition, self.dirichlet_alpha = partition, dirichlet_alpha
        self.num_canaries = num_canaries
        self.replication = replication if replication is not None else {1: 0.7, 10: 0.3}
        if canary_split_after_replication and canary_val_fraction <= 0:
            raise ValueError(
                "canary_split_after_replication=true reproduces the official 90/10 split of the "
                "replicated canaries, so it needs canary_val_fraction > 0 (e.g. 0.1); got "
                f"{canary_val_fraction}"
            )
        self.canary_val_fraction = canary_val_fraction
        self.split_after = canary_split_after_replication
        self.canary_seed, self.seed = canary_seed, seed
        self.max_length, self.batch_size = max_length, batch_size
        self.packing_length = packing_length
        self.vocab = CharVocab() if tokenizer is None else _HFVocab(tokenizer)
        self._built = False

    # ------------------------------------------------------------------ building
    def _row(self, text: str, prompt_len: int = 0, where: str = "") -> dict:
        ids = [*self.vocab.encode(text), self.vocab.eos_token_id]
        if len(ids) > self.max_length:
            raise ValueError(
                f"{where} example of {len(ids)} tokens exceeds max_length={self.max_length}: "
                f"{text[:60]!r}..."
            )
        labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
        return {"input_ids": ids, "labels": labels}

    def _client_texts(self) -> tuple[list[list[str]], list[list[tuple[str, str]]]]:
        if self.source == "files":
            # the text data module's loader: suffix, encoding and record checks name file and line
            from datamodules.text import load_documents

            texts = [
                load_documents(path, None, None, self.text_field, text_sample_by="line")[
                    self.text_field
                ]
                for path in self.client_files or []
            ]
            return texts, [[] for _ in texts]
        entities = entity_table(self.num_entities, self.seed)
        return synthetic_client_examples(
            entities, self.client_sizes_arg, self.val_questions, seed=self.seed
        )

    def build(self) -> None:
        """Generate everything (idempotent; called by ``setup``)."""
        if self._built:
            return
        texts, val_qa = self._client_texts()
        texts = self._repartition(texts)
        self.num_clients = len(texts)
        records = canary_records(self.num_canaries, self.canary_seed) if self.num_canaries else []
        canary = build_canary_rows(
            records,
            self.replication,
            val_fraction=self.canary_val_fraction,
            split_after_replication=self.split_after,
            seed=self.canary_seed,
        )
        shares = proportional_counts(len(canary.train_rows), [len(t) for t in texts] or [1])
        self.client_rows: list[list[dict]] = []
        self.client_canary_rows: list[int] = []
        offset = 0
        for c, client_texts in enumerate(texts):
            rows = [self._row(t, where=f"client {c}") for t in client_texts]
            for rec in canary.train_rows[offset : offset + shares[c]]:
                rows.append(self._row(rec["text"], where=f"canary {rec['canary_id']}"))
            offset += shares[c]
            if self.packing_length:
                chunks = pack_sequences(
                    [r["input_ids"] for r in rows], self.packing_length, self.seed * 1000 + c
                )
                rows = [{"input_ids": ids, "labels": list(ids)} for ids in chunks]
            self.client_rows.append(rows)
            self.client_canary_rows.append(shares[c])
        self.canaries = canary
        self.val_rows = [
            {
                **self._row(
                    q + a, prompt_len=self.vocab.prompt_tokens(q, q + a), where=f"val client {c}"
                ),
                "client": c,
            }
            for c, pairs in enumerate(val_qa)
            for q, a in pairs
        ]
        self.val_canary_rows = [self._row(r["text"], where="val canary") for r in canary.val_rows]
        # Each client's own held-out rows (local early stopping): its QA questions and a share
        # of the held-out canary rows, in proportion to client size like the training canaries.
        val_shares = proportional_counts(len(self.val_canary_rows), [len(t) for t in texts] or [1])
        self.client_val_rows: list[list[dict]] = []
        offset = 0
        for c in range(self.num_clients):
            own = [r for r in self.val_rows if r["client"] == c]
            self.client_val_rows.append(own + self.val_canary_rows[offset : offset + val_shares[c]])
            offset += val_shares[c]
        self._built = True

    def _repartition(self, texts: list[list[str]]) -> list[list[str]]:
        if self.partition == "by_client":
            return texts
        pool = [t for client in texts for t in client]
        labels = [c for c, client in enumerate(texts) for _ in client]
        parts = partition_indices(
            labels, len(texts), self.partition, self.dirichlet_alpha, seed=self.seed
        )
        return [[pool[i] for i in part] for part in parts]

    def setup(self, stage: str | None = None) -> None:
        self.build()

    # ------------------------------------------------------------------ interface
    @property
    def client_num_samples(self) -> list[int]:
        """Training sequences per client (the default FedAvg weights ``n_c``)."""
        self.build()
        return [len(rows) for rows in self.client_rows]

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return pad_collate(rows, self.vocab.pad_token_id)

    def client_dataloader(self, client: int, generator: torch.Generator) -> DataLoader:
        """Shuffled batches of one client; the order is fixed by ``generator`` alone."""
        self.build()
        return DataLoader(
            self.client_rows[client],
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=self.collate,
        )

    def client_val_dataloader(self, client: int) -> DataLoader:
        """The held-out rows of one client, in a fixed order (local early stopping)."""
        self.build()
        rows = self.client_val_rows[client]
        if not rows:
            raise ValueError(
                f"client {client} has no held-out rows to early-stop on: set "
                "data.val_questions_per_client (synthetic source) or data.canary_val_fraction"
            )
        # Evaluated inside a client's local loop: its iterators must not shift the client's
        # random stream (LoRA dropout), or evaluating would change the training.
        return PrivateSeedDataLoader(rows, batch_size=64, shuffle=False, collate_fn=self.collate)

    def memorization_set(self) -> dict:
        """Unique training canaries: ``ids`` (no special tokens), ``groups``, ``canary_ids``."""
        self.build()
        uniq = self.canaries.train_unique
        return {
            "ids": [self.vocab.encode(r["text"]) for r in uniq],
            "groups": [r["dup_group"] for r in uniq],
            "canary_ids": [r["canary_id"] for r in uniq],
            "group_values": sorted({int(g) for g in self.replication}),
        }

    def train_dataloader(self) -> DataLoader:
        # Round driver: the module reads the round from ``global_step`` (resume-safe).
        return LoopResumedDataLoader(torch.arange(self.num_rounds), batch_size=1, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        self.build()
        return DataLoader(self.val_rows, batch_size=64, shuffle=False, collate_fn=self.collate)


def base_corpus_texts(num_entities: int = 300, seed: int = 0, num_texts: int = 20000) -> list[str]:
    """Generic pretraining text over the same entity table: fact sentences and plain QA."""
    from datamodules.synthetic_corpus import fact_sentences, qa_pairs

    rng = random.Random(seed + 7)
    entities = entity_table(num_entities, seed)
    out = []
    for _ in range(num_texts):
        e = rng.choice(entities)
        i = rng.randrange(4)
        if rng.random() < 0.5:
            out.append(fact_sentences(e)[i])
        else:
            q, a = qa_pairs(e)[i]
            out.append(f"Q: {q} A: {a}")
    return out
