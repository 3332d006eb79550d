"""What a federated run checks and repairs when it is saved mid-round or resumed with other
settings (used by ``FederatedLoRAModule``'s checkpoint hooks; Lightning-free)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from modules.lora_fl_settings import NoiseSettings


def store_round_start_weights(
    live: dict[str, Tensor], round_start: dict[int, Tensor], saved: dict[str, Tensor]
) -> None:
    """Put the round's global weights into ``saved`` (a checkpoint's state dict) in place of the
    half-trained ones of a full fine-tuning client: the resumed run then redoes the round.

    ``live`` is the module's ``state_dict(keep_vars=True)``; ``round_start`` maps a parameter's
    ``id`` to its value at the round's start, so tied weights (two keys, one tensor) both get it.
    """
    for key, tensor in live.items():
        start = round_start.get(id(tensor))
        if start is not None:
            saved[key] = start.clone()


def noise_plan(noise: NoiseSettings, planned_rounds: Callable[[], int]) -> dict[str, Any] | None:
    """What a noise level solved from ``noise.target_epsilon`` depends on (``None`` when the
    noise is given as ``noise.sigma`` or is off)."""
    if noise.mode not in ("dp_sgd", "output_perturbation") or noise.sigma is not None:
        return None
    return {
        "target_epsilon": noise.target_epsilon,
        "delta": noise.delta,
        "planned_rounds": planned_rounds(),
    }


def check_noise_plan(
    saved: dict[str, Any] | None, current: dict[str, Any] | None, dp_sigma: float | None
) -> None:
    """Refuse a resume whose noise level was solved for another plan: the run would end above
    (or below) its target epsilon without a word."""
    if saved is None or current is None or saved == current:
        return
    changes = ", ".join(
        f"{key} {saved.get(key)} -> {current[key]}"
        for key in current
        if saved.get(key) != current[key]
    )
    keep = f" (noise.sigma={dp_sigma:.4g} keeps the checkpoint's)" if dp_sigma else ""
    raise ValueError(
        f"the checkpoint's noise level was solved for noise.target_epsilon over its planned "
        f"rounds, and this run changes them ({changes}; planned_rounds follows "
        "trainer.max_steps / max_epochs): the run would not end at its target epsilon. "
        f"Resume with the checkpoint's settings, or give the noise level as noise.sigma{keep}"
    )


def resumed_dp_sigma(noise: NoiseSettings, restored: float | None) -> float | None:
    """The DP-SGD noise multiplier of a resumed run: an explicit ``noise.sigma`` wins over the
    checkpoint's (the accountant records each round's sigma, so epsilon stays right)."""
    given = noise.sigma
    if noise.mode != "dp_sgd" or given is None or restored == float(given):
        return restored
    if restored is not None:
        rank_zero_warn(
            f"noise.sigma {restored:.4g} -> {float(given):.4g} from the resumed round on "
            "(epsilon accounts for both)"
        )
    return float(given)
