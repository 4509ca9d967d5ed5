"""Few-step distillation of the causal ST-DiT: a student that makes a chunk in `num_steps` DDIM steps.

The recipe (README, "Few-step students"):
- ODE regression (Luhman & Luhman 2021; CausVid, Yin et al. 2025, sec. 4): the teacher integrates the probability
  flow ODE with deterministic DDIM from noise z, given the chunk's context; at each of its own timesteps tau_i the
  student takes the teacher's state x_{tau_i} and regresses the teacher's end point,
      L = || x0_student(x_{tau_i}, tau_i | context) - x0_teacher(z | real context) ||^2.
  The student's DDIM timesteps are a subset of the teacher's, so x_{tau_i} is a point of the teacher's trajectory.
- Self-rollout (Self Forcing, Huang et al. 2025): with probability `rollout_prob` the student's context is its own
  few-step rollout from the first real frame, written to its KV cache by the same commit as at inference, while the
  teacher's target still comes from the real context, so the student learns to return to the data from its own
  errors. Gradient truncation: the rollout and the cache are detached; the gradient flows through the student's
  prediction of the target chunk only.
"""

from dataclasses import dataclass

import torch

from causalvdm.config import check_range, settings_from
from causalvdm.diffusion import make_sampler
from causalvdm.diffusion.samplers import STUDENT_SAMPLER
from causalvdm.registry import ConfigError



@dataclass
class DistillSettings:
    """`cfg.distill`: the teacher checkpoint, the student's steps, the teacher's ODE steps, the rollout probability."""

    teacher: str = ""  # training checkpoint directory, save_pretrained folder or weights file of the teacher
    teacher_weights: str = "ema"  # ema | model: which weights of a training checkpoint directory
    num_steps: int = 4  # the student's DDIM steps per chunk
    teacher_steps: int = 24  # the teacher's DDIM steps for the ODE targets; a multiple of num_steps
    rollout_prob: float = 0.5  # share of samples whose context is the student's own rollout

    @classmethod
    def from_cfg(cls, distill_cfg) -> "DistillSettings":
        """Validate `cfg.distill` against the declared fields -> DistillSettings."""
        settings = settings_from(cls, "distill", dict(distill_cfg or {}))
        if not settings.teacher:
            raise ConfigError("distill.teacher: give the teacher's checkpoint (--cfg-options distill.teacher=PATH)")
        if settings.teacher_weights not in ("ema", "model"):
            raise ConfigError(f"distill.teacher_weights must be 'ema' or 'model', got {settings.teacher_weights!r}")
        check_range("distill", settings, 1, None, "num_steps", "teacher_steps")
        check_range("distill", settings, 0, 1, "rollout_prob")
        return settings


def matched_steps(student, teacher) -> list[int]:
    """The index in the teacher sampler's steps of each of the student's timesteps (both high -> low)."""
    teacher_steps = teacher.timesteps.tolist()
    missing = [t for t in student.timesteps.tolist() if t not in teacher_steps]
    if missing:
        raise ConfigError(f"distill.teacher_steps={len(teacher_steps)}: the teacher's DDIM timesteps miss the "
                          f"student's {missing}; make teacher_steps a multiple of distill.num_steps")
    return [teacher_steps.index(t) for t in student.timesteps.tolist()]


def context_spans(prefix_len: int, n0: int, chunk_size: int) -> list[tuple[int, int]]:
    """The frame spans [start, end) written by the calls of a video: the n0 given frames, then chunks of k."""
    spans = [(0, min(n0, prefix_len))]
    while spans[-1][1] < prefix_len:
        spans.append((spans[-1][1], min(spans[-1][1] + chunk_size, prefix_len)))
    return spans


