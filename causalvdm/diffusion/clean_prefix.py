"""The clean-prefix training objective of Ca2-VDM: a clean prefix of p frames conditions one noisy chunk of k.

Every random draw of a sample comes from that sample's own CPU generator, so a sample's loss does not
depend on which other samples share its batch or process (distributed training matches one process).
"""

import torch

from causalvdm.diffusion.gaussian import GaussianDiffusion

# Which samples get a random cyclic-TPE offset: every one, or only those whose prefix + chunk fill the table
# (p + k >= max_tpe_len; shorter windows start at row 0, as they do at inference before the queue is full).
TPE_OFFSETS = ("always", "full_window")


def prefix_lengths(clip_len: int, chunk_size: int) -> list[int]:
    """Allowed prefix lengths [1, 1 + k, 1 + 2k, ...] with p + k <= clip_len (k = chunk_size)."""
    if chunk_size < 1 or clip_len < 1 + chunk_size:
        raise ValueError(f"clip_len={clip_len} must hold one frame plus a chunk of chunk_size={chunk_size}")
    return list(range(1, clip_len - chunk_size + 1, chunk_size))


def timestep_from_uniform(t: torch.Tensor, num_timesteps: int, power: float) -> torch.Tensor:
    """Uniform timesteps t (B,) in [0, N) -> floor(N * ((t + 0.5) / N) ** power): power > 1 draws the low noise
    levels, where a frame's fine detail is decided, more often (power 1: t itself)."""
    if power == 1:
        return t
    u = (t.double() + 0.5) / num_timesteps
    return (num_timesteps * u**power).floor().long().clamp(0, num_timesteps - 1)


def _draw(model, diffusion, sample_shape, prefix_len, prefix_perturb_t, drop_text, txt_dropout_prob, shift,
          timestep_power, gen):
    """One sample's random draws, always in the same order: t, chunk noise, prefix noise, text drop, TPE offset
    (drawn last, so whether it is drawn changes none of the others)."""
    c, k, h, w = sample_shape
    t = torch.randint(0, diffusion.num_timesteps, (1,), generator=gen)
    t = timestep_from_uniform(t, diffusion.num_timesteps, timestep_power)
    noise = torch.randn(c, k, h, w, generator=gen)
    prefix_noise = torch.randn(c, prefix_len, h, w, generator=gen) if prefix_perturb_t > 0 else None
    drop = bool(torch.rand((), generator=gen) < txt_dropout_prob) if drop_text else False
    return t, noise, prefix_noise, drop, model.sample_tpe_offset(1, gen) if shift else None


def clean_prefix_loss(
    model,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    *,
    y: torch.Tensor | None,
    mask: torch.Tensor | None,
    chunk_size: int,
    prefix_len: int,
    prefix_perturb_t: int,
    txt_dropout_prob: float,
    generators: list[torch.Generator],
    tpe_offsets: str = "always",
    sink_frames: int = 0,
    switch_at: torch.Tensor | None = None,
    timestep_power: float = 1.0,
) -> dict:
    """Diffusion loss on the chunk frames [p, p + k) of clean latents x0 (B, C, L, H, W) given the clean prefix [0, p).

    The prefix has timestep input 0 (its frames optionally noised to `prefix_perturb_t`); the chunk shares one
    random t per sample. y (B, L_text, C_text) / mask (B, L_text) are replaced by the model's null caption with
    probability `txt_dropout_prob`. generators: B CPU generators, one per sample. tpe_offsets (cyclic TPE):
    'always' draws a random table offset for every sample, 'full_window' only when p + k >= max_tpe_len.
    sink_frames: the first frames of the prefix are a frame sink, laid out as at inference (fixed TPE rows; the
    offsets roll the other frames only). switch_at (B,) long: the frame where a sample's own frames and caption begin
    after another caption's frames (0: none; data.CaptionSwitchDataset); a sample whose chunk starts before it is not
    counted (it would teach the old content under the new caption). timestep_power: the chunk's t is drawn as
    `timestep_from_uniform` makes it (1: uniform). Returns dict(loss=scalar tensor with grad, mse, vb: detached
    scalar tensors), batch means, all on x0's device.
    """
    b, c, clip_len, h, w = x0.shape
    p, k = prefix_len, chunk_size
    allowed = prefix_lengths(clip_len, k)
    if p not in allowed:
        raise ValueError(f"prefix_len={p} is not one of {allowed} (clip_len={clip_len}, chunk_size={k})")
    if len(generators) != b:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {b}")
    if tpe_offsets not in TPE_OFFSETS:
        raise ValueError(f"tpe_offsets must be one of {', '.join(TPE_OFFSETS)}, got {tpe_offsets!r}")
    # Applied even at probability 0: the null caption then stays in the graph, so DDP sees every parameter used.
    drop_text = y is not None and model.caption_channels > 0

    # The reference code draws one offset per batch, for full windows only; each sample's own draw has the same
    # distribution and keeps its loss independent of the batch.
    shift = tpe_offsets == "always" or p + k >= model.max_tpe_len
    draws = [_draw(model, diffusion, (c, k, h, w), p, prefix_perturb_t, drop_text, txt_dropout_prob, shift,
                   timestep_power, g) for g in generators]
    t, noise, prefix_noise, drop, tpe_offset = zip(*draws)
    t = torch.cat(t).to(x0.device)  # (B,)
    noise = torch.stack(noise).to(x0)  # (B, C, k, H, W)

    # Causal attention: frames after the chunk cannot affect it, so they are not fed at all.
    prefix = x0[:, :, :p]  # (B, C, p, H, W)
    chunk_x0 = x0[:, :, p:p + k]  # (B, C, k, H, W)
    if prefix_perturb_t > 0:
        # Perturb the clean frames slightly (robustness to imperfect generated context); their t input stays 0.
        perturb_t = torch.full((b,), prefix_perturb_t, dtype=torch.long, device=x0.device)
        prefix = diffusion.q_sample(prefix, perturb_t, torch.stack(prefix_noise).to(x0))
    chunk_xt = diffusion.q_sample(chunk_x0, t, noise)
    x_in = torch.cat([prefix, chunk_xt], dim=2)  # (B, C, p + k, H, W)
    t_prefix = torch.zeros(b, p, dtype=torch.long, device=x0.device)
    t_in = torch.cat([t_prefix, t[:, None].expand(b, k)], dim=1)  # (B, p + k)

    text_drop = torch.tensor(drop, device=x0.device) if drop_text else None  # (B,) bool
    tpe_offset = None if tpe_offset[0] is None else torch.cat(tpe_offset).to(x0.device)  # (B,)

    out = model(x_in, t_in, y=y, mask=mask, chunk=(p, p + k), tpe_offset=tpe_offset, text_drop=text_drop,
                sink_frames=sink_frames)  # (B, 2C, p + k, H, W)
    losses = diffusion.training_losses(out[:, :, p:p + k], chunk_x0, chunk_xt, t, noise, token=model.patch_size[1:])
    if switch_at is not None:
        # Zeroed, not dropped from the mean: a sample's share of the loss stays independent of its batch.
        counted = (switch_at.to(x0.device) <= p).float()  # (B,)
        losses = {name: value * counted for name, value in losses.items()}
    # The logged terms stay on the device: reading them here would stall every step on the GPU.
    return dict(loss=losses["loss"].mean(), mse=losses["mse"].mean().detach(), vb=losses["vb"].mean().detach())
