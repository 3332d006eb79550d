"""Layer parallelism (LP): plan validation, weight fusion math and layer-importance scores.

Paper: Calvo González, Paliotta, Pagliardini, Jaggi, Fleuret, *Leveraging the True Depth of LLMs*
(arXiv 2502.02790). A pair of consecutive pre-norm blocks ``(i, j = i + 1)`` is evaluated with the
sequential depth of one block (spec section 3.1)::

    h = x + Attn_i(N1_i(x)) + Attn_j(N1_j(x))
    y = h + MLP_i(N2_i(h)) + MLP_j(N2_j(h))

so ``Delta`` paired layers reduce the depth from ``L`` to ``L - Delta / 2``. Everything here is
Lightning- and ``transformers``-free: the model wrapper (``modules/layer_parallel_model.py``) calls
these functions on plain tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

POST_NORM_MODES = ("per_member", "rank_mixed", "averaged")


@dataclass(frozen=True)
class LayerParallelPlan:
    """Which consecutive layers run as parallel pairs.

    Args:
        pairs: sorted pairs ``(i, i + 1)`` of 0-based layer indices; empty means "no LP".
    """

    pairs: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for pair in self.pairs:
            if len(pair) != 2 or any(not isinstance(k, int) or isinstance(k, bool) for k in pair):
                raise ValueError(f"LP pair {pair!r} must be two integer layer indices (i, i + 1)")
            i, j = pair
            if i < 0:
                raise ValueError(f"LP pair {pair!r}: layer indices must be >= 0")
            if j != i + 1:
                raise ValueError(f"LP pair {pair!r}: members must be consecutive layers (i, i + 1)")
            if i in seen or j in seen:
                raise ValueError(f"LP pair {pair!r} overlaps another pair in {list(self.pairs)}")
            seen.update(pair)
        if list(self.pairs) != sorted(self.pairs):
            object.__setattr__(self, "pairs", tuple(sorted(self.pairs)))

    @classmethod
    def from_range(cls, start: int, end: int) -> LayerParallelPlan:
        """Pairs ``(start, start+1), ..., (end-2, end-1)`` of the range ``[start, end)``.

        ``Delta = end - start`` must be even (official ``replace_layers`` asserts the same).
        """
        if not (isinstance(start, int) and isinstance(end, int)):
            raise ValueError(f"LP range start={start!r}, end={end!r} must be integers")
        if start < 0:
            raise ValueError(f"LP range start={start} must be >= 0")
        if start >= end:
            raise ValueError(
                f"LP range [{start}, {end}) is empty: start must be < end (end is exclusive); "
                "the sequential model is plan: null"
            )
        if (end - start) % 2:
            raise ValueError(
                f"LP range [{start}, {end}) has odd length Delta={end - start}; layers are paired, "
                "so end - start must be even"
            )
        return cls(tuple((i, i + 1) for i in range(start, end, 2)))

    @classmethod
    def parse(cls, spec: Any) -> LayerParallelPlan:
        """Build a plan from a YAML-friendly value.

        Accepted: ``None`` / ``[]`` (empty plan), ``{"start": s, "end": e}``, a list of ranges
        ``[{"start": .., "end": ..}, ...]``, a list of pairs ``[[2, 3], [4, 5]]`` or a plan.
        """
        if isinstance(spec, LayerParallelPlan):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"start", "end"}
            if unknown or not {"start", "end"} <= set(spec):
                raise ValueError(
                    f"LP plan {dict(spec)!r}: expected exactly the keys 'start' and 'end'"
                )
            return cls.from_range(spec["start"], spec["end"])
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            pairs: list[tuple[int, int]] = []
            for item in spec:
                if isinstance(item, Mapping):
                    pairs.extend(cls.parse(item).pairs)
                elif isinstance(item, Sequence) and not isinstance(item, str):
                    pairs.append(tuple(item))  # type: ignore[arg-type]
                else:
                    raise ValueError(f"LP plan item {item!r} is neither a pair nor a range")
            return cls(tuple(pairs))
        raise ValueError(f"LP plan {spec!r}: expected None, a range dict or a list of pairs")

    @property
    def delta(self) -> int:
        """Number of layers that are paired (``Delta`` in the paper)."""
        return 2 * len(self.pairs)

    @property
    def layers(self) -> tuple[int, ...]:
        """All paired layer indices, sorted."""
        return tuple(k for pair in self.pairs for k in pair)

    def effective_depth(self, num_layers: int) -> int:
        """Sequential depth ``L - Delta / 2`` after pairing."""
        self.validate(num_layers, warn=False)
        return num_layers - len(self.pairs)

    def validate(self, num_layers: int, warn: bool = True) -> None:
        """Raise if a pair lies outside ``[0, num_layers)``; warn on pairing the first/last layer.

        The spec's rule [ours]: pairing layer 0 costs most perplexity (project measurement 1.144 vs
        1.006 for a middle pair) and pairing the last layer feeds the head a mix of two blocks.
        """
        for i, j in self.pairs:
            if j >= num_layers:
                raise ValueError(
                    f"LP pair ({i}, {j}) is out of range for a model with {num_layers} layers "
                    f"(valid indices 0..{num_layers - 1})"
                )
        if not warn:
            return
        if 0 in self.layers:
            warnings.warn(
                "LP plan pairs layer 0; the first layers are the least interchangeable "
                "(expect a large perplexity increase)",
                stacklevel=2,
            )
        if num_layers - 1 in self.layers:
            warnings.warn("LP plan pairs the last layer", stacklevel=2)

    def to_list(self) -> list[list[int]]:
        """Primitive form for hparams / JSON."""
        return [list(p) for p in self.pairs]


def count_allreduces(plan: LayerParallelPlan, num_layers: int) -> int:
    """All-reduces per forward step under 2-way tensor parallelism (spec 3.5): ``2L - Delta``.

    A sequential Megatron layer needs one after the attention output projection and one after the
    MLP down projection; an LP pair needs the same two for both members together.
    """
    plan.validate(num_layers, warn=False)
    return 2 * num_layers - plan.delta


def ideal_speedup(num_layers: int, delta: int) -> float:
    """Depth ratio ``L / (L - Delta / 2)``: the speed-up if every layer costs one launch-bound step."""
    return num_layers / (num_layers - delta / 2)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``n(x) = x / sqrt(mean(x^2) + eps)`` without gain, computed in fp32 like ``LlamaRMSNorm``."""
    xf = x.to(torch.float32)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def fold_norm_into_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor,
    beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a norm's affine part into the following linear layer (spec 3.4).

    ``W (gamma * n + beta) + b = (W diag(gamma)) n + (W beta + b)``. ``gamma`` may be a vector
    ``[d_in]`` (one gain for all output rows) or a matrix ``[d_out, d_in]`` (a gain per output row,
    used by ``rank_mixed`` where halves of one MLP see different norms).
    """
    w = weight * (gamma if gamma.dim() == 2 else gamma.unsqueeze(0))
    if beta is None:
        return w, bias
    shift = weight @ beta
    return w, shift if bias is None else bias + shift


def post_norm_gains(
    gain_i: torch.Tensor, gain_j: torch.Tensor, intermediate: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``N2`` gains ``[I, d]`` applied to member ``i``'s and ``j``'s gate/up rows.

    * ``per_member`` [ours, spec 3.1]: each MLP sees its own ``N2``.
    * ``rank_mixed`` [code HEAD, 2-way TP]: rank ``b`` holds the ``b``-th half of the hidden units of
      *both* MLPs and normalises with member ``b``'s gain, so the first half of every MLP sees
      ``N2_i`` and the second half ``N2_j`` (official defect 1, reproduced on request).
    * ``averaged`` [code first commit]: one norm with the mean gain for both MLPs.
    """
    if mode not in POST_NORM_MODES:
        raise ValueError(f"post_norm_mode={mode!r} is not one of {POST_NORM_MODES}")
    d = gain_i.numel()
    if mode == "per_member":
        return gain_i.expand(intermediate, d), gain_j.expand(intermediate, d)
    if mode == "averaged":
        mean = 0.5 * (gain_i + gain_j)
        return mean.expand(intermediate, d), mean.expand(intermediate, d)
    if intermediate % 2:
        raise ValueError(f"rank_mixed needs an even intermediate size, got {intermediate}")
    half = intermediate // 2
    mixed = torch.cat([gain_i.expand(half, d), gain_j.expand(half, d)])
    return mixed, mixed


