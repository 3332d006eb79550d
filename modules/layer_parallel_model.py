"""Apply layer parallelism (LP) to a Hugging Face Llama-family decoder, and undo it.

``apply_layer_parallelism(model, plan)`` replaces each planned pair of decoder layers ``(i, i+1)``
by one module with the depth of a single layer (spec section 3.1)::

    h = x + Attn_i(N1_i(x)) + Attn_j(N1_j(x));   y = h + MLP_i(N2_i(h)) + MLP_j(N2_j(h))

* ``mode="reference"``: :class:`LPPairReference` calls both original sub-layers explicitly
  (training, tests).
* ``mode="fused"``: :class:`LPPairFused` folds the RMSNorm gains into the projections and runs one
  wider QKV matmul, one attention call over ``2H`` heads, one output, one gate/up and one down
  matmul per pair (spec 3.4): same FLOPs, half the kernel launches of the two layers.

Both write keys/values under each member's **original** layer index, so the ``DynamicCache`` keeps
one entry per original layer and ``generate()`` works unchanged. The original layer objects stay
inside the pair (``pair.members``) unless ``keep_originals=False``, so
``undo_layer_parallelism`` restores the model bit-identically.

While LP is applied, ``model.save_pretrained`` writes the original sequential layers (the pair
modules' keys would reload as a different model), ``output_hidden_states`` /
``output_attentions`` raise (Hugging Face records them from ``LlamaDecoderLayer`` /
``LlamaAttention`` calls, which pairs do not make), and a fused pair raises when its members would
be trained (its weights are derived buffers that receive no gradient).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from ops.layer_parallel import (
    POST_NORM_MODES,
    LayerParallelPlan,
    block_influence,
    fuse_attention,
    fuse_mlp,
    rms_normalize,
)

# Families whose decoder loop is `for layer in self.layers: layer(hidden, attention_mask=one_mask,
# position_embeddings=..., cache=...)` with Llama-shaped layers. Qwen2/3 index a per-layer mask by
# position in the loop, which a shortened layer list would misalign, so they are not accepted.
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
MODES = ("reference", "fused")
CAPTURE_FLAGS = ("output_hidden_states", "output_attentions")


@dataclass(frozen=True)
class LPState:
    """What ``apply_layer_parallelism`` did to a model (stored as ``model.layer_parallel``)."""

    plan: LayerParallelPlan
    mode: str
    post_norm_mode: str


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``) of a causal LM or the stack itself; rejects other families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(
            f"layer parallelism supports Hugging Face model_type in {SUPPORTED_MODEL_TYPES}, got "
            f"{model_type!r} ({type(model).__name__}); other families need their own pair module"
        )
    decoder = model.model if hasattr(model, "model") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(decoder).__name__} has no `layers` ModuleList")
    return decoder


def _check_member(layer: nn.Module, idx: int) -> None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    needed = (attn, mlp, getattr(layer, "input_layernorm", None))
    if any(m is None for m in needed) or not hasattr(layer, "post_attention_layernorm"):
        raise TypeError(f"layer {idx} ({type(layer).__name__}) is not a Llama-shaped decoder layer")
    if getattr(attn, "layer_idx", idx) != idx:
        raise ValueError(f"layer {idx} has self_attn.layer_idx={attn.layer_idx}; expected {idx}")


class _LPPair(nn.Module):
    """Common parts of both pair implementations: the members and their original indices."""

    def __init__(self, layer_i: nn.Module, layer_j: nn.Module, idx: tuple[int, int], post: str):
        super().__init__()
        if post not in POST_NORM_MODES:
            raise ValueError(f"post_norm_mode={post!r} is not one of {POST_NORM_MODES}")
        self.layer_ids = idx
        self.post_norm_mode = post
        self.config = layer_i.self_attn.config  # capture flags' defaults; HF attention interfaces
        self.members = nn.ModuleList([layer_i, layer_j])

    def extra_repr(self) -> str:
        return f"layers={self.layer_ids}, post_norm_mode={self.post_norm_mode}"

    def refuse_output_capture(self, kwargs: dict) -> None:
        """Raise when per-layer outputs are requested (kwargs first, then config, as HF reads them).

        Hugging Face records hidden states / attentions with hooks on ``LlamaDecoderLayer`` /
        ``LlamaAttention`` calls; a pair is neither and a fused pair never calls its members, so
        the paired layers would be missing and the other entries would match no layer index.
        """
        for flag in CAPTURE_FLAGS:
            value = kwargs.get(flag, getattr(self.config, flag, False))
            if value is not None and value is not False:
                raise NotImplementedError(
                    f"{flag}={value!r} is not supported while layer parallelism is applied "
                    f"(LP pair {self.layer_ids} would be missing from the output); run the model "
                    "under `with sequential_layers(model):` or call undo_layer_parallelism first"
                )


class LPPairReference(_LPPair):
    """An LP pair computed member by member with the original HF sub-modules (spec 3.1)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        self.refuse_output_capture(kwargs)
        x = hidden_states
        h = x
        # Both attentions read the same x; each updates the cache at its own original layer index.
        for m in self.members:
            a, _ = m.self_attn(
                hidden_states=m.input_layernorm(x),
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            h = h + a
        # Both MLPs read h, which already holds both attention outputs.
        return h + self._mlps(h)

    def _mlps(self, h: torch.Tensor) -> torch.Tensor:
        mi, mj = self.members
        if self.post_norm_mode == "per_member":
            return mi.mlp(mi.post_attention_layernorm(h)) + mj.mlp(mj.post_attention_layernorm(h))
        ni, nj = mi.post_attention_layernorm, mj.post_attention_layernorm
        eps_i, eps_j = ni.variance_epsilon, nj.variance_epsilon
        if self.post_norm_mode == "averaged":
            # First official commit: one RMSNorm, mean gain, the smaller eps, for both MLPs.
            u = 0.5 * (ni.weight + nj.weight) * rms_normalize(h, min(eps_i, eps_j))
            return mi.mlp(u) + mj.mlp(u)
        # rank_mixed (official HEAD, 2-way TP): hidden units [0, I/2) of both MLPs see N2_i(h),
        # units [I/2, I) see N2_j(h).
        ui, uj = ni(h), nj(h)
        out = 0
        for m in (mi, mj):
            half = m.mlp.gate_proj.out_features // 2
            parts = []
            for u, rows in ((ui, slice(0, half)), (uj, slice(half, None))):
                g = F.linear(u, m.mlp.gate_proj.weight[rows], _rows(m.mlp.gate_proj.bias, rows))
                p = F.linear(u, m.mlp.up_proj.weight[rows], _rows(m.mlp.up_proj.bias, rows))
                parts.append(m.mlp.act_fn(g) * p)
            out = out + m.mlp.down_proj(torch.cat(parts, dim=-1))
        return out


def _check_foldable_eps(idx: tuple[int, int], norm: str, eps_i: float, eps_j: float) -> None:
    """Folding needs one shared ``n(x)`` per sub-layer, i.e. equal eps (spec 3.4 "assert")."""
    if eps_i != eps_j:
        raise ValueError(
            f"LP pair {idx}: {norm}.variance_epsilon differs between the members ({eps_i} vs "
            f"{eps_j}), so the norms cannot be folded into one fused layer; use mode='reference'"
        )


def _rows(bias: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if bias is None else bias[rows]


def _linear_parts(lin: nn.Linear, prefix: str) -> dict[str, torch.Tensor | None]:
    return {prefix: lin.weight, f"{prefix}_bias": lin.bias}


class LPPairFused(_LPPair):
    """An LP pair as one wide layer: folded norm gains, concatenated projections (spec 3.4).

    The fused weights are derived, non-persistent buffers: checkpoints keep the unfused weights.
    """

    def __init__(
        self,
        layer_i: nn.Module,
        layer_j: nn.Module,
        idx: tuple[int, int],
        post: str,
        keep_originals: bool = True,
    ):
        super().__init__(layer_i, layer_j, idx, post)
        ai, aj = layer_i.self_attn, layer_j.self_attn
        ni, nj = layer_i.input_layernorm, layer_j.input_layernorm
        pi, pj = layer_i.post_attention_layernorm, layer_j.post_attention_layernorm
        _check_foldable_eps(idx, "input_layernorm", ni.variance_epsilon, nj.variance_epsilon)
        if post != "averaged":
            # `averaged` is defined with one norm using the smaller eps (official first commit), so
            # its reference path shares n(h) too; the other modes normalise h with each member's
            # own eps, which one folded n(h) cannot reproduce.
            _check_foldable_eps(
                idx, "post_attention_layernorm", pi.variance_epsilon, pj.variance_epsilon
            )
        self.eps1 = ni.variance_epsilon
        self.eps2 = min(pi.variance_epsilon, pj.variance_epsilon)
        self.head_dim = ai.head_dim
        self.scaling = ai.scaling
        self.is_causal = True
        self.num_heads = ai.q_proj.out_features // ai.head_dim
        self.num_kv_heads = ai.k_proj.out_features // ai.head_dim
        # With member-major head order [i heads, j heads] for Q and KV, repeat_kv's grouping maps
        # each member's queries to its own KV heads (spec 3.4 step 1).
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.attention_dropout = 0.0
        self.act_fn = ACT2FN[layer_i.mlp.config.hidden_act]
        with torch.no_grad():
            attn = fuse_attention(*(self._attn_parts(a, n) for a, n in ((ai, ni), (aj, nj))))
            mlp = fuse_mlp(
                *(self._mlp_parts(m.mlp, m.post_attention_layernorm) for m in (layer_i, layer_j)),
                post_norm_mode=post,
            )
        for name, value in {**attn, **mlp}.items():
            self.register_buffer(name, None if value is None else value.detach().clone(), False)
        if not keep_originals:
            del self.members

    def _members_trainable(self) -> bool:
        members = getattr(self, "members", ())  # gone after keep_originals=False: nothing to train
        return any(p.requires_grad for m in members for p in m.parameters())

    @staticmethod
    def _attn_parts(attn: nn.Module, norm: nn.Module) -> dict[str, torch.Tensor | None]:
        parts: dict[str, torch.Tensor | None] = {"gain": norm.weight}
        for name in ("q", "k", "v", "o"):
            parts.update(_linear_parts(getattr(attn, f"{name}_proj"), name))
        return parts

    @staticmethod
    def _mlp_parts(mlp: nn.Module, norm: nn.Module) -> dict[str, torch.Tensor | None]:
        parts: dict[str, torch.Tensor | None] = {"gain": norm.weight}
        for name in ("gate", "up", "down"):
            parts.update(_linear_parts(getattr(mlp, f"{name}_proj"), name))
        return parts

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        self.refuse_output_capture(kwargs)
        if self.training and torch.is_grad_enabled() and self._members_trainable():
            raise RuntimeError(
                f"LP pair {self.layer_ids} is fused: its weights are derived buffers, so training "
                "through it leaves the members' parameters without gradients; apply layer "
                "parallelism with mode='reference' to train (or call model.eval() / run under "
                "torch.no_grad() for inference)"
            )
        x = hidden_states
        bsz, q_len, _ = x.shape
        hq, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(rms_normalize(x, self.eps1), self.qkv, self.qkv_bias)
        q, k, v = qkv.split([2 * hq * hd, 2 * hkv * hd, 2 * hkv * hd], dim=-1)
        q = q.view(bsz, q_len, 2 * hq, hd).transpose(1, 2)
        k = k.view(bsz, q_len, 2 * hkv, hd).transpose(1, 2)
        v = v.view(bsz, q_len, 2 * hkv, hd).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            # One cache entry per original layer: member i under index i, member j under j.
            i, j = self.layer_ids
            ki, vi = cache.update(k[:, :hkv], v[:, :hkv], i)
            kj, vj = cache.update(k[:, hkv:], v[:, hkv:], j)
            k, v = torch.cat([ki, kj], dim=1), torch.cat([vi, vj], dim=1)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        h = x + F.linear(out.reshape(bsz, q_len, -1), self.o, self.o_bias)
        gate, up = F.linear(rms_normalize(h, self.eps2), self.gate_up, self.gate_up_bias).chunk(
            2, dim=-1
        )
        return h + F.linear(self.act_fn(gate) * up, self.down, self.down_bias)


def apply_layer_parallelism(
    model: nn.Module,
    plan: LayerParallelPlan | dict | list | None,
    mode: str = "fused",
    post_norm_mode: str = "per_member",
    keep_originals: bool = True,
) -> nn.Module:
    """Replace the planned layer pairs of ``model`` in place and return it.

    Args:
        model: a Hugging Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` (or their ``*Model``).
        plan: a :class:`LayerParallelPlan` or anything ``LayerParallelPlan.parse`` accepts.
        mode: ``"fused"`` (inference) or ``"reference"`` (training, tests).
        post_norm_mode: ``"per_member"`` (spec 3.1), or the code-faithful ``"rank_mixed"`` /
            ``"averaged"`` variants (spec section 4, defect 1).
        keep_originals: keep the member layers inside fused pairs so the model can be undone;
            ``False`` frees their memory (inference only, no undo).
    """
    plan = LayerParallelPlan.parse(plan)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if post_norm_mode not in POST_NORM_MODES:
        raise ValueError(f"post_norm_mode={post_norm_mode!r} is not one of {POST_NORM_MODES}")
    decoder = decoder_of(model)
    if getattr(model, "layer_parallel", None) is not None:
        raise RuntimeError(
            f"model already has layer parallelism {model.layer_parallel}; call "
            "undo_layer_parallelism first"
        )
    layers = decoder.layers
    if len(layers) != model.config.num_hidden_layers:
        raise ValueError(
            f"decoder has {len(layers)} layers, config says {model.config.num_hidden_layers}"
        )
    plan.validate(len(layers))
    first = dict(plan.pairs)
    second = {j for _, j in plan.pairs}
    new: list[nn.Module] = []
    for idx, layer in enumerate(layers):
        if idx in second:
            continue
        if idx not in first:
            new.append(layer)
            continue
        j = first[idx]
        _check_member(layer, idx)
        _check_member(layers[j], j)
        if mode == "reference":
            new.append(LPPairReference(layer, layers[j], (idx, j), post_norm_mode))
        else:
            new.append(LPPairFused(layer, layers[j], (idx, j), post_norm_mode, keep_originals))
    decoder.layers = nn.ModuleList(new)
    if hasattr(type(model), "save_pretrained"):
        # An instance attribute shadows the class method until undo; a callable object (not a
        # closure) so deepcopy and pickling (ddp_spawn) rebind it to the copied model.
        object.__setattr__(model, "save_pretrained", SaveSequential(model))
    # A plain attribute (not a Module), so it stays out of state_dict; the config keeps
    # num_hidden_layers = L so DynamicCache still allocates one entry per original layer.
    object.__setattr__(model, "layer_parallel", LPState(plan, mode, post_norm_mode))
    return model


class SaveSequential:
    """``model.save_pretrained`` while LP is applied: writes the original sequential layers.

    With the pairs in ``decoder.layers`` the state dict has keys ``layers.<k>.members.<m>.*`` at
    shifted positions, which Hugging Face would load as a different model (missing layers
    initialised at random). The plan is not saved: re-apply it after loading.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with sequential_layers(self.model):
            return type(self.model).save_pretrained(self.model, *args, **kwargs)


def undo_layer_parallelism(model: nn.Module) -> nn.Module:
    """Put the original layers back (the same objects, so the model is bit-identical)."""
    decoder = decoder_of(model)
    if getattr(model, "layer_parallel", None) is None:
        return model
    layers = original_layers(model)
    decoder.layers = nn.ModuleList(layers)
    model.__dict__.pop("save_pretrained", None)
    object.__setattr__(model, "layer_parallel", None)
    return model


def num_sequential_layers(model: nn.Module) -> int:
    """Sequential depth of the (possibly LP) decoder: the number of modules its loop runs."""
    return len(decoder_of(model).layers)


def original_layers(model: nn.Module) -> list[nn.Module]:
    """The model's original decoder layers in order (the pairs' members, unpaired layers as is)."""
    layers: list[nn.Module] = []
    for layer in decoder_of(model).layers:
        if isinstance(layer, _LPPair):
            if not hasattr(layer, "members"):
                raise RuntimeError(
                    f"LP pair {layer.layer_ids} was fused with keep_originals=False; "
                    "its original layers are gone and cannot be restored"
                )
            layers.extend(layer.members)
        else:
            layers.append(layer)
    return layers


@contextmanager
def sequential_layers(model: nn.Module, keep: Sequence[int] | None = None) -> Iterator[nn.Module]:
    """Temporarily run the original sequential stack (or only the layers ``keep``).

    The same layer objects are swapped in (no copy), so this is free; used for the sequential
    baseline next to an LP model and for the drop-layers baselines (spec 3.6).
    """
    decoder = decoder_of(model)
    lp_layers = decoder.layers
    layers = original_layers(model)
    if keep is not None:
        layers = [layers[k] for k in keep]
    decoder.layers = nn.ModuleList(layers)
    try:
        yield model
    finally:
        decoder.layers = lp_layers


@torch.no_grad()
def layer_block_influence(model: nn.Module, batches: Iterable[torch.Tensor]) -> list[float]:
    """Per-layer Block Influence ``1 - mean cos(x_in, x_out)`` (ShortGPT) of the sequential model."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    hooks = []
    with sequential_layers(model):
        for idx, layer in enumerate(decoder_of(model).layers):

            def hook(_mod, args, kwargs, out, idx=idx):
                x_in = args[0] if args else kwargs["hidden_states"]
                x_out = out[0] if isinstance(out, tuple) else out
                sums[idx] = sums.get(idx, 0.0) + block_influence(x_in, x_out).item()
                counts[idx] = counts.get(idx, 0) + 1

            hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
        try:
            for ids in batches:
                model(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()
    return [sums[k] / counts[k] for k in sorted(sums)]
