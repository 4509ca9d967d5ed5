"""Samplers for one chunk: the caller runs the model, a sampler turns its output into the next x.

    sampler = make_sampler("dpm-solver++", diffusion, num_steps=25)
    sampler.reset()                                   # at the start of every chunk
    for i, t in enumerate(sampler.timesteps):         # model-input timesteps, high -> low
        out = model(x, t.expand(B, k), ...)           # (B, 2C, k, H, W)
        x = sampler.step(out, i, x, generator)
"""

import numpy as np
import torch

from causalvdm.diffusion.gaussian import GaussianDiffusion

SAMPLERS = ("ddim", "dpm-solver++", "iddpm")
# What few-step students sample with (their objective, causalvdm/distill, is built for it): deterministic, with
# "trailing" timesteps, so one step starts at the pure-noise end.
STUDENT_SAMPLER = "ddim"


class IDDPMSampler:
    """Ancestral sampling with the learned variance over `num_steps` respaced steps (IDDPM)."""

    def __init__(self, diffusion: GaussianDiffusion, num_steps: int):
        self.diffusion = diffusion.respaced(num_steps)
        self.timesteps = torch.from_numpy(self.diffusion.timestep_map[::-1].copy()).long()  # (S,)

    def reset(self) -> None:
        """Nothing to reset: each ancestral step depends on the current x only."""

    def step_noise(self, shape, generator=None, device=None) -> torch.Tensor:
        """The noise of every step of a chunk at once -> (S, *shape) on `device`.

        Drawn on the generator's device step by step (one draw of the whole block would give other numbers), so it
        equals drawing at each step: a seeded CPU generator gives the same video on any accelerator, with one
        host-to-device copy per chunk instead of one per step.
        """
        draw_on = generator.device if generator is not None else device
        noise = [torch.randn(shape, generator=generator, device=draw_on) for _ in range(len(self.timesteps))]
        return torch.stack(noise).to(device)

    def step(self, model_output: torch.Tensor, i: int, x_t: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        """x at step i (B, C, ...) and the model output (B, 2C, ...) there -> x at step i + 1.

        noise: this step's noise (B, C, ...), e.g. from `step_noise`; else it is drawn from `generator`.
        """
        if noise is None:
            device = generator.device if generator is not None else x_t.device
            noise = torch.randn(x_t.shape, generator=generator, device=device).to(x_t.device)
        return self.step_rows(model_output, torch.full((x_t.shape[0],), i, device=x_t.device), x_t, noise)

    def step_rows(self, model_output: torch.Tensor, steps: torch.Tensor, x_t: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
        """`step` for rows each at its own step index: steps (B,) long on x_t's device, noise (B, C, ...)."""
        t = (self.diffusion.num_timesteps - 1) - steps
        return self.diffusion.p_sample(model_output, x_t, t, noise)


class DDIMSampler:
    """Deterministic DDIM (eta 0) over `num_steps` "trailing" steps, spaced by the diffusion's spacing_power.

    Trailing: the first step is the last training step, where pure noise matches the schedule, and the last one
    lands on x_0 (alpha-bar 1).
    """

    def __init__(self, diffusion: GaussianDiffusion, num_steps: int):
        self.diffusion = diffusion
        total = diffusion.num_timesteps
        # T k / S for k = S .. 1, minus 1 (diffusers' float `arange` of the same positions gives S + 1 of them for
        # some S, the last at -1)
        steps = diffusion.spaced(total * np.arange(num_steps, 0, -1) / num_steps, total, offset=-1)  # (S,) high -> low
        self._steps = steps.tolist()
        self.timesteps = torch.from_numpy(diffusion.timestep_map[steps]).long()  # (S,) what the model is given
        abar_next = np.append(diffusion.alphas_cumprod[steps[1:]], 1.0).tolist()  # (S,) alpha-bar after each step
        # Per step: the diffusion step, sqrt(abar_next) and sqrt(1 - abar_next), each rounded once to float32, as a
        # Python float multiplying a float32 tensor is; copied to a device once (see `_on`).
        self._tables = (torch.tensor(self._steps), torch.tensor([a**0.5 for a in abar_next], dtype=torch.float32),
                        torch.tensor([(1 - a) ** 0.5 for a in abar_next], dtype=torch.float32))
        self._device_tables = {}

    def reset(self) -> None:
        """Nothing to reset: each step depends on the current x only."""

    def step_noise(self, shape, generator=None, device=None) -> None:
        """Deterministic steps draw no noise."""
        return None

    def step(self, model_output: torch.Tensor, i: int, x_t: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        """x at step i (B, C, ...) and the model output (B, C or 2C, ...) there -> x at step i + 1 (deterministic)."""
        # made on the device, not copied there: a host-to-device copy at every step would make the host wait
        return self.step_rows(model_output, torch.full((x_t.shape[0],), i, device=x_t.device), x_t)

    def step_rows(self, model_output: torch.Tensor, steps: torch.Tensor, x_t: torch.Tensor,
                  noise=None) -> torch.Tensor:
        """`step` for rows each at its own step index: steps (B,) long on x_t's device."""
        pred = model_output[:, : x_t.shape[1]]
        step_t, keep, add = (table[steps] for table in self._on(x_t.device))
        x_start, eps = self.diffusion.predict_xstart(pred, x_t, step_t), self.diffusion.predict_eps(pred, x_t, step_t)
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        return (keep.view(shape) * x_start + add.view(shape) * eps).to(x_t.dtype)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The per-step tables on `device`, copied there once (a copy at every step would make the host wait)."""
        if device not in self._device_tables:
            self._device_tables[device] = tuple(table.to(device) for table in self._tables)
        return self._device_tables[device]


class DPMSolverSampler:
    """diffusers' DPM-Solver++ (2nd order multistep) driven by our betas over steps spaced by the diffusion's
    spacing_power; uses only the prediction half of a learned-sigma output."""

    def __init__(self, diffusion: GaussianDiffusion, num_steps: int):
        # Imported here: diffusers takes seconds to import and training never needs it.
        from diffusers import DPMSolverMultistepScheduler

        self.scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=diffusion.num_timesteps,
            trained_betas=np.asarray(diffusion.betas).tolist(),
            prediction_type=diffusion.prediction_type,
            thresholding=False,  # latents are not bounded like pixels
            algorithm_type="dpmsolver++",
            solver_order=2,
        )
        top = diffusion.num_timesteps - 1
        even = np.linspace(0, top, num_steps + 1)[::-1][:-1]  # diffusers' own "linspace" spacing
        self._steps = diffusion.spaced(even, top).tolist()
        self.reset()
        # Scheduler indices are steps of `diffusion`; the model expects the original timesteps.
        self.timesteps = torch.from_numpy(diffusion.timestep_map)[self.scheduler.timesteps].long()  # (S,)

    def reset(self) -> None:
        """Start a new chunk: drop the multistep history of the previous one."""
        self.scheduler.set_timesteps(timesteps=self._steps)
        self._next = 0

    def step_noise(self, shape, generator=None, device=None) -> None:
        """Deterministic steps draw no noise."""
        return None

    def step(self, model_output: torch.Tensor, i: int, x_t: torch.Tensor, generator=None, noise=None) -> torch.Tensor:
        """x at step i (B, C, ...) and the model output (B, C or 2C, ...) there -> x at step i + 1 (deterministic)."""
        if i != self._next:
            raise ValueError(f"sampler step {i} out of order (expected {self._next}); call reset() before a new chunk")
        self._next += 1
        pred = model_output[:, : x_t.shape[1]]
        return self.scheduler.step(pred, self.scheduler.timesteps[i], x_t).prev_sample


def make_sampler(name: str, diffusion: GaussianDiffusion, num_steps: int):
    """A sampler over `num_steps` steps of `diffusion`, spaced by its spacing_power: 'iddpm', 'ddim' or 'dpm-solver++'.

    The result has .timesteps (S,) long model-input timesteps (high -> low), .reset(),
    .step_noise(shape, generator, device) -> (S, *shape) or None and
    .step(model_output, i, x_t, generator=None, noise=None) -> x_prev; the stateless ones ('iddpm', 'ddim') also
    .step_rows(model_output, steps, x_t, noise) for rows each at its own step (the stream engine steps every stream
    in one call).
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
    if not 1 <= num_steps <= diffusion.num_timesteps:
        raise ValueError(f"num_steps must be in [1, {diffusion.num_timesteps}], got {num_steps}")
    if name == "iddpm":
        return IDDPMSampler(diffusion, num_steps)
    if name == "ddim":
        return DDIMSampler(diffusion, num_steps)
    return DPMSolverSampler(diffusion, num_steps)
