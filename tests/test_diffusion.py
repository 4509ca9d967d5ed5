import math

import numpy as np
import pytest
import torch

from causalvdm.diffusion import IDDPM, GaussianDiffusion, clean_prefix_loss, make_sampler, prefix_lengths
from causalvdm.diffusion.clean_prefix import timestep_from_uniform
from causalvdm.diffusion.gaussian import SAMPLE_WEIGHT_FLOOR
from causalvdm.diffusion.samplers import SAMPLERS
from causalvdm.registry import SCHEDULERS, ConfigError, build

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)  # DDPM's schedule, written out independently of the code under test
ABAR = np.cumprod(1 - BETAS)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _abar(t):
    """abar[t] for a (B,) index tensor as float64 (B, 1, 1, 1, 1)."""
    return torch.from_numpy(ABAR[t.numpy()]).view(-1, 1, 1, 1, 1)


# ------------------------------------------------------------------------------------ schedule
def test_builder_and_errors():
    d = build(SCHEDULERS, dict(type="IDDPM", prediction_type="v_prediction"), "diffusion")
    assert d.num_timesteps == T and d.prediction_type == "v_prediction" and d.learn_sigma
    assert d.betas.dtype == np.float64 and np.allclose(d.betas, BETAS, rtol=0, atol=1e-15)
    assert np.allclose(IDDPM(diffusion_steps=250).betas, np.linspace(4e-4, 0.08, 250))  # IDDPM's 1000/N rescale
    with pytest.raises(ConfigError, match="unknown noise_schedule 'cosine'"):
        build(SCHEDULERS, dict(type="IDDPM", noise_schedule="cosine"), "diffusion")
    with pytest.raises(ValueError, match="unknown prediction_type 'x0'"):
        IDDPM(prediction_type="x0")


@pytest.mark.numerics
def test_q_sample_closed_form():
    d = IDDPM()
    x0, noise = _rand(3, 2, 2, 3, 3, seed=1), _rand(3, 2, 2, 3, 3, seed=2)
    t = torch.tensor([0, 500, 999])
    expected = _abar(t).sqrt() * x0.double() + (1 - _abar(t)).sqrt() * noise.double()
    torch.testing.assert_close(d.q_sample(x0, t, noise).double(), expected, rtol=0, atol=1e-6)


@pytest.mark.numerics
def test_posterior_is_bayes_rule():
    # q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})
    d = IDDPM()
    x0, xt = _rand(3, 2, 1, 2, 2, seed=3), _rand(3, 2, 1, 2, 2, seed=4)
    t = torch.tensor([1, 300, 999])
    beta = torch.from_numpy(BETAS[t.numpy()]).view(-1, 1, 1, 1, 1)
    abar_prev = torch.from_numpy(ABAR[t.numpy() - 1]).view(-1, 1, 1, 1, 1)
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    mean = ((1 - beta).sqrt() / beta * xt.double() + abar_prev.sqrt() / (1 - abar_prev) * x0.double()) / precision
    got_mean, got_var, got_logvar = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_var.double(), (1 / precision).expand_as(got_var), rtol=1e-5, atol=0)
    torch.testing.assert_close(got_logvar.double(), (1 / precision).log().expand_as(got_var), rtol=1e-5, atol=0)
    # At t = 0 the posterior is a point mass at x_0; the log-variance is clipped to the t = 1 value.
    got_mean, got_var, got_logvar = d.q_posterior_mean_variance(x0, xt, torch.tensor([0, 0, 0]))
    torch.testing.assert_close(got_mean, x0, rtol=0, atol=1e-6)
    assert got_var.abs().max() == 0
    assert math.isclose(got_logvar[0].item(), math.log(BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])), rel_tol=1e-6)


def test_respacing_keeps_alphas_cumprod():
    d = IDDPM()
    r = d.respaced(10)
    assert r.num_timesteps == 10 and r.timestep_map[0] == 0 and r.timestep_map[-1] == T - 1
    assert (np.diff(r.timestep_map) > 0).all()
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[r.timestep_map], rtol=1e-12)
    rr = r.respaced(4)  # respacing a respaced diffusion maps back to the original timesteps
    np.testing.assert_allclose(rr.alphas_cumprod, d.alphas_cumprod[rr.timestep_map], rtol=1e-12)
    assert d.respaced(1).timestep_map.tolist() == [T - 1] and d.respaced(T).timestep_map.tolist() == list(range(T))
    with pytest.raises(ValueError, match="num_steps"):
        d.respaced(0)


