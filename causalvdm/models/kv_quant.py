"""8-bit storage of cached keys/values: one scale per token and head, so a stream's cache takes about half the bytes.

A vector x (Dh values of one token, one head) is stored as q = round(x / s) in int8 (or x / s in float8_e4m3fn) with
s = max|x| / qmax kept in bfloat16 (its range, not its precision, matters: a zero row must not divide by zero).
Every value then comes back within s / 2 (int8) or within 2^-4 of its own magnitude plus s * 2^-10 (e4m3's three
mantissa bits; its subnormals near zero), which is what the cache tests bound.
"""

import torch

# name -> (storage dtype, largest stored magnitude)
CACHE_DTYPES = {"int8": (torch.int8, 127.0), "float8_e4m3fn": (torch.float8_e4m3fn, 448.0)}
SCALE_DTYPE = torch.bfloat16
TINY = 2.0**-100  # the smallest scale: a row of zeros stores zeros


def check_cache_dtype(name: str | None) -> str | None:
    """Return `name` if it is None (the model's own dtype) or a known 8-bit cache dtype; else a one-line error."""
    if name is not None and name not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be None (the model's dtype) or one of {', '.join(CACHE_DTYPES)}, "
                         f"got {name!r}")
    return name


def quantize(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., Dh) -> stored values (..., Dh) in the 8-bit dtype `name`, scales (..., 1) bfloat16."""
    dtype, qmax = CACHE_DTYPES[name]
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    scale = (amax / qmax).clamp(min=TINY)
    # Rounded up to bf16 (the top half of a float32's bits), so x / scale never passes qmax: nothing is clipped.
    stored = ((scale.view(torch.int32) + 0xFFFF) & ~0xFFFF).view(torch.float32)
    y = x.detach().float() / stored
    if dtype == torch.int8:
        y = y.round()
    return y.clamp(-qmax, qmax).to(dtype), stored.to(SCALE_DTYPE)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A float8 tensor as uint8 (same bytes) for the copies, scatters and fills CPU kernels lack in float8; others
    as they are."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored values (..., Dh) and scales (..., 1) -> values (..., Dh) in `dtype`."""
    return (q.float() * scale.float()).to(dtype)


def stored_bytes_per_vector(head_dim: int, name: str | None, dtype: torch.dtype) -> int:
    """Bytes one cached vector (one token, one head, keys or values) takes: Dh values, plus a scale when 8-bit."""
    if name is None:
        return head_dim * dtype.itemsize
    return head_dim * CACHE_DTYPES[name][0].itemsize + SCALE_DTYPE.itemsize
