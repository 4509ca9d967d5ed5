"""The causal spatial-temporal DiT (ST-DiT): causal temporal attention, per-frame timesteps, shared KV cache.

With `cache=None` the model is a plain causal model over the whole clip (training and the
recompute baseline). With a cache, it runs on the chunk frames only and their temporal attention
also reads the cached keys/values of the conditioning frames; `write_cache` appends clean frames.
"""

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from causalvdm.models.kv_cache import KVCache
from causalvdm.models.layers import (
    CaptionEmbedder,
    CrossAttention,
    FinalLayer,
    Mlp,
    PatchEmbed3D,
    SelfAttention,
    TemporalAttention,
    TimestepEmbedder,
    modulate,
)
from causalvdm.models.positional import check_tpe_mode, rope_cos_sin, sincos_2d, sincos_table, tpe_index
from causalvdm.registry import MODELS

# Size presets (depth, width, heads), DiT style; patch size is (1, 2, 2) for all.
PRESETS = {
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12),
    "S/2": dict(depth=12, hidden_size=384, num_heads=6),
}


@dataclass
class TemporalContext:
    """Per-call state of the temporal attention, shared by all blocks."""

    attn_mask: torch.Tensor  # (T, keys) bool, True = attend
    tpe: torch.Tensor | None  # (B or 1, T, D) table embedding added to the first block's temporal input
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin (T, head_dim)
    cache: object | None  # KVCache (or the reference cache) read by this call