# ------------------------------------------------------------------------------ reverse step
@pytest.mark.numerics
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_pred_xstart_from_true_target(prediction_type):
    d = IDDPM(prediction_type=prediction_type)
    x0, noise = _rand(4, 2, 2, 2, 2, seed=5), _rand(4, 2, 2, 2, 2, seed=6)
    t = torch.tensor([0, 10, 500, 999])
    xt = d.q_sample(x0, t, noise)
    a, s = _abar(t).sqrt().float(), (1 - _abar(t)).sqrt().float()
    target = dict(epsilon=noise, v_prediction=a * noise - s * x0, sample=x0)[prediction_type]
    out = d.p_mean_variance(torch.cat([target, _rand(4, 2, 2, 2, 2, seed=7).tanh()], 1), xt, t)
    # At t = 999 eps-prediction divides by sqrt(abar) ~ 0.006, amplifying float32 rounding.
    tol = 3e-3 if prediction_type == "epsilon" else 1e-5
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=tol)


@pytest.mark.numerics
def test_p_sample_at_t0_returns_x0_without_noise():
    d = IDDPM()
    x0, eps = _rand(2, 2, 3, 2, 2, seed=8), _rand(2, 2, 3, 2, 2, seed=9)
    t = torch.zeros(2, dtype=torch.long)
    xt = d.q_sample(x0, t, eps)
    out = torch.cat([eps, _rand(2, 2, 3, 2, 2, seed=10).tanh()], 1)
    torch.testing.assert_close(d.p_sample(out, xt, t, noise=_rand(2, 2, 3, 2, 2, seed=11)), x0, rtol=0, atol=1e-6)


@pytest.mark.numerics
def test_learned_range_variance_and_noise():
    d = IDDPM()
    xt, out = _rand(2, 1, 1, 2, 2, seed=12), _rand(2, 2, 1, 2, 2, seed=13)
    out[:, 1] = torch.tensor([-1.0, 1.0])[:, None, None, None]  # v = -1 -> posterior variance, v = +1 -> beta_t
    t = torch.tensor([400, 400])
    res = d.p_mean_variance(out, xt, t)
    post = BETAS[400] * (1 - ABAR[399]) / (1 - ABAR[400])
    torch.testing.assert_close(res["variance"][0], torch.full((1, 1, 2, 2), post, dtype=torch.float32))
    torch.testing.assert_close(res["variance"][1], torch.full((1, 1, 2, 2), BETAS[400], dtype=torch.float32))
    noise = _rand(2, 1, 1, 2, 2, seed=14)
    torch.testing.assert_close(d.p_sample(out, xt, t, noise), res["mean"] + res["variance"].sqrt() * noise)
    with pytest.raises(ValueError, match=r"has 1 channels, expected 2 \(learn_sigma=True"):
        d.p_mean_variance(out[:, :1], xt, t)


# ---------------------------------------------------------------------------------- the loss
def _hand_posterior(x0, xt, t):
    beta, abar, abar_prev = BETAS[t], ABAR[t], ABAR[t - 1] if t > 0 else 1.0
    mean = beta * math.sqrt(abar_prev) / (1 - abar) * x0 + (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar) * xt
    return mean, beta * (1 - abar_prev) / (1 - abar)