def _cat_bias(*biases: torch.Tensor | None, sizes: Sequence[int]) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    ref = next(b for b in biases if b is not None)
    return torch.cat(
        [b if b is not None else ref.new_zeros(n) for b, n in zip(biases, sizes, strict=True)]
    )


def _sum_bias(*biases: torch.Tensor | None) -> torch.Tensor | None:
    present = [b for b in biases if b is not None]
    return None if not present else torch.stack(present).sum(0)


def fuse_attention(
    member_i: Mapping[str, torch.Tensor | None], member_j: Mapping[str, torch.Tensor | None]
) -> dict[str, torch.Tensor | None]:
    """One wide QKV matmul and one wide output matmul for an LP pair's attention (spec 3.4 1-3).

    Each member maps ``q, k, v, o`` (weights ``[out, in]``), optional ``q_bias, k_bias, v_bias,
    o_bias`` and ``gain`` (its input RMSNorm weight) to tensors. Returns ``qkv`` with rows
    ``[Wq_i'; Wq_j'; Wk_i'; Wk_j'; Wv_i'; Wv_j']`` (primes: gain-folded), so heads are member-major
    and grouped-query attention maps member ``i``'s queries only to member ``i``'s KV heads;
    ``o = [Wo_i, Wo_j]`` (column concatenation equals summing both output projections).
    """
    fused_w, fused_b, sizes = [], [], []
    for name in ("q", "k", "v"):
        for m in (member_i, member_j):
            w, b = fold_norm_into_linear(m[name], m.get(f"{name}_bias"), m["gain"])
            fused_w.append(w)
            fused_b.append(b)
            sizes.append(w.shape[0])
    return {
        "qkv": torch.cat(fused_w),
        "qkv_bias": _cat_bias(*fused_b, sizes=sizes),
        "o": torch.cat([member_i["o"], member_j["o"]], dim=1),
        "o_bias": _sum_bias(member_i.get("o_bias"), member_j.get("o_bias")),
    }


