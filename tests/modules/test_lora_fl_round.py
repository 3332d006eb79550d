"""The per-round sums of federated training: buffer layout, rank agreement, masked sum."""

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from modules.lora_fl_round import MaskedRoundSum, RoundSums
from modules.lora_fl_settings import SecureAggregationSettings

CPU = torch.device("cpu")


def test_round_sums_add_weighted_updates_losses_and_steps():
    server = [torch.ones(2, 3), torch.full((4,), 0.5)]  # checksum 6 + 2 = 8
    sums = RoundSums(server, CPU)
    sums.add_client(torch.arange(10.0), weight=0.25, loss=2.0, local_steps=3)
    sums.add_client(torch.ones(10), weight=0.75, loss=4.0, local_steps=5)
    sums.all_reduce(SingleDeviceStrategy(device=CPU))
    assert sums.numel == 10
    torch.testing.assert_close(sums.update, torch.arange(10.0) + 1)
    assert sums.weighted_loss == 0.25 * 2.0 + 0.75 * 4.0
    assert sums.clients == 2.0
    assert sums.mean_local_steps == 4.0
    assert sums.checksum == 8.0
    assert sums.rank_desync(world_size=1) == 0.0


def test_rank_desync_is_the_checksum_gap_between_ranks():
    """Summed over two ranks, the checksums give 2x one rank's iff both start from one theta_r."""
    same = [RoundSums([torch.ones(3)], CPU) for _ in range(2)]
    apart = [RoundSums([torch.ones(3)], CPU), RoundSums([torch.full((3,), 1.5)], CPU)]
    for pair in (same, apart):
        pair[0].buffer = pair[0].buffer + pair[1].buffer  # what the all-reduce does on rank 0
    assert same[0].rank_desync(world_size=2) == 0.0
    assert apart[0].rank_desync(world_size=2) == abs((3.0 + 4.5) - 2 * 3.0)


def test_a_rank_without_clients_reports_zero_local_steps():
    sums = RoundSums([torch.zeros(2)], CPU)
    assert sums.clients == 0.0 and sums.mean_local_steps == 0.0


def test_masked_round_sum_unmasks_to_the_plain_sum_within_the_bound():
    settings = SecureAggregationSettings(enabled=True, frac_bits=16, modulus_bits=32)
    updates = {0: torch.tensor([0.1, -0.2, 0.3]), 2: torch.tensor([-0.05, 0.4, 0.0])}
    masked = MaskedRoundSum(settings, 3, CPU, participants=[0, 2], round_index=5, seed=1)
    masked.add_client(updates[0], 0)
    one_client = masked.total.clone()
    masked.add_client(updates[2], 2)
    aggregate = masked.unmask(SingleDeviceStrategy(device=CPU))
    plain = (updates[0] + updates[2]).double()
    assert (aggregate - plain).abs().max() <= masked.error_bound() == 2 * 2**-17
    # One client's masked vector alone decodes to noise, not to its update.
    assert (one_client.double() / 2**16 - updates[0].double()).abs().max() > 1.0
    assert masked.clipped_coordinates == 0


def test_masked_round_sum_counts_clipped_coordinates():
    settings = SecureAggregationSettings(enabled=True, clip_range=0.5)
    masked = MaskedRoundSum(settings, 3, CPU, participants=[0], round_index=0, seed=0)
    masked.add_client(torch.tensor([0.7, -0.9, 0.2]), 0)
    assert masked.clipped_coordinates == 2
    torch.testing.assert_close(
        masked.unmask(SingleDeviceStrategy(device=CPU)),
        torch.tensor([0.5, -0.5, 0.2], dtype=torch.float64),
        atol=2**-24,
        rtol=0,
    )
