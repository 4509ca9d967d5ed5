"""Exponential moving average of the weights, kept in fp32 beside the model."""

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


class EMA:
    """Shadow copy of a model's parameters updated as ema = decay * ema + (1 - decay) * param.

    Works on FSDP2-sharded models: the shadow tensors are DTensors with the same sharding, so the
    update is local; `state_dict()` gathers full tensors (a collective: call it on every rank).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) fp32 tensors on the CPU."""
        return {n: (t.full_tensor() if isinstance(t, DTensor) else t).cpu() for n, t in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, t in self.shadow.items():
            full = state[name].float()
            if isinstance(t, DTensor):
                full = distribute_tensor(full.to(t.device), t.device_mesh, t.placements)
            t.copy_(full)