def fuse_mlp(
    member_i: Mapping[str, torch.Tensor | None],
    member_j: Mapping[str, torch.Tensor | None],
    post_norm_mode: str = "per_member",
) -> dict[str, torch.Tensor | None]:
    """Gate/up of both members in one matmul, down projections concatenated (spec 3.4 step 4).

    Each member maps ``gate, up, down`` (``[out, in]``), optional ``*_bias`` and ``gain`` (its
    post-attention RMSNorm weight). Returns ``gate_up`` rows ``[Wg_i'; Wg_j'; Wu_i'; Wu_j']`` and
    ``down = [Wd_i, Wd_j]``, so ``y = h + down @ (act(gate) * up)`` sums both MLPs.
    """
    inter = member_i["gate"].shape[0]
    if member_j["gate"].shape[0] != inter:
        raise ValueError("LP pair members have different MLP intermediate sizes")
    g_i, g_j = post_norm_gains(member_i["gain"], member_j["gain"], inter, post_norm_mode)
    rows, biases = [], []
    for name in ("gate", "up"):
        for m, g in ((member_i, g_i), (member_j, g_j)):
            w, b = fold_norm_into_linear(m[name], m.get(f"{name}_bias"), g)
            rows.append(w)
            biases.append(b)
    return {
        "gate_up": torch.cat(rows),
        "gate_up_bias": _cat_bias(*biases, sizes=[inter] * 4),
        "down": torch.cat([member_i["down"], member_j["down"]], dim=1),
        "down_bias": _sum_bias(member_i.get("down_bias"), member_j.get("down_bias")),
    }


def block_influence(
    x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """ShortGPT Block Influence ``BI = 1 - mean_t cos(x_in_t, x_out_t)`` over tokens.

    Args:
        x_in: block inputs ``[..., d]``.
        x_out: block outputs, same shape.
        mask: optional boolean ``[...]`` selecting the tokens to average (e.g. non-padding).
    """
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
    if mask is not None:
        cos = cos[mask]
    return 1.0 - cos.mean()


def admissible_ranges(num_layers: int, delta: int) -> list[LayerParallelPlan]:
    """Contiguous plans of ``delta`` layers that do not pair layer 0 (spec 3.2 rule [ours])."""
    if delta <= 0 or delta % 2 or delta > num_layers - 1:
        raise ValueError(f"delta={delta} must be even, positive and below num_layers={num_layers}")
    return [LayerParallelPlan.from_range(s, s + delta) for s in range(1, num_layers - delta + 1)]


def lowest_influence_layers(
    influence: Iterable[float], k: int, exclude: Iterable[int] = (0,)
) -> list[int]:
    """The ``k`` layers with the lowest Block Influence (ShortGPT drop baseline), sorted."""
    skip = set(exclude)
    ranked = sorted((v, idx) for idx, v in enumerate(influence) if idx not in skip)
    if k > len(ranked):
        raise ValueError(f"cannot pick {k} layers out of {len(ranked)} candidates")
    return sorted(idx for _, idx in ranked[:k])
