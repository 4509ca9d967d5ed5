"""The one table of dtype names: configs, command lines and loaders all resolve names through it."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_dtype(name: str | torch.dtype | None, device=None) -> torch.dtype:
    """A dtype name ('float32', 'bf16', ...) -> the torch dtype. None or 'auto': bfloat16 on CUDA (on `device`, or
    where CUDA is available when no device is given), float32 elsewhere. A torch dtype passes through."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if cuda else torch.float32
    if ALIASES.get(name, name) not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[ALIASES.get(name, name)]
