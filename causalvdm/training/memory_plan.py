"""Expected peak memory of training and sampling, worked out before anything is allocated.

The model is built on the meta device: parameter counts are exact, and the activations autograd saves in a
training forward are counted by tracing that forward on meta tensors (no memory, no compute). What a trace
cannot see (the working memory of backward and of an inference call) uses constants calibrated against
measured CPU peaks; tools/plan_memory.py prints the table. All figures are bytes unless a name says MiB.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from causalvdm.config import AutoregressiveSettings
from causalvdm.diffusion import prefix_lengths
from causalvdm.models.kv_cache import padded_slots
from causalvdm.models.kv_quant import stored_bytes_per_vector
from causalvdm.models.pretrained import split_init_fields
from causalvdm.models.spatial_prefix import spatial_prefix_frames
from causalvdm.registry import MODELS, build
from causalvdm.training.settings import TrainSettings

MIB = 2**20
GIB = 2**30
# Calibrated on the CPU (tools/plan_memory.py --help has the table). The working memory of backward beyond the
# saved activations, in units of one block's saved activations (the gradients of a block's intermediates).
BACKWARD_WORK_BLOCKS = 2.0
# The live tensors of one inference call per token, in units of (2 * mlp_hidden + 2 * hidden) values (the MLP's
# two hidden tensors plus the residual stream and its normalised copy): measured 2.4 on the CPU, used everywhere.
INFERENCE_WORK = 2.4
# CPU only: resident memory grows past the live bytes of training activations (glibc keeps freed blocks, and the
# first step's optimizer state lands between them), and the first inference call loads ~90 MiB of kernels and
# scratch. A GPU's max_memory_allocated counts live tensors only, so neither applies there.
CPU_HEAP_FACTOR = 1.35
CPU_SAMPLE_RUNTIME_MB = 90.0
# Resident memory of a Python process that has imported torch and causalvdm (the CPU totals include it).
CPU_BASELINE_MB = 330.0


@dataclass
class ModelDims:
    """What the estimates read from a model built on the meta device."""

    params: int
    block_params: int  # one block (what FSDP2 gathers at a time)
    depth: int
    hidden: int
    heads: int
    mlp_hidden: int
    in_channels: int
    caption_channels: int
    text_tokens: int


def meta_model(cfg):
    """`cfg.model` built on the meta device (no weights are read or allocated)."""
    model_cfg = split_init_fields(cfg.model)[0]
    with torch.device("meta"):
        return build(MODELS, model_cfg, "model")


def model_dims(model) -> ModelDims:
    return ModelDims(
        params=sum(p.numel() for p in model.parameters()),
        block_params=sum(p.numel() for p in model.blocks[0].parameters()),
        depth=len(model.blocks),
        hidden=model.hidden_size,
        heads=model.num_heads,
        mlp_hidden=model.blocks[0].mlp.fc1.out_features,
        in_channels=model.in_channels,
        caption_channels=model.caption_channels,
        text_tokens=model.model_max_length if model.caption_channels else 0,
    )


def param_bytes(model, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's parameters, stored in `dtype` (default: their own)."""
    return sum(p.numel() * (p.element_size() if dtype is None else dtype.itemsize) for p in model.parameters())


