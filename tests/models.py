"""Small models and data shared by the engine tests."""

from __future__ import annotations

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(self.norm(x)))


class Net(nn.Module):
    """Blocks between an input and an output projection, each its own PaRO unit.

    ``out_features`` = 3 and ``in_features`` = 6 give parameters whose first dimension does
    not divide by 4 or 8, so FSDP pads them and some ranks hold short or empty shards.
    """

    def __init__(self, dim: int = 16, depth: int = 2, in_features: int = 6, out_features: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(in_features, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def units(self) -> list[nn.Module]:
        return [self.inp, *self.layers, self.head]


def batch(step: int, micro: int, rank: int, in_features: int = 6, out_features: int = 3,
          size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100_000 * step + 1_000 * micro + rank)
    return torch.randn(size, in_features, generator=gen), torch.randn(size, out_features, generator=gen)


def loss_fn(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = data
    # The loss in fp32 whatever the compute dtype (torch 2.11 cannot backward a bf16-fp32 mse_loss).
    return torch.nn.functional.mse_loss(model(x).float(), y)
