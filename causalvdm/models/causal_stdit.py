"""The causal spatial-temporal DiT (ST-DiT): causal temporal attention, per-frame timesteps, shared KV cache.

With `cache=None` the model is a plain causal model over the whole clip (training and the
recompute baseline). With a cache, it runs on the chunk frames only and their temporal attention
also reads the cached keys/values of the conditioning frames; `write_cache` appends clean frames.
"""

import functools
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from causalvdm.models.call_context import CallContext, TextContext, begin_call, prepare_call
from causalvdm.models.kv_cache import CallCache, KVCache
from causalvdm.models.layers import (
    CaptionEmbedder,
    CrossAttention,
    FinalLayer,
    Mlp,
    OutputRefiner,
    PatchEmbed3D,
    SpatialAttention,
    TemporalAttention,
    TimestepEmbedder,
    modulate,
)
from causalvdm.models.positional import check_tpe_mode, sincos_table
from causalvdm.models.spatial_prefix import spatial_prefix_frames
from causalvdm.registry import MODELS

# Size presets (depth, width, heads), DiT style; patch size is (1, 2, 2) for all.
PRESETS = {
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12),
    "S/2": dict(depth=12, hidden_size=384, num_heads=6),
}
NULL_CAPTIONS = ("learned", "fixed")


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, channels: int) -> torch.Tensor:
    """Classifier-free guidance of model outputs (B, 2C, ...) with and without the caption -> (B, 2C, ...): the
    guided prediction in the first `channels`, the variance of the conditional output."""
    guided = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


