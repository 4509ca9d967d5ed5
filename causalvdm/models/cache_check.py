"""Check the ring-buffer KV cache against what the model computes without it: the recompute baseline before the
first eviction, the naive keep-everything `ReferenceKVCache` after it (tools/verify_cache.py and the tests run it)."""

import torch

from causalvdm.models.reference_cache import ReferenceKVCache


@torch.no_grad()
def verify(model, ar_steps: int, chunk: int, max_cond: int, latent_size, first_frames: int = 1,
           denoise_calls: int = 3, batch_size: int = 2, seed: int = 0, sink_frames: int = 0) -> list[dict]:
    """Run `ar_steps` autoregressive steps through the ring cache and the reference; per-step max abs diff and
    the largest |output| of the reference (a bf16 model is compared relative to it). sink_frames: the first frames
    stay in view besides the rolling queue (eviction starts after sink_frames + max_cond frames).

    With text conditioning the batch is a classifier-free-guidance batch: conditional rows, then null text.
    """
    gen = torch.Generator().manual_seed(seed)
    c, (h, w) = model.in_channels, latent_size
    device = next(model.parameters()).device

    def randn(*shape):  # drawn on the CPU, so every device sees the same numbers
        return torch.randn(shape, generator=gen).to(device)

    y = mask = None
    if model.caption_channels:
        half = batch_size // 2
        y_null, mask_null = model.null_text(batch_size - half)
        y = torch.cat([randn(half, *y_null.shape[1:]).to(y_null), y_null])
        mask = torch.cat([(torch.rand(half, y_null.shape[1], generator=gen) < 0.7).to(device), mask_null])
        mask[:, 0] = True  # a caption has at least one token

    frames = randn(batch_size, c, first_frames, h, w)
    cache = model.new_cache(batch_size, max_cond, chunk_size=max(chunk, first_frames), sink_frames=sink_frames)
    naive = ReferenceKVCache(len(model.blocks), max_cond, model.spatial_prefix, sink_frames,
                             rotate_sink=model.tpe_mode == "rope")
    model.write_cache(frames, cache, y, mask)
    model.write_cache(frames, naive, y, mask)
    results = []
    for step in range(ar_steps):
        x = randn(batch_size, c, chunk, h, w)
        evicted = frames.shape[2] > sink_frames + max_cond
        cached = len(cache)
        worst = scale = 0.0
        for _ in range(denoise_calls):
            t = torch.randint(1, 1000, (batch_size, 1), generator=gen).expand(-1, chunk).to(device)
            out = model(x, t, y, mask, cache=cache)
            if evicted:
                ref = model(x, t, y, mask, cache=naive)
            else:
                p = frames.shape[2]
                t_full = torch.cat([torch.zeros(batch_size, p, dtype=t.dtype, device=device), t], dim=1)
                ref = model(torch.cat([frames, x], dim=2), t_full, y, mask, chunk=(p, p + chunk),
                            sink_frames=sink_frames)[:, :, p:]
            worst = max(worst, (out - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            x = x - 0.1 * out[:, :c]  # a stand-in denoising update, so each call sees a new input
        model.write_cache(x, cache, y, mask)
        model.write_cache(x, naive, y, mask)
        frames = torch.cat([frames, x], dim=2)
        results.append(dict(step=step, first=frames.shape[2] - chunk, cached=cached,
                            reference="naive" if evicted else "recompute", max_abs_diff=worst, scale=scale))
    return results
