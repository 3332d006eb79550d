"""What one federated round adds up over its clients (used by ``FederatedLoRAModule``).

Each rank adds its clients' weighted updates ``w_c Delta_c`` into ``RoundSums``, a flat buffer
that one all-reduce combines; under secure aggregation the same updates also go, quantized and
masked, into ``MaskedRoundSum``, whose integer all-reduce is the aggregate the server uses.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from modules.lora_fl_settings import SecureAggregationSettings
from ops import secure_aggregation as sa
from ops.seeding import derive_seed


class RoundSums:
    """A round's per-rank sums in one fp32 buffer, so that a single all-reduce combines them.

    Layout: ``[sum_c w_c Delta_c | sum_c w_c loss_c | clients | checksum | sum_c local steps]``.
    The checksum is the sum of the global weights ``theta_r`` the rank starts the round from;
    summed over ranks it is ``world_size`` times one rank's value iff the ranks agree.
    """

    _LOSS, _CLIENTS, _CHECKSUM, _LOCAL_STEPS = range(4)

    def __init__(self, server_parameters: list[Tensor], device: torch.device) -> None:
        self.numel = sum(p.numel() for p in server_parameters)
        self.buffer = torch.zeros(self.numel + 4, dtype=torch.float32, device=device)
        # Tensor by tensor: a float64 copy of the whole model would be its largest buffer.
        sums = [p.detach().sum(dtype=torch.float64) for p in server_parameters]
        self.checksum = float(torch.stack(sums).sum())
        self.buffer[self.numel + self._CHECKSUM] = self.checksum

    def add_client(self, update: Tensor, weight: float, loss: float, local_steps: int) -> None:
        """Add one client's weighted update ``w_c Delta_c``, its loss and its local steps."""
        self.buffer[: self.numel] += update
        self.buffer[self.numel + self._LOSS] += weight * loss
        self.buffer[self.numel + self._CLIENTS] += 1.0
        self.buffer[self.numel + self._LOCAL_STEPS] += local_steps

    def all_reduce(self, strategy: Strategy) -> None:
        """Sum the buffers of all ranks (the round's one aggregation collective)."""
        self.buffer = strategy.reduce(self.buffer, reduce_op="sum")

    def _scalar(self, offset: int) -> float:
        return float(self.buffer[self.numel + offset])

    @property
    def update(self) -> Tensor:
        """``sum_c w_c Delta_c``: a view into the buffer."""
        return self.buffer[: self.numel]

    @property
    def weighted_loss(self) -> float:
        return self._scalar(self._LOSS)

    @property
    def clients(self) -> float:
        return self._scalar(self._CLIENTS)

    @property
    def mean_local_steps(self) -> float:
        return self._scalar(self._LOCAL_STEPS) / max(self.clients, 1.0)

    def rank_desync(self, world_size: int) -> float:
        """After ``all_reduce``: 0 iff every rank started from the same ``theta_r`` (up to fp32
        rounding of the checksums, which the buffer holds in fp32)."""
        mine = float(torch.tensor(self.checksum, dtype=torch.float32))
        return abs(self._scalar(self._CHECKSUM) - world_size * mine)


class MaskedRoundSum:
    """Secure aggregation of a round (Bonawitz et al. 2017, ``ops.secure_aggregation``): each
    client's ``w_c Delta_c`` is clipped to ``[-R, R]``, encoded in fixed point and masked with its
    pairwise masks; the ranks add the masked integers mod ``2^m``, and only the sum over every
    participant unmasks."""

    def __init__(
        self,
        settings: SecureAggregationSettings,
        numel: int,
        device: torch.device,
        participants: list[int],
        round_index: int,
        seed: int,
    ) -> None:
        self.settings, self.participants = settings, participants
        self.round_index, self.seed = round_index, seed
        self.total = torch.zeros(numel, dtype=torch.int64, device=device)
        self.clipped_coordinates = 0  # this rank's clients only

    def add_client(self, update: Tensor, client: int) -> None:
        s = self.settings
        # On the CPU, like the masks' generators; the rounding noise comes from the client's
        # own stream, not the global RNG (resume and rank layout stay exact).
        rounding = torch.Generator().manual_seed(
            derive_seed(self.seed, self.round_index, client, 1)
        )
        encoded, clipped = sa.quantize(
            update.cpu(), s.clip_range, s.frac_bits, s.modulus_bits, s.stochastic_rounding,
            generator=rounding,
        )  # fmt: skip
        self.clipped_coordinates += clipped
        masked = sa.mask_update(
            encoded, client, self.participants, s.master_seed, self.round_index, s.modulus_bits
        )
        self.total = torch.remainder(self.total + masked.to(self.total.device), 2**s.modulus_bits)

    def unmask(self, strategy: Strategy) -> Tensor:
        """Sum over ranks, then decode: ``sum_c w_c Delta_c`` (float64) up to quantization."""
        total = strategy.reduce(self.total, reduce_op="sum")
        return sa.unmask_sum(total, self.settings.frac_bits, self.settings.modulus_bits)

    def error_bound(self) -> float:
        """Largest quantization error of the unmasked sum (``ops.secure_aggregation``)."""
        s = self.settings
        return sa.error_bound(len(self.participants), s.frac_bits, s.stochastic_rounding)