@torch.no_grad()
def ode_solve(model, sampler, x: torch.Tensor, cache, y=None, mask=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run `sampler` on a chunk from x (B, C, k, h, w) reading `cache`, as the generator's cache mode does (unguided)
    -> (the end point, the state before each step), each (B, C, k, h, w) float32. model: plain or DDP/FSDP-wrapped."""
    sampler.reset()
    b, k = x.shape[0], x.shape[2]
    states = []
    for i, t in enumerate(sampler.timesteps.to(x.device)):
        states.append(x)
        x = sampler.step(model(x, t.expand(b, k), y=y, mask=mask, cache=cache), i, x)
    return x, states


class FewStepDistillation:
    """The objective's pieces over a fixed diffusion and autoregressive layout; see the module docstring.

    diffusion: the training GaussianDiffusion; chunk_size, max_cond_frames, sink_frames, prefix_perturb_t: as
    `cfg.autoregressive`; num_steps / teacher_steps: the student's and the teacher's DDIM steps.
    """

    def __init__(self, diffusion, chunk_size: int, max_cond_frames: int, sink_frames: int, prefix_perturb_t: int,
                 num_steps: int, teacher_steps: int):
        self.diffusion = diffusion
        self.chunk_size, self.max_cond_frames, self.sink_frames = chunk_size, max_cond_frames, sink_frames
        self.prefix_perturb_t = prefix_perturb_t
        self.student_sampler = make_sampler(STUDENT_SAMPLER, diffusion, num_steps)
        self.teacher_sampler = make_sampler(STUDENT_SAMPLER, diffusion, teacher_steps)
        self.matched = matched_steps(self.student_sampler, self.teacher_sampler)

    def draw(self, shape, prefix_len: int, rollout: bool, generator: torch.Generator) -> dict:
        """One sample's random draws, in a fixed order: the chunk noise z (C, k, h, w), the student step i, the noise
        of each rolled-out context chunk, the perturbation noise of the context frames (C, p, h, w)."""
        c, h, w = shape
        k = self.chunk_size
        z = torch.randn(c, k, h, w, generator=generator)
        step = int(torch.randint(len(self.matched), (1,), generator=generator))
        chunks = len(context_spans(prefix_len, 1, k)) - 1
        rollout_noise = torch.randn(chunks, c, k, h, w, generator=generator) if rollout else None
        perturb = torch.randn(c, prefix_len, h, w, generator=generator) if self.prefix_perturb_t else None
        return dict(z=z, step=step, rollout_noise=rollout_noise, perturb=perturb)

    def _perturb(self, frames: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Written frames forward-noised to prefix_perturb_t, as the generator writes them (timestep input 0)."""
        if noise is None:
            return frames
        t = torch.full((frames.shape[0],), self.prefix_perturb_t, dtype=torch.long, device=frames.device)
        return self.diffusion.q_sample(frames, t, noise.to(frames))

    @torch.no_grad()
    def context(self, model, first: torch.Tensor, real: torch.Tensor | None, prefix_len: int, draws: list[dict],
                y=None, mask=None):
        """A cache of `model` holding a video's first `prefix_len` frames, written call by call as at inference
        (frame 0, then chunks of k) -> (cache, the clean frames written (B, C, p, h, w)).

        first: frame 0 (B, C, 1, h, w); real: the real frames (B, C, >= p, h, w) to write, or None for the model's own
        few-step rollout from frame 0 with each sample's `rollout_noise`; y (B, L, C_text), mask (B, L): the caption.
        model: plain or DDP/FSDP-wrapped (every call goes through its forward).
        """
        cache = model.new_cache(first.shape[0], self.max_cond_frames, self.chunk_size, self.sink_frames)
        perturb = None if draws[0]["perturb"] is None else torch.stack([d["perturb"] for d in draws])
        frames = []
        for j, (start, end) in enumerate(context_spans(prefix_len, 1, self.chunk_size)):
            if start == 0:
                clean = first
            elif real is not None:
                clean = real[:, :, start:end]
            else:
                noise = torch.stack([d["rollout_noise"][j - 1] for d in draws]).to(first)
                clean = ode_solve(model, self.student_sampler, noise, cache, y, mask)[0]
            frames.append(clean)
            written = self._perturb(clean, None if perturb is None else perturb[:, :, start:end])
            model(written, None, y=y, mask=mask, cache=cache, write=True)
        return cache, torch.cat(frames, dim=2)

    @torch.no_grad()
    def targets(self, teacher, x0: torch.Tensor, prefix_len: int, draws: list[dict], y=None, mask=None):
        """The teacher's ODE from each sample's z given the real context x0[:, :, :p] -> (student inputs x_{tau_i}
        (B, C, k, h, w), their timesteps tau_i (B,), the teacher's end points (B, C, k, h, w))."""
        cache, _ = self.context(teacher, x0[:, :, :1], x0, prefix_len, draws, y, mask)
        z = torch.stack([d["z"] for d in draws]).to(x0)
        end, states = ode_solve(teacher, self.teacher_sampler, z, cache, y, mask)
        steps = [d["step"] for d in draws]
        x_in = torch.stack([states[self.matched[i]][n] for n, i in enumerate(steps)])
        t_in = self.student_sampler.timesteps[steps].to(x0.device)
        return x_in, t_in, end

    def loss(self, student, x_in: torch.Tensor, t_in: torch.Tensor, target: torch.Tensor, cache, y=None,
             mask=None) -> torch.Tensor:
        """Per-sample squared error (B,) of the student's x0 prediction from x_in (B, C, k, h, w) at t_in (B,),
        reading `cache`, against `target` (B, C, k, h, w); `student` may be the DDP/FSDP-wrapped model."""
        # No caption is dropped, but passing text_drop keeps the null caption in the graph, so DDP finds every
        # parameter of a caption-conditioned student used (as in clean_prefix_loss).
        keep = None if y is None else torch.zeros(x_in.shape[0], dtype=torch.bool, device=x_in.device)
        out = student(x_in, t_in[:, None].expand(-1, x_in.shape[2]), y=y, mask=mask, cache=cache, text_drop=keep)
        pred = self.diffusion.p_mean_variance(out, x_in, t_in)["pred_xstart"]
        return ((pred - target.float()) ** 2).mean(dim=(1, 2, 3, 4))
