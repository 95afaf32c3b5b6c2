"""Samplers: plain functions over a denoiser D(x, sigma) in sigma space, as in k-diffusion's `sampling.py`.

    x = sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None)

`sigmas` descend to where sampling ends (0, or sigma(t=0) for DDIM/PNDM/DEIS); `x` starts at noise level sigmas[0].
History (previous derivatives, denoised estimates) lives in local variables. Each sampler reproduces one diffusers
scheduler as StableDiffusionPipeline drives it (`prepare` builds the matching sigmas and timesteps), rewritten in
sigma space: diffusers' "VP" schedulers work on x_vp = x / sqrt(1 + sigma**2) with alpha_t = 1 / sqrt(1 + sigma**2),
sigma_t(VP) = sigma * alpha_t and lambda = log(alpha_t / sigma_t(VP)) = -log(sigma). Dividing their updates by alpha_t
gives the updates below; e.g. DDIM (eta 0) is exactly Euler, and DDPM is exactly Euler ancestral.

Noise: `generator` is None, a torch.Generator or a list of them (one per batch element, drawing shape (1, ...) each,
as diffusers' `randn_tensor`); noise is drawn in float32 on the generator's device (the CPU for None) and moved to
x's device, at the same points of the loop as the diffusers scheduler draws it.
The math runs in float32. `callback(dict(i, x, sigma, sigma_next, denoised))` runs after each step; it may raise
to cancel, or return a tensor that replaces x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import rng
from .schedule import NoiseSchedule, TimestepMap, discretize


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    """Unit normal noise shaped like x, drawn exactly as diffusers' `randn_tensor(x.shape, generator)` draws it:
    from one generator, or one (1, ...) draw from each generator of a list (any of rng.draw's generators)."""
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


def _dpm2(denoiser, x, sigmas, generator, callback, ancestral: bool):
    """DPM-Solver-2 (Lu et al. 2022) in k-diffusion's form: the midpoint in log-sigma, then a full step with the
    derivative there; the step to sigma 0 is Euler. diffusers' KDPM2 lerps log(sigma_next) -> log(sigma) and
    KDPM2Ancestral log(sigma) -> log(sigma_down): the same orders are kept so the midpoints are bit-identical."""
    x, sigmas = _float32(x, sigmas)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next) if ancestral else (sigma_next, 0.0)
        d = (x - denoised) / sigma
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            if ancestral:
                sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
                # sqrt(sigma * sigma_down) is sigma_next in exact arithmetic and often bit for bit; diffusers feeds
                # the U-Net the log-interpolated timestep there, not the next step's own (with Karras, rounded) one,
                # so a midpoint on a plan sigma is moved one float32 ulp to keep sigma_to_t from mapping it as one
                if sigma_mid == sigma_next:
                    sigma_mid = torch.nextafter(sigma_mid, sigma)
            else:
                sigma_mid = sigma_next.log().lerp(sigma.log(), 0.5).exp()
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
# the table of samplers, name lookup, and the plan (sigmas + timesteps) for a run


@dataclass(frozen=True)
class Sampler:
    """A sampler and the facts needed to reproduce its diffusers scheduler (as `from_config` of an SD 1.x config)."""

    name: str
    fn: Callable
    label: str  # AUTOMATIC1111's display name
    aliases: tuple[str, ...] = ()
    supports_karras: bool = False  # the diffusers class takes use_karras_sigmas
    stochastic: bool = False
    diffusers_class: str = ""  # the diffusers scheduler it reproduces (tests build it by this name)
    diffusers_kwargs: tuple[tuple[str, object], ...] = ()  # extra from_config arguments
    timesteps: str = "k"  # discretization style, see schedule.discretize: "k", "dpm" or "ddim"
    spacing: str = "linspace"  # the class' default timestep_spacing
    final: str = "zero"  # where sampling ends, see schedule.discretize
    karras_round: bool = False  # the class rounds the timesteps it computes for Karras sigmas
    vp_init: bool = False  # init_noise_sigma is 1: txt2img latents start as pure VP noise


_VP = dict(timesteps="dpm", vp_init=True, karras_round=True, supports_karras=True)
_DDIM = dict(timesteps="ddim", spacing="leading", vp_init=True)

SAMPLERS: dict[str, Sampler] = {s.name: s for s in [
    Sampler("euler", sample_euler, "Euler", ("k_euler",), supports_karras=True,
            diffusers_class="EulerDiscreteScheduler"),
    Sampler("euler_a", sample_euler_a, "Euler a", ("k_euler_a", "euler_ancestral"), stochastic=True,
            diffusers_class="EulerAncestralDiscreteScheduler"),
    Sampler("heun", sample_heun, "Heun", ("k_heun",), supports_karras=True, diffusers_class="HeunDiscreteScheduler"),
    Sampler("lms", sample_lms, "LMS", ("k_lms",), supports_karras=True, diffusers_class="LMSDiscreteScheduler"),
    Sampler("dpm2", sample_dpm2, "DPM2", ("k_dpm_2", "dpm_2"), supports_karras=True, karras_round=True,
            diffusers_class="KDPM2DiscreteScheduler"),
    Sampler("dpm2_a", sample_dpm2_a, "DPM2 a", ("k_dpm_2_a", "dpm_2_ancestral"), supports_karras=True,
            stochastic=True, karras_round=True, diffusers_class="KDPM2AncestralDiscreteScheduler"),
    Sampler("dpmpp_2m", sample_dpmpp_2m, "DPM++ 2M", ("k_dpmpp_2m",), diffusers_class="DPMSolverMultistepScheduler",
            **_VP),
    Sampler("dpmpp_2m_sde", sample_dpmpp_2m_sde, "DPM++ 2M SDE", ("k_dpmpp_2m_sde",), stochastic=True,
            diffusers_class="DPMSolverMultistepScheduler",
            diffusers_kwargs=(("algorithm_type", "sde-dpmsolver++"),), **_VP),
    Sampler("ddim", sample_ddim, "DDIM", final="final_alpha", diffusers_class="DDIMScheduler", **_DDIM),
    Sampler("pndm", sample_pndm, "PLMS", ("plms",), final="final_alpha", diffusers_class="PNDMScheduler", **_DDIM),
    Sampler("unipc", sample_unipc, "UniPC", diffusers_class="UniPCMultistepScheduler", **_VP),
    Sampler("ddpm", sample_ddpm, "DDPM", stochastic=True, diffusers_class="DDPMScheduler", **_DDIM),
    Sampler("deis", sample_deis, "DEIS", final="sigma_min", diffusers_class="DEISMultistepScheduler", **_VP),
]}


