"""Functional LoRA adapters for federated clients: factors held outside the model, added by hooks.

A federated client needs an adapter it can create, train, read and throw away many times per
round without rebuilding the model. ``LoraAdapter`` keeps the factors ``A`` (r x in) and ``B``
(out x r) of every target ``nn.Linear`` in a plain dict and adds ``s * B A dropout(x)`` to the
layer output with a forward hook, which is exactly peft's ``lora.Linear`` forward (Hu et al.
2021, eq. 3; peft's init: ``A ~ KaimingUniform(a=sqrt(5))``, ``B = 0``, ``s = alpha / r``).
Because the factors live in a dict, a DP step can swap in functional copies, and the merged
update ``s B A`` (``ops.federated.lora_delta``) is read off directly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ops.federated import lora_delta

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def find_lora_targets(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` submodules whose last name component is in ``target_modules``."""
    wanted = set(target_modules)
    targets = {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in wanted and isinstance(module, nn.Linear)
    }
    if not targets:
        present = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        conv1d = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
        )
        hint = (
            f"; the model's projections {conv1d} are GPT-2-style Conv1D layers (transposed "
            "weights), which this adapter does not support: use finetune_mode: full or a "
            "Llama-style model"
            if conv1d
            else ""
        )
        raise ValueError(
            f"lora target_modules={list(target_modules)} match no nn.Linear in the model; "
            f"linear layers present: {present}{hint}"
        )
    unmatched = sorted(wanted - {name.rsplit(".", 1)[-1] for name in targets})
    if unmatched:
        # e.g. the Llama default names on Phi-3, whose q/k/v and gate/up projections are fused
        # (qkv_proj, gate_up_proj): only o_proj and down_proj would be adapted, silently.
        present = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        warnings.warn(
            f"lora target_modules {unmatched} match no nn.Linear of the model and get no "
            f"adapter; linear layers present: {present}",
            stacklevel=2,
        )
    return targets


class LoraAdapter:
    """LoRA factors for the target layers of ``model``, applied by forward hooks while attached.

    Args:
        model: the (frozen or not) base model; it is never modified.
        target_modules: last name components of the linear layers to adapt (Llama names).
        rank: LoRA rank ``r``.
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input (only while the layer is in training mode).
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: Sequence[str] = DEFAULT_TARGETS,
        rank: int = 16,
        alpha: float = 8.0,
        dropout: float = 0.0,
    ) -> None:
        if rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {rank}")
        self.targets = find_lora_targets(model, target_modules)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scale = alpha / rank
        self.factors: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def factor_names(self) -> list[str]:
        """Ordered factor keys ``<layer>.lora_A`` / ``<layer>.lora_B`` (peft's naming)."""
        return [f"{n}.lora_{ab}" for n in self.targets for ab in ("A", "B")]

    def fresh_factors(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """New trainable factors: ``A`` Kaiming-uniform (a=sqrt(5)) as peft, ``B = 0``."""
        factors = {}
        for name, lin in self.targets.items():
            a = torch.empty(self.rank, lin.in_features, device=lin.weight.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            factors[f"{name}.lora_A"] = a.requires_grad_(True)
            factors[f"{name}.lora_B"] = torch.zeros(
                lin.out_features, self.rank, device=lin.weight.device, requires_grad=True
            )
        return factors

    def _hook(self, name: str):
        def hook(module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            a = self.factors[f"{name}.lora_A"]
            b = self.factors[f"{name}.lora_B"]
            x = F.dropout(inputs[0], self.dropout, training=module.training)
            return output + self.scale * F.linear(F.linear(x.to(a.dtype), a), b).to(output.dtype)

        return hook

    @contextmanager
    def attached(self, factors: dict[str, Tensor]) -> Iterator[LoraAdapter]:
        """Within the block, the model computes ``W x + s B A dropout(x)`` for every target."""
        missing = set(self.factor_names()) - set(factors)
        if missing:
            raise KeyError(f"LoRA factors missing for {sorted(missing)[:4]} ...")
        self.factors = factors
        self._handles = [
            lin.register_forward_hook(self._hook(name)) for name, lin in self.targets.items()
        ]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    def merged_deltas(self, factors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{<layer>.weight: s * B @ A}`` for every target layer (fp32, detached)."""
        return dict(self.iter_merged_deltas(factors))

    def iter_merged_deltas(self, factors: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        """``(<layer>.weight, s * B @ A)`` one target at a time: with every attention and MLP
        projection targeted, the deltas together are as large as the model."""
        for name in self.targets:
            a, b = (factors[f"{name}.lora_{k}"].detach().float() for k in "AB")
            yield f"{name}.weight", lora_delta(a, b, self.scale)

    def merged_numel(self) -> int:
        """The number of entries of all merged deltas (of the target weights)."""
        return sum(lin.weight.numel() for lin in self.targets.values())

    @torch.no_grad()
    def merge_into(self, model: nn.Module, factors: dict[str, Tensor]) -> None:
        """Add ``s B A`` to the base weights in place (peft's ``merge_and_unload``)."""
        params = dict(model.named_parameters())
        for key, delta in self.iter_merged_deltas(factors):
            params[key].add_(delta.to(params[key].dtype))

    def peft_state_dict(self, factors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The factors under peft's key names (``base_model.model.<layer>.lora_A.weight``)."""
        return {
            f"base_model.model.{k}.weight": v.detach().clone().contiguous()
            for k, v in factors.items()
        }
