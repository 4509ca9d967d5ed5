"""Exponential moving average of the weights, kept in fp32 beside the model."""

import torch
import torch.distributed as dist
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
        # One foreach call: on GPU a few fused kernels instead of one launch per parameter.
        names, params = zip(*[(name, p.detach().float()) for name, p in model.named_parameters()])
        torch._foreach_lerp_([self.shadow[n] for n in names], list(params), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) fp32 tensors on the CPU of the main process; other processes get {}.

        Shards are gathered one tensor at a time, so no process but the main one ever holds the whole EMA.
        """
        main = not dist.is_initialized() or dist.get_rank() == 0
        state = {}
        for name, t in self.shadow.items():
            full = t.full_tensor() if isinstance(t, DTensor) else t  # an all-gather: every rank takes part
            if main:
                state[name] = full.cpu()
        return state

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