class STDiTBlock(nn.Module):
    """Spatial attention -> causal temporal attention -> text cross-attention -> MLP, adaLN-single.

    x: (B, T, S, D); t0: (B, T, 6D) per-frame modulation from the shared timestep MLP.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.attn_temp = TemporalAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x, t0, y, y_mask, ctx: TemporalContext, layer: int) -> torch.Tensor:
        b, t, s, d = x.shape
        mods = self.scale_shift_table[None, None] + t0.view(b, t, 6, d)  # (B, T, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:, :, :, None].unbind(2)  # (B, T, 1, D)

        h = modulate(self.norm1(x), shift_msa, scale_msa).reshape(b * t, s, d)  # (B*T, S, D)
        x = x + gate_msa * self.attn(h).view(b, t, s, d)

        # Open-Sora v1 feeds the unnormalised stream to the temporal attention, plus the TPE in block 0 only.
        h = x + ctx.tpe[:, :, None] if ctx.tpe is not None and layer == 0 else x
        h = h.transpose(1, 2).reshape(b * s, t, d)  # (B*S, T, D)
        h = self.attn_temp(h, ctx, layer).view(b, s, t, d).transpose(1, 2)  # (B, T, S, D)
        x = x + gate_msa * h

        if self.cross_attn is not None:
            x = x + self.cross_attn(x.reshape(b, t * s, d), y, y_mask).view(b, t, s, d)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


@MODELS.register_module()
class CausalSTDiT(nn.Module):
    """Causal ST-DiT over video latents: x (B, C, T, H, W), per-frame t (B, T) -> (B, 2C, T, H, W).

    tpe_mode: 'absolute' | 'cyclic' | 'rope' temporal positions, table length `max_tpe_len`.
    space_scale: divides the spatial grid coordinates of the 2D sin-cos embedding (Open-Sora v1).
    chunk_bidirectional: frames of the chunk being denoised see each other; the past stays causal.
    caption_channels: width of the text-encoder tokens; 0 builds an unconditional model.
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
        learn_sigma: bool = True,
        tpe_mode: str = "cyclic",
        max_tpe_len: int = 33,
        space_scale: float = 1.0,
        chunk_bidirectional: bool = False,
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
        self.caption_channels = caption_channels
        self.model_max_length = model_max_length
        self.tpe_mode = check_tpe_mode(tpe_mode)
        self.max_tpe_len = max_tpe_len
        self.space_scale = space_scale
        self.chunk_bidirectional = chunk_bidirectional
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length) if caption_channels else None
        self.register_buffer("pos_embed_temporal", sincos_table(hidden_size, max_tpe_len), persistent=False)
        self.blocks = nn.ModuleList(
            STDiTBlock(hidden_size, num_heads, mlp_ratio, cross_attention=caption_channels > 0) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size[1] * patch_size[2], self.out_channels)
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
        zeroed = [self.t_block[1], self.final_layer.linear]
        for block in self.blocks:
            zeroed.append(block.attn_temp.proj)
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.proj)
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # ----------------------------------------------------------------------------------- text
    def null_text(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned null caption for guidance and text dropout -> y (B, L, C_text), mask (B, L)."""
        y = self.y_embedder.y_embedding[None].expand(batch_size, -1, -1)
        return y, torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)

    def _embed_text(self, y, mask, batch_size, text_drop=None):
        """Project text tokens; missing text means the null caption. -> (B, L, D), (B, L) bool or Nones.

        text_drop (B,) bool swaps those rows for the null caption inside the forward (classifier-free
        guidance training), where FSDP has gathered the null-caption parameter.
        """
        if self.y_embedder is None:
            return None, None
        if y is None:
            y, mask = self.null_text(batch_size)
        elif mask is None:
            mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        mask = mask.bool()
        if text_drop is not None:
            y = torch.where(text_drop[:, None, None], self.y_embedder.y_embedding.to(y), y)
            mask = mask | text_drop[:, None]
        return self.y_embedder(y), mask

    # ------------------------------------------------------------------------------ positions
    def _temporal_context(self, positions, cache, attn_mask, tpe_offset) -> TemporalContext:
        tpe = rope = None
        if self.tpe_mode == "rope":
            cos, sin = rope_cos_sin(positions, self.hidden_size // self.num_heads)
            rope = (cos.to(attn_mask.device), sin.to(attn_mask.device))
        else:
            index = tpe_index(positions.to(self.pos_embed_temporal.device), self.tpe_mode, self.max_tpe_len, tpe_offset)
            tpe = self.pos_embed_temporal[index]  # (B or 1, T, D)
        return TemporalContext(attn_mask=attn_mask, tpe=tpe, rope=rope, cache=cache)

    def sample_tpe_offset(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Random cyclic-TPE offsets (B,) for training, so every rotation of the table is seen; None otherwise."""
        if self.tpe_mode != "cyclic":
            return None
        return torch.randint(0, self.max_tpe_len, (batch_size,), generator=generator)

    @staticmethod
    def frame_mask(num_frames: int, chunk: tuple[int, int] | None, device) -> torch.Tensor:
        """Causal mask over frames (T, T), True = attend; frames inside `chunk` = (start, end) see each other."""
        mask = torch.ones(num_frames, num_frames, dtype=torch.bool).tril()
        if chunk is not None:
            start, end = chunk
            mask[start:end, start:end] = True
        return mask.to(device)

    # -------------------------------------------------------------------------------- forward
    def _trunk(self, x, t, y, mask, cache, chunk, tpe_offset, bidirectional, text_drop=None):
        """Embed and run every block -> tokens (B, T, S, D), per-frame timestep embedding (B, T, D)."""
        b, _, num_frames, height, width = x.shape
        ph, pw = self.patch_size[1:]
        if height % ph or width % pw:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {ph}x{pw}")
        if cache is None:
            positions = torch.arange(num_frames)
            attn_mask = self.frame_mask(num_frames, chunk if self.chunk_bidirectional else None, x.device)
        else:
            positions = cache.begin(num_frames)
            attn_mask = cache.attn_mask(bidirectional, x.device)
        ctx = self._temporal_context(positions, cache, attn_mask, tpe_offset)

        h = self.x_embedder(x)  # (B, T, S, D)
        h = h + sincos_2d(self.hidden_size, height // ph, width // pw, self.space_scale).to(h)
        t_emb = self.t_embedder(t.reshape(-1)).view(b, num_frames, -1)  # (B, T, D)
        t0 = self.t_block(t_emb)  # (B, T, 6D)
        y, y_mask = self._embed_text(y, mask, b, text_drop)
        for layer, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, t0, y, y_mask, ctx, layer, use_reentrant=False)
            else:
                h = block(h, t0, y, y_mask, ctx, layer)
        return h, t_emb

    def forward(self, x, t, y=None, mask=None, cache=None, chunk=None, tpe_offset=None, text_drop=None) -> torch.Tensor:
        """Predict noise (and variance) for every frame.

        x: (B, C, T, H, W); t: (B, T) per-frame timesteps; y: (B, L, C_text) text tokens, mask: (B, L).
        cache: read-only conditioning frames (x is then the chunk only); chunk: (start, end) span of the
        chunk being denoised when cache is None (used in chunk-bidirectional mode); tpe_offset: (B,)
        random cyclic-TPE offsets for training; text_drop: (B,) bool rows whose text is replaced by the
        null caption (training). Returns (B, 2C, T, H, W).
        """
        b, _, num_frames, height, width = x.shape
        h, t_emb = self._trunk(x, t, y, mask, cache, chunk, tpe_offset, self.chunk_bidirectional, text_drop)
        h = self.final_layer(h, t_emb)  # (B, T, S, ph*pw*C_out)
        ph, pw = self.patch_size[1:]
        h = h.view(b, num_frames, height // ph, width // pw, ph, pw, self.out_channels)
        return h.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, self.out_channels, num_frames, height, width)

    def forward_with_cfg(self, x, t, y, mask, cfg_scale: float, cache=None, chunk=None) -> torch.Tensor:
        """Classifier-free guidance in one batch: conditional and null text side by side.

        x: (B, C, T, H, W), t: (B, T); the cache (if any) must hold 2B rows, conditional first; chunk as
        in `forward`. Returns (B, 2C, T, H, W): guided prediction, variance from the conditional half.
        """
        b = x.shape[0]
        y_null, mask_null = self.null_text(b)
        if y.shape[1:] != y_null.shape[1:]:
            raise ValueError(f"text tokens must be (B, {self.model_max_length}, {self.caption_channels}), got {tuple(y.shape)}")
        mask = torch.ones_like(mask_null) if mask is None else mask.bool()
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), torch.cat([mask, mask_null]), cache=cache,
                   chunk=chunk)
        cond, uncond = out.chunk(2)
        c = self.in_channels
        guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)

    # ---------------------------------------------------------------------------------- cache
    def new_cache(self, batch_size: int, max_frames: int, chunk_size: int | None = None) -> KVCache:
        """An empty queue of `max_frames` conditioning frames; calls stage up to `chunk_size` frames."""
        return KVCache(len(self.blocks), batch_size, max_frames, chunk_size or max_frames)

    def write_cache(self, x_clean, cache, y=None, mask=None) -> None:
        """Append clean frames x_clean (B, C, T, H, W) to the cache: one t = 0 causal pass against it."""
        t = torch.zeros(x_clean.shape[:1] + x_clean.shape[2:3], dtype=torch.long, device=x_clean.device)
        self._trunk(x_clean, t, y, mask, cache, None, None, bidirectional=False)
        cache.commit()


def _register_preset(name: str, arch: dict) -> None:
    def factory(**kwargs):
        return CausalSTDiT(**{**arch, **kwargs})

    factory.__signature__ = inspect.signature(functools.partial(CausalSTDiT, **arch))
    factory.__doc__ = f"CausalSTDiT-{name}: {arch}."
    MODELS.register_module(f"CausalSTDiT-{name}", module=factory)


for _name, _arch in PRESETS.items():
    _register_preset(_name, _arch)