def kv_cache_bytes(depth: int, rows: int, tokens_per_frame: int, hidden: int, slots: int, dtype: torch.dtype,
                   spatial_frames: int = 0, heads: int = 1, cache_dtype: str | None = None) -> int:
    """Keys and values of a KVCache: 2 x layers x rows (B, or 2B with guidance) x S x hidden x slots x dtype bytes.

    slots = sink_frames + max_cond_frames + chunk_size (the ring also holds the frames of the current call), which
    the cache pads up to a multiple of 8; spatial_frames: the frames whose spatial keys/values a spatial prefix keeps
    (1 for 'first_frame', N for 'prev_frames_N'), in `dtype`; cache_dtype: an 8-bit cache stores each of the `heads`
    heads' vectors in 8 bits plus a bf16 scale.
    """
    vectors = 2 * depth * rows * tokens_per_frame * heads
    temporal = vectors * padded_slots(slots) * stored_bytes_per_vector(hidden // heads, cache_dtype, dtype)
    return temporal + vectors * spatial_frames * hidden // heads * dtype.itemsize


class _FusedAttention(torch.autograd.Function):
    """Attention as the fused kernels (flash, memory-efficient, cuDNN; CUDA's and the CPU's) keep it for backward:
    q, k, v, the mask, the output (..., L, Ev) and a float32 log-sum-exp per query row (..., L), where the meta
    device's math path keeps the (L, S) scores and probabilities too. Only traced, so never differentiated."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        rows = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        out = q.new_empty(*rows, q.shape[-2], v.shape[-1])
        lse = q.new_empty(*rows, q.shape[-2], dtype=torch.float32)
        if mask is not None and mask.dtype == torch.bool:  # the kernels keep it as an additive mask in q's dtype
            mask = mask.new_empty(mask.shape, dtype=q.dtype)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("_FusedAttention only counts what a training forward saves; it has no backward")


class _AsFusedAttention(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention through _FusedAttention while a trace counts saved bytes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, *rest = args
            return _FusedAttention.apply(q, k, v, kwargs.get("attn_mask", rest[0] if rest else None))
        return func(*args, **kwargs)


def saved_activation_bytes(model, batch: int, frames: int, height: int, width: int, dtype: torch.dtype,
                           chunk: tuple[int, int], grad_checkpointing: bool) -> int:
    """Bytes autograd keeps from a training forward on latents (batch, C, frames, height, width), counted on meta.

    `model` must be on the meta device. Each storage is counted once (views and the weights themselves are free:
    the weights are counted elsewhere). bf16 autocast is approximated by a model and inputs in bf16; attention
    keeps what the fused kernels keep (_FusedAttention), not the meta device's math path.
    """
    model = model.to(dtype).train()
    model.grad_checkpointing = grad_checkpointing
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in weights:
            saved[key] = t.untyped_storage().nbytes()
        return t

    # Inputs made on meta explicitly, not under torch.device("meta"): the model's cached positional tables must
    # stay real CPU tensors for the runs that follow in this process.
    meta = torch.device("meta")
    x = torch.zeros(batch, model.in_channels, frames, height, width, dtype=dtype, device=meta)
    t = torch.zeros(batch, frames, dtype=torch.long, device=meta)
    cc = model.caption_channels
    y = torch.zeros(batch, model.model_max_length, cc, dtype=dtype, device=meta) if cc else None
    drop = torch.zeros(batch, dtype=torch.bool, device=meta) if cc else None
    offset = model.sample_tpe_offset(batch)  # on the CPU, like the positions it shifts
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _AsFusedAttention():
        model(x, t, y=y, chunk=chunk, tpe_offset=offset, text_drop=drop)
    return sum(saved.values())


def _find(node, key):
    """The first `key` in a nested config dict (e.g. num_frames inside RepeatDataset's dataset), or None."""
    if not isinstance(node, dict):
        return None
    if key in node:
        return node[key]
    for value in node.values():
        found = _find(value, key)
        if found is not None:
            return found
    return None


def latent_hw(cfg) -> tuple[int, int]:
    """(h, w) of the latents: dataset (or sample) image size over the VAE factor, else `latent_size`."""
    size = _find(dict(cfg.get("sample") or {}), "image_size") or _find(dict(cfg.get("dataset") or {}), "image_size")
    if size is None:
        if cfg.get("latent_size") is None:
            raise ValueError(f"{cfg.filename}: no dataset.image_size, sample.image_size or latent_size")
        return tuple(int(s) for s in cfg.latent_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    vae = dict(cfg.get("vae") or {})
    factor = vae.get("factor", 2) if vae.get("type") == "PixelVAE" else 8  # SD VAEs downsample by 8
    return size[0] // factor, size[1] // factor


def train_frames(cfg, chunk_size: int) -> tuple[int, int]:
    """(frames fed, prefix length) of the largest clean-prefix step: the longest prefix plus one chunk."""
    clip = _find(dict(cfg.get("dataset") or {}), "num_frames") or cfg.model.get("max_tpe_len", 33)
    prefix = prefix_lengths(clip, chunk_size)[-1]
    return prefix + chunk_size, prefix


def _mb(value: float) -> float:
    return value / MIB


def train_plan(cfg, batch_size: int | None = None, num_gpus: int = 1, device: str = "cuda") -> dict:
    """Peak training memory per process in MiB, by part, for DDP and FSDP2, with and without checkpointing.

    device 'cuda': fp32 master weights, bf16 autocast (activations in bf16), fused AdamW; 'cpu': all fp32,
    foreach AdamW (one parameter-sized temporary), plus the process baseline.
    """
    settings = TrainSettings.from_cfg(cfg.get("train"))
    ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
    batch = batch_size or settings.batch_size
    model = meta_model(cfg)
    dims = model_dims(model)
    h, w = latent_hw(cfg)
    frames, prefix = train_frames(cfg, ar.chunk_size)
    gpu = device == "cuda"
    act_dtype = torch.bfloat16 if gpu else torch.float32
    chunk = (prefix, frames)
    per_sample = saved_activation_bytes(model, 1, frames, h, w, act_dtype, chunk, grad_checkpointing=False)
    per_sample_ckpt = saved_activation_bytes(model, 1, frames, h, w, act_dtype, chunk, grad_checkpointing=True)
    block = (per_sample - per_sample_ckpt) / dims.depth  # one block's saved activations (recomputed under checkpointing)

    p32 = dims.params * 4
    plans = {}
    for parallel in ("ddp", "fsdp"):
        shard = num_gpus if parallel == "fsdp" else 1
        weights, grads, optim, ema = p32 / shard, p32 / shard, 2 * p32 / shard, p32 / shard
        extra = 0.0
        if parallel == "fsdp" and num_gpus > 1:
            extra += dims.block_params * (act_dtype.itemsize + 4)  # one block gathered (params) and its full grads
        elif num_gpus > 1:
            extra += p32  # DDP's gradient buckets, a second copy of the gradients
        if gpu and parallel == "ddp":
            extra += dims.params * 2  # autocast keeps a bf16 copy of every weight through forward and backward
        optim_temp = 0.0 if gpu else p32  # foreach AdamW's sqrt(v) list; fused AdamW has none
        for ckpt in (False, True):
            heap = 1.0 if gpu else CPU_HEAP_FACTOR
            acts = heap * batch * (per_sample_ckpt + block if ckpt else per_sample)
            work = heap * batch * BACKWARD_WORK_BLOCKS * block
            during_backward = weights + optim + ema + extra + acts + work
            at_step = weights + optim + ema + extra + grads + optim_temp
            baseline = 0 if gpu else CPU_BASELINE_MB * MIB
            per_row = heap * ((per_sample_ckpt + block if ckpt else per_sample) + BACKWARD_WORK_BLOCKS * block)
            plans[f"{parallel}{'+ckpt' if ckpt else ''}"] = dict(
                weights=_mb(weights), grads=_mb(grads), optimizer=_mb(optim), ema=_mb(ema), extra=_mb(extra),
                activations=_mb(acts), backward_work=_mb(work),
                total=_mb(max(during_backward, at_step) + baseline),
                fixed=_mb(weights + optim + ema + extra + baseline), floor=_mb(at_step + baseline),
                per_sample=_mb(per_row))
    return dict(mode="train", device=device, batch_size=batch, num_gpus=num_gpus, frames=frames, latent=(h, w),
                params=dims.params, parallel=settings.parallel, grad_checkpointing=settings.grad_checkpointing,
                plans=plans)


def sample_plan(cfg, batch_size: int = 1, device: str = "cuda", max_cond_frames: int | None = None,
                cfg_scale: float | None = None) -> dict:
    """Peak sampling memory in MiB, by part: weights and KV cache in the sampling dtype (bf16 on CUDA, fp32 on the
    CPU; the cache in 8 bits with sample.cache_dtype), one chunk's call with and without guidance, the VAE decode
    micro-batch."""
    ar = AutoregressiveSettings.from_cfg(cfg.get("autoregressive"))
    cache_dtype = dict(cfg.get("sample") or {}).get("cache_dtype")
    cond = max_cond_frames or ar.max_cond_frames
    scale = cfg_scale if cfg_scale is not None else dict(cfg.get("sample") or {}).get("cfg_scale", 1.0)
    model = meta_model(cfg)
    dims = model_dims(model)
    h, w = latent_hw(cfg)
    ph, pw = model.patch_size[1:]
    tokens = (h // ph) * (w // pw)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    guided = scale != 1.0 and dims.caption_channels > 0
    plans = {}
    for name, rows in (("no guidance", batch_size), ("guidance", 2 * batch_size)):
        cache = kv_cache_bytes(dims.depth, rows, tokens, dims.hidden, ar.sink_frames + cond + ar.chunk_size, dtype,
                               spatial_prefix_frames(model.spatial_prefix), dims.heads, cache_dtype)
        text_kv = dims.depth * rows * dims.text_tokens * 2 * dims.hidden * dtype.itemsize  # projected once per video
        call = INFERENCE_WORK * rows * ar.chunk_size * tokens * (2 * dims.mlp_hidden + 2 * dims.hidden) * dtype.itemsize
        weights = param_bytes(model, dtype)
        vae = vae_decode_bytes(cfg, h, w, batch_size * ar.chunk_size)
        runtime = (CPU_BASELINE_MB + CPU_SAMPLE_RUNTIME_MB) * MIB if device == "cpu" else 0
        total = weights + cache + text_kv + call + vae + runtime
        plans[name] = dict(weights=_mb(weights), kv_cache=_mb(cache), text_kv=_mb(text_kv), activations=_mb(call),
                           vae_decode=_mb(vae), total=_mb(total), fixed=_mb(total - cache - text_kv - call), floor=0.0,
                           per_sample=_mb((cache + text_kv + call) / batch_size),
                           per_cond_frame=_mb(cache / (cond + ar.chunk_size)))
    return dict(mode="sample", device=device, batch_size=batch_size, max_cond_frames=cond, chunk_size=ar.chunk_size,
                latent=(h, w), params=dims.params, guided=guided, max_tpe_len=model.max_tpe_len,
                tpe_mode=model.tpe_mode, plans=plans)


def vae_decode_bytes(cfg, h: int, w: int, frames: int) -> float:
    """Working memory of decoding `frames` latent frames (an SD VAE works in micro-batches): ~6 live fp32 tensors of
    128 channels at full resolution per frame (its last up block). Not calibrated here (no VAE weights offline)."""
    vae = dict(cfg.get("vae") or {})
    if vae.get("type") != "SDVAE":
        return 0.0  # PixelVAE is a reshape; no VAE means latents out
    micro = min(frames, vae.get("micro_batch_size", 16))
    return micro * 6 * 128 * (8 * h) * (8 * w) * 4 + 84e6 * 2  # plus its ~84M weights (decoder half) in bf16


def fits(plan: dict, gpu_mem_mb: float) -> dict:
    """The largest batch size (and, for sampling, max_cond_frames) of each variant that fits in `gpu_mem_mb`."""
    out = {}
    for name, part in plan["plans"].items():
        rows = int((gpu_mem_mb - part["fixed"]) // part["per_sample"])
        entry = dict(max_batch_size=max(rows, 0) if part["floor"] <= gpu_mem_mb else 0)
        if plan["mode"] == "sample":
            spare = gpu_mem_mb - part["total"]
            entry["max_cond_frames"] = max(plan["max_cond_frames"] + int(spare // part["per_cond_frame"]), 0)
        out[name] = entry
    return out


def estimate_line(cfg, mode: str, device: str = "cuda", batch_size: int | None = None, num_gpus: int = 1,
                  cfg_scale: float | None = None) -> str:
    """One line for the start of a run, e.g. 'memory plan (train, cuda, fsdp+ckpt, batch 4 x 8 GPUs): ~31.2 GiB per GPU'.

    cfg_scale: sampling's guidance scale when a flag overrides the config's (guidance doubles the batch)."""
    if mode == "train":
        plan = train_plan(cfg, batch_size, num_gpus, device)
        variant = plan["parallel"] + ("+ckpt" if plan["grad_checkpointing"] else "")
        part = plan["plans"][variant]
        return (f"memory plan (train, {device}, {variant}, batch {plan['batch_size']} x {num_gpus} process(es)): "
                f"~{part['total'] / 1024:.2f} GiB per process (weights {part['weights'] / 1024:.2f}, optimizer+EMA "
                f"{(part['optimizer'] + part['ema']) / 1024:.2f}, activations {part['activations'] / 1024:.2f} GiB)")
    if mode == "sample":
        plan = sample_plan(cfg, batch_size or 1, device, cfg_scale=cfg_scale)
        part = plan["plans"]["guidance" if plan["guided"] else "no guidance"]
        return (f"memory plan (sample, {device}, batch {plan['batch_size']}, {plan['max_cond_frames']} cached frames"
                f"{', guidance' if plan['guided'] else ''}): ~{part['total'] / 1024:.2f} GiB (weights "
                f"{part['weights'] / 1024:.2f}, KV cache {part['kv_cache'] / 1024:.2f} GiB)")
    raise ValueError(f"mode must be 'train' or 'sample', got {mode!r}")


__all__ = ["ModelDims", "estimate_line", "fits", "kv_cache_bytes", "param_bytes", "sample_plan", "train_plan"]
