"""Gaussian diffusion in the IDDPM style: float64 schedule tables, learned-range variance, eps or v targets.

The diffusion object owns no model: every method takes the model's output as a tensor. Timesteps `t`
are (B,) long indices into this diffusion's tables and broadcast over the other axes (C, T, H, W).
Model outputs have 2C channels when `learn_sigma` (prediction, then variance values v in [-1, 1]).
"""

import math

import numpy as np
import torch

from causalvdm.registry import SCHEDULERS

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# 'sample' (x-prediction) weighs its x_0 error by 1 / (1 - abar_t), so the loss is the v-prediction loss of the
# same model (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"); the floor keeps the
# nearly clean steps from dominating it.
SAMPLE_WEIGHT_FLOOR = 0.05


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear betas 1e-4 .. 0.02, rescaled as IDDPM does so other step counts keep the same total noise."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """Log-probability of x under N(mean, e^(2 log_scale)) integrated over x's bin of 256 in [-1, 1].

    The outermost bins extend to -inf / +inf (DDPM's decoder L0). Elementwise, in nats.
    """
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def _border_mse(err: torch.Tensor, weight, dim: int, every: int) -> torch.Tensor:
    """Weighted mean square of the steps of `err` (B, ...) along `dim` from position i to i + 1 where i + 1 is a
    multiple of `every` (a token border) -> (B,); 0 where there is no border."""
    borders = torch.arange(every - 1, err.shape[dim] - 1, every, device=err.device)
    if len(borders) == 0:
        return torch.zeros(err.shape[0], device=err.device)
    return _mean_flat(weight * err.diff(dim=dim).index_select(dim, borders) ** 2)


class GaussianDiffusion:
    """Forward process, posterior and learned reverse step for a given beta schedule.

    betas: (N,) float64; prediction_type: 'epsilon' | 'v_prediction' | 'sample' (the model predicts x_0 itself: a
    narrow model cannot carry the noise through each token, which eps and v ask of it); learn_sigma: the model also
    predicts the variance (IDDPM learned range). timestep_map: (N,) original timesteps the model is given for each
    step of this diffusion (identity unless it was made by `respaced`). border_weight: the loss also weighs the
    steps of the prediction error across token borders, so that an error which jumps from one token to the next
    costs more than the same error shared by both (0: the plain MSE). spacing_power: where a sampler of few steps
    puts them: the even positions t are moved to T (t / T) ** spacing_power, so above 1 more of the steps fall at
    low noise, where the fine detail is decided (1: evenly spaced).
    """

    def __init__(self, betas, prediction_type: str = "epsilon", learn_sigma: bool = True, timestep_map=None,
                 border_weight: float = 0.0, spacing_power: float = 1.0):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r} (known: {', '.join(PREDICTION_TYPES)})")
        if not (math.isfinite(border_weight) and border_weight >= 0):
            raise ValueError(f"border_weight must be a finite number >= 0, got {border_weight}")
        if not (math.isfinite(spacing_power) and spacing_power > 0):
            raise ValueError(f"spacing_power must be a finite number > 0, got {spacing_power}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.prediction_type = prediction_type
        self.learn_sigma = learn_sigma
        self.border_weight = float(border_weight)
        self.spacing_power = float(spacing_power)
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        self._device_tables: dict[tuple[int, torch.device], torch.Tensor] = {}

        alphas = 1.0 - betas
        self.log_betas = np.log(betas)
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)  (DDPM eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The variance is 0 at t = 0; its log is clipped to the t = 1 value so it stays finite.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]) if self.num_timesteps > 1
            else self.betas
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # Fixed "large" variance (IDDPM's choice without learn_sigma): beta_t, with the posterior value at t = 0.
        fixed_large = np.append(self.posterior_variance[1], betas[1:]) if self.num_timesteps > 1 else betas
        self.fixed_log_variance = np.log(fixed_large)

    # ------------------------------------------------------------------------------- helpers
    def _extract(self, table: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """table[t] as float32 (B, 1, ..., 1) with `ndim` axes, on t's device.

        Each table is copied to a device once: a host-to-device copy at every sampling step would make the
        host wait for the device.
        """
        key = (id(table), t.device)
        if key not in self._device_tables:
            self._device_tables[key] = torch.from_numpy(table).to(t.device)
        return self._device_tables[key][t].float().view(-1, *([1] * (ndim - 1)))

    def _split(self, model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model output (B, C or 2C, ...) -> prediction (B, C, ...), variance values (B, C, ...) or None."""
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected:
            raise ValueError(f"model output has {model_output.shape[1]} channels, expected {expected} "
                             f"(learn_sigma={self.learn_sigma}, {channels} latent channels)")
        if self.learn_sigma:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    # ---------------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); x0, noise (B, ...) -> (B, ...)."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x0.dim()) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) * noise).to(x0.dtype)

    def q_posterior_mean_variance(self, x0, x_t, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), each broadcastable to x_t."""
        n = x_t.dim()
        coef1, coef2 = self._extract(self.posterior_mean_coef1, t, n), self._extract(self.posterior_mean_coef2, t, n)
        variance = self._extract(self.posterior_variance, t, n)
        return coef1 * x0 + coef2 * x_t, variance, self._extract(self.posterior_log_variance_clipped, t, n)

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
        n = x0.dim()
        sqrt_abar = self._extract(self.sqrt_alphas_cumprod, t, n)
        return sqrt_abar * noise - self._extract(self.sqrt_one_minus_alphas_cumprod, t, n) * x0

    # ---------------------------------------------------------------------- reverse process
    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict:
        """p(x_{t-1} | x_t) from the model output (B, 2C or C, ...).

        Returns dict(mean, variance, log_variance, pred_xstart), float32 tensors broadcastable to x_t (B, C, ...).
        """
        n = x_t.dim()
        pred, var_values = self._split(model_output.float(), x_t.shape[1])
        x_t = x_t.float()
        if var_values is None:
            log_variance = self._extract(self.fixed_log_variance, t, n).expand_as(x_t)
        else:
            # Learned range (IDDPM eq. 15): interpolate, in log space, between the posterior variance and beta_t.
            min_log = self._extract(self.posterior_log_variance_clipped, t, n)
            max_log = self._extract(self.log_betas, t, n)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log

        pred_xstart = self.predict_xstart(pred, x_t, t)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return dict(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance, pred_xstart=pred_xstart)

    def predict_xstart(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 implied by a prediction of this diffusion's type (B, C, ...) at x_t, t -> (B, C, ...) float32."""
        n = x_t.dim()
        pred, x_t = pred.float(), x_t.float()
        if self.prediction_type == "epsilon":
            return (self._extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t
                    - self._extract(self.sqrt_recipm1_alphas_cumprod, t, n) * pred)
        if self.prediction_type == "sample":
            return pred
        # v: x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return (self._extract(self.sqrt_alphas_cumprod, t, n) * x_t
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, n) * pred)

    def predict_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by a prediction of this diffusion's type (B, C, ...) at x_t, t -> (B, C, ...) float32."""
        n = x_t.dim()
        pred, x_t = pred.float(), x_t.float()
        if self.prediction_type == "epsilon":
            return pred
        if self.prediction_type == "sample":  # x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps
            return ((x_t - self._extract(self.sqrt_alphas_cumprod, t, n) * pred)
                    / self._extract(self.sqrt_one_minus_alphas_cumprod, t, n))
        # v: eps = sqrt(abar) v + sqrt(1 - abar) x_t
        return (self._extract(self.sqrt_alphas_cumprod, t, n) * pred
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, n) * x_t)

    def p_sample(self, model_output, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} = mean + sigma * noise; no noise is added where t == 0. Shapes of x_t."""
        out = self.p_mean_variance(model_output, x_t, t)
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.dim() - 1)))
        x_prev = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise.float()
        return x_prev.to(x_t.dtype)

    # ------------------------------------------------------------------------------ training
    def training_losses(self, model_output, x0, x_t, t, noise, token: tuple[int, int] = (1, 1)) -> dict:
        """IDDPM hybrid loss per sample: MSE on the prediction target plus the VLB term for the variance, plus
        border_weight times the same weighted MSE of the error's steps across token borders, every `token` = (th, tw)
        latent positions along H and W (the last two axes; (1, 1): between every two neighbours).

        model_output (B, 2C or C, ...), x0 / x_t / noise (B, C, ..., H, W), t (B,) -> dict(loss, mse, vb), each (B,).
        """
        pred, var_values = self._split(model_output, x0.shape[1])
        if self.prediction_type == "sample":
            one_minus_abar = self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0.dim()) ** 2
            weight = 1 / one_minus_abar.clamp(min=SAMPLE_WEIGHT_FLOOR)
            err = x0.float() - pred.float()
        else:
            target = noise if self.prediction_type == "epsilon" else self.v_target(x0, noise, t)
            weight, err = 1.0, target.float() - pred.float()
        mse = _mean_flat(weight * err**2)
        loss = mse
        if self.border_weight > 0:
            borders = _border_mse(err, weight, -2, token[0]) + _border_mse(err, weight, -1, token[1])
            loss = loss + self.border_weight * borders
        if var_values is None:
            vb = torch.zeros_like(mse)
        else:
            # The VLB only trains the variance: the mean is frozen so the MSE alone drives the prediction.
            frozen = torch.cat([pred.detach(), var_values], dim=1)
            vb = self._vb_bits(frozen, x0, x_t, t) * (self.num_timesteps / 1000.0)
        return dict(loss=loss + vb, mse=mse, vb=vb)

    def _vb_bits(self, model_output, x0, x_t, t) -> torch.Tensor:
        """One VLB term per sample (B,) in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), decoder NLL at t == 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0.float(), x_t.float(), t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0.float(), out["mean"], 0.5 * out["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ----------------------------------------------------------------------------- respacing
    def respaced(self, num_steps: int) -> "GaussianDiffusion":
        """The diffusion over `num_steps` steps of this one, first and last kept, spaced by `spacing_power`.

        New betas are re-derived from the kept alphas_cumprod, so q(x_t | x_0) is unchanged at those steps;
        `timestep_map` gives the original timestep the model expects for each new step.
        """
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_timesteps}], got {num_steps}")
        # Spaced from the last step down so that a single step sits at the pure-noise end.
        even = np.linspace(self.num_timesteps - 1, 0, num_steps)
        kept = self.spaced(even, self.num_timesteps - 1)[::-1]
        abar = self.alphas_cumprod[kept]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(betas, self.prediction_type, self.learn_sigma, self.timestep_map[kept],
                                 self.border_weight, self.spacing_power)

    def spaced(self, even: np.ndarray, top: float, offset: int = 0) -> np.ndarray:
        """A sampler's evenly spaced timestep positions (S,) in [0, top], high -> low, moved to
        top (t / top) ** spacing_power, rounded and shifted by `offset` -> (S,) int64 steps of this diffusion; a
        one-line error where two of them would be the same step or one would fall below 0."""
        # Power 1 leaves the positions as they are, so the even spacing stays bit for bit what it was.
        moved = even if self.spacing_power == 1 else top * (even / top) ** self.spacing_power
        steps = np.round(moved).astype(np.int64) + offset
        if (np.diff(steps) >= 0).any() or steps[-1] < 0:
            raise ValueError(f"num_steps={len(even)} with spacing_power={self.spacing_power:g} puts two steps on "
                             f"the same timestep or one below 0; take fewer steps or a power closer to 1")
        return steps


@SCHEDULERS.register_module()
def IDDPM(diffusion_steps: int = 1000, noise_schedule: str = "linear", prediction_type: str = "epsilon",
          learn_sigma: bool = True, border_weight: float = 0.0, spacing_power: float = 1.0) -> GaussianDiffusion:
    """The training diffusion: `diffusion_steps` steps of linear betas, eps, v or x_0 target, learned-range variance;
    border_weight > 0 adds the error's steps across token borders to the loss, spacing_power > 1 puts more of a
    sampler's steps at low noise (`GaussianDiffusion`)."""
    if noise_schedule != "linear":
        raise ValueError(f"unknown noise_schedule {noise_schedule!r} (known: linear)")
    return GaussianDiffusion(linear_betas(diffusion_steps), prediction_type, learn_sigma, border_weight=border_weight,
                             spacing_power=spacing_power)
