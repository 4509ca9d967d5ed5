"""Model helpers shared by tools and tests."""

import torch
from torch import nn


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
    """Overwrite every parameter, the zero-initialised ones included, with seeded random values.

    Matrices get N(0, scale^2 / fan_in) so activations stay O(1) through depth; vectors and tables
    get N(0, (0.2 scale)^2). Used where an equality would be vacuous on a zero-output fresh model.
    """
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.dim() >= 2:
            std = scale / param[0].numel() ** 0.5
        else:
            std = 0.2 * scale
        param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
