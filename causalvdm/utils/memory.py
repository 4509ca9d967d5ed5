"""Process memory: figures for logs and benchmarks (the accelerator's allocator on CUDA, resident memory on the
CPU), and the glibc allocator setting that stops CPU forward passes from page-faulting their memory in again."""

import ctypes
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest value glibc accepts on 64-bit


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MiB: "VmRSS" (resident now) or "VmHWM" (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated memory on a CUDA device, or the process's peak resident memory on the CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return proc_status_mb("VmHWM")


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak measured by `peak_memory_mb`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def keep_freed_memory() -> bool:
    """Make glibc keep freed CPU blocks up to 32 MiB in the process for reuse; True if it took effect.

    By default it hands them back to the kernel, so every forward pass page-faults its activations in
    again: on a 2-core CPU that was 7% of the sampling time and most of the jitter between equal chunks.
    Resident memory then stays at its peak, which is what the process needs anyway. No-op off glibc.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library already loaded into this process
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    if not ok:
        log.warning("mallopt refused the allocator settings; freed memory goes back to the kernel")
    return bool(ok)
