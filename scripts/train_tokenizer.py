"""Train the project's byte-level BPE tokenizer on the bundled corpus.

The result is a Hugging Face tokenizer directory that ``AutoTokenizer.from_pretrained`` loads
offline. Training is deterministic for a fixed corpus and ``tokenizers`` version.
Run:  python scripts/train_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def iter_texts(corpus: Path):
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def train(corpus: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=1_000_000,  # documents are packed into blocks by the datamodule
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus/python_docs.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("data/tokenizer"))
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    tokenizer = train(args.corpus, args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"saved a {len(tokenizer)}-token byte-level BPE tokenizer to {args.out}")


if __name__ == "__main__":
    main()
