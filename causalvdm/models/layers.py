"""Building blocks of the causal ST-DiT (PixArt / Open-Sora v1 layout, so pretrained keys map 1:1)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from causalvdm.models.positional import apply_rope
from causalvdm.models.spatial_prefix import attend_with_context


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; x (B, T, S, D), shift/scale (B, T, 1, D)."""
    return x * (1 + scale) + shift


class PatchEmbed3D(nn.Module):
    """Video latent (B, C, T, H, W) -> tokens (B, T, S, D) with a strided Conv3d, S = (H/ph)(W/pw)."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, T, h, w)
        # Copied to (B, T, S, D) order: a permuted view would carry the conv's layout into the residual stream, and
        # every residual add would mix two layouts (on CUDA, the slow strided element-wise kernel).
        return x.flatten(3).permute(0, 2, 3, 1).contiguous()  # (B, T, h*w, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (N,) -> (N, D): sinusoidal features then a two-layer MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(N,) -> (N, dim) cos/sin features of the (possibly fractional) timesteps."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.sinusoidal(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class Mlp(nn.Module):
    """Two linear layers with tanh-GELU (the transformer MLP and the caption projection)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Text tokens (B, L, C_text) -> (B, L, D); y_embedding (L, C_text) is the null caption for guidance.

    learned_null=False freezes the null caption (PixArt / Open-Sora v1 keep it fixed). It stays a parameter, only
    without gradient, so it travels with the weights wherever they go: EMA, checkpoints, pretrained keys.
    """

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int, learned_null: bool = True):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        null = torch.randn(token_num, caption_channels) / caption_channels**0.5
        self.y_embedding = nn.Parameter(null, requires_grad=learned_null)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the second-to-last axis; x (N, L, D) -> (N, L, D)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, L, D) -> q, k, v each (N, H, L, D/H)."""
        n, length, dim = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, dim // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """(N, H, L, D/H) -> (N, L, D)."""
        return self.proj(o.transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        return self.out(F.scaled_dot_product_attention(q, k, v))


class SpatialAttention(SelfAttention):
    """Attention among the tokens of each frame, x (B*T, S, D) -> (B*T, S, D).

    With a spatial prefix (`ctx.spatial`, see CausalSTDiT's `spatial_prefix`) the frames of the chunk being
    denoised also attend to the tokens of earlier frames: from the cache (its reads), from this call's own earlier
    frames (no cache: training and the recompute baseline), and a cache write keeps them for later chunks.
    """

    def forward(self, x: torch.Tensor, ctx, layer: int, num_frames: int) -> torch.Tensor:
        q, k, v = self.project_qkv(x)  # (B*T, H, S, Dh)
        prefix = ctx.spatial
        if prefix is None:
            return self.out(F.scaled_dot_product_attention(q, k, v))
        if prefix.mode == "write":
            ctx.cache.spatial.stage(layer, k, v)
            return self.out(F.scaled_dot_product_attention(q, k, v))
        if prefix.mode == "read":
            context_k, context_v = ctx.cache.spatial.context(layer)  # (B, H, C, Dh)
            if context_k is None:
                return self.out(F.scaled_dot_product_attention(q, k, v))
            return self.out(attend_with_context(q, k, v, context_k, context_v, prefix.mask))
        # window: frames from `prefix.start` on read the frames `prefix.frames` of this very call
        q, k, v = (z.view(-1, num_frames, *z.shape[1:]) for z in (q, k, v))  # (B, T, H, S, Dh)
        context_k, context_v = (z[:, prefix.frames].transpose(1, 2).flatten(2, 3) for z in (k, v))  # (B, H, C, Dh)
        start = prefix.start
        before = F.scaled_dot_product_attention(*(z[:, :start].flatten(0, 1) for z in (q, k, v)))
        after = attend_with_context(*(z[:, start:].flatten(0, 1) for z in (q, k, v)), context_k, context_v)
        o = torch.cat([before.view(q.shape[0], start, *before.shape[1:]),
                       after.view(q.shape[0], num_frames - start, *after.shape[1:])], dim=1)
        return self.out(o.flatten(0, 1))


class TemporalAttention(SelfAttention):
    """Attention across frames at each spatial position, causal over frames, optionally through a cache.

    x: (B*S, T, D) -> (B*S, T, D). `ctx` carries the mask, RoPE tables and cache of this call.
    """

    def project_kv(self, x: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B*S, T, D) -> q, k, v (B*S, H, T, Dh), rotated by the call's RoPE tables if any."""
        q, k, v = self.project_qkv(x)
        if ctx.rope is not None:
            cos, sin = ctx.rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, ctx, layer: int) -> torch.Tensor:
        q, k, v = self.project_kv(x, ctx)  # (B*S, H, T, Dh)
        if ctx.cache is not None:
            k, v = ctx.cache.attend(layer, k, v)  # (B*S, H, cached + T, Dh)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask)
        return self.out(o)

    def write_kv(self, x: torch.Tensor, ctx, layer: int) -> None:
        """Only stage the keys/values of x (B*S, T, D) in the cache: what the last block of a cache write needs."""
        dim = x.shape[-1]
        kv = F.linear(x, self.qkv.weight[dim:], self.qkv.bias[dim:])  # (B*S, T, 2D): no query is needed
        k, v = kv.view(*x.shape[:2], 2, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if ctx.rope is not None:
            k = apply_rope(k, *ctx.rope)
        ctx.cache.stage(layer, k, v)


class CrossAttention(nn.Module):
    """Tokens (B, N, D) attend to text tokens (B, L, D) under a padding mask, True = keep."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def project_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (B, L, D) -> k, v (B, H, L, Dh): constant for a caption, so a video projects them once."""
        b, length, dim = y.shape
        kv = self.kv_linear(y).view(b, length, 2, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], attn_mask: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), kv from `project_kv`, attn_mask (B, 1, 1, L) bool -> (B, N, D)."""
        b, n, dim = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, dim // self.num_heads).transpose(1, 2)  # (B, H, N, Dh)
        o = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn_mask)
        return self.proj(o.transpose(1, 2).reshape(b, n, dim))


class FinalLayer(nn.Module):
    """adaLN-single output head: tokens (B, T, S, D) -> (B, T, S, prod(patch) * out_channels).

    neighbour_kernel > 1 adds a k x k convolution over the token grid of the normalised tokens, so each token's output
    also reads its neighbours' features (its errors are then not its own alone and the token grid shows less).
    """

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int, neighbour_kernel: int = 1):
        super().__init__()
        if neighbour_kernel < 1 or neighbour_kernel % 2 == 0:
            raise ValueError(f"head_kernel must be an odd number >= 1, got {neighbour_kernel}")
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)
        self.neighbours = (nn.Conv2d(hidden_size, patch_volume * out_channels, neighbour_kernel,
                                     padding=neighbour_kernel // 2) if neighbour_kernel > 1 else None)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # t_emb: (B, T, D) per-frame timestep embedding; grid: the (rows, columns) of the S tokens
        shift, scale = (self.scale_shift_table[None, None] + t_emb[:, :, None]).unbind(2)  # (B, T, D) each
        x = modulate(self.norm_final(x), shift[:, :, None], scale[:, :, None])
        out = self.linear(x)
        if self.neighbours is None:
            return out
        b, t, s, d = x.shape
        planes = x.reshape(b * t, *grid, d).permute(0, 3, 1, 2)  # (B*T, D, rows, columns)
        return out + self.neighbours(planes).flatten(2).transpose(1, 2).view(b, t, s, -1)


class OutputRefiner(nn.Module):
    """A residual 3x3 conv pair over each frame of the unpatchified output: (N, C, H, W) -> (N, C, H, W).

    Each token's values come from its own vector alone, so its errors are its own and the token grid shows; these
    convolutions see across token borders. The last one starts at zero, so a fresh refiner changes nothing.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(x)))
