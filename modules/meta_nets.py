"""Small networks for the meta-learning task families (no normalization layers).

BatchNorm inside an inner loop updates running statistics during adaptation and makes the loss
blow up (learn2learn #377, spec §4.2), so these nets use none.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LinearRegressor(nn.Module):
    """y = X w with a single weight vector (the linear-regression task family, closed forms exist).

    Args:
        dim: input dimension d.
        init_std: std of the initial weight; 0 starts from x = 0 as in spec §6 A.
    """

    def __init__(self, dim: int = 20, init_std: float = 0.0) -> None:
        super().__init__()
        self.dim = dim  # checked against the data's dim at setup
        self.weight = nn.Parameter(init_std * torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight


class MLPRegressor(nn.Module):
    """The Finn et al. (2017) sinusoid regressor: 1 -> hidden -> hidden -> 1 with ReLU.

    Args:
        hidden: width of each hidden layer.
        depth: number of hidden layers.
    """

    def __init__(self, hidden: int = 40, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.unsqueeze(-1) if x.dim() == 1 else x).squeeze(-1)


class Conv1dNet(nn.Module):
    """MNIST-1D classifier of spec §5: three conv1d layers (kernel 5; strides 1, 2, 2; ReLU), linear head.

    Args:
        channels: channels of every conv layer (the memory experiment sweeps 16, 64, 250).
        n_way: number of output classes per task.
        length: input signal length (MNIST-1D: 40).
    """

    def __init__(self, channels: int = 32, n_way: int = 5, length: int = 40) -> None:
        super().__init__()
        self.n_way = n_way  # checked against the data's n_way at setup
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=1, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 5, stride=2, padding=2),
            nn.ReLU(),
        )
        out_len = (((length - 1) // 2 + 1) - 1) // 2 + 1
        self.head = nn.Linear(channels * out_len, n_way)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # [batch, length] -> [batch, 1, length]
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))
