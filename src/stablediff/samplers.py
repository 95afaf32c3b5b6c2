"""Samplers: plain functions over a denoiser D(x, sigma) in sigma space, as in k-diffusion's `sampling.py`.

    x = sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None)

`sigmas` descend to where sampling ends (0, or sigma(t=0) for DDIM/PNDM/DEIS/TCD); `x` starts at noise level
sigmas[0]. History (previous derivatives, denoised estimates) lives in local variables. LCM and TCD also take the
plan's integer `timesteps` (their updates depend on t itself, not only on sigma) and TCD the training sigmas: the
Sampler's `plan_args`, which `SamplingPlan.sample` hands them.

Two families share the table `SAMPLERS`, named so that a name says which one it is:
  * "diffusers" (snake_case names: euler, euler_a, dpmpp_2m, ...; and DDIM, PLMS, UniPC, DDPM, DEIS): each
    reproduces one diffusers scheduler as StableDiffusionPipeline drives it;
  * "a1111" (AUTOMATIC1111's labels: "Euler a", "DPM++ 2M", "DPM++ 2M SDE", ...): each reproduces A1111 v1.10, i.e.
    k-diffusion's sample_* update rule with A1111's schedules and rules (a1111.py).
`prepare` builds a family's sigmas and timesteps; `SamplingPlan.sample` runs it.

The diffusers family is rewritten in
sigma space: diffusers' "VP" schedulers work on x_vp = x / sqrt(1 + sigma**2) with alpha_t = 1 / sqrt(1 + sigma**2),
sigma_t(VP) = sigma * alpha_t and lambda = log(alpha_t / sigma_t(VP)) = -log(sigma). Dividing their updates by alpha_t
gives the updates below; e.g. DDIM (eta 0) is exactly Euler, and DDPM is exactly Euler ancestral.

Noise: `generator` is None, a torch.Generator or a list of them (one per batch element, drawing shape (1, ...) each,
as diffusers' `randn_tensor` and A1111's per-image RNG do); noise is drawn in float32 on the generator's device (the
CPU for None) and moved to x's device, at the points of the loop where the reproduced code draws it. A1111's SDE
samplers instead draw from Brownian trees seeded with each generator's initial seed (a1111.BrownianNoise).
The math runs in float32. `callback(dict(i, x, sigma, sigma_next, denoised))` runs after each step; it may raise
to cancel, or return a tensor that replaces x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import a1111, rng
from .schedule import NoiseSchedule, TimestepMap, discretize


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    """Unit normal noise shaped like x, drawn exactly as diffusers' `randn_tensor(x.shape, generator)` draws it:
    from one generator, or one (1, ...) draw from each generator of a list (any of rng.draw's generators), or the
    next noise of an rng.ImageRNG (A1111's per-image generators)."""
    if isinstance(generator, rng.ImageRNG):
        return generator.next().to(x.device, x.dtype)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        noise = torch.cat([rng.draw(g, (1, *x.shape[1:]), x.device) for g in generator])
    else:
        noise = rng.draw(generator or torch.default_generator, x.shape, x.device)
    return noise.to(x.device, x.dtype)


def _float32(x, sigmas):
    return x.to(torch.float32), torch.as_tensor(sigmas, dtype=torch.float32).cpu()


def _steps(sigmas):
    """(i, sigma, sigma_next) for each step."""
    return ((i, sigmas[i], sigmas[i + 1]) for i in range(len(sigmas) - 1))


def _report(callback, i, x, sigma, sigma_next, denoised):
    """Run the step callback. It may return a replacement for x (inpainting blends the known latents back in, as
    diffusers does to `latents` after each scheduler step); otherwise x goes on unchanged."""
    if callback is None:
        return x
    out = callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x if out is None else out


def ancestral_step(sigma, sigma_next):
    """Split a step sigma -> sigma_next into a deterministic step down to sigma_down and fresh noise of sigma_up
    (eta = 1), so that sigma_down**2 + sigma_up**2 = sigma_next**2."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


# ---------------------------------------------------------------------------------------------------------------
# first- and second-order ODE / SDE steppers (Karras et al. 2022; Euler a, DPM2 from k-diffusion)


def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma. (EulerDiscreteScheduler)"""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# DDIM with eta = 0 is exactly Euler in sigma space: x_next = D + sigma_next * (x - D) / sigma. (DDIMScheduler)
sample_ddim = sample_euler


def sample_euler_a(denoiser, x, sigmas, *, generator=None, callback=None):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of sigma_up. Noise is drawn on every step,
    the last included (where sigma_up is 0), as EulerAncestralDiscreteScheduler draws it."""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        x = x + _noise(x, generator) * sigma_up
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# DDPM (Ho et al. 2020, "fixed_small" variance) is exactly Euler ancestral in sigma space: its posterior mean is
# D + (sigma_next / sigma)**2 * (x - D) and its standard deviation sigma_next * sqrt(sigma**2 - sigma_next**2) / sigma,
# which are sigma_down and sigma_up above; it draws noise after every model call too. (DDPMScheduler)
sample_ddpm = sample_euler_a


def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None):
    """Heun's method (Karras et al. 2022, Alg. 1); the step to sigma = 0 is a plain Euler step. (HeunDiscreteScheduler)"""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoiser(x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) / 2 * dt
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def _dpm2(denoiser, x, sigmas, generator, callback, ancestral: bool, diffusers: bool = True):
    """DPM-Solver-2 (Lu et al. 2022) in k-diffusion's form: the midpoint in log-sigma, then a full step with the
    derivative there; the step to sigma 0 is Euler. k-diffusion lerps log(sigma) -> log(sigma_down); diffusers'
    KDPM2 lerps log(sigma_next) -> log(sigma) (KDPM2Ancestral as k-diffusion): `diffusers` keeps its orders so the
    midpoints are bit-identical with it. Noise is not drawn on the last step."""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next) if ancestral else (sigma_next, 0.0)
        d = (x - denoised) / sigma
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            if diffusers and not ancestral:
                sigma_mid = sigma_next.log().lerp(sigma.log(), 0.5).exp()
            else:
                sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
            if diffusers and ancestral and sigma_mid == sigma_next:
                # sqrt(sigma * sigma_down) is sigma_next in exact arithmetic and often bit for bit; diffusers feeds
                # the U-Net the log-interpolated timestep there, not the next step's own (with Karras, rounded) one,
                # so a midpoint on a plan sigma is moved one float32 ulp to keep sigma_to_t from mapping it as one
                sigma_mid = torch.nextafter(sigma_mid, sigma)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = (x_2 - denoiser(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigma_down - sigma)
            if ancestral:
                x = x + _noise(x, generator) * sigma_up
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_dpm2(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM2 (KDPM2DiscreteScheduler): two model calls per step, at sigma and at sqrt(sigma * sigma_next)."""
    return _dpm2(denoiser, x, sigmas, generator, callback, ancestral=False)


def sample_dpm2_a(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM2 ancestral (KDPM2AncestralDiscreteScheduler): DPM2 down to sigma_down, then noise of sigma_up (none drawn
    on the last step)."""
    return _dpm2(denoiser, x, sigmas, generator, callback, ancestral=True)


def sample_k_dpm2(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM2 as k-diffusion's `sample_dpm_2` (A1111's "DPM2"): the midpoint lerped from log(sigma)."""
    return _dpm2(denoiser, x, sigmas, generator, callback, ancestral=False, diffusers=False)


def sample_k_dpm2_a(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM2 ancestral as k-diffusion's `sample_dpm_2_ancestral` (A1111's "DPM2 a")."""
    return _dpm2(denoiser, x, sigmas, generator, callback, ancestral=True, diffusers=False)


# ---------------------------------------------------------------------------------------------------------------
# linear multistep methods


def lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial for node sigma_{i-j} among the nodes
    sigma_i, ..., sigma_{i-order+1}. Gauss-Legendre with `order` points is exact for this degree order-1 polynomial
    (diffusers and k-diffusion integrate it numerically with scipy's quad)."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * np.dot(weights, basis))


def sample_lms(denoiser, x, sigmas, *, generator=None, callback=None, order: int = 4):
    """Linear multistep in sigma on the derivatives (x - D) / sigma, up to `order` (4) of them; the coefficients
    integrate the Lagrange interpolant over each step. (LMSDiscreteScheduler)"""
    x, sigmas = _float32(x, sigmas)
    sigmas_f64 = sigmas.double().numpy()
    ds = []
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        ds = [*ds, (x - denoised) / sigma][-order:]
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigmas_f64, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# Adams-Bashforth weights of PLMS for 1..4 past derivatives, newest first
_PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_pndm(denoiser, x, sigmas, *, generator=None, callback=None):
    """PLMS (Liu et al. 2022, pseudo linear multistep) as PNDMScheduler(skip_prk_steps=True) runs it.

    PNDM's transfer function is DDIM's step, i.e. Euler in sigma space with eps = (x - D) / sigma, and PLMS feeds it
    the Adams-Bashforth combination of up to 4 past eps (weights fixed, as if the steps were equal). diffusers' first
    step visits the second timestep twice: Euler to it, then back from the start with the mean of both eps (a Heun
    step), then on from the corrected sample; the eps at the uncorrected sample is not kept in the history.
    """
    x, sigmas = _float32(x, sigmas)
    steps = len(sigmas) - 1
    eps_history = []
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        eps = (x - denoised) / sigma
        eps_history = [*eps_history[-3:], eps]
        if i == 0 and steps > 1:
            x_2 = x + eps * (sigma_next - sigma)
            eps_2 = (x_2 - denoiser(x_2, sigma_next)) / sigma_next
            x = x + (eps + eps_2) / 2 * (sigma_next - sigma)
        else:
            weights = _PLMS_WEIGHTS[len(eps_history)]
            eps_prime = sum(w * e for w, e in zip(weights, reversed(eps_history)))
            x = x + eps_prime * (sigma_next - sigma)
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# ---------------------------------------------------------------------------------------------------------------
# exponential integrators in lambda = -log(sigma): DPM-Solver++, UniPC, DEIS


def _dpmpp_2m(denoiser, x, sigmas, generator, callback, eta: float):
    """DPM-Solver++(2M) (Lu et al. 2022b), midpoint form, as DPMSolverMultistepScheduler: first order on the first
    step and on the step to sigma 0 (lower_order_final with final_sigmas_type "zero"), second order in between.
    eta = 1 is its "sde-dpmsolver++" variant, which draws noise on every step, the last included."""
    x, sigmas = _float32(x, sigmas)
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        noise = _noise(x, generator) if eta > 0 else None
        h = sigma.log() - sigma_next.log()  # lambda_next - lambda
        if old_denoised is None or sigma_next == 0:
            denoised_d = denoised
        else:
            r = h_last / h
            denoised_d = denoised + (denoised - old_denoised) / (2 * r)
        if noise is None:
            x = sigma_next / sigma * x - torch.expm1(-h) * denoised_d
        else:
            x = sigma_next / sigma * torch.exp(-eta * h) * x - torch.expm1(-(1 + eta) * h) * denoised_d
            x = x + sigma_next * (-torch.expm1(-2 * eta * h)).sqrt() * noise
        old_denoised, h_last = denoised, h
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2M): DPMSolverMultistepScheduler's default (dpmsolver++, order 2, midpoint)."""
    return _dpmpp_2m(denoiser, x, sigmas, generator, callback, eta=0.0)


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2M) SDE: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), noise from `generator`
    (not k-diffusion's Brownian tree)."""
    return _dpmpp_2m(denoiser, x, sigmas, generator, callback, eta=1.0)


def _unipc_update(x, sigma_t, history, order: int, denoised_t=None):
    """One UniPC update with B(h) = expm1(-h) ("bh2") in data-prediction form (Zhao et al. 2023, Alg. 2/3).

    history: [(sigma_s0, D_s0), (sigma_s1, D_s1), ...], newest first; x is the sample at sigma_s0.
    Without denoised_t this is the predictor UniP to sigma_t; with it, the corrector UniC using D at sigma_t.
    """
    corrector = denoised_t is not None
    (sigma_s0, m0), older = history[0], history[1:order]
    h = sigma_s0.log() - sigma_t.log()
    hh = -h
    b_h = torch.expm1(hh)
    x_t = sigma_t / sigma_s0 * x - b_h * m0  # h * phi_1(h) == B(h) for bh2
    if not corrector and order == 1:
        return x_t
    rks = [(sigma_s0.log() - s.log()) / h for s, _ in older]  # (lambda_si - lambda_s0) / h
    d1s = [(m - m0) / rk for (_, m), rk in zip(older, rks)]
    if order == (1 if corrector else 2):
        rhos = [0.5]  # diffusers' fixed value here (UniC-1, UniP-2)
    else:
        R, b = [], []
        r = torch.stack([*rks, torch.ones(())])
        h_phi_k, factorial = torch.expm1(hh) / hh - 1, 1
        for k in range(1, order + 1):
            R.append(r ** (k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        R, b = torch.stack(R), torch.stack(b)
        rhos = torch.linalg.solve(R, b) if corrector else torch.linalg.solve(R[:-1, :-1], b[:-1])
    res = sum(rho * d for rho, d in zip(rhos, d1s))
    if corrector:
        res = res + rhos[-1] * (denoised_t - m0)
    return x_t - b_h * res


def sample_unipc(denoiser, x, sigmas, *, generator=None, callback=None, order: int = 2):
    """UniPC (UniPCMultistepScheduler defaults: order 2, bh2, predict_x0): each new D first corrects the last step
    (UniC, with the order that step used), then a UniP predictor step; the order warms up from 1 and drops to 1 for
    the last step (lower_order_final). The corrector uses D from the uncorrected sample, as diffusers does."""
    x, sigmas = _float32(x, sigmas)
    steps = len(sigmas) - 1
    history, x_last, last_order = [], None, 1
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        if x_last is not None:
            x = _unipc_update(x_last, sigma, history, last_order, denoised_t=denoised)
        history = [(sigma, denoised), *history][:order]
        last_order = min(order, steps - i, i + 1)
        x_last = x
        x = _unipc_update(x, sigma_next, history, last_order)
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def _deis_coefficient(t, b, c):
    """Integral over rho of the Lagrange basis through log-rho nodes b, c (the one that is 1 at b), taken from 0 to t
    up to a constant: DEIS' "logrho" multistep coefficient (Zhang & Chen 2023)."""
    return t * (-c.log() + t.log() - 1) / (b.log() - c.log())


def sample_deis(denoiser, x, sigmas, *, generator=None, callback=None):
    """DEIS (DEISMultistepScheduler defaults: order 2, logrho) on eps = (x - D) / sigma with rho = sigma.
    First order (= DDIM / Euler) on the first step and, with fewer than 15 steps, on the last (lower_order_final).
    diffusers counts the steps of the whole schedule there, these sigmas only: an img2img run that keeps fewer than 15
    of 15 or more steps takes a first-order last step where diffusers takes a second-order one."""
    x, sigmas = _float32(x, sigmas)
    steps = len(sigmas) - 1
    eps_prev = None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        eps = (x - denoised) / sigma
        if eps_prev is None or (i == steps - 1 and steps < 15) or sigma_next == 0:
            x = x + (sigma_next - sigma) * eps
        else:
            sigma_prev = sigmas[i - 1]
            coef_0 = _deis_coefficient(sigma_next, sigma, sigma_prev) - _deis_coefficient(sigma, sigma, sigma_prev)
            coef_1 = _deis_coefficient(sigma_next, sigma_prev, sigma) - _deis_coefficient(sigma, sigma_prev, sigma)
            x = x + coef_0 * eps + coef_1 * eps_prev
        eps_prev = eps
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# ---------------------------------------------------------------------------------------------------------------
# consistency samplers: LCM, TCD. Their updates depend on the integer timestep of each step, not only on sigma, so
# they take the plan's `timesteps` (and TCD the training sigmas, `train_sigmas`) as keywords (Sampler.plan_args).


def lcm_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's boundary-condition scalings (c_skip, c_out) at timestep t (Song et al. 2023, consistency models, with
    t scaled by LCMScheduler's timestep_scaling): c_skip(0) = 1 and c_out(0) = 0, so that f(x, 0) = x."""
    t = t * timestep_scaling
    return sigma_data**2 / (t**2 + sigma_data**2), t / (t**2 + sigma_data**2) ** 0.5


def sample_lcm(denoiser, x, sigmas, *, timesteps, generator=None, callback=None):
    """Latent Consistency Model sampling (Luo et al. 2023), as LCMScheduler: at each step the consistency function
    f = c_skip(t) * x_vp + c_out(t) * D(x, sigma) (x_vp = x / sqrt(1 + sigma**2), the sample diffusers scales) maps
    x to the data; every step but the last then noises f afresh to the next sigma: x_next = f + sigma_next * z.
    The callback's `denoised` is f."""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        c_skip, c_out = lcm_scalings(timesteps[i])
        x = c_out * denoiser(x, sigma) + c_skip * x / (1 + sigma**2) ** 0.5
        denoised = x
        if i < len(sigmas) - 2:
            x = x + _noise(x, generator) * sigma_next
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_tcd(denoiser, x, sigmas, *, timesteps, train_sigmas, eta: float = 0.3, generator=None, callback=None):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024), as TCDScheduler: a
    DDIM (Euler) step from sigma down to sigma_s, the training sigma at s = floor((1 - eta) * t_next) (t_next = 0
    after the last step, so sampling ends at sigma(t=0)); then, if eta > 0 and not on the last step, fresh noise back
    up to sigma_next: x_next = x_s + sqrt(sigma_next**2 - sigma_s**2) * z. eta (the paper's gamma, TCDScheduler's
    default 0.3) = 0 is deterministic: DDIM to each next timestep."""
    if not 0 <= eta <= 1:
        raise ValueError(f"TCD's eta (gamma) must be in [0, 1], got {eta}")
    x, sigmas = _float32(x, sigmas)
    t_next = torch.cat([timesteps[1:len(sigmas) - 1], timesteps.new_zeros(1)])
    sigmas_s = torch.as_tensor(train_sigmas, dtype=torch.float32)[torch.floor((1 - eta) * t_next).long()]
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        x = denoised + sigmas_s[i] / sigma * (x - denoised)
        if eta > 0 and i < len(sigmas) - 2:
            x = x + _noise(x, generator) * (sigma_next**2 - sigmas_s[i] ** 2).sqrt()
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# ---------------------------------------------------------------------------------------------------------------
# k-diffusion's DPM-Solver++ ancestral and SDE samplers (A1111's "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE (Heun)",
# "DPM++ 3M SDE"), eta = 1 and s_noise = 1 as A1111 runs them, in k-diffusion's variables: t = lambda = -log(sigma)


def _sigma(t):
    return t.neg().exp()


def _brownian(x, sigmas, generator, noise_range):
    """Brownian-tree noise over noise_range (the whole run's (sigma_min, sigma_max), which an img2img plan knows),
    by default over these sigmas' range, as k-diffusion does."""
    lo, hi = noise_range if noise_range is not None else (sigmas[sigmas > 0].min(), sigmas.max())
    return a1111.BrownianNoise(x, lo, hi, generator)


def sample_dpmpp_2s_a(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2S) ancestral: a second-order single-step update down to sigma_down (its midpoint halfway in
    lambda), then fresh noise of sigma_up from `generator`; Euler and no noise on the step to 0."""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        if sigma_down == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            t, t_next = sigma.log().neg(), sigma_down.log().neg()
            h = t_next - t
            s = t + h * 0.5
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = denoiser(x_2, _sigma(s))
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigma_next > 0:
            x = x + _noise(x, generator) * sigma_up
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_dpmpp_sde(denoiser, x, sigmas, *, generator=None, callback=None, noise_range=None, r: float = 0.5):
    """DPM-Solver++ SDE (k-diffusion's `sample_dpmpp_sde`): two stochastic ancestral sub-steps per step, the first
    to lambda + r * h, the second with a combination of both D; Brownian-tree noise. Euler on the step to 0."""
    x, sigmas = _float32(x, sigmas)
    noise = _brownian(x, sigmas, generator, noise_range)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            t, t_next = sigma.log().neg(), sigma_next.log().neg()
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = ancestral_step(_sigma(t), _sigma(s))
            s_ = sd.log().neg()
            x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise(_sigma(t), _sigma(s)) * su
            denoised_2 = denoiser(x_2, _sigma(s))
            sd, su = ancestral_step(_sigma(t), _sigma(t_next))
            t_next_ = sd.log().neg()
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise(_sigma(t), _sigma(t_next)) * su
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def _k_dpmpp_2m_sde(denoiser, x, sigmas, generator, callback, noise_range, heun: bool):
    """DPM-Solver++(2M) SDE as k-diffusion's `sample_dpmpp_2m_sde` (eta 1): the second-order correction with the
    midpoint or Heun's weights, Brownian-tree noise, and the step to 0 returning D itself."""
    x, sigmas = _float32(x, sigmas)
    noise = _brownian(x, sigmas, generator, noise_range)
    old_denoised, h, h_last = None, None, None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x_next = denoised
        else:
            h_last, h = h, sigma.log() - sigma_next.log()
            phi = (-2 * h).expm1().neg()  # 1 - exp(-(1 + eta) h)
            x_next = sigma_next / sigma * (-h).exp() * x + phi * denoised
            if old_denoised is not None:
                weight = phi / (-2 * h) + 1 if heun else 0.5 * phi
                x_next = x_next + weight * (1 / (h_last / h)) * (denoised - old_denoised)
            x_next = x_next + noise(sigma, sigma_next) * sigma_next * (-2 * h).expm1().neg().sqrt()
        x, old_denoised = _report(callback, i, x_next, sigma, sigma_next, denoised), denoised
    return x


def sample_k_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, noise_range=None):
    """A1111's "DPM++ 2M SDE": k-diffusion's midpoint form, Brownian-tree noise."""
    return _k_dpmpp_2m_sde(denoiser, x, sigmas, generator, callback, noise_range, heun=False)


def sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, *, generator=None, callback=None, noise_range=None):
    """A1111's "DPM++ 2M SDE Heun": k-diffusion's solver_type="heun" weights, Brownian-tree noise."""
    return _k_dpmpp_2m_sde(denoiser, x, sigmas, generator, callback, noise_range, heun=True)


def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, generator=None, callback=None, noise_range=None):
    """DPM-Solver++(3M) SDE (k-diffusion's `sample_dpmpp_3m_sde`, eta 1): third-order multistep on the last three
    D (first and second order while they are fewer), Brownian-tree noise, the step to 0 returning D."""
    x, sigmas = _float32(x, sigmas)
    noise = _brownian(x, sigmas, generator, noise_range)
    denoised_1, denoised_2, h, h_1, h_2 = None, None, None, None, None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x_next = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h_eta = h * 2
            x_next = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x_next = x_next + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x_next = x_next + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            x_next = x_next + noise(sigma, sigma_next) * sigma_next * (-2 * h).expm1().neg().sqrt()
        x = _report(callback, i, x_next, sigma, sigma_next, denoised)
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


# ---------------------------------------------------------------------------------------------------------------
# the table of samplers, name lookup, and the plan (sigmas + timesteps) for a run


@dataclass(frozen=True)
class Sampler:
    """A sampler and what its plan needs. family "diffusers": reproduces one diffusers scheduler (as `from_config`
    of an SD 1.x config); family "a1111": reproduces AUTOMATIC1111 v1.10's k-diffusion sampler of that label."""

    name: str
    fn: Callable
    label: str  # display name: AUTOMATIC1111's for the a1111 family (and DDIM, PLMS, UniPC, which only we have)
    aliases: tuple[str, ...] = ()
    family: str = "diffusers"
    supports_karras: bool = False  # diffusers family: the class takes use_karras_sigmas (a1111: every schedule)
    stochastic: bool = False
    diffusers_class: str = ""  # the diffusers scheduler it reproduces (tests build it by this name)
    diffusers_kwargs: tuple[tuple[str, object], ...] = ()  # extra from_config arguments
    timesteps: str = "k"  # discretization style, see schedule.discretize: "k", "dpm" or "ddim"
    spacing: str = "linspace"  # the class' default timestep_spacing
    final: str = "zero"  # where sampling ends, see schedule.discretize
    karras_round: bool = False  # the class rounds the timesteps it computes for Karras sigmas
    vp_init: bool = False  # init_noise_sigma is 1: txt2img latents start as pure VP noise
    default_schedule: str | None = None  # a1111: what its "Automatic" schedule is (None: uniform)
    discard_penultimate: bool = False  # a1111: one step more, then the next-to-last sigma dropped
    brownian: bool = False  # a1111: Brownian-tree noise over the whole run's sigma range (`noise_range`)
    plan_args: tuple[str, ...] = ()  # SamplingPlan fields the function takes as keywords (LCM, TCD: `timesteps`)


_VP = dict(timesteps="dpm", vp_init=True, karras_round=True, supports_karras=True)
_DDIM = dict(timesteps="ddim", spacing="leading", vp_init=True)
_A1111 = dict(family="a1111", supports_karras=True)
_SDE = dict(_A1111, stochastic=True, brownian=True)

SAMPLERS: dict[str, Sampler] = {s.name: s for s in [
    # diffusers' schedulers; those A1111 also has are named and labelled in snake_case, so "Euler a" means A1111's
    Sampler("euler", sample_euler, "euler", supports_karras=True, diffusers_class="EulerDiscreteScheduler"),
    Sampler("euler_a", sample_euler_a, "euler_a", ("euler_ancestral",), stochastic=True,
            diffusers_class="EulerAncestralDiscreteScheduler"),
    Sampler("heun", sample_heun, "heun", supports_karras=True, diffusers_class="HeunDiscreteScheduler"),
    Sampler("lms", sample_lms, "lms", supports_karras=True, diffusers_class="LMSDiscreteScheduler"),
    Sampler("dpm2", sample_dpm2, "dpm2", ("dpm_2",), supports_karras=True, karras_round=True,
            diffusers_class="KDPM2DiscreteScheduler"),
    Sampler("dpm2_a", sample_dpm2_a, "dpm2_a", ("dpm_2_ancestral",), supports_karras=True,
            stochastic=True, karras_round=True, diffusers_class="KDPM2AncestralDiscreteScheduler"),
    Sampler("dpmpp_2m", sample_dpmpp_2m, "dpmpp_2m", diffusers_class="DPMSolverMultistepScheduler", **_VP),
    Sampler("dpmpp_2m_sde", sample_dpmpp_2m_sde, "dpmpp_2m_sde", stochastic=True,
            diffusers_class="DPMSolverMultistepScheduler",
            diffusers_kwargs=(("algorithm_type", "sde-dpmsolver++"),), **_VP),
    # A1111's DDIM, PLMS and UniPC are its own (not k-diffusion) samplers; these labels give diffusers' instead
    Sampler("ddim", sample_ddim, "DDIM", final="final_alpha", diffusers_class="DDIMScheduler", **_DDIM),
    Sampler("pndm", sample_pndm, "PLMS", ("plms",), final="final_alpha", diffusers_class="PNDMScheduler", **_DDIM),
    Sampler("unipc", sample_unipc, "UniPC", diffusers_class="UniPCMultistepScheduler", **_VP),
    Sampler("ddpm", sample_ddpm, "DDPM", stochastic=True, diffusers_class="DDPMScheduler", **_DDIM),
    Sampler("deis", sample_deis, "DEIS", final="sigma_min", diffusers_class="DEISMultistepScheduler", **_VP),
    Sampler("lcm", sample_lcm, "LCM", stochastic=True, diffusers_class="LCMScheduler", timesteps="lcm", vp_init=True,
            plan_args=("timesteps",)),
    Sampler("tcd", sample_tcd, "TCD", stochastic=True, diffusers_class="TCDScheduler", timesteps="lcm",
            final="sigma_min", vp_init=True, plan_args=("timesteps", "train_sigmas")),
    # AUTOMATIC1111 v1.10's k-diffusion samplers, named by their labels (its samplers_k_diffusion table)
    Sampler("Euler a", sample_euler_a, "Euler a", ("k_euler_a", "k_euler_ancestral"), stochastic=True, **_A1111),
    Sampler("Euler", sample_euler, "Euler", ("k_euler",), **_A1111),
    Sampler("LMS", sample_lms, "LMS", ("k_lms",), **_A1111),
    Sampler("Heun", sample_heun, "Heun", ("k_heun",), **_A1111),
    Sampler("DPM2", sample_k_dpm2, "DPM2", ("k_dpm_2",), default_schedule="karras", discard_penultimate=True,
            **_A1111),
    Sampler("DPM2 a", sample_k_dpm2_a, "DPM2 a", ("k_dpm_2_a",), stochastic=True, default_schedule="karras",
            discard_penultimate=True, **_A1111),
    Sampler("DPM++ 2S a", sample_dpmpp_2s_a, "DPM++ 2S a", ("k_dpmpp_2s_a",), stochastic=True,
            default_schedule="karras", **_A1111),
    Sampler("DPM++ 2M", sample_dpmpp_2m, "DPM++ 2M", ("k_dpmpp_2m",), default_schedule="karras", **_A1111),
    Sampler("DPM++ SDE", sample_dpmpp_sde, "DPM++ SDE", ("k_dpmpp_sde",), default_schedule="karras", **_SDE),
    Sampler("DPM++ 2M SDE", sample_k_dpmpp_2m_sde, "DPM++ 2M SDE", ("k_dpmpp_2m_sde",),
            default_schedule="exponential", **_SDE),
    Sampler("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde_heun, "DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",),
            default_schedule="exponential", **_SDE),
    Sampler("DPM++ 3M SDE", sample_dpmpp_3m_sde, "DPM++ 3M SDE", ("k_dpmpp_3m_sde",), default_schedule="exponential",
            discard_penultimate=True, **_SDE),
]}
A1111_MISSING = ("DPM fast", "DPM adaptive", "Restart", "LCM")  # A1111 labels not implemented here


def sampler_table() -> list[dict]:
    """Both families for `stablediff samplers` and /sdapi/v1/samplers: name, label, family, aliases, the schedules
    it takes and what "automatic" means for it."""
    rows = []
    for s in SAMPLERS.values():
        if s.family == "a1111":
            schedules, automatic = list(a1111.SCHEDULES), s.default_schedule or "uniform"
        else:
            schedules, automatic = ["automatic", "karras"] if s.supports_karras else ["automatic"], s.diffusers_class
        rows.append(dict(name=s.name, label=s.label, family=s.family, aliases=list(s.aliases), schedules=schedules,
                         automatic=automatic))
    return rows


def _lookup(key: str) -> Sampler | None:
    """Exact name, label or alias first; then case-insensitively, where that picks one sampler ("euler a" is A1111's
    "Euler a", but "EULER" could be "Euler" or "euler")."""
    names = {s: (s.name, s.label, *s.aliases) for s in SAMPLERS.values()}
    exact = [s for s, n in names.items() if key in n]
    if exact:
        return exact[0]
    folded = [s for s, n in names.items() if key.lower() in {x.lower() for x in n}]
    if len(folded) > 1:
        raise ValueError(f"sampler {key!r} is ambiguous: {' or '.join(repr(s.name) for s in folded)} "
                         f"(A1111's labels and diffusers' snake_case names differ only in case there)")
    return folded[0] if folded else None


def get_sampler(name: str) -> tuple[Sampler, str | None]:
    """Look a sampler up by name, alias or label (see `_lookup`); a trailing schedule label, as in A1111's legacy
    names, asks for that schedule: "DPM++ 2M Karras" -> (SAMPLERS["DPM++ 2M"], "karras"),
    "dpmpp_2m karras" -> (SAMPLERS["dpmpp_2m"], "karras")."""
    key = " ".join(str(name).split())
    s, schedule = _lookup(key), None
    if s is None:
        base, schedule = a1111.schedule_suffix(key)
        s = _lookup(base) if schedule else None
    if s is None:
        missing = [m for m in A1111_MISSING if m.lower() == key.lower()]
        if missing:
            raise ValueError(f"sampler {name!r}: A1111's {missing[0]!r} is not implemented here")
        valid = [n for s in SAMPLERS.values() for n in (s.name, s.label)]
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(dict.fromkeys(valid))} "
                         f"(add a schedule such as ' Karras')")
    _check_schedule(s, schedule)
    return s, schedule