class STDiTBlock(nn.Module):
    """Spatial attention -> causal temporal attention -> text cross-attention -> MLP, adaLN-single.

    x: (B, T, S, D); t0: (B, T, 6D) per-frame modulation from the shared timestep MLP.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SpatialAttention(hidden_size, num_heads)
        self.attn_temp = TemporalAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x, t0, ctx: CallContext, layer: int, kv_only: bool = False) -> torch.Tensor:
        """kv_only: stop once the temporal keys/values are in the cache (the last block of a cache write)."""
        b, t, s, d = x.shape
        mods = self.scale_shift_table[None, None] + t0.view(b, t, 6, d)  # (B, T, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:, :, :, None].unbind(2)  # (B, T, 1, D)

        h = modulate(self.norm1(x), shift_msa, scale_msa).reshape(b * t, s, d)  # (B*T, S, D)
        x = x + gate_msa * self.attn(h, ctx, layer, t).view(b, t, s, d)

        # Open-Sora v1 feeds the unnormalised stream to the temporal attention, plus the TPE in block 0 only.
        h = x + ctx.tpe[:, :, None] if ctx.tpe is not None and layer == 0 else x
        h = h.transpose(1, 2).reshape(b * s, t, d)  # (B*S, T, D)
        if kv_only:
            self.attn_temp.write_kv(h, ctx, layer)
            return x
        h = self.attn_temp(h, ctx, layer).view(b, s, t, d).transpose(1, 2)  # (B, T, S, D)
        x = x + gate_msa * h

        if self.cross_attn is not None:
            text = ctx.text
            kv = text.kv[layer] if text.kv is not None else self.cross_attn.project_kv(text.tokens)
            x = x + self.cross_attn(x.reshape(b, t * s, d), kv, text.mask).view(b, t, s, d)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


@MODELS.register_module()
class CausalSTDiT(nn.Module):
    """Causal ST-DiT over video latents: x (B, C, T, H, W), per-frame t (B, T) -> (B, 2C, T, H, W).

    tpe_mode: 'absolute' | 'cyclic' | 'rope' temporal positions, table length `max_tpe_len`.
    space_scale: divides the spatial grid coordinates of the 2D sin-cos embedding (Open-Sora v1).
    chunk_bidirectional: frames of the chunk being denoised see each other; the past stays causal.
    caption_channels: width of the text-encoder tokens; 0 builds an unconditional model.
    null_caption: 'learned' (a trained null caption; its rows attend to all its tokens) | 'fixed' (frozen, and its
    rows keep the prompt's padding mask, as in PixArt / Open-Sora v1 and the reference code).
    spatial_prefix: None | 'first_frame' | 'prev_frames_N': the spatial attention of the chunk being denoised also
    attends to the tokens of frame 0, or of the N frames before the chunk (Ca2-VDM's prefix-enhanced spatial
    attention); their spatial keys/values are cached like the temporal ones.
    output_refine: channels of a residual 3x3 conv pair over each output frame (layers.OutputRefiner), which sees
    across token borders so they do not show; 0 (the default): none, every token's output is its own.
    head_kernel: the output head also convolves the token grid of features with this odd kernel (1: it does not).
    """

    def __init__(
        self,
        in_channels: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        model_max_length: int = 120,
        null_caption: str = "learned",
        learn_sigma: bool = True,
        tpe_mode: str = "cyclic",
        max_tpe_len: int = 33,
        space_scale: float = 1.0,
        chunk_bidirectional: bool = False,
        spatial_prefix: str | None = None,
        output_refine: int = 0,
        head_kernel: int = 1,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        patch_size = tuple(patch_size)
        if patch_size[0] != 1:
            raise ValueError(f"patch_size must be (1, ph, pw): a temporal patch would mix frames, got {patch_size}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size={hidden_size} must split into an even head size over num_heads={num_heads}")
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        if null_caption not in NULL_CAPTIONS:
            raise ValueError(f"null_caption must be one of {', '.join(NULL_CAPTIONS)}, got {null_caption!r}")
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.null_caption = null_caption
        self.tpe_mode = check_tpe_mode(tpe_mode)
        self.max_tpe_len = max_tpe_len
        self.space_scale = space_scale
        self.chunk_bidirectional = chunk_bidirectional
        spatial_prefix_frames(spatial_prefix)  # a one-line error for a bad value
        self.spatial_prefix = spatial_prefix
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length,
                                          learned_null=null_caption == "learned") if caption_channels else None
        self.register_buffer("pos_embed_temporal", sincos_table(hidden_size, max_tpe_len), persistent=False)
        self.blocks = nn.ModuleList(
            STDiTBlock(hidden_size, num_heads, mlp_ratio, cross_attention=caption_channels > 0) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size[1] * patch_size[2], self.out_channels, head_kernel)
        self.refiner = OutputRefiner(self.out_channels, output_refine) if output_refine else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT/PixArt init: xavier linears, zeroed adaLN projection, output head and residual projections
        of the temporal and cross attention (Open-Sora v1), so a fresh model outputs exactly zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
            nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        zeroed = [self.t_block[1], self.final_layer.linear] + ([self.refiner.conv2] if self.refiner else [])
        zeroed += [self.final_layer.neighbours] if self.final_layer.neighbours is not None else []
        for block in self.blocks:
            zeroed.append(block.attn_temp.proj)
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.proj)
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights: inputs are cast to it inside the model, outputs come back as float32."""
        return self.x_embedder.proj.weight.dtype

    # ----------------------------------------------------------------------------------- text
    def null_text(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The null caption where there is no prompt at all -> y (B, L, C_text), mask (B, L) all True."""
        y = self.y_embedder.y_embedding[None].expand(batch_size, -1, -1)
        return y, torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)

    def encode_text(self, y, mask, batch_size: int, text_drop=None, per_block_kv: bool = False) -> TextContext | None:
        """Caption tokens y (B, L, C_text), mask (B, L) -> TextContext; None for an unconditional model.

        Missing text means the null caption. text_drop (B,) bool swaps those rows for the null caption inside the
        forward (classifier-free guidance training), where FSDP has gathered the null-caption parameter; they keep
        the prompt's mask with a fixed null caption, else attend to all its tokens.
        per_block_kv: also project every block's text keys/values now, once for a video instead of at every call.
        """
        if self.y_embedder is None:
            return None
        if y is None:
            y, mask = self.null_text(batch_size)
        elif mask is None:
            mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        mask = mask.bool()
        if text_drop is not None:
            y = torch.where(text_drop[:, None, None], self.y_embedder.y_embedding.to(y), y)
            if self.null_caption == "learned":
                mask = mask | text_drop[:, None]
        tokens = self.y_embedder(y.to(self.dtype))  # (B, L, D)
        kv = [block.cross_attn.project_kv(tokens) for block in self.blocks] if per_block_kv else None
        return TextContext(tokens, mask[:, None, None, :], kv)

    def guided_text(self, y, mask, per_block_kv: bool = False) -> TextContext:
        """The 2B-row text of a guidance batch: captions y (B, L, C_text), mask (B, L), then the null caption
        (under the prompt's mask with a fixed null caption, as in training)."""
        y_null, mask_null = self.null_text(y.shape[0])
        if y.shape[1:] != y_null.shape[1:]:
            raise ValueError(f"text tokens must be (B, {self.model_max_length}, {self.caption_channels}), got {tuple(y.shape)}")
        mask = torch.ones_like(mask_null) if mask is None else mask.bool()
        if self.null_caption == "fixed":
            mask_null = mask
        y = torch.cat([y.to(y_null), y_null])
        return self.encode_text(y, torch.cat([mask, mask_null]), y.shape[0], per_block_kv=per_block_kv)

    # --------------------------------------------------------------------------- call context
    def sample_tpe_offset(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Random cyclic-TPE offsets (B,) for training, so every rotation of the table is seen; None otherwise."""
        if self.tpe_mode != "cyclic":
            return None
        return torch.randint(0, self.max_tpe_len, (batch_size,), generator=generator)

    def begin_call(self, cache: CallCache, num_frames: int, height: int, width: int) -> torch.Tensor:
        """Start a call on `num_frames` new frames of height x width latents on `cache` -> their positions (T,): size
        its buffers for this model once, then begin the call (`call_context.begin_call`)."""
        return begin_call(self, cache, num_frames, height, width)

    def prepare(self, num_frames: int, height: int, width: int, cache: CallCache | None = None,
                text: TextContext | None = None, chunk: tuple[int, int] | None = None, tpe_offset=None,
                write: bool = False, positions: torch.Tensor | None = None, sink_frames: int = 0) -> CallContext:
        """The context of calls on `num_frames` frames of height x width latents, made once per chunk on the device;
        changes nothing: a cache's call is begun by `begin_call` (arguments: `call_context.prepare_call`)."""
        return prepare_call(self, num_frames, height, width, cache, text, chunk, tpe_offset, write, positions,
                            sink_frames)

    # -------------------------------------------------------------------------------- forward
    def _trunk(self, x, t, ctx: CallContext, kv_only_last: bool = False):
        """Embed and run every block -> tokens (B, T, S, D), per-frame timestep embedding (B, T, D).

        kv_only_last: the cache write, whose last block stops once its temporal keys/values are staged.
        """
        b, num_frames = x.shape[0], x.shape[2]
        h = self.x_embedder(x.to(self.dtype)) + ctx.pos_spatial  # (B, T, S, D)
        t_emb = self.t_embedder(t.reshape(-1)).view(b, num_frames, -1)  # (B, T, D)
        t0 = self.t_block(t_emb)  # (B, T, 6D)
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            kv_only = kv_only_last and layer == last
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, t0, ctx, layer, kv_only, use_reentrant=False)
            else:
                h = block(h, t0, ctx, layer, kv_only)
        return h, t_emb

    def step(self, x: torch.Tensor, t: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        """One call with a prepared context: x (B, C, T, H, W), t (B, T) -> (B, 2C, T, H, W) float32.

        The hot call of sampling: pure tensor work on fixed shapes, no host synchronisation, so it compiles once.
        """
        b, _, num_frames, height, width = x.shape
        h, t_emb = self._trunk(x, t, ctx)
        ph, pw = self.patch_size[1:]
        h = self.final_layer(h, t_emb, (height // ph, width // pw))  # (B, T, S, ph*pw*C_out)
        h = h.view(b, num_frames, height // ph, width // pw, ph, pw, self.out_channels)
        if self.refiner is None:
            return h.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, self.out_channels, num_frames, height, width).float()
        frames = h.permute(0, 1, 6, 2, 4, 3, 5).reshape(b * num_frames, self.out_channels, height, width)
        out = self.refiner(frames).view(b, num_frames, self.out_channels, height, width)  # each frame on its own
        return out.transpose(1, 2).float()

    def step_with_cfg(self, x: torch.Tensor, t: torch.Tensor, ctx: CallContext, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance in one batch: x (B, C, T, H, W), t (B, T), ctx of 2B rows (conditional first)
        -> (B, 2C, T, H, W) float32: guided prediction, variance from the conditional half."""
        out = self.step(torch.cat([x, x]), torch.cat([t, t]), ctx)
        return guide(*out.chunk(2), cfg_scale, self.in_channels)

    def forward(self, x, t, y=None, mask=None, cache=None, chunk=None, tpe_offset=None, text_drop=None,
                sink_frames: int = 0, write: bool = False) -> torch.Tensor | None:
        """Predict noise (and variance) for every frame; with `write`, append x to the cache instead (`write_cache`).

        x: (B, C, T, H, W); t: (B, T) per-frame timesteps; y: (B, L, C_text) text tokens, mask: (B, L).
        cache: read-only conditioning frames (x is then the chunk only); chunk: (start, end) span of the
        chunk being denoised when cache is None (used in chunk-bidirectional mode); tpe_offset: (B,)
        random cyclic-TPE offsets for training; text_drop: (B,) bool rows whose text is replaced by the
        null caption (training); sink_frames: without a cache, the first frames are a frame sink (see `prepare`);
        write: x are clean frames to append to `cache` (t is ignored): through forward, so a DDP/FSDP-wrapped model can
        write its cache (distillation rollouts). Returns (B, 2C, T, H, W) float32, None with `write`.
        """
        if write:
            self.write_cache(x, cache, y, mask)
            return None
        b, _, num_frames, height, width = x.shape
        text = self.encode_text(y, mask, b, text_drop)
        if cache is not None:
            self.begin_call(cache, num_frames, height, width)
        ctx = self.prepare(num_frames, height, width, cache, text, chunk, tpe_offset, sink_frames=sink_frames)
        return self.step(x, t, ctx)

    def forward_with_cfg(self, x, t, y, mask, cfg_scale: float, cache=None, chunk=None) -> torch.Tensor:
        """Classifier-free guidance in one batch: conditional and null text side by side.

        x: (B, C, T, H, W), t: (B, T); the cache (if any) must hold 2B rows, conditional first; chunk as
        in `forward`. Returns (B, 2C, T, H, W): guided prediction, variance from the conditional half.
        """
        _, _, num_frames, height, width = x.shape
        if cache is not None:
            self.begin_call(cache, num_frames, height, width)
        ctx = self.prepare(num_frames, height, width, cache, self.guided_text(y, mask), chunk)
        return self.step_with_cfg(x, t, ctx, cfg_scale)

    # ---------------------------------------------------------------------------------- cache
    def new_cache(self, batch_size: int, max_cond_frames: int, chunk_size: int | None = None,
                  sink_frames: int = 0, cache_dtype: str | None = None) -> KVCache:
        """An empty queue of `max_cond_frames` conditioning frames, plus a sink of the first `sink_frames` frames kept
        for the whole video; calls stage up to `chunk_size` frames; cache_dtype: None (the model's) or 8-bit."""
        return KVCache(len(self.blocks), batch_size, max_cond_frames, chunk_size or max_cond_frames,
                       self.spatial_prefix, sink_frames, rotate_sink=self.tpe_mode == "rope", cache_dtype=cache_dtype)

    @torch.no_grad()
    def write_cache(self, x_clean, cache, y=None, mask=None, text: TextContext | None = None) -> None:
        """Append clean frames x_clean (B, C, T, H, W) to the cache: one t = 0 causal pass against it.

        The pass stops at the last block's temporal keys/values (nothing after them reaches the cache) and never
        records autograd history. text: a TextContext from `encode_text` / `guided_text` instead of y, mask.
        """
        b, _, num_frames, height, width = x_clean.shape
        text = self.encode_text(y, mask, b) if text is None else text
        self.begin_call(cache, num_frames, height, width)
        ctx = self.prepare(num_frames, height, width, cache, text, write=True)
        t = torch.zeros(b, num_frames, dtype=torch.long, device=x_clean.device)
        self._trunk(x_clean, t, ctx, kv_only_last=True)
        cache.commit()


def _register_preset(name: str, arch: dict) -> None:
    def factory(**kwargs):
        return CausalSTDiT(**{**arch, **kwargs})

    factory.__signature__ = inspect.signature(functools.partial(CausalSTDiT, **arch))
    factory.__doc__ = f"CausalSTDiT-{name}: {arch}."
    MODELS.register_module(f"CausalSTDiT-{name}", module=factory)


for _name, _arch in PRESETS.items():
    _register_preset(_name, _arch)
