"""Model FLOPs of the causal ST-DiT and device peaks, for throughput and MFU figures.

Counted as torch's FlopCounterMode counts them (2 per multiply-add of every matmul, linear, convolution
and attention product; elementwise work is free), so a test can check the formula against it.
"""

import torch

# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity: half the datasheets' sparse figures), by a substring of
# torch.cuda.get_device_name(); the first key found in the name wins, so a variant comes before its family. The NVL
# and PCIe cards run at a lower power than the SXM modules: 835 (NVL, 1,671 sparse) and 756 against 989.
PEAK_TFLOPS = {
    "H100 NVL": 835.0,
    "H200 NVL": 835.0,
    "H100 PCIe": 756.0,
    "GH200": 989.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,  # SXM
    "H800": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name (e.g. 'NVIDIA H200 NVL') by the table above, None when unknown."""
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


def device_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device from the table above, None when unknown (or on a CPU)."""
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def forward_flops(model, batch: int, frames: int, height: int, width: int, keys: int | None = None,
                  text_tokens: int = 0, project_text: bool = True, head: bool = True, last_block_kv_only: bool = False,
                  spatial_context: tuple[int, int] = (0, 0)) -> int:
    """FLOPs of one forward of `model` (a CausalSTDiT) on latents (batch, C, frames, height, width).

    keys: temporal keys each frame's attention reads (default `frames`: no cache; with a cache, its capacity
    plus the frames of the call, since a masked attention computes every product); text_tokens: caption
    length L (0: unconditional); project_text: count the caption MLP and the per-block text K/V projections
    (False when they were computed once per video); head: the output layer; last_block_kv_only: the cache
    write pass, whose last block stops after its temporal K/V projection; spatial_context: (frames, context frames):
    with a spatial prefix, that many of the call's frames also attend to the tokens of that many earlier frames.
    """
    d = model.hidden_size
    ph, pw = model.patch_size[1:]
    s = (height // ph) * (width // pw)
    n = batch * frames * s  # tokens of the call
    keys = frames if keys is None else keys
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    cross = model.caption_channels > 0

    reading, context = spatial_context
    spatial = 2 * n * d * 3 * d + 4 * n * s * d + 2 * n * d * d  # qkv, QK^T and AV, out projection
    spatial += 4 * batch * reading * s * context * s * d  # the spatial prefix's extra keys
    temporal = 2 * n * d * 3 * d + 4 * n * keys * d + 2 * n * d * d
    text = 2 * n * d * d + 4 * n * text_tokens * d + 2 * n * d * d if cross else 0  # q, QK^T and AV, out
    text_kv = 2 * batch * text_tokens * d * 2 * d if cross and project_text else 0
    mlp = 4 * n * d * mlp_hidden
    block = spatial + temporal + text + text_kv + mlp

    total = len(model.blocks) * block
    if last_block_kv_only:  # the last block: spatial attention, then only the temporal K/V projection
        total += spatial + 2 * n * d * 2 * d - block
    c_in = model.in_channels
    total += 2 * n * c_in * ph * pw * d  # patch embedding
    freq = model.t_embedder.frequency_size
    total += 2 * batch * frames * (freq * d + d * d + d * 6 * d)  # timestep MLP and adaLN projection
    if cross and project_text:
        total += 2 * batch * text_tokens * (model.caption_channels * d + d * d)  # caption MLP
    if head:
        total += 2 * n * d * ph * pw * model.out_channels
    return total
