"""A small English sentiment set with flipped labels, for mislabeled-data detection on an LLM.

Sentences are product / place reviews assembled from hand-written templates (a subject, an
opinion phrase, a closing clause), positive (label 1) or negative (label 0), e.g. "The hotel room
was spotless and the staff were lovely, so we will definitely come back." The pool holds a few
thousand distinct sentences; every seed draws its own training and validation sentences from it,
then flips ``noise_rate`` of the **training** labels (the validation labels stay clean, as in the
HyperINF / DataInf mislabel experiments).

With ``frozen_prefix_model`` set (e.g. ``smollm2-135m-instruct``) the datamodule runs the frozen
first ``num_layers - tail_layers`` decoder layers of that model once and keeps their output
(``hidden``, ``B x T x d``) instead of the token ids: training, and the per-sample gradients of the
influence computation, then only run the trainable tail (``modules.llm_tail_classifier``). This is
exact (the prefix is frozen), and it is what makes LoRA on a 135M-parameter model affordable on a
shared CPU.

The validation/test loaders (both the validation set) are sharded evenly under DDP and their
batches carry a ``scored`` row mask (``datamodules.even_eval_sampler.even_eval_loader``).
"""

from __future__ import annotations

import itertools
import random

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from datamodules.even_eval_sampler import even_eval_loader
from datamodules.resumable_sampler import resumable_train_loader

SUBJECTS = (
    "The hotel room", "The pasta", "This laptop", "The train journey", "The new phone",
    "The museum tour", "The coffee", "This novel", "The concert", "The customer service",
    "The rental car", "The hiking trail", "This vacuum cleaner", "The film", "The bakery",
    "The online course", "The dentist visit", "The running shoes", "The city park", "The hostel",
)  # fmt: skip
POSITIVE = (
    "was excellent", "was a real delight", "exceeded all my expectations", "was wonderful",
    "was clean, quick and friendly", "felt like great value for money", "was simply perfect",
    "made my whole week better", "was far better than I had hoped", "was genuinely lovely",
)  # fmt: skip
NEGATIVE = (
    "was terrible", "was a complete disappointment", "fell far short of my expectations",
    "was awful", "was dirty, slow and rude", "felt like a waste of money", "was simply broken",
    "ruined my whole week", "was far worse than I had feared", "was genuinely unpleasant",
)  # fmt: skip
POSITIVE_ENDINGS = (
    ", and I would happily recommend it.", ", so I will definitely come back.",
    ", and I am already telling my friends.", ", and I would buy it again.", "; five stars.",
)  # fmt: skip
NEGATIVE_ENDINGS = (
    ", and I would not recommend it.", ", so I will never come back.",
    ", and I am asking for a refund.", ", and I regret buying it.", "; one star.",
)  # fmt: skip


def sentiment_pool() -> list[tuple[str, int]]:
    """Every ``(sentence, label)`` of the template grammar (label 1 = positive), in fixed order."""
    grammar = ((1, POSITIVE, POSITIVE_ENDINGS), (0, NEGATIVE, NEGATIVE_ENDINGS))
    return [
        (f"{subject} {opinion}{ending}", label)
        for label, opinions, endings in grammar
        for subject, opinion, ending in itertools.product(SUBJECTS, opinions, endings)
    ]


def flip_binary(y: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of the ``round(rate * n)`` labels to flip, chosen uniformly without repeats."""
    n = y.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[: round(rate * n)]] = True
    return mask


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"tensors of different lengths: {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class SentimentNoisyDataModule(L.LightningDataModule):
    """Template sentiment sentences, ``noise_rate`` of the training labels flipped.

    Args:
        tokenizer: tokenizer name or directory (a pretrained preset name works).
        n_train: training sentences.
        n_val: validation sentences (clean labels, disjoint from training).
        noise_rate: fraction of training labels flipped.
        seed: draws the sentences and the flipped labels.
        batch_size: training batch size.
        frozen_prefix_model: if set, a causal LM (name or directory) whose frozen first layers
            are run once; the datasets then hold their hidden states (see module docstring).
        tail_layers: decoder layers left to the trainable tail (with ``frozen_prefix_model``).
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m-instruct",
        n_train: int = 200,
        n_val: int = 50,
        noise_rate: float = 0.2,
        seed: int = 0,
        batch_size: int = 200,
        frozen_prefix_model: str | None = "smollm2-135m-instruct",
        tail_layers: int = 1,
    ):
        super().__init__()
        # logger=False: see TextDataModule (datamodules/text.py)
        self.save_hyperparameters(logger=False)
        self.train_dataset: TensorDictDataset | None = None
        self.val_dataset: TensorDictDataset | None = None
        self.noisy_mask: torch.Tensor | None = None
        self.num_classes = 2

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        from datamodules.text import load_tokenizer

        hp = self.hparams
        pool = sentiment_pool()
        if hp.n_train + hp.n_val > len(pool):
            raise ValueError(f"n_train + n_val = {hp.n_train + hp.n_val} > pool size {len(pool)}")
        rng = random.Random(hp.seed)
        picked = rng.sample(range(len(pool)), hp.n_train + hp.n_val)
        texts = [pool[i][0] for i in picked]
        labels = torch.tensor([pool[i][1] for i in picked])
        tokenizer = load_tokenizer(hp.tokenizer, setting="data.tokenizer")
        # Right padding whatever the tokenizer's own side (decoder-only models often ship
        # "left"): the classifier pools the state at length - 1, the last real token.
        enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        ids, lengths = enc.input_ids, enc.attention_mask.sum(1)
        self.texts = texts
        gen = torch.Generator().manual_seed(hp.seed)
        noisy = flip_binary(labels[: hp.n_train], hp.noise_rate, gen)
        y_train = torch.where(noisy, 1 - labels[: hp.n_train], labels[: hp.n_train])
        self.noisy_mask, self.clean_train_labels = noisy, labels[: hp.n_train]
        inputs = {"input_ids": ids}
        if hp.frozen_prefix_model is not None:
            from modules.llm_tail_classifier import prefix_hidden_states

            inputs = {"hidden": prefix_hidden_states(hp.frozen_prefix_model, ids, hp.tail_layers)}
        sample_id = torch.tensor(picked)
        split = hp.n_train
        self.train_dataset = TensorDictDataset(
            {**{k: v[:split] for k, v in inputs.items()}, "length": lengths[:split],
             "y": y_train, "sample_id": sample_id[:split]}
        )  # fmt: skip
        self.val_dataset = TensorDictDataset(
            {**{k: v[split:] for k, v in inputs.items()}, "length": lengths[split:],
             "y": labels[split:], "sample_id": sample_id[split:]}
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        # order from (seed, epoch) only (it used the global RNG), so a resumed run continues with
        # the same batches
        hp = self.hparams
        return resumable_train_loader(self, self.train_dataset, hp.batch_size, hp.seed, False)

    def val_dataloader(self) -> DataLoader:
        return even_eval_loader(self, self.val_dataset, self.hparams.batch_size, default_collate)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
