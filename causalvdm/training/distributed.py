"""Process-group set-up from torchrun's environment, and wrapping a plain model for data parallelism.

Model code stays single-device; DDP or FSDP2 is applied here from outside, in a fixed order (torchtitan).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel


@dataclass
class DistInfo:
    """Where this process sits: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); a plain `python` launch is one process."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(0, 1, 0, device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """Mean of a scalar over all processes (a CPU-GPU sync point: call it at log steps only)."""
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def any_process(flag: bool, info: DistInfo) -> bool:
    """True if `flag` is true on any process, so all ranks take the same branch."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class DDP(DistributedDataParallel):
    """DDP that forwards unknown attributes to the wrapped model (null_text, sample_tpe_offset, ...)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def parallelize(model: nn.Module, mode: str, info: DistInfo, bf16: bool = False) -> nn.Module:
    """Move to the device and wrap for data parallelism: 'ddp', or 'fsdp' (fully_shard each block, then the root).

    With `bf16`, FSDP2 gathers parameters in bf16 for compute and reduces gradients in fp32 (the sharded
    fp32 master weights stay). Returns the model to train; with FSDP2 it is the same object, sharded in place.
    """
    model.to(info.device)
    if not dist.is_initialized():
        return model
    if mode == "fsdp":
        # Halves all-gather traffic and compute memory; fp32 reduction keeps the gradient sum exact enough.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
