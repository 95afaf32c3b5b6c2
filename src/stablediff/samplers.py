"""Samplers: plain functions over a denoiser D(x, sigma) in sigma space, as in k-diffusion's `sampling.py`.

    x = sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None)

`sigmas` descend to where sampling ends (0, or sigma(t=0) for DDIM/PNDM/DEIS/TCD); `x` starts at noise level
sigmas[0]. History (previous derivatives, denoised estimates) lives in local variables. LCM and TCD also take the
plan's integer `timesteps` (their updates depend on t itself, not only on sigma) and TCD the training sigmas: the
Sampler's `plan_args`, which `SamplingPlan.sample` hands them.

Two families share the table `SAMPLERS`, named so that a name says which one it is:
  * "diffusers" (snake_case names: euler, euler_a, dpmpp_2m, ddim, pndm, unipc, ...; and DDPM, DEIS): each
    reproduces one diffusers scheduler as StableDiffusionPipeline drives it;
  * "a1111" (AUTOMATIC1111's labels: "Euler a", "DPM++ 2M", "DDIM", "PLMS", "Restart", ...): each reproduces A1111
    v1.10, i.e. k-diffusion's sample_* update rule (or A1111's own, ksampling.py) with A1111's schedules and rules
    (a1111.py); its timestep samplers ("DDIM", "DDIM CFG++", "PLMS", "UniPC") get A1111's timesteps (see
    `_prepare_timesteps`).
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

from . import a1111
from .ksampling import PLMS_WEIGHTS as _PLMS_WEIGHTS
from .ksampling import ancestral_step, as_float32 as _float32, draw_noise as _noise, report as _report
from .ksampling import sample_dpm_adaptive, sample_dpm_fast, sample_dpmpp_2m_sde_heun, sample_dpmpp_2s_a
from .ksampling import sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_k_dpmpp_2m_sde, sample_plms
from .ksampling import sample_lcm as sample_k_lcm
from .ksampling import sample_restart, step_pairs as _steps
from .schedule import NoiseSchedule, TimestepMap, discretize


# ---------------------------------------------------------------------------------------------------------------
# first- and second-order ODE / SDE steppers (Karras et al. 2022; Euler a, DPM2 from k-diffusion)


# k-diffusion's defaults for its churn parameters: no churn (s_tmax inf: every sigma in range)
CHURN_OFF = dict(s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)


def churn(x, sigmas, i: int, generator, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float):
    """Karras et al. (2022, Alg. 2)'s churn before step i, as k-diffusion's sample_euler / sample_heun / sample_dpm_2
    take it (A1111's "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise"): where s_tmin <= sigma <= s_tmax, the
    step starts from sigma_hat = sigma * (1 + gamma), gamma = min(s_churn / steps, sqrt(2) - 1), x raised to it by
    fresh noise * s_noise. Returns (x, sigma_hat). k-diffusion draws that noise on every step, outside the range
    too, so with churn on one noise is drawn per step here as well (A1111's noise stream); with s_churn 0 none is."""
    sigma = sigmas[i]
    if not s_churn:
        return x, sigma
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    eps = _noise(x, generator) * s_noise
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EulerDiscreteScheduler);
    with `churn` where s_churn > 0 (k-diffusion's sample_euler)."""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        x, sigma_hat = churn(x, sigmas, i, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        x = x + d * (sigma_next - sigma_hat)
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 0.0):
    """DDIM (DDIMScheduler with the pipeline's `eta`). With eta 0 it is exactly Euler in sigma space, x_next = D +
    sigma_next * (x - D) / sigma; with eta > 0 its variance sigma_t**2 = eta**2 (1 - a_prev) / (1 - a) (1 - a /
    a_prev) is, divided by a_prev, the ancestral split's sigma_up**2 at that eta, so it is Euler ancestral with
    noise drawn at every step (the last too: DDIM ends above sigma 0). A1111's DDIM (sd_samplers_timesteps_impl)
    is the same update on its own timesteps."""
    if eta == 0:
        return sample_euler(denoiser, x, sigmas, generator=generator, callback=callback)
    return sample_euler_a(denoiser, x, sigmas, generator=generator, callback=callback, eta=eta)


CFGPP_SCALE_FACTOR = 1 / 12.5  # A1111's DDIM CFG++ guides with cfg_scale / 12.5: CFG 0..12.5 is CFG++'s 0..1


def sample_ddim_cfgpp(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 0.0):
    """DDIM with CFG++ (Chung et al. 2024, manifold-constrained classifier-free guidance), as A1111's "DDIM CFG++":
    the x0 estimate is the guided D, but the step back out follows the unconditional eps, x_next = D + sigma_down *
    (x - D_uncond) / sigma (+ noise of sigma_up at eta > 0, drawn at every step as sample_ddim's), and
    the guidance scale is A1111's times CFGPP_SCALE_FACTOR. The denoiser must give D_uncond apart:
    `with_uncond(x, sigma, scale_factor)`, as denoiser.ScheduledCFGDenoiser does."""
    with_uncond = getattr(denoiser, "with_uncond", None)
    if with_uncond is None:
        raise TypeError(f"DDIM CFG++ needs a guidance denoiser with `with_uncond` (denoiser.ScheduledCFGDenoiser), "
                        f"got {type(denoiser).__name__}")
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised, uncond = with_uncond(x, sigma, scale_factor=CFGPP_SCALE_FACTOR)
        if eta:
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            x = denoised + sigma_down * (x - uncond) / sigma + _noise(x, generator) * sigma_up
        else:
            x = denoised + sigma_next * (x - uncond) / sigma
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_euler_a(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 1.0):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of sigma_up (ancestral_step's eta).
    Noise is drawn on every step, the last included (where sigma_up is 0), as EulerAncestralDiscreteScheduler
    draws it."""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        x = x + _noise(x, generator) * sigma_up
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


# DDPM (Ho et al. 2020, "fixed_small" variance) is exactly Euler ancestral in sigma space: its posterior mean is
# D + (sigma_next / sigma)**2 * (x - D) and its standard deviation sigma_next * sqrt(sigma**2 - sigma_next**2) / sigma,
# which are sigma_down and sigma_up above; it draws noise after every model call too. (DDPMScheduler)
sample_ddpm = sample_euler_a


def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0):
    """Heun's method (Karras et al. 2022, Alg. 1); the step to sigma = 0 is a plain Euler step
    (HeunDiscreteScheduler); with `churn` where s_churn > 0 (k-diffusion's sample_heun)."""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        x, sigma_hat = churn(x, sigmas, i, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoiser(x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) / 2 * dt
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def _dpm2(denoiser, x, sigmas, generator, callback, ancestral: bool, diffusers: bool = True, eta: float = 1.0,
          s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
    """DPM-Solver-2 (Lu et al. 2022) in k-diffusion's form: the midpoint in log-sigma, then a full step with the
    derivative there; the step to sigma 0 is Euler. k-diffusion lerps log(sigma) -> log(sigma_down); diffusers'
    KDPM2 lerps log(sigma_next) -> log(sigma) (KDPM2Ancestral as k-diffusion): `diffusers` keeps its orders so the
    midpoints are bit-identical with it. Noise is not drawn on the last step. s_noise: the ancestral noise's scale;
    without ancestral noise, the churn's (`churn`, with s_churn, s_tmin, s_tmax) as k-diffusion's sample_dpm_2."""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        x, sigma_hat = (x, sigma) if ancestral else churn(x, sigmas, i, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta) if ancestral else (sigma_next, 0.0)
        d = (x - denoised) / sigma_hat
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma_hat)
        else:
            if diffusers and not ancestral:
                sigma_mid = sigma_next.log().lerp(sigma.log(), 0.5).exp()
            else:
                sigma_mid = sigma_hat.log().lerp(sigma_down.log(), 0.5).exp()
            if diffusers and ancestral and sigma_mid == sigma_next:
                # sqrt(sigma * sigma_down) is sigma_next in exact arithmetic and often bit for bit; diffusers feeds
                # the U-Net the log-interpolated timestep there, not the next step's own (with Karras, rounded) one,
                # so a midpoint on a plan sigma is moved one float32 ulp to keep sigma_to_t from mapping it as one
                sigma_mid = torch.nextafter(sigma_mid, sigma)
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = (x_2 - denoiser(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigma_down - sigma_hat)
            if ancestral:
                x = x + _noise(x, generator) * s_noise * sigma_up
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_dpm2(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM2 (KDPM2DiscreteScheduler): two model calls per step, at sigma and at sqrt(sigma * sigma_next)."""
    return _dpm2(denoiser, x, sigmas, generator, callback, ancestral=False)


def sample_dpm2_a(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM2 ancestral (KDPM2AncestralDiscreteScheduler): DPM2 down to sigma_down, then noise of sigma_up (none drawn
    on the last step)."""
    return _dpm2(denoiser, x, sigmas, generator, callback, ancestral=True)


def sample_k_dpm2(denoiser, x, sigmas, *, generator=None, callback=None, s_churn: float = 0.0, s_tmin: float = 0.0,
                  s_tmax: float = math.inf, s_noise: float = 1.0):
    """DPM2 as k-diffusion's `sample_dpm_2` (A1111's "DPM2"): the midpoint lerped from log(sigma_hat)."""
    return _dpm2(denoiser, x, sigmas, generator, callback, ancestral=False, diffusers=False, s_churn=s_churn,
                 s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


def sample_k_dpm2_a(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 1.0, s_noise: float = 1.0):
    """DPM2 ancestral as k-diffusion's `sample_dpm_2_ancestral` (A1111's "DPM2 a")."""
    return _dpm2(denoiser, x, sigmas, generator, callback, ancestral=True, diffusers=False, eta=eta, s_noise=s_noise)


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


def _unipc_update(x, sigma_t, history, order: int, denoised_t=None, bh1: bool = False):
    """One UniPC update with B(h) = expm1(-h) ("bh2"; bh1: B(h) = -h) in data-prediction form (Zhao et al. 2023,
    Alg. 2/3).

    history: [(sigma_s0, D_s0), (sigma_s1, D_s1), ...], newest first; x is the sample at sigma_s0.
    Without denoised_t this is the predictor UniP to sigma_t; with it, the corrector UniC using D at sigma_t.
    """
    corrector = denoised_t is not None
    (sigma_s0, m0), older = history[0], history[1:order]
    h = sigma_s0.log() - sigma_t.log()
    hh = -h
    b_h = hh if bh1 else torch.expm1(hh)
    x_t = sigma_t / sigma_s0 * x - torch.expm1(hh) * m0  # h * phi_1(h), which is B(h) for bh2
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


def sample_unipc(denoiser, x, sigmas, *, generator=None, callback=None, order: int = 2, bh1: bool = False):
    """UniPC (UniPCMultistepScheduler defaults: order 2, bh2, predict_x0): each new D first corrects the last step
    (UniC, with the order that step used), then a UniP predictor step; the order warms up from 1 and drops to 1 for
    the last step (lower_order_final). The corrector uses D from the uncorrected sample, as diffusers does."""
    x, sigmas = _float32(x, sigmas)
    steps = len(sigmas) - 1
    history, x_last, last_order = [], None, 1
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        if x_last is not None:
            x = _unipc_update(x_last, sigma, history, last_order, denoised_t=denoised, bh1=bh1)
        history = [(sigma, denoised), *history][:order]
        last_order = min(order, steps - i, i + 1)
        x_last = x
        x = _unipc_update(x, sigma_next, history, last_order, bh1=bh1)
        x = _report(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_a1111_unipc(denoiser, x, sigmas, *, generator=None, callback=None):
    """A1111's UniPC with its default settings (variant bh1, order 3, lower order final, multistep, predict x0):
    the same predictor-corrector steps as diffusers' over the plan's sigmas (A1111's continuous times)."""
    return sample_unipc(denoiser, x, sigmas, generator=generator, callback=callback, order=3, bh1=True)


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
# the table of samplers, name lookup, and the plan (sigmas + timesteps) for a run


@dataclass(frozen=True)
class Sampler:
    """A sampler and what its plan needs. family "diffusers": reproduces one diffusers scheduler (as `from_config`
    of an SD 1.x config); family "a1111": reproduces AUTOMATIC1111 v1.10's k-diffusion sampler of that label."""

    name: str
    fn: Callable
    label: str  # display name: AUTOMATIC1111's for the a1111 family (and DDPM, DEIS, which A1111 lacks)
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
    # denoiser calls a step (second-order: 2; A1111's "second_order" samplers, Restart among them): prompt-editing
    # schedules count calls over steps * this, as does A1111's skip_early_cond
    calls_per_step: int = 1
    timestep_space: bool = False  # a1111: A1111's timestep sampler (DDIM, DDIM CFG++, PLMS, UniPC): its own times,
    # whatever the schedule (A1111 ignores the schedule type for them), VP start and end, its img2img start
    sigma_range: bool = False  # a1111: runs over (sigma_min, sigma_max) as A1111 passes them (DPM fast, adaptive)
    lcm: bool = False  # a1111: LCM's 50-timestep denoiser (a1111.LCMSigmas), whose sigma_to_t the sampler needs
    needs_uncond: bool = False  # steps with the unconditional prediction too: the denoiser's `with_uncond` (CFG++)
    # the function's `eta` where it takes one (params.eta replaces it): A1111's options eta_ancestral 1 for its
    # k-diffusion samplers, eta_ddim 0 for DDIM; diffusers' DDIM 0 and TCD 0.3 (their pipelines' eta argument)
    eta: float | None = None
    # a1111: which of k-diffusion's s_churn, s_tmin, s_tmax, s_noise A1111 passes it (its sampler_extra_params);
    # others take none and leave them unused, as A1111 does
    sigma_params: tuple[str, ...] = ()

    @property
    def eta_key(self) -> str:
        """The infotext key of a non-default eta, as A1111 writes it: "Eta DDIM" (default 0), else "Eta"."""
        return "Eta DDIM" if self.eta == 0 else "Eta"

    def eta_options(self, eta: float | None) -> dict:
        """The function's keywords for a run's eta (None: the sampler's own); {} where it takes none."""
        if self.eta is None or eta is None:
            return {}
        return {"eta": eta}

    def sigma_options(self, values: dict) -> dict:
        """The function's keywords for a run's s_churn, s_tmin, s_tmax, s_noise (`values`, A1111's convention: s_tmax
        0 is no bound): those it takes (`sigma_params`) that are not k-diffusion's defaults (CHURN_OFF)."""
        values = {**values, "s_tmax": values.get("s_tmax") or math.inf}
        return {k: values[k] for k in self.sigma_params if k in values and values[k] != CHURN_OFF[k]}


_VP = dict(timesteps="dpm", vp_init=True, karras_round=True, supports_karras=True)
_DDIM = dict(timesteps="ddim", spacing="leading", vp_init=True)
_A1111 = dict(family="a1111", supports_karras=True)
_CHURN = dict(sigma_params=("s_churn", "s_tmin", "s_tmax", "s_noise"))
_SDE = dict(_A1111, stochastic=True, brownian=True, eta=1.0, sigma_params=("s_noise",))

SAMPLERS: dict[str, Sampler] = {s.name: s for s in [
    # diffusers' schedulers; those A1111 also has are named and labelled in snake_case, so "Euler a" means A1111's
    Sampler("euler", sample_euler, "euler", supports_karras=True, diffusers_class="EulerDiscreteScheduler"),
    Sampler("euler_a", sample_euler_a, "euler_a", ("euler_ancestral",), stochastic=True,
            diffusers_class="EulerAncestralDiscreteScheduler"),
    Sampler("heun", sample_heun, "heun", supports_karras=True, diffusers_class="HeunDiscreteScheduler",
            calls_per_step=2),
    Sampler("lms", sample_lms, "lms", supports_karras=True, diffusers_class="LMSDiscreteScheduler"),
    Sampler("dpm2", sample_dpm2, "dpm2", ("dpm_2",), supports_karras=True, karras_round=True,
            diffusers_class="KDPM2DiscreteScheduler", calls_per_step=2),
    Sampler("dpm2_a", sample_dpm2_a, "dpm2_a", ("dpm_2_ancestral",), supports_karras=True,
            stochastic=True, karras_round=True, diffusers_class="KDPM2AncestralDiscreteScheduler",
            calls_per_step=2),
    Sampler("dpmpp_2m", sample_dpmpp_2m, "dpmpp_2m", diffusers_class="DPMSolverMultistepScheduler", **_VP),
    Sampler("dpmpp_2m_sde", sample_dpmpp_2m_sde, "dpmpp_2m_sde", stochastic=True,
            diffusers_class="DPMSolverMultistepScheduler",
            diffusers_kwargs=(("algorithm_type", "sde-dpmsolver++"),), **_VP),
    # the labels "DDIM", "PLMS" and "UniPC" are A1111's own samplers (below)
    Sampler("ddim", sample_ddim, "ddim", final="final_alpha", diffusers_class="DDIMScheduler", eta=0.0, **_DDIM),
    Sampler("pndm", sample_pndm, "pndm", ("plms",), final="final_alpha", diffusers_class="PNDMScheduler", **_DDIM),
    Sampler("unipc", sample_unipc, "unipc", diffusers_class="UniPCMultistepScheduler", **_VP),
    Sampler("ddpm", sample_ddpm, "DDPM", stochastic=True, diffusers_class="DDPMScheduler", **_DDIM),
    Sampler("deis", sample_deis, "DEIS", final="sigma_min", diffusers_class="DEISMultistepScheduler", **_VP),
    Sampler("lcm", sample_lcm, "lcm", stochastic=True, diffusers_class="LCMScheduler", timesteps="lcm", vp_init=True,
            plan_args=("timesteps",)),
    Sampler("tcd", sample_tcd, "tcd", stochastic=True, diffusers_class="TCDScheduler", timesteps="lcm",
            final="sigma_min", vp_init=True, plan_args=("timesteps", "train_sigmas"), eta=0.3),
    # AUTOMATIC1111 v1.10's k-diffusion samplers, named by their labels (its samplers_k_diffusion table)
    Sampler("Euler a", sample_euler_a, "Euler a", ("k_euler_a", "k_euler_ancestral"), stochastic=True, eta=1.0,
            **_A1111),
    Sampler("Euler", sample_euler, "Euler", ("k_euler",), **_A1111, **_CHURN),
    Sampler("LMS", sample_lms, "LMS", ("k_lms",), **_A1111),
    Sampler("Heun", sample_heun, "Heun", ("k_heun",), **_A1111, **_CHURN, calls_per_step=2),
    Sampler("DPM2", sample_k_dpm2, "DPM2", ("k_dpm_2",), default_schedule="karras", discard_penultimate=True,
            **_A1111, **_CHURN, calls_per_step=2),
    Sampler("DPM2 a", sample_k_dpm2_a, "DPM2 a", ("k_dpm_2_a",), stochastic=True, default_schedule="karras",
            discard_penultimate=True, eta=1.0, sigma_params=("s_noise",), **_A1111, calls_per_step=2),
    Sampler("DPM++ 2S a", sample_dpmpp_2s_a, "DPM++ 2S a", ("k_dpmpp_2s_a",), stochastic=True,
            default_schedule="karras", eta=1.0, sigma_params=("s_noise",), **_A1111, calls_per_step=2),
    Sampler("DPM++ 2M", sample_dpmpp_2m, "DPM++ 2M", ("k_dpmpp_2m",), default_schedule="karras", **_A1111),
    Sampler("DPM++ SDE", sample_dpmpp_sde, "DPM++ SDE", ("k_dpmpp_sde",), default_schedule="karras", **_SDE,
            calls_per_step=2),
    Sampler("DPM++ 2M SDE", sample_k_dpmpp_2m_sde, "DPM++ 2M SDE", ("k_dpmpp_2m_sde",),
            default_schedule="exponential", **_SDE),
    Sampler("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde_heun, "DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",),
            default_schedule="exponential", **_SDE),
    Sampler("DPM++ 3M SDE", sample_dpmpp_3m_sde, "DPM++ 3M SDE", ("k_dpmpp_3m_sde",), default_schedule="exponential",
            discard_penultimate=True, **_SDE),
    Sampler("DPM fast", sample_dpm_fast, "DPM fast", ("k_dpm_fast",), stochastic=True, sigma_range=True, eta=1.0,
            sigma_params=("s_noise",), **_A1111),
    Sampler("DPM adaptive", sample_dpm_adaptive, "DPM adaptive", ("k_dpm_ad",), stochastic=True, sigma_range=True,
            eta=1.0, **_A1111),
    Sampler("Restart", sample_restart, "Restart", ("restart",), stochastic=True, default_schedule="karras", **_A1111,
            calls_per_step=2),
    # A1111's own samplers outside k-diffusion: sd_samplers_lcm and sd_samplers_timesteps (its DDIM is diffusers')
    Sampler("LCM", sample_k_lcm, "LCM", ("k_lcm",), stochastic=True, lcm=True, **_A1111),
    Sampler("DDIM", sample_ddim, "DDIM", timestep_space=True, eta=0.0, **_A1111),
    Sampler("DDIM CFG++", sample_ddim_cfgpp, "DDIM CFG++", ("ddim_cfgpp",), timestep_space=True, needs_uncond=True,
            eta=0.0, **_A1111),
    Sampler("PLMS", sample_plms, "PLMS", timestep_space=True, **_A1111),
    Sampler("UniPC", sample_a1111_unipc, "UniPC", timestep_space=True, **_A1111),
]}


def sampler_table() -> list[dict]:
    """Both families for `stablediff samplers` and /sdapi/v1/samplers: name, label, family, aliases, the schedules
    it takes and what "automatic" means for it."""
    rows = []
    for s in SAMPLERS.values():
        if s.timestep_space:
            schedules, automatic = ["automatic"], "A1111 timesteps (schedules ignored)"
        elif s.family == "a1111":
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
    sigma_range: tuple[torch.Tensor, torch.Tensor] | None = None  # a1111 DPM fast/adaptive: (sigma_min, sigma_max)
    train_sigmas: torch.Tensor | None = None  # diffusers family: the schedule's training sigmas (TCD's sigma_s)
    img2img_sigma: float | None = None  # a1111 timestep samplers' img2img: the noise level of the init latents

    def sample(self, denoiser, x: torch.Tensor, *, generator=None, callback=None, **options) -> torch.Tensor:
        """Run the sampler over the plan's sigmas, with what some samplers need besides: the Brownian-tree range an
        img2img run needs, DPM fast/adaptive's sigma range, A1111's LCM's timestep map, and the plan fields a
        sampler's `plan_args` name (diffusers' LCM, TCD); options: the sampler function's own keywords (TCD's eta)."""
        s, extra = self.sampler, {name: getattr(self, name) for name in self.sampler.plan_args}
        if s.brownian:
            extra["noise_range"] = self.noise_range
        if s.sigma_range:
            extra["sigma_range"] = self.sigma_range
        if s.lcm:
            extra["sigma_to_t"] = self.sigma_to_t
        return s.fn(denoiser, x, self.sigmas, generator=generator, callback=callback, **extra, **options)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, extra: float = 0.0) -> torch.Tensor:
        """img2img's start x from the init latents x0 and unit noise: x0 + sigmas[0] * noise (diffusers' `add_noise`
        and A1111's k-diffusion samplers, in sigma space). A1111's timestep samplers noise x0 to `img2img_sigma`, one
        timestep above their first, and then read that VP latent as if it were at sigmas[0]. extra: A1111's extra
        noise for img2img and hires fix (its img2img_extra_noise), noise * extra more, added as A1111 adds it (for its
        timestep samplers to the VP latent, times sqrt(alphas_cumprod))."""
        if self.img2img_sigma is None:
            x = x0 + noise * float(self.sigmas[0])
            return x + noise * extra if extra else x
        s, s0 = self.img2img_sigma, float(self.sigmas[0])
        if not extra:
            return (x0 + noise * s) * math.sqrt((1 + s0**2) / (1 + s**2))
        scale = 1 / math.sqrt(1 + s**2)  # sqrt(alphas_cumprod) at img2img_sigma: the VP latent, then extra noise
        return ((x0 + noise * s) * scale + noise * extra * scale) * math.sqrt(1 + s0**2)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the latent diffusers returns: x / sqrt(1 + sigma_last**2) (identity when it is 0), and the VP
        latent A1111's timestep samplers return. A1111's k-diffusion samplers decode x as it is, whatever the last
        sigma."""
        if self.sampler.family == "a1111" and not self.sampler.timestep_space:
            return x
        return x / math.sqrt(1.0 + float(self.sigmas[-1]) ** 2)


def prepare(name: str, noise_schedule: NoiseSchedule, steps: int, *, schedule: str | None = None,
            strength: float | None = None) -> SamplingPlan:
    """The plan for `steps` steps of sampler `name` (any name `get_sampler` takes) on `noise_schedule`.
    schedule: any name or label in a1111.SCHEDULES (None or "automatic": the sampler's own); the diffusers family
    takes only "karras", where its class has use_karras_sigmas.

    strength: None for txt2img; img2img's in (0, 1]. Only A1111's timestep samplers run img2img at strength 1
    differently from txt2img (see `_prepare_timesteps`); for the others 1 keeps every step.
    strength < 1 keeps the last steps. diffusers' img2img `get_timesteps`:
    init_timestep = min(int(steps * strength), steps), starting at step steps - init_timestep. A1111's
    `setup_img2img_steps`: t_enc = int(min(strength, 0.999) * steps), starting at step steps - t_enc - 1.
    LCM and TCD instead pick all `steps` from the low-noise part of their schedule (`set_timesteps(strength=...)`, as
    diffusers' LatentConsistencyModelImg2ImgPipeline calls it; schedule.consistency_timesteps).
    img2img then starts from `SamplingPlan.noised(init_latents, noise)`.
    """
    sampler, named = get_sampler(name)
    schedule = a1111.schedule_name(schedule) if schedule is not None else named
    _check_schedule(sampler, schedule)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if strength is not None and not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if sampler.timestep_space:
        return _prepare_timesteps(sampler, noise_schedule, steps, strength)
    strength = 1.0 if strength is None else strength
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
    model = (a1111.LCMSigmas if sampler.lcm else a1111.ModelSigmas).from_schedule(ns)
    full = a1111.sigmas(model, steps, schedule or sampler.default_schedule or "uniform",
                        discard_penultimate=sampler.discard_penultimate)
    t_start = 0 if strength >= 1 else steps - int(min(strength, 0.999) * steps) - 1
    sigmas = full[t_start:]
    if len(sigmas) < 2:
        raise ValueError(f"strength {strength} leaves no step of {len(full) - 1} to run; raise strength or steps")
    noise_range = (full[full > 0].min(), full.max())
    # A1111 runs DPM fast/adaptive over the model's sigma range in txt2img, and the kept sigmas' in img2img
    sigma_range = (model.sigmas[0], model.sigmas[-1]) if strength >= 1 else (sigmas[-2], sigmas[0])
    return SamplingPlan(sampler, schedule, sigmas, model.sigma_to_t(sigmas[:-1]), model, float(sigmas[0]),
                        noise_range, sigma_range if sampler.sigma_range else None)


def a1111_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """A1111's timesteps for its DDIM and PLMS (CompVisSampler.get_timesteps), ascending: 1, 1 + T // steps, ...
    below T. Sampling visits them top down and ends at the lowest, t = 1: 20 steps are the 20 timesteps
    1, 51, ..., 951, i.e. 19 model calls from t 951 to t 51 and a last step to t 1."""
    if not 1 < steps <= num_train_timesteps:
        raise ValueError(f"A1111's timestep samplers need 2 to {num_train_timesteps} steps, got {steps} "
                         "(1 step gives the single timestep 1, which runs no step)")
    return (torch.arange(0, num_train_timesteps, num_train_timesteps // steps) + 1).clamp(0, num_train_timesteps - 1)


def _prepare_timesteps(sampler: Sampler, ns: NoiseSchedule, steps: int, strength: float | None) -> SamplingPlan:
    """The plan of A1111's DDIM, DDIM CFG++, PLMS or UniPC, and a sigma_to_t that feeds the U-Net exactly A1111's
    timesteps. DDIM, PLMS: the training sigmas at `a1111_timesteps`, descending, ending at t = 1's (integer
    timesteps). UniPC: as many steps as those timesteps, evenly in its continuous time (a1111.unipc_times;
    fractional timesteps), ending at t = 0's sigma. x starts as VP noise (unit noise * sqrt(1 + sigma**2)) and
    `finish` returns the VP latent at the last sigma, which A1111 decodes.

    img2img (strength not None, 1 included), as A1111's `sample_img2img` with img2img_fix_steps off: t_enc =
    int(min(strength, 0.999) * steps); it runs timesteps[:t_enc] (UniPC: t_enc steps from just above the last of
    them) but noises the init latents to timesteps[t_enc], one timestep higher (`img2img_sigma`), and its first
    step reads that VP latent as if it were at the first timestep it runs (`SamplingPlan.noised`).
    """
    model = a1111.ModelSigmas.from_schedule(ns)
    timesteps = a1111_timesteps(steps, len(model.sigmas))
    img2img_sigma = None
    if strength is not None:
        t_enc = int(min(strength, 0.999) * steps)
        img2img_sigma = float(model.sigmas[timesteps[t_enc]])
        timesteps = timesteps[:t_enc]
    unipc = sampler.name == "UniPC"
    if len(timesteps) < (3 if unipc else 2):
        raise ValueError(f"{steps} steps at strength {strength} leave {len(timesteps)} of A1111's timesteps, too few "
                         f"for its {sampler.name} ({'3, its order' if unipc else '2'}); raise strength or steps")
    if unipc:
        t_start = 1.0 if strength is None else float(timesteps[-1] + 1) / len(model.sigmas)
        sigmas, t = a1111.unipc_times(ns, len(timesteps), t_start)
    else:
        timesteps = timesteps.flip(0)
        sigmas, t = model.sigmas[timesteps], timesteps.float()
    sigma_to_t = TimestepMap(sigmas, t, ns.log_sigmas)
    init_noise_scale = math.sqrt(float(sigmas[0]) ** 2 + 1)
    return SamplingPlan(sampler, None, sigmas, t[:-1], sigma_to_t, init_noise_scale, img2img_sigma=img2img_sigma)
