"""Per-sample gradients of selected (trainable, e.g. LoRA) parameters with ``torch.func``.

The loss is any callable ``loss_fn(batch) -> Tensor[B]`` that runs ``module`` on a batch (a
tensor, tuple or dict of tensors with a leading batch axis) and returns one loss per example.
``vmap(grad(.))`` evaluates it on batches of one, with the selected parameters swapped in by
``functional_call``; the ``loop`` mode is a batch-1 autograd fallback for models ``vmap``
cannot trace. Neither leaves ``.grad`` populated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from ops.influence import orient_grad


def select_params(
    module: nn.Module, include: Sequence[str], exclude: Sequence[str] = ()
) -> dict[str, nn.Parameter]:
    """Trainable parameters whose name contains one of ``include`` and none of ``exclude``.

    Args:
        module: the model.
        include: name substrings, e.g. ``["lora_A", "lora_B", "head.weight"]``.
        exclude: name substrings to drop.

    Raises:
        ValueError: nothing matched, or a matched tensor has more than two dimensions.
    """
    chosen = {
        name: p
        for name, p in module.named_parameters()
        if p.requires_grad
        and any(s in name for s in include)
        and not any(s in name for s in exclude)
    }
    if not chosen:
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        raise ValueError(
            f"no trainable parameter matches include={list(include)} exclude={list(exclude)}; "
            f"trainable parameters are {trainable[:20]}"
        )
    for name, p in chosen.items():
        if p.ndim > 2:
            raise ValueError(
                f"parameter {name!r} has shape {tuple(p.shape)}: influence supports 1-D and 2-D "
                "tensors only; exclude it"
            )
    return chosen


class _LossCall(nn.Module):
    """Holds ``module`` as a child so ``functional_call`` can swap its parameters."""

    def __init__(self, module: nn.Module, loss_fn: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.inner = module
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._loss_fn(batch)


def per_sample_grads(
    module: nn.Module,
    params: dict[str, nn.Parameter],
    loss_fn: Callable[[Any], torch.Tensor],
    batch: Any,
    mode: Literal["vmap", "loop"] = "vmap",
    orient: bool = True,
) -> dict[str, torch.Tensor]:
    """Gradients ``d loss(z_b) / d theta_l`` for every example ``b`` of ``batch``.

    Args:
        module: the model whose parameters ``loss_fn`` uses.
        params: the selected parameters (name -> parameter of ``module``).
        loss_fn: ``batch -> Tensor[B]`` per-example losses (e.g. ``pl_module.per_sample_loss``).
        batch: tensor / tuple / dict of tensors with leading batch axis ``B``.
        mode: ``vmap`` (``torch.func``) or ``loop`` (one autograd call per example).
        orient: return oriented ``(B, r, d)`` gradients (:func:`ops.influence.orient_grad`),
            otherwise raw ``(B, *shape)``.

    Returns:
        name -> ``(B, r, d)`` (or ``(B, *shape)``) gradients, detached.
    """
    if mode == "vmap":
        wrapper = _LossCall(module, loss_fn)
        detached = {"inner." + n: p.detach() for n, p in params.items()}

        def loss_one(p: dict[str, torch.Tensor], example: Any) -> torch.Tensor:
            one = tree_map(lambda t: t.unsqueeze(0), example)
            return functional_call(wrapper, p, (one,), strict=False).sum()

        raw = vmap(grad(loss_one), in_dims=(None, 0), randomness="error")(detached, batch)
        out = {n: raw["inner." + n] for n in params}
    elif mode == "loop":
        leaves = [t for t in _tensors(batch)]
        size = leaves[0].shape[0]
        names = list(params)
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for b in range(size):
            one = tree_map(lambda t, b=b: t[b : b + 1], batch)
            gs = torch.autograd.grad(loss_fn(one).sum(), [params[n] for n in names])
            for n, g in zip(names, gs, strict=True):
                rows[n].append(g.detach())
        out = {n: torch.stack(rows[n]) for n in names}
    else:
        raise ValueError(f"per-sample gradient mode={mode!r}: expected 'vmap' or 'loop'")
    if orient:
        out = {n: orient_grad(n, g, batched=True) for n, g in out.items()}
    return out


def loss_hessian_blocks(
    module: nn.Module,
    params: dict[str, nn.Parameter],
    loss_fn: Callable[[Any], torch.Tensor],
    batch: Any,
) -> dict[str, torch.Tensor]:
    """Diagonal blocks ``d^2 (sum_b l(z_b)) / d vec(theta_l)^2`` of the true Hessian, per tensor.

    The Koh & Liang curvature (second derivative of the training loss, not the Fisher), for the
    ``exact_hessian``/``lissa_hessian`` baselines. One ``(r d, r d)`` block per selected tensor,
    in the coordinates of the oriented gradients (``vec`` of :func:`ops.influence.orient_grad`),
    so it pairs with the same ``v_l``/``g_il`` as the Fisher ``F_l`` of ``exact_fim``. Summed
    (not averaged) over the batch so batches and ranks accumulate; divide by ``n`` afterwards.
    Cross-tensor blocks are not formed: like every curvature here it is layer-wise (spec 3.1).

    Args:
        module: the model whose parameters ``loss_fn`` uses.
        params: the selected parameters (name -> parameter of ``module``).
        loss_fn: ``batch -> Tensor[B]`` per-example losses.
        batch: tensor / tuple / dict of tensors with leading batch axis ``B``.

    Returns:
        name -> ``(r d, r d)`` Hessian block, detached, in the parameters' dtype.
    """
    wrapper = _LossCall(module, loss_fn)
    detached = {"inner." + n: p.detach() for n, p in params.items()}
    out = {}
    for name, p in params.items():
        oriented = orient_grad(name, p.detach())

        def loss_sum(x: torch.Tensor, name: str = name, shape=p.shape) -> torch.Tensor:
            # orient_grad is an involution up to the (1, d) -> (d,) reshape of 1-D tensors, so it
            # maps the oriented coordinates back to the parameter's own layout
            raw = orient_grad(name, x).reshape(shape)
            swapped = {**detached, "inner." + name: raw}
            return functional_call(wrapper, swapped, (batch,), strict=False).sum()

        H = torch.func.hessian(loss_sum)(oriented)  # (r, d, r, d), forward-over-reverse
        out[name] = H.reshape(oriented.numel(), oriented.numel()).detach()
    return out


def _tensors(batch: Any) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    tree_map(lambda t: leaves.append(t) if isinstance(t, torch.Tensor) else None, batch)
    if not leaves:
        raise ValueError("per_sample_grads: batch contains no tensor")
    return leaves


def causal_lm_targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets of a batch without ``labels``: ``input_ids``, -100 where padded."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return ids if mask is None else ids.masked_fill(mask == 0, -100)


def causal_lm_per_sample_loss(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of every sequence over its non-ignored (``labels != -100``) tokens.

    For modules whose ``forward(input_ids, **kw)`` returns Hugging Face causal-LM outputs
    (e.g. ``modules.causal_lm.CausalLMModule``); ``attention_mask`` is passed on when present.
    Without ``labels`` the targets are ``input_ids`` with the padded positions
    (``attention_mask == 0``) ignored, so padding never counts as a target (spec 3.2).
    """
    kwargs = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
    logits = module(batch["input_ids"], **kwargs).logits[:, :-1]
    labels = batch["labels"] if "labels" in batch else causal_lm_targets(batch)
    labels = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    valid = (labels != -100).to(tok.dtype)
    return (tok * valid).sum(1) / valid.sum(1).clamp_min(1.0)
