"""Tell FSDP shards from whole tensors (for optimizers whose math needs whole weights: per-row
or global norms)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def is_fsdp_shard(tensor: Tensor) -> bool:
    """True for FSDP shards: DTensors (FSDP2), flat parameters (FSDP1) and, with
    ``use_orig_params=True`` (Lightning's default), the 1-D views FSDP1 gives the original
    parameters, which it marks as flattened."""
    try:
        from torch.distributed.fsdp._common_utils import _is_fsdp_flattened
        from torch.distributed.fsdp._flat_param import FlatParameter
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor | FlatParameter) or _is_fsdp_flattened(tensor)


def refuse_fsdp_shards(tensors: Iterable[Tensor], who: str, why: str) -> None:
    """Raise ``ValueError`` naming ``who`` and ``why`` if any tensor is an FSDP shard."""
    if any(is_fsdp_shard(t) for t in tensors):
        raise ValueError(f"{who} does not run under FSDP: {why}; use DDP")