def _check_schedule(s: Sampler, schedule: str | None) -> None:
    if s.family == "a1111" or schedule is None:
        return
    if schedule != "karras":
        raise ValueError(f"sampler {s.name!r} reproduces diffusers' {s.diffusers_class}, which has no {schedule!r} "
                         f"schedule; A1111's samplers ({', '.join(n for n, x in SAMPLERS.items() if x.family == 'a1111')}) "
                         "take every schedule")
    if not s.supports_karras:
        raise ValueError(f"sampler {s.name!r} does not take the karras schedule (diffusers' {s.diffusers_class} has no "
                         f"use_karras_sigmas); samplers that do: "
                         f"{', '.join(n for n, x in SAMPLERS.items() if x.supports_karras)}")


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Everything a run needs besides the model: which sampler, its sigmas and the timesteps fed at each."""

    sampler: Sampler
    schedule: str | None  # a schedule name (a1111.SCHEDULES), None for the sampler's own ("automatic")
    sigmas: torch.Tensor  # float32 CPU (steps + 1,): the sigma of each step, then where sampling ends
    timesteps: torch.Tensor  # float32 CPU (steps,): the timestep the U-Net is fed at each step's sigma
    sigma_to_t: Callable  # sigma -> timestep (diffusers: exact at `sigmas`; a1111: k-diffusion's, continuous)
    init_noise_scale: float  # txt2img: x = unit noise * init_noise_scale
    noise_range: tuple[torch.Tensor, torch.Tensor] | None = None  # a1111 Brownian noise: the whole run's sigmas
    train_sigmas: torch.Tensor | None = None  # diffusers family: the schedule's training sigmas (TCD's sigma_s)

    def sample(self, denoiser, x: torch.Tensor, *, generator=None, callback=None, **options) -> torch.Tensor:
        """Run the sampler over the plan's sigmas (with the Brownian-tree range an img2img run needs, and the plan
        fields a sampler's `plan_args` name); options: the sampler function's own keywords (TCD's eta)."""
        extra = {"noise_range": self.noise_range} if self.sampler.brownian else {}
        extra.update({name: getattr(self, name) for name in self.sampler.plan_args})
        return self.sampler.fn(denoiser, x, self.sigmas, generator=generator, callback=callback, **extra, **options)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the latent diffusers returns: x / sqrt(1 + sigma_last**2) (identity when it is 0). A1111 decodes
        x as it is, whatever the last sigma."""
        if self.sampler.family == "a1111":
            return x
        return x / math.sqrt(1.0 + float(self.sigmas[-1]) ** 2)


def prepare(name: str, noise_schedule: NoiseSchedule, steps: int, *, schedule: str | None = None,
            strength: float = 1.0) -> SamplingPlan:
    """The plan for `steps` steps of sampler `name` (any name `get_sampler` takes) on `noise_schedule`.
    schedule: any name or label in a1111.SCHEDULES (None or "automatic": the sampler's own); the diffusers family
    takes only "karras", where its class has use_karras_sigmas.

    strength < 1 (img2img) keeps the last steps. diffusers' img2img `get_timesteps`:
    init_timestep = min(int(steps * strength), steps), starting at step steps - init_timestep. A1111's
    `setup_img2img_steps`: t_enc = int(min(strength, 0.999) * steps), starting at step steps - t_enc - 1.
    LCM and TCD instead pick all `steps` from the low-noise part of their schedule (`set_timesteps(strength=...)`, as
    diffusers' LatentConsistencyModelImg2ImgPipeline calls it; schedule.consistency_timesteps).
    img2img then starts from x = init_latents + sigmas[0] * noise (diffusers' `add_noise` in sigma space, and A1111's).
    """
    sampler, named = get_sampler(name)
    schedule = a1111.schedule_name(schedule) if schedule is not None else named
    _check_schedule(sampler, schedule)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if sampler.family == "a1111":
        return _prepare_a1111(sampler, noise_schedule, steps, schedule, strength)
    if noise_schedule.clip_sample and sampler.name in ("ddim", "ddpm", "heun"):
        raise NotImplementedError(f"clip_sample=True ({sampler.diffusers_class} would clamp its x0 predictions) "
                                  "is not implemented; set clip_sample false in the scheduler config")
    sigmas, timesteps = discretize(noise_schedule, steps, style=sampler.timesteps, spacing=sampler.spacing,
                                   final=sampler.final, karras=schedule == "karras",
                                   karras_round=sampler.karras_round, strength=strength)
    sigma_max = float(sigmas.max())
    leading = (noise_schedule.timestep_spacing or sampler.spacing) == "leading"
    init_noise_scale = math.sqrt(sigma_max**2 + 1) if sampler.vp_init or leading else sigma_max
    init_timestep = steps if sampler.timesteps == "lcm" else min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    if t_start >= steps:
        raise ValueError(f"strength {strength} leaves no step of {steps} to run; raise strength or steps")
    if sampler.name == "pndm" and t_start >= 2:
        t_start -= 1  # PLMS lists its second timestep twice, so diffusers' timesteps[t_start:] starts one step earlier
    sigmas, timesteps = torch.from_numpy(sigmas[t_start:].copy()), torch.from_numpy(timesteps[t_start:].copy())
    sigma_to_t = TimestepMap(sigmas[:-1], timesteps, noise_schedule.log_sigmas)
    return SamplingPlan(sampler, schedule, sigmas, timesteps, sigma_to_t, init_noise_scale,
                        train_sigmas=noise_schedule.sigmas)


def _prepare_a1111(sampler: Sampler, ns: NoiseSchedule, steps: int, schedule: str | None,
                   strength: float) -> SamplingPlan:
    model = a1111.ModelSigmas.from_schedule(ns)
    full = a1111.sigmas(model, steps, schedule or sampler.default_schedule or "uniform",
                        discard_penultimate=sampler.discard_penultimate)
    t_start = 0 if strength >= 1 else steps - int(min(strength, 0.999) * steps) - 1
    sigmas = full[t_start:]
    if len(sigmas) < 2:
        raise ValueError(f"strength {strength} leaves no step of {len(full) - 1} to run; raise strength or steps")
    noise_range = (full[full > 0].min(), full.max())
    return SamplingPlan(sampler, schedule, sigmas, model.sigma_to_t(sigmas[:-1]), model, float(sigmas[0]),
                        noise_range)