def _hand_model(eps, v, xt, t):
    """Model mean and variance of p(x_{t-1} | x_t) for one element, from scalar formulas."""
    abar = ABAR[t]
    x0_pred = (xt - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    mean, _ = _hand_posterior(x0_pred, xt, t)
    post_clipped = _hand_posterior(0.0, 0.0, max(t, 1))[1]
    frac = (v + 1) / 2
    return mean, math.exp(frac * math.log(BETAS[t]) + (1 - frac) * math.log(post_clipped))


@pytest.mark.numerics
@pytest.mark.parametrize("t", [0, 1, 37, 600])
def test_training_losses_match_hand_computation(t):
    d = IDDPM()
    shape = (1, 1, 2, 2, 2)
    x0 = _rand(*shape, seed=15).clamp(-0.9, 0.9)
    noise, eps_pred = _rand(*shape, seed=16), _rand(*shape, seed=17)
    v = _rand(*shape, seed=18).tanh()
    tt = torch.tensor([t])
    xt = d.q_sample(x0, tt, noise)
    losses = d.training_losses(torch.cat([eps_pred, v], 1), x0, xt, tt, noise)

    terms = []
    for x0_, xt_, e_, v_ in zip(*(a.double().flatten().tolist() for a in (x0, xt, eps_pred, v))):
        m_model, var_model = _hand_model(e_, v_, xt_, t)
        if t == 0:  # decoder NLL of the 1/127.5-wide bin around x0
            cdf = lambda z: 0.5 * (1 + math.erf((z - m_model) / math.sqrt(2 * var_model)))  # noqa: E731
            terms.append(-math.log(cdf(x0_ + 1 / 255) - cdf(x0_ - 1 / 255)))
        else:  # KL of two Gaussians
            m_true, var_true = _hand_posterior(x0_, xt_, t)
            terms.append(0.5 * (math.log(var_model / var_true) + (var_true + (m_true - m_model) ** 2) / var_model - 1))
    vb = np.mean(terms) / math.log(2)
    mse = ((noise - eps_pred) ** 2).mean().item()
    assert math.isclose(losses["vb"].item(), vb, rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(losses["mse"].item(), mse, rel_tol=1e-6)
    assert math.isclose(losses["loss"].item(), mse + vb, rel_tol=1e-4)


def test_vb_trains_only_the_variance():
    d = IDDPM()
    x0, noise = _rand(2, 2, 2, 2, 2, seed=19), _rand(2, 2, 2, 2, 2, seed=20)
    t = torch.tensor([0, 250])
    out = _rand(2, 4, 2, 2, 2, seed=21).requires_grad_()
    losses = d.training_losses(out, x0, d.q_sample(x0, t, noise), t, noise)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert grad_vb[:, :2].abs().max() == 0 and grad_vb[:, 2:].abs().min() > 0  # mean is frozen in the VLB
    assert grad_mse[:, 2:].abs().max() == 0 and grad_mse[:, :2].abs().min() > 0


@pytest.mark.numerics
def test_v_prediction_mse_target():
    d = IDDPM(prediction_type="v_prediction", learn_sigma=False)
    x0, noise = _rand(2, 2, 1, 2, 2, seed=22), _rand(2, 2, 1, 2, 2, seed=23)
    t = torch.tensor([3, 700])
    v = (_abar(t).sqrt() * noise.double() - (1 - _abar(t)).sqrt() * x0.double()).float()
    losses = d.training_losses(v, x0, d.q_sample(x0, t, noise), t, noise)
    assert losses["mse"].abs().max() < 1e-12 and losses["vb"].abs().max() == 0


@pytest.mark.numerics
def test_sample_prediction_loss_is_the_v_loss_of_its_x0():
    # x-prediction trains with the v-prediction loss of the same x_0 estimate: |x0 - pred|^2 / (1 - abar), the
    # weight floored at SAMPLE_WEIGHT_FLOOR where the step is nearly clean.
    d = IDDPM(prediction_type="sample", learn_sigma=False)
    x0, noise = _rand(3, 2, 1, 2, 2, seed=24), _rand(3, 2, 1, 2, 2, seed=25)
    pred = x0 + 0.1 * _rand(3, 2, 1, 2, 2, seed=26)
    t = torch.tensor([5, 300, 900])
    xt = d.q_sample(x0, t, noise)
    losses = d.training_losses(pred, x0, xt, t, noise)
    abar = _abar(t)

    def v_of(x):  # v from an x_0 estimate
        return (abar.sqrt() * xt.double() - x.double()) / (1 - abar).sqrt()

    v_mse = ((v_of(x0) - v_of(pred)) ** 2).mean(dim=(1, 2, 3, 4))
    floored = v_mse * (1 - abar.flatten()) / (1 - abar.flatten()).clamp(min=SAMPLE_WEIGHT_FLOOR)
    assert abar[0].item() > 1 - SAMPLE_WEIGHT_FLOOR and abar[1].item() < 1 - SAMPLE_WEIGHT_FLOOR
    torch.testing.assert_close(losses["mse"].double(), floored, rtol=1e-5, atol=0)
    assert d.training_losses(x0, x0, xt, t, noise)["mse"].abs().max() == 0


@pytest.mark.numerics
@pytest.mark.parametrize("prediction_type, token", [("sample", (2, 3)), ("epsilon", (1, 1))])
def test_border_weight_adds_the_steps_across_token_borders(prediction_type, token):
    # loss = mse + w * (mean square step of the weighted error across each token border along H, + the same along
    # W), against a loop over the pairs of positions on either side of a border, in float64
    w, (th, tw) = 0.5, token
    d = IDDPM(prediction_type=prediction_type, learn_sigma=False, border_weight=w)
    x0, noise = _rand(2, 2, 2, 5, 6, seed=40), _rand(2, 2, 2, 5, 6, seed=41)
    pred = _rand(2, 2, 2, 5, 6, seed=42)
    t = torch.tensor([5, 600])
    losses = d.training_losses(pred, x0, d.q_sample(x0, t, noise), t, noise, token=token)
    err = (x0 if prediction_type == "sample" else noise).double() - pred.double()
    weight = 1 / (1 - _abar(t).flatten()).clamp(min=SAMPLE_WEIGHT_FLOOR) if prediction_type == "sample" else [1, 1]
    for b in range(2):
        e = err[b]
        rows = [(e[:, :, i, j] - e[:, :, i - 1, j]) ** 2 for i in range(1, 5) if i % th == 0 for j in range(6)]
        cols = [(e[:, :, i, j] - e[:, :, i, j - 1]) ** 2 for i in range(5) for j in range(1, 6) if j % tw == 0]
        assert len(rows) == (24 if th == 1 else 12) and len(cols) == (25 if tw == 1 else 5)
        mse, borders = (e**2).mean(), torch.stack(rows).mean() + torch.stack(cols).mean()
        assert math.isclose(losses["mse"][b].item(), weight[b] * mse, rel_tol=1e-5)
        assert math.isclose(losses["loss"][b].item(), weight[b] * (mse + w * borders), rel_tol=1e-5)
    # an error that is the same at every position has no steps: the loss is the plain MSE, to the bit
    x0 = torch.arange(2 * 2 * 2 * 5 * 6, dtype=torch.float32).reshape(2, 2, 2, 5, 6) / 64  # exact in float32
    flat = d.training_losses(x0 - 0.25, x0, x0, t, x0, token=token)  # x0 is the noise too: eps's error is 0.25
    assert torch.equal(flat["loss"], flat["mse"]) and flat["mse"].min() > 0
    # a grid one token high has no border along H (not NaN); a respaced diffusion keeps the weight
    thin = d.training_losses(pred[..., :th, :], x0[..., :th, :], x0[..., :th, :], t, noise[..., :th, :], token=token)
    assert torch.isfinite(thin["loss"]).all() and (thin["loss"] > thin["mse"]).all()
    assert d.respaced(10).border_weight == w
    with pytest.raises(ValueError, match="border_weight must be a finite number >= 0"):
        IDDPM(border_weight=-1)


# --------------------------------------------------------------------------- clean prefix
class Recorder:
    """Wraps a model, keeping each call's inputs and output (with retained grad)."""

    def __init__(self, model):
        self.model = model
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, **kwargs):
        out = self.model(x, t, **kwargs)
        out.retain_grad()
        self.calls.append(dict(x=x, t=t, out=out, **kwargs))
        return out


def _batch(model, b=2, frames=33, seed=30):
    x0 = _rand(b, model.in_channels, frames, 4, 4, seed=seed)
    y = _rand(b, model.model_max_length, model.caption_channels, seed=seed + 1)
    mask = torch.ones(b, model.model_max_length, dtype=torch.bool)
    mask[:, -2:] = False
    return x0, y, mask


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_prefix_lengths():
    assert prefix_lengths(33, 8) == [1, 9, 17, 25]
    assert prefix_lengths(9, 8) == [1] and prefix_lengths(17, 4) == [1, 5, 9, 13]
    with pytest.raises(ValueError, match="clip_len=8"):
        prefix_lengths(8, 8)


def test_clean_prefix_inputs_and_gradients(make_model):
    model = Recorder(make_model().train())
    d = IDDPM()
    x0, y, mask = _batch(model)
    p, k = 9, 8
    kwargs = dict(y=y, mask=mask, chunk_size=k, prefix_len=p, prefix_perturb_t=0, txt_dropout_prob=0.0)
    res = clean_prefix_loss(model, d, x0, generators=_gens([0, 1]), **kwargs)
    res["loss"].backward()
    call = model.calls[0]
    assert call["x"].shape[2] == p + k and call["chunk"] == (p, p + k)  # frames after the chunk are not fed
    assert torch.equal(call["x"][:, :, :p], x0[:, :, :p])  # clean prefix
    assert (call["t"][:, :p] == 0).all() and (call["t"][:, p:] == call["t"][:, p:p + 1]).all()
    assert (call["t"][:, p] > 0).all() and call["tpe_offset"].shape == (2,)  # cyclic TPE offsets drawn
    assert torch.equal(call["y"], y) and torch.equal(call["mask"], mask)
    assert model.y_embedder.y_embedding.grad is not None  # null caption in the graph even at p = 0 (for DDP)
    grad = call["out"].grad
    assert grad[:, :, :p].abs().max() == 0  # no loss on the prefix outputs
    assert grad[:, :, p:].abs().amin(dim=(0, 1, 3, 4)).min() > 0  # every chunk frame carries loss
    assert res["loss"].dim() == 0 and res["mse"].dim() == 0 and res["vb"].dim() == 0
    assert not res["mse"].requires_grad and not res["vb"].requires_grad  # logged, never backpropagated
    assert math.isclose(res["loss"].item(), res["mse"] + res["vb"], rel_tol=1e-5)

    x0_later = x0.clone()
    x0_later[:, :, p + k:] = 100.0  # frames after the chunk cannot matter
    again = clean_prefix_loss(model, d, x0_later, generators=_gens([0, 1]), **kwargs)
    assert torch.equal(again["loss"], res["loss"].detach())
    with pytest.raises(ValueError, match=r"prefix_len=10 is not one of \[1, 9, 17, 25\]"):
        clean_prefix_loss(model, d, x0, generators=_gens([0, 1]), **{**kwargs, "prefix_len": 10})


def test_clean_prefix_loss_charges_the_models_token_borders(make_model):
    model = Recorder(make_model(learn_sigma=False))  # patch (1, 2, 2): a token is 2x2 latent positions
    x0, y, mask = _batch(model)
    kwargs = dict(y=y, mask=mask, chunk_size=8, prefix_len=9, prefix_perturb_t=0, txt_dropout_prob=0.0)
    d = IDDPM(prediction_type="sample", learn_sigma=False, border_weight=0.5)
    res = clean_prefix_loss(model, d, x0, generators=_gens([0, 1]), **kwargs)
    call = model.calls[0]
    chunk_xt = call["x"][:, :, 9:]  # x-prediction without a variance: the loss reads neither x_t nor the noise
    args = (call["out"][:, :, 9:].detach(), x0[:, :, 9:17], chunk_xt, call["t"][:, 9], torch.zeros_like(chunk_xt))
    tokens, steps = (d.training_losses(*args, token=token)["loss"].mean() for token in ((2, 2), (1, 1)))
    torch.testing.assert_close(res["loss"].detach(), tokens)
    assert not math.isclose(tokens.item(), steps.item(), rel_tol=1e-3)  # the borders are not every step


def test_timestep_power_draws_low_noise_more_often(make_model):
    n = 1000
    uniform = torch.arange(n)
    assert torch.equal(timestep_from_uniform(uniform, n, 1.0), uniform)
    squared = timestep_from_uniform(uniform, n, 2.0)
    assert squared.min() == 0 and squared.max() == n - 1 and (squared.diff() >= 0).all()
    # t < N / 4 needs (t + 0.5) / N < 1 / 2: half the draws instead of a quarter.
    assert (squared < n // 4).sum() == n // 2

    model = Recorder(make_model())
    x0, y, mask = _batch(model)
    kwargs = dict(y=y, mask=mask, chunk_size=8, prefix_len=9, prefix_perturb_t=0, txt_dropout_prob=0.0)
    clean_prefix_loss(model, IDDPM(), x0, generators=_gens([0, 1]), **kwargs)
    clean_prefix_loss(model, IDDPM(), x0, generators=_gens([0, 1]), timestep_power=2.0, **kwargs)
    plain, leaning = model.calls
    assert torch.equal(leaning["t"][:, 9:], timestep_from_uniform(plain["t"][:, 9:], n, 2.0))
    assert (leaning["t"][:, 9] < plain["t"][:, 9]).all()  # the same draws, moved towards t = 0
    assert torch.equal(leaning["tpe_offset"], plain["tpe_offset"])


@pytest.mark.numerics
def test_clean_prefix_perturbation_and_text_dropout(make_model):
    model = Recorder(make_model())
    d = IDDPM()
    x0, y, mask = _batch(model, frames=17)
    clean_prefix_loss(model, d, x0, y=y, mask=mask, chunk_size=8, prefix_len=9, prefix_perturb_t=50,
                      txt_dropout_prob=1.0, generators=_gens([0, 1]))
    call = model.calls[0]
    assert (call["t"][:, :9] == 0).all()  # the timestep input of perturbed prefix frames stays 0
    noise = (call["x"][:, :, :9].double() - math.sqrt(ABAR[50]) * x0[:, :, :9].double()) / math.sqrt(1 - ABAR[50])
    assert 0.7 < noise.std() < 1.3  # the prefix is x0 noised to t = 50
    assert call["text_drop"].tolist() == [True, True]  # probability 1: every caption is dropped
    # The model swaps dropped rows for its null caption: same output as passing the null caption itself.
    y_null, mask_null = model.null_text(2)
    kwargs = dict(chunk=call["chunk"], tpe_offset=call["tpe_offset"])
    dropped = model.model(call["x"], call["t"], y=call["y"], mask=call["mask"], text_drop=call["text_drop"], **kwargs)
    explicit = model.model(call["x"], call["t"], y=y_null, mask=mask_null, **kwargs)
    assert torch.allclose(dropped, explicit, atol=1e-6)
    kept = model.model(call["x"], call["t"], y=call["y"], mask=call["mask"], **kwargs)
    assert not torch.allclose(kept, explicit, atol=1e-4)


def test_clean_prefix_tpe_offsets(make_model):
    # 'full_window' (the reference code): random cyclic offsets only when prefix + chunk fill the 33-row table.
    x0, y, mask = _batch(make_model())
    kwargs = dict(y=y, mask=mask, chunk_size=8, prefix_perturb_t=50, txt_dropout_prob=0.5)
    for p in (9, 25):
        calls = {}
        for tpe_offsets in ("always", "full_window"):
            model = Recorder(make_model())
            res = clean_prefix_loss(model, IDDPM(), x0, prefix_len=p, generators=_gens([5, 6]),
                                    tpe_offsets=tpe_offsets, **kwargs)
            calls[tpe_offsets] = (model.calls[0], res["loss"].item())
        (always, loss_always), (full, loss_full) = calls["always"], calls["full_window"]
        assert always["tpe_offset"].shape == (2,) and always["tpe_offset"].tolist() != [0, 0]
        if p + 8 == 33:  # a full window: the same offsets, drawn by each sample's generator
            assert torch.equal(full["tpe_offset"], always["tpe_offset"]) and loss_full == loss_always
        else:  # shorter: row 0 first, as at inference before the queue is full; the other draws are unchanged
            assert full["tpe_offset"] is None and loss_full != loss_always
        assert torch.equal(full["x"], always["x"]) and torch.equal(full["t"], always["t"])
        assert torch.equal(full["text_drop"], always["text_drop"])
    with pytest.raises(ValueError, match="tpe_offsets must be one of always, full_window, got 'sometimes'"):
        clean_prefix_loss(make_model(), IDDPM(), x0, prefix_len=9, generators=_gens([5, 6]), tpe_offsets="sometimes",
                          **kwargs)


@pytest.mark.numerics
def test_clean_prefix_text_dropout_with_fixed_null_caption(make_model):
    # The reference code's null caption: frozen, and a dropped row keeps its prompt's padding mask.
    model = Recorder(make_model(null_caption="fixed").train())
    x0, y, mask = _batch(model, frames=17)
    res = clean_prefix_loss(model, IDDPM(), x0, y=y, mask=mask, chunk_size=8, prefix_len=9, prefix_perturb_t=0,
                            txt_dropout_prob=1.0, generators=_gens([0, 1]))
    res["loss"].backward()
    call = model.calls[0]
    assert call["text_drop"].tolist() == [True, True]
    null = model.y_embedder.y_embedding
    assert not null.requires_grad and null.grad is None
    kwargs = dict(chunk=call["chunk"], tpe_offset=call["tpe_offset"])
    with torch.no_grad():
        dropped = model.model(call["x"], call["t"], y=y, mask=mask, text_drop=call["text_drop"], **kwargs)
        under_mask = model.model(call["x"], call["t"], y=null[None].expand(2, -1, -1), mask=mask, **kwargs)
        unmasked = model.model(call["x"], call["t"], y=None, **kwargs)
    assert torch.allclose(dropped, under_mask, atol=1e-6)
    assert not torch.allclose(dropped, unmasked, atol=1e-4)  # the mask's 2 padded tokens are not attended


@pytest.mark.numerics
def test_clean_prefix_batch_equals_mean_of_halves(make_model):
    model = make_model()
    d = IDDPM()
    x0, y, mask = _batch(model, b=4)
    kwargs = dict(chunk_size=8, prefix_len=17, prefix_perturb_t=50, txt_dropout_prob=0.5)
    seeds = [11, 12, 13, 14]
    full = clean_prefix_loss(model, d, x0, y=y, mask=mask, generators=_gens(seeds), **kwargs)
    halves = [clean_prefix_loss(model, d, x0[s], y=y[s], mask=mask[s], generators=_gens(seeds[s]), **kwargs)
              for s in (slice(0, 2), slice(2, 4))]
    assert math.isclose(full["loss"].item(), (halves[0]["loss"].item() + halves[1]["loss"].item()) / 2, rel_tol=1e-5)
    assert math.isclose(full["mse"], (halves[0]["mse"] + halves[1]["mse"]) / 2, rel_tol=1e-5)
    assert math.isclose(full["vb"], (halves[0]["vb"] + halves[1]["vb"]) / 2, rel_tol=1e-5)
    other = clean_prefix_loss(model, d, x0, y=y, mask=mask, generators=_gens([1, 2, 3, 4]), **kwargs)
    assert other["loss"].item() != full["loss"].item()  # the seeds matter


# ---------------------------------------------------------------------------------- samplers
def _run_sampler(model, sampler, x, y, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    sampler.reset()
    for i in range(steps):
        t = sampler.timesteps[i].expand(x.shape[0], x.shape[2])
        x = sampler.step(model(x, t, y=y), i, x, generator=gen)
    return x


@pytest.mark.parametrize("name", ["iddpm", "ddim", "dpm-solver++"])
def test_sampler_deterministic_and_finite(make_model, name):
    model = make_model()
    x, y, _ = _batch(model, b=1, frames=4)
    sampler = make_sampler(name, IDDPM(), num_steps=20)
    assert sampler.timesteps.dtype == torch.long and sampler.timesteps.shape == (20,)
    assert sampler.timesteps[0] == T - 1 and (sampler.timesteps.diff() < 0).all()
    with torch.no_grad():
        a = _run_sampler(model, sampler, x, y, steps=4, seed=0)
        b = _run_sampler(model, sampler, x, y, steps=4, seed=0)  # reset() restarts any multistep history
        c = _run_sampler(model, make_sampler(name, IDDPM(), num_steps=20), x, y, steps=4, seed=0)
    assert torch.isfinite(a).all() and (a - x).abs().max() > 1e-3
    assert torch.equal(a, b) and torch.equal(a, c)
    if name == "iddpm":  # the only stochastic sampler
        with torch.no_grad():
            assert not torch.equal(a, _run_sampler(model, sampler, x, y, steps=4, seed=1))


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["iddpm", "ddim", "dpm-solver++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing_power", [1.0, 1.5])
def test_oracle_model_recovers_x0(name, prediction_type, spacing_power):
    d = IDDPM(prediction_type=prediction_type, spacing_power=spacing_power)
    x0 = _rand(2, 3, 2, 4, 4, seed=40).clamp(-2, 2)

    def oracle(x_t, t):
        """The exact eps (or v) for this x0, as a learned-sigma output (variance values 0)."""
        abar = torch.tensor(ABAR[t], dtype=torch.float64)
        eps = (x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()
        pred = dict(epsilon=eps, v_prediction=abar.sqrt() * eps - (1 - abar).sqrt() * x0.double(),
                    sample=x0.double())[prediction_type]
        return torch.cat([pred.float(), torch.zeros_like(x_t)], 1)

    sampler = make_sampler(name, d, num_steps=50)
    x = _rand(*x0.shape, seed=41)
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(oracle(x, int(t)), i, x, generator=gen)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-3)


def test_sampler_errors():
    with pytest.raises(ValueError, match=r"unknown sampler 'euler' \(known: ddim, dpm-solver\+\+, iddpm\)"):
        make_sampler("euler", IDDPM(), 10)
    sampler = make_sampler("dpm-solver++", IDDPM(), 10)
    x = torch.zeros(1, 2, 1, 2, 2)
    sampler.step(torch.zeros(1, 4, 1, 2, 2), 0, x)
    with pytest.raises(ValueError, match="call reset"):
        sampler.step(torch.zeros(1, 4, 1, 2, 2), 0, x)


def test_even_spacing_is_the_samplers_own():
    """spacing_power 1 keeps each sampler's even steps: IDDPM's linspace from T - 1 to 0, diffusers' "trailing"
    DDIM steps (T k / S - 1, without the extra step at -1 its float arange makes for some S, e.g. 61) and its
    DPM-Solver++ steps, with the same sigmas."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    d = IDDPM()
    for s in (*range(1, 48), 61, 100, 999):
        assert d.respaced(s).timestep_map.tolist() == np.round(np.linspace(T - 1, 0, s)).astype(int)[::-1].tolist()
        ddim, dpm = make_sampler("ddim", d, s), make_sampler("dpm-solver++", d, s)
        assert ddim.timesteps.tolist() == [round(T * k / s) - 1 for k in range(s, 0, -1)]
        reference = DDIMScheduler(num_train_timesteps=T, trained_betas=BETAS.tolist(), timestep_spacing="trailing")
        reference.set_timesteps(s)
        assert ddim.timesteps.tolist() == reference.timesteps.tolist()[:s]
        reference = DPMSolverMultistepScheduler(num_train_timesteps=T, trained_betas=BETAS.tolist())
        reference.set_timesteps(s)
        assert dpm.timesteps.tolist() == reference.timesteps.tolist()
        assert torch.equal(dpm.scheduler.sigmas, reference.sigmas)


def test_spacing_power_moves_the_steps_to_low_noise():
    """Each sampler's even positions t in [0, top] go to top (t / top) ** p: with p = 2 the 20 steps are the
    formula's, about twice as many of them lie under T / 4, and a respaced diffusion keeps p."""
    p, s = 2.0, 20
    d = IDDPM(spacing_power=p)
    k = np.arange(s, 0, -1)
    assert make_sampler("ddim", d, s).timesteps.tolist() == (np.round(T * (k / s) ** p) - 1).astype(int).tolist()
    assert make_sampler("dpm-solver++", d, s).timesteps.tolist() == np.round((T - 1) * (k / s) ** p).astype(int).tolist()
    kept = np.round((T - 1) * np.linspace(1, 0, s) ** p).astype(int)[::-1]
    assert make_sampler("iddpm", d, s).timesteps.tolist() == kept[::-1].tolist()
    assert d.respaced(s).timestep_map.tolist() == kept.tolist() and d.respaced(s).spacing_power == p
    for name in SAMPLERS:  # under T / 4: (k / s) ** 2 < 1 / 4 for 9 or 10 of the 20 steps, against 5 evenly spaced
        assert (make_sampler(name, d, s).timesteps < T / 4).sum() >= 9
        assert (make_sampler(name, IDDPM(), s).timesteps < T / 4).sum() <= 5


@pytest.mark.numerics
def test_ddim_step_against_float64():
    """One DDIM step x' = sqrt(abar') x_0 + sqrt(1 - abar') eps from each prediction type, evenly and unevenly
    spaced, against float64; the last step lands on x_0. float32 arithmetic: within 8 float32 epsilons."""
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        for power in (1.0, 1.25):
            sampler = make_sampler("ddim", IDDPM(prediction_type=prediction_type, spacing_power=power), 25)
            steps = sampler.timesteps.tolist()
            for i, t in enumerate(steps):
                x, out = _rand(2, 3, 2, 4, 4, seed=2 * i), _rand(2, 6, 2, 4, 4, seed=2 * i + 1)
                a, a_next = ABAR[t], ABAR[steps[i + 1]] if i + 1 < len(steps) else 1.0
                xd, pred = x.double(), out[:, :3].double()
                x0 = dict(epsilon=(xd - math.sqrt(1 - a) * pred) / math.sqrt(a), sample=pred,
                          v_prediction=math.sqrt(a) * xd - math.sqrt(1 - a) * pred)[prediction_type]
                eps = (xd - math.sqrt(a) * x0) / math.sqrt(1 - a)
                expected = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
                got = sampler.step(out, i, x).double()
                assert ((got - expected).abs() / (expected.abs() + 1)).max() < 8 * torch.finfo(torch.float32).eps
            assert a_next == 1.0 and torch.allclose(got, x0, rtol=0, atol=1e-5)



@pytest.mark.parametrize("name", ["ddim", "iddpm"])
def test_step_rows_equals_each_row_stepped_alone(name):
    """step_rows, each row at its own step index (the stream engine's one call for all its streams), gives every row
    exactly what `step` gives it alone, in float32 and bf16, with and without guidance's variance channels."""
    diffusion = IDDPM(learn_sigma=name == "iddpm")
    sampler = make_sampler(name, diffusion, 5)
    steps = [3, 0, 4, 1, 3]
    for dtype in (torch.float32, torch.bfloat16):
        x = _rand(5, 3, 2, 4, 4, seed=1).to(dtype)
        out = _rand(5, 6 if diffusion.learn_sigma else 3, 2, 4, 4, seed=2)
        noise = _rand(5, 3, 2, 4, 4, seed=3)
        together = sampler.step_rows(out, torch.tensor(steps), x, noise)
        alone = torch.cat([sampler.step(out[j:j + 1], i, x[j:j + 1], noise=noise[j:j + 1])
                           for j, i in enumerate(steps)])
        assert together.dtype == dtype and torch.equal(together, alone)

def test_spacing_power_errors():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="spacing_power must be a finite number > 0"):
            IDDPM(spacing_power=bad)
    d = IDDPM(spacing_power=3.0)  # 200 steps: (1 / 200) ** 3 T rounds to 0 and so do the next ones
    for name in SAMPLERS:
        with pytest.raises(ValueError, match="num_steps=200 with spacing_power=3 puts two steps on the same timestep"):
            make_sampler(name, d, 200)
    with pytest.raises(ValueError, match="num_steps=1000 with spacing_power=1 puts two steps"):
        make_sampler("dpm-solver++", IDDPM(), T)  # (T - 1) k / T: two of them round to the same step
    with pytest.raises(ValueError, match="one below 0"):  # DDIM's last: round(1000 * 0.1 ** 4) - 1 = -1
        make_sampler("ddim", IDDPM(spacing_power=4.0), 10)


def test_gaussian_diffusion_rejects_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(np.array([0.1, 1.5]))


def test_frame_sink_training_layout(make_model):
    """Training lays a sink out as inference does: the first frames keep TPE rows 0..s-1 whatever the sample's
    random offset, the others roll over the remaining rows; the loss sees it (it differs from no sink)."""
    model = make_model(max_tpe_len=11)
    offsets = torch.tensor([0, 4, 9])
    ctx = model.prepare(9, 4, 4, tpe_offset=offsets, sink_frames=2)
    table = model.pos_embed_temporal
    for row, offset in enumerate(offsets.tolist()):
        expected = [0, 1] + [2 + (p - 2 + offset) % 9 for p in range(2, 9)]
        assert torch.equal(ctx.tpe[row], table[expected])
    x0 = torch.randn(2, 4, 9, 4, 4, generator=torch.Generator().manual_seed(0))
    losses = []
    for sink in (0, 2):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        out = clean_prefix_loss(model, IDDPM(), x0, y=None, mask=None, chunk_size=4, prefix_len=5, prefix_perturb_t=0,
                                txt_dropout_prob=0.0, generators=gens, sink_frames=sink)
        losses.append(out["loss"].item())
    assert losses[0] != losses[1]


def test_clean_prefix_counts_only_chunks_after_a_caption_switch(make_model):
    # A sample whose chunk starts before its switch frame adds nothing (loss and gradient); the others keep their
    # own loss, as if their batch held them alone (the mean stays over the whole batch).
    model = Recorder(make_model().train())
    x0, y, mask = _batch(model)
    kwargs = dict(y=y, mask=mask, chunk_size=8, prefix_len=9, prefix_perturb_t=0, txt_dropout_prob=0.0)
    whole = clean_prefix_loss(model, IDDPM(), x0, generators=_gens([0, 1]), **kwargs)
    alone = [clean_prefix_loss(model, IDDPM(), x0[i:i + 1], generators=_gens([i]),
                               **{**kwargs, "y": y[i:i + 1], "mask": mask[i:i + 1]})["loss"].item() for i in (0, 1)]
    assert math.isclose(whole["loss"].item(), sum(alone) / 2, rel_tol=1e-5)
    switched = clean_prefix_loss(model, IDDPM(), x0, generators=_gens([0, 1]), switch_at=torch.tensor([9, 17]),
                                 **kwargs)
    assert math.isclose(switched["loss"].item(), alone[0] / 2, rel_tol=1e-5)
    assert math.isclose(switched["mse"] + switched["vb"], switched["loss"].item(), rel_tol=1e-5)
    switched["loss"].backward()
    grad = model.calls[-1]["out"].grad
    assert grad[1].abs().max() == 0 and grad[0, :, 9:].abs().amin() > 0