def get_sampler(name: str) -> tuple[Sampler, str | None]:
    """Look a sampler up by canonical name, alias or AUTOMATIC1111 display name, case-insensitively; a trailing
    " Karras" asks for the karras schedule: "DPM++ 2M Karras" -> (SAMPLERS["dpmpp_2m"], "karras")."""
    key = " ".join(str(name).lower().replace("_", " ").split())
    schedule = None
    if key.endswith(" karras"):
        key, schedule = key[: -len(" karras")], "karras"
    for s in SAMPLERS.values():
        if key in {n.lower().replace("_", " ") for n in (s.name, s.label, *s.aliases)}:
            if schedule == "karras" and not s.supports_karras:
                raise ValueError(f"sampler {s.name!r} does not take the karras schedule; samplers that do: "
                                 f"{', '.join(n for n, x in SAMPLERS.items() if x.supports_karras)}")
            return s, schedule
    valid = [n for s in SAMPLERS.values() for n in (s.name, s.label)]
    raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(dict.fromkeys(valid))} "
                     f"(add ' Karras' for the karras schedule)")


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Everything a run needs besides the model: which sampler, its sigmas and the timesteps fed at each."""

    sampler: Sampler
    schedule: str | None  # "karras" or None
    sigmas: torch.Tensor  # float32 CPU (steps + 1,): the sigma of each step, then where sampling ends
    timesteps: torch.Tensor  # float32 CPU (steps,): the timestep diffusers feeds the U-Net at each step's sigma
    sigma_to_t: TimestepMap  # sigma -> timestep; exact at `sigmas`, log-sigma interpolation elsewhere
    init_noise_scale: float  # txt2img: x = unit noise * init_noise_scale

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the latent diffusers returns: x / sqrt(1 + sigma_last**2) (identity when it is 0)."""
        return x / math.sqrt(1.0 + float(self.sigmas[-1]) ** 2)


def prepare(name: str, noise_schedule: NoiseSchedule, steps: int, *, schedule: str | None = None,
            strength: float = 1.0) -> SamplingPlan:
    """The plan for `steps` steps of sampler `name` (any name `get_sampler` takes) on `noise_schedule`.

    strength < 1 (img2img) keeps the last steps as diffusers' img2img `get_timesteps` does:
    init_timestep = min(int(steps * strength), steps), starting at step steps - init_timestep; img2img then starts
    from x = init_latents + sigmas[0] * noise, which is diffusers' `add_noise` in sigma space for every scheduler.
    """
    sampler, named = get_sampler(name)
    schedule = schedule or named
    if schedule not in (None, "karras"):
        raise ValueError(f"schedule {schedule!r} is not known; use 'karras' or None")
    if schedule == "karras" and not sampler.supports_karras:
        raise ValueError(f"sampler {sampler.name!r} does not take the karras schedule (diffusers' "
                         f"{sampler.diffusers_class} has no use_karras_sigmas)")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if noise_schedule.clip_sample and sampler.name in ("ddim", "ddpm", "heun"):
        raise NotImplementedError(f"clip_sample=True ({sampler.diffusers_class} would clamp its x0 predictions) "
                                  "is not implemented; set clip_sample false in the scheduler config")
    sigmas, timesteps = discretize(noise_schedule, steps, style=sampler.timesteps, spacing=sampler.spacing,
                                   final=sampler.final, karras=schedule == "karras",
                                   karras_round=sampler.karras_round)
    sigma_max = float(sigmas.max())
    leading = (noise_schedule.timestep_spacing or sampler.spacing) == "leading"
    init_noise_scale = math.sqrt(sigma_max**2 + 1) if sampler.vp_init or leading else sigma_max
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    if t_start >= steps:
        raise ValueError(f"strength {strength} leaves no step of {steps} to run; raise strength or steps")
    if sampler.name == "pndm" and t_start >= 2:
        t_start -= 1  # PLMS lists its second timestep twice, so diffusers' timesteps[t_start:] starts one step earlier
    sigmas, timesteps = torch.from_numpy(sigmas[t_start:].copy()), torch.from_numpy(timesteps[t_start:].copy())
    sigma_to_t = TimestepMap(sigmas[:-1], timesteps, noise_schedule.log_sigmas)
    return SamplingPlan(sampler, schedule, sigmas, timesteps, sigma_to_t, init_noise_scale)
