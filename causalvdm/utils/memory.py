"""Process memory figures for logs and benchmarks: the accelerator's allocator on CUDA, resident memory on the CPU."""

from pathlib import Path

import torch


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
