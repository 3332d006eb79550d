"""Typed settings groups of ``FederatedLoRAModule`` (each one a YAML mapping in the config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ops.federated_lora import DEFAULT_TARGETS


@dataclass
class LoraFLSettings:
    """LoRA adapters of federated clients (paper scripts: r=16, alpha=8, dropout 0.05).

    Args:
        rank: adapter rank ``r``.
        alpha: the update is ``alpha / r * B A``.
        dropout: dropout on the adapter input during local training.
        target_modules: last name components of the adapted linear layers.
    """

    rank: int = 16
    alpha: float = 8.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))


@dataclass
class GoldfishSettings:
    """Goldfish loss (Hans et al. 2024): drop a deterministic 1/k of the target tokens.

    Args:
        enabled: use the Goldfish loss in local training.
        k: drop frequency (about 1/k of the tokens leave the loss).
        h: hash context width (Goldfish paper: 13); the Bossy paper's k, h are (reconstructed).
        strategy: ``hash_table`` or ``static``.
        hash: ``mod_product`` (overflow-free) or ``wrapping_product`` (reference int64 product).
        incomplete_window: ``keep`` (reference: the first ``h - 1`` targets of a row are never
            dropped) or ``drop`` (they never enter the loss). Use ``drop`` with
            ``packing_length``: packed rows start mid-document, and ``keep`` then trains every
            straddling replica of a duplicated passage unmasked on up to ``h - 1`` tokens (our
            addition, see ``ops.goldfish.goldfish_drop_mask``).
    """

    enabled: bool = False
    k: float = 4.0
    h: int = 13
    strategy: Literal["hash_table", "static"] = "hash_table"
    hash: Literal["mod_product", "wrapping_product"] = "mod_product"
    incomplete_window: Literal["keep", "drop"] = "keep"


@dataclass
class NoiseSettings:
    """Noise / differential privacy in local training (spec section 3.4b).

    Args:
        mode: ``none``; ``output_perturbation`` (official heuristic, noise on the trained
            factors, *not* a DP guarantee); ``dp_sgd`` (per-sample clipping + Gaussian noise,
            Poisson sampling, RDP accounting; record-level DP per client, (reconstructed));
            ``weight_noise`` (official ``src/noise.py``, post-hoc, no guarantee: after the last
            round a fresh LoRA on ``lora.target_modules`` gets ``N(0, sigma^2)`` on ``A`` and
            ``B`` and is merged into the global model, whatever ``finetune_mode`` trained it).
        sigma: noise multiplier (``weight_noise``: the std of the factor noise, required);
            ``None`` = solved from ``target_epsilon``.
        clip_norm: per-sample clipping norm ``C`` (``dp_sgd``) or ``C`` of the heuristic.
        target_epsilon: epsilon to reach at the last round (solves ``sigma``).
        delta: target delta (official 1e-4; keep ``delta < 1 / n_c``).
        c2: constant of the output-perturbation heuristic.
    """

    mode: Literal["none", "output_perturbation", "dp_sgd", "weight_noise"] = "none"
    sigma: float | None = None
    clip_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-4
    c2: float = 1.1

    def __post_init__(self) -> None:
        # The Python API does not check Literal types: a typo such as "dp-sgd" would otherwise
        # train without any noise.
        modes = ("none", "output_perturbation", "dp_sgd", "weight_noise")
        if self.mode not in modes:
            raise ValueError(f"noise.mode={self.mode!r} is not one of {modes}")
        if self.mode == "weight_noise" and (self.sigma is None or self.target_epsilon is not None):
            raise ValueError(
                "noise.mode='weight_noise' needs noise.sigma (the std of the factor noise) and "
                "no noise.target_epsilon: it is a post-hoc perturbation without a privacy guarantee"
            )
        needs_noise_level = self.mode in ("output_perturbation", "dp_sgd")
        if needs_noise_level and self.sigma is None and self.target_epsilon is None:
            # Checked here, not when a client first adds noise: that happens only on the ranks
            # running a client, while the others already wait in the round's all-reduce.
            raise ValueError(f"noise.mode={self.mode!r} needs noise.sigma or noise.target_epsilon")
        if self.sigma is not None and self.sigma < 0:
            raise ValueError(f"noise.sigma must be >= 0, got {self.sigma}")
        if self.clip_norm <= 0:
            raise ValueError(f"noise.clip_norm must be > 0, got {self.clip_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"noise.delta must lie in (0, 1), got {self.delta}")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"noise.target_epsilon must be > 0, got {self.target_epsilon}")


@dataclass
class SecureAggregationSettings:
    """Pairwise-masked secure aggregation in fixed point (Bonawitz et al. 2017).

    Args:
        enabled: aggregate masked integer vectors instead of floats.
        clip_range: ``R``: weight-scaled updates are clipped to ``[-R, R]`` before encoding.
        frac_bits: ``f``: fixed-point resolution ``2^-f``.
        modulus_bits: ``m``: arithmetic modulo ``M = 2^m``.
        stochastic_rounding: unbiased random rounding instead of round-to-nearest.
        master_seed: seed standing in for the pairwise key agreement.
    """

    enabled: bool = False
    clip_range: float = 1.0
    frac_bits: int = 24
    modulus_bits: int = 40
    stochastic_rounding: bool = False
    master_seed: int = 0


@dataclass
class LocalEarlyStoppingSettings:
    """Early stopping of each client's local training (official scripts: Hugging Face
    ``Trainer`` with ``EarlyStoppingCallback``, evaluation every 50 steps, patience 3, threshold
    1e-3, ``load_best_model_at_end``). The spec's default is off (``local_early_stopping: null``).

    The client evaluates its validation loss (next-token NLL over the answer and canary tokens
    of its own held-out rows, ``FederatedTextDataModule.client_val_rows``, dropout off) every
    ``every_n_steps`` local steps. As in ``EarlyStoppingCallback``, an evaluation resets the
    patience count only if it beats the best so far by more than ``min_delta``; the best
    weights are those of the lowest loss (any improvement).

    Args:
        every_n_steps: local steps between two evaluations of the client's validation loss.
        patience: evaluations without an improvement larger than ``min_delta`` before the
            client stops.
        min_delta: improvement threshold of the patience count.
        load_best: the client returns its best evaluated weights (as ``load_best_model_at_end``:
            steps after the last evaluation are dropped), else its last weights.
    """

    every_n_steps: int = 50
    patience: int = 3
    min_delta: float = 1e-3
    load_best: bool = True

    def __post_init__(self) -> None:
        for key in ("every_n_steps", "patience"):
            if getattr(self, key) < 1:
                raise ValueError(
                    f"local_early_stopping.{key} must be >= 1, got {getattr(self, key)}"
                )
        if self.min_delta < 0:
            raise ValueError(f"local_early_stopping.min_delta must be >= 0, got {self.min_delta}")


@dataclass
class MemorizationSettings:
    """Canary extraction metric (Carlini et al. 2023; spec section 3.2).

    Args:
        enabled: evaluate memorization (always after the last round).
        prefix_lengths: prompt lengths ``L`` in tokens.
        suffix_len: ``S``: tokens to reproduce exactly.
        frequency_penalty: ``phi`` of the greedy decoding (0 = pure greedy).
        bleu_threshold: approximate memorization iff char BLEU-4 >= this.
        every_n_rounds: also evaluate every n rounds (0 = only after the last round).
        seed: seed of the split-index generator (official 42).
        batch_size: prompts decoded together.
        code_faithful_retokenize: score as the official script does, through text: prompts,
            generations and answers decoded and re-tokenized (a BOS where the tokenizer adds
            one), BLEU rounded to 2 decimals, ``>`` in ``approx_all``, the worst exact case of
            the x1 group only (``ops.memorization_faithful``). Default: token ids compared
            directly, ``>=`` everywhere, worst case per group.
    """

    enabled: bool = True
    prefix_lengths: list[int] = field(default_factory=lambda: [10, 50, 100, 200, 500])
    suffix_len: int = 50
    frequency_penalty: float = 1.0
    bleu_threshold: float = 0.75
    every_n_rounds: int = 0
    seed: int = 42
    batch_size: int = 64
    code_faithful_retokenize: bool = False


# Checkpoints store these settings in ``hyper_parameters``; Lightning loads checkpoints with
# ``torch.load(weights_only=True)``, which only unpickles allow-listed classes.
torch.serialization.add_safe_globals(
    [
        LoraFLSettings,
        GoldfishSettings,
        LocalEarlyStoppingSettings,
        NoiseSettings,
        SecureAggregationSettings,
        MemorizationSettings,
    ]
)
