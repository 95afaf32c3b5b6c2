"""The sampling steps both families share, and the samplers only AUTOMATIC1111's family has (see samplers.py).

Every sampler is a plain function over a denoiser D(x, sigma) in sigma space, as in k-diffusion's `sampling.py`:

    x = sample_<name>(denoiser, x, sigmas, *, generator=None, callback=None)

Here are k-diffusion's DPM-Solver++ SDE samplers, DPM-Solver fast and adaptive, and A1111 v1.10's own samplers:
its timestep-space PLMS (sd_samplers_timesteps_impl; its DDIM is Euler in sigma space and its UniPC diffusers'
UniPC steps with A1111's settings, both in samplers.py), Restart (sd_samplers_extra) and LCM (sd_samplers_lcm),
each with the arguments A1111 calls it with (eta, default 1, and s_noise, the noise's scale, where it passes them).

A1111's timestep samplers work on the VP latent x_t = x / sqrt(1 + sigma**2) (DDIM and PLMS at integer timesteps t,
sigma = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])). Dividing their updates by sqrt(alphas_cumprod) gives the
sigma-space updates below: DDIM's x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps is x0 + sigma_prev * eps.
"""

from __future__ import annotations

import math

import torch

from . import a1111, rng
from .schedule import NoiseSchedule


def draw_noise(x: torch.Tensor, generator) -> torch.Tensor:
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


def as_float32(x, sigmas):
    return x.to(torch.float32), torch.as_tensor(sigmas, dtype=torch.float32).cpu()


def step_pairs(sigmas):
    """(i, sigma, sigma_next) for each step."""
    return ((i, sigmas[i], sigmas[i + 1]) for i in range(len(sigmas) - 1))


def report(callback, i, x, sigma, sigma_next, denoised):
    """Run the step callback. It may return a replacement for x (inpainting blends the known latents back in, as
    diffusers does to `latents` after each scheduler step); otherwise x goes on unchanged."""
    if callback is None:
        return x
    out = callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x if out is None else out


def ancestral_step(sigma, sigma_next, eta: float = 1.0):
    """Split a step sigma -> sigma_next into a deterministic step down to sigma_down and fresh noise of sigma_up,
    so that sigma_down**2 + sigma_up**2 = sigma_next**2: eta 1 adds all the noise the step's posterior has, 0 none
    (the ODE step), as k-diffusion's get_ancestral_step (sigma_up at most sigma_next; eta 0: exactly sigma_next)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = torch.minimum(torch.as_tensor(sigma_next),
                             eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up



# ---------------------------------------------------------------------------------------------------------------
# k-diffusion's DPM-Solver++ ancestral and SDE samplers (A1111's "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE (Heun)",
# "DPM++ 3M SDE"), with the eta (default 1) and s_noise A1111 passes, in k-diffusion's variables: t = -log(sigma)


def _sigma(t):
    return t.neg().exp()


def _brownian(x, sigmas, generator, noise_range):
    """Brownian-tree noise over noise_range (the whole run's (sigma_min, sigma_max), which an img2img plan knows),
    by default over these sigmas' range, as k-diffusion does."""
    lo, hi = noise_range if noise_range is not None else (sigmas[sigmas > 0].min(), sigmas.max())
    return a1111.BrownianNoise(x, lo, hi, generator)


def sample_dpmpp_2s_a(denoiser, x, sigmas, *, generator=None, callback=None, eta: float = 1.0,
                      s_noise: float = 1.0):
    """DPM-Solver++(2S) ancestral: a second-order single-step update down to sigma_down (its midpoint halfway in
    lambda), then fresh noise of sigma_up from `generator` (ancestral_step's eta); Euler and no noise on the step
    to 0."""
    x, sigmas = as_float32(x, sigmas)
    for i, sigma, sigma_next in step_pairs(sigmas):
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
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
            x = x + draw_noise(x, generator) * s_noise * sigma_up
        x = report(callback, i, x, sigma, sigma_next, denoised)
    return x


def sample_dpmpp_sde(denoiser, x, sigmas, *, generator=None, callback=None, noise_range=None, r: float = 0.5,
                     eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++ SDE (k-diffusion's `sample_dpmpp_sde`): two stochastic ancestral sub-steps per step, the first
    to lambda + r * h, the second with a combination of both D; Brownian-tree noise. Euler on the step to 0."""
    x, sigmas = as_float32(x, sigmas)
    noise = _brownian(x, sigmas, generator, noise_range)
    for i, sigma, sigma_next in step_pairs(sigmas):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            t, t_next = sigma.log().neg(), sigma_next.log().neg()
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = ancestral_step(_sigma(t), _sigma(s), eta)
            s_ = sd.log().neg()
            x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise(_sigma(t), _sigma(s)) * s_noise * su
            denoised_2 = denoiser(x_2, _sigma(s))
            sd, su = ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = sd.log().neg()
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise(_sigma(t), _sigma(t_next)) * s_noise * su
        x = report(callback, i, x, sigma, sigma_next, denoised)
    return x


def _k_dpmpp_2m_sde(denoiser, x, sigmas, generator, callback, noise_range, heun: bool, eta: float, s_noise: float):
    """DPM-Solver++(2M) SDE as k-diffusion's `sample_dpmpp_2m_sde`: the second-order correction with the
    midpoint or Heun's weights, Brownian-tree noise (none at eta 0), and the step to 0 returning D itself."""
    x, sigmas = as_float32(x, sigmas)
    noise = _brownian(x, sigmas, generator, noise_range)
    old_denoised, h, h_last = None, None, None
    for i, sigma, sigma_next in step_pairs(sigmas):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x_next = denoised
        else:
            h_last, h = h, sigma.log() - sigma_next.log()
            eta_h = eta * h
            phi = (-h - eta_h).expm1().neg()  # 1 - exp(-(1 + eta) h)
            x_next = sigma_next / sigma * (-eta_h).exp() * x + phi * denoised
            if old_denoised is not None:
                weight = phi / (-h - eta_h) + 1 if heun else 0.5 * phi
                x_next = x_next + weight * (1 / (h_last / h)) * (denoised - old_denoised)
            if eta:
                x_next = x_next + noise(sigma, sigma_next) * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        x, old_denoised = report(callback, i, x_next, sigma, sigma_next, denoised), denoised
    return x


def sample_k_dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, noise_range=None,
                          eta: float = 1.0, s_noise: float = 1.0):
    """A1111's "DPM++ 2M SDE": k-diffusion's midpoint form, Brownian-tree noise."""
    return _k_dpmpp_2m_sde(denoiser, x, sigmas, generator, callback, noise_range, heun=False, eta=eta,
                           s_noise=s_noise)


def sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, *, generator=None, callback=None, noise_range=None,
                             eta: float = 1.0, s_noise: float = 1.0):
    """A1111's "DPM++ 2M SDE Heun": k-diffusion's solver_type="heun" weights, Brownian-tree noise."""
    return _k_dpmpp_2m_sde(denoiser, x, sigmas, generator, callback, noise_range, heun=True, eta=eta,
                           s_noise=s_noise)


def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, generator=None, callback=None, noise_range=None,
                        eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(3M) SDE (k-diffusion's `sample_dpmpp_3m_sde`): third-order multistep on the last three D (first
    and second order while they are fewer), Brownian-tree noise (none at eta 0), the step to 0 returning D."""
    x, sigmas = as_float32(x, sigmas)
    noise = _brownian(x, sigmas, generator, noise_range)
    denoised_1, denoised_2, h, h_1, h_2 = None, None, None, None, None
    for i, sigma, sigma_next in step_pairs(sigmas):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x_next = denoised
        else:
            h = sigma.log() - sigma_next.log()
            h_eta = h * (eta + 1)
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
            if eta:
                x_next = x_next + noise(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        x = report(callback, i, x_next, sigma, sigma_next, denoised)
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x



# ---------------------------------------------------------------------------------------------------------------
# A1111's PLMS (timestep space; its schedule and the VP start and end are the plan's, see samplers.prepare)

# Adams-Bashforth weights of PLMS for 1..4 past eps, newest first
PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def sample_plms(denoiser, x, sigmas, *, generator=None, callback=None):
    """PLMS (Liu et al. 2022) as A1111's `plms`: the first step is a pseudo improved Euler step (DDIM to the next
    timestep, then again from the start with the mean of both eps), the later ones DDIM steps with the
    Adams-Bashforth combination of up to 4 eps. Only the eps at each step's own sample enters the history.
    DDIM's step is Euler in sigma space: x + eps * (sigma_next - sigma)."""
    x, sigmas = as_float32(x, sigmas)
    eps_history = []
    for i, sigma, sigma_next in step_pairs(sigmas):
        denoised = denoiser(x, sigma)
        eps = (x - denoised) / sigma
        if not eps_history:
            x_2 = x + eps * (sigma_next - sigma)
            eps_prime = (eps + (x_2 - denoiser(x_2, sigma_next)) / sigma_next) / 2
        else:
            weights = PLMS_WEIGHTS[len(eps_history) + 1]
            eps_prime = sum(w * e for w, e in zip(weights, [eps, *reversed(eps_history)]))
        eps_history = [*eps_history, eps][-3:]
        x = report(callback, i, x + eps_prime * (sigma_next - sigma), sigma, sigma_next, denoised)
    return x


# ---------------------------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022) in k-diffusion's form: t = lambda = -log(sigma), eps = (x - D) / sigma


def _eps(denoiser, x, t):
    sigma = _sigma(t)
    return (x - denoiser(x, sigma)) / sigma


def _dpm_solver_1(x, t, t_next, eps):
    return x - _sigma(t_next) * (t_next - t).expm1() * eps


def _dpm_solver_2(denoiser, x, t, t_next, eps, r1=1 / 2):
    """DPM-Solver-2 with its intermediate point at t + r1 * h; returns x and the eps there."""
    h = t_next - t
    s1 = t + r1 * h
    eps_r1 = _eps(denoiser, x - _sigma(s1) * (r1 * h).expm1() * eps, s1)
    x_2 = x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
    return x_2, eps_r1


def _dpm_solver_3(denoiser, x, t, t_next, eps, eps_r1=None, r1=1 / 3, r2=2 / 3):
    """DPM-Solver-3; eps_r1, the eps at t + r1 * h, is taken as given where DPM-Solver-2 already found it."""
    h = t_next - t
    s1, s2 = t + r1 * h, t + r2 * h
    if eps_r1 is None:
        eps_r1 = _eps(denoiser, x - _sigma(s1) * (r1 * h).expm1() * eps, s1)
    u2 = x - _sigma(s2) * (r2 * h).expm1() * eps - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (
        eps_r1 - eps)
    eps_r2 = _eps(denoiser, u2, s2)
    return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _ancestral_target(t, t_next, t_end, eta: float):
    """The deterministic target t_next_ (not beyond t_end) and the noise that brings it back to t_next (eta 0:
    t_next itself and none)."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = torch.minimum(t_end, sigma_down.log().neg())
    return t_next_, (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5


def sample_dpm_fast(denoiser, x, sigmas, *, generator=None, callback=None, sigma_range=None, eta: float = 1.0,
                    s_noise: float = 1.0):
    """DPM-Solver-fast (k-diffusion's `sample_dpm_fast`; A1111 passes it eta, default 1): n = len(sigmas) - 1 calls
    spread over floor(n / 3) + 1 steps evenly in lambda from sigma_max down to sigma_min, third order but for the
    last one or two; each step an ancestral one. sigma_range: (sigma_min, sigma_max), by default
    (sigmas[-2], sigmas[0]); the run ends at sigma_min, not 0."""
    x, sigmas = as_float32(x, sigmas)
    nfe = len(sigmas) - 1
    sigma_min, sigma_max = sigma_range if sigma_range is not None else (sigmas[-2], sigmas[0])
    t_start, t_end = torch.as_tensor(sigma_max).float().log().neg(), torch.as_tensor(sigma_min).float().log().neg()
    m = nfe // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_next_, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        eps = _eps(denoiser, x, t)
        denoised = x - _sigma(t) * eps
        if order == 1:
            x = _dpm_solver_1(x, t, t_next_, eps)
        elif order == 2:
            x, _ = _dpm_solver_2(denoiser, x, t, t_next_, eps)
        else:
            x = _dpm_solver_3(denoiser, x, t, t_next_, eps)
        x = x + sigma_up * s_noise * draw_noise(x, generator)
        x = report(callback, i, x, _sigma(t), _sigma(t_next), denoised)
    return x


def _step_size_factor(error: float, order: float, accept_safety: float = 0.81) -> tuple[float, bool]:
    """k-diffusion's PID step-size controller with its defaults (integral only, icoeff 1): the factor the step
    size is multiplied by, and whether the step is accepted."""
    factor = (1 / (error + 1e-8)) ** (1 / order)
    factor = 1 + math.atan(factor - 1)
    return factor, factor >= accept_safety


def sample_dpm_adaptive(denoiser, x, sigmas, *, generator=None, callback=None, sigma_range=None,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, eta: float = 1.0):
    """DPM-Solver-23 with adaptive step size (k-diffusion's `sample_dpm_adaptive`, order 3; A1111 passes it eta,
    default 1, and with eta the step-size controller takes order 1.5): each step compares DPM-Solver-2 (r1 = 1/3)
    with DPM-Solver-3 and lets the error over the whole batch set the next step size; the number of steps ignores
    `sigmas`, which give only the range (see sample_dpm_fast)."""
    x, sigmas = as_float32(x, sigmas)
    sigma_min, sigma_max = sigma_range if sigma_range is not None else (sigmas[-2], sigmas[0])
    s, t_end = torch.as_tensor(sigma_max).float().log().neg(), torch.as_tensor(sigma_min).float().log().neg()
    atol, rtol = torch.tensor(atol), torch.tensor(rtol)
    h, x_prev, i = h_init, x, 0
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + h)
        t_, sigma_up = _ancestral_target(s, t, t_end, eta)
        eps = _eps(denoiser, x, s)
        denoised = x - _sigma(s) * eps
        x_low, eps_r1 = _dpm_solver_2(denoiser, x, s, t_, eps, r1=1 / 3)
        x_high = _dpm_solver_3(denoiser, x, s, t_, eps, eps_r1)
        delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        factor, accept = _step_size_factor(float(error), order=1.5 if eta else 3)
        h *= factor
        if accept:
            x_prev = x_low
            x = x_high + sigma_up * draw_noise(x, generator)
            x = report(callback, i, x, _sigma(s), _sigma(t), denoised)
            s, i = t, i + 1
    return x


# ---------------------------------------------------------------------------------------------------------------
# Restart (Xu et al. 2023) and LCM (Luo et al. 2023) as A1111 runs them


def _heun_step(denoiser, x, sigma, sigma_next):
    """One Heun step (Euler on the step to 0); returns x and D at sigma."""
    denoised = denoiser(x, sigma)
    d = (x - denoised) / sigma
    if sigma_next == 0:
        return x + d * (sigma_next - sigma), denoised
    x_2 = x + d * (sigma_next - sigma)
    d_2 = (x_2 - denoiser(x_2, sigma_next)) / sigma_next
    return x + (d + d_2) / 2 * (sigma_next - sigma), denoised


def _nearest(sigmas, value) -> int:
    return int(torch.argmin((sigmas - value).abs()))


def restart_steps(sigmas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (sigma, sigma_next) pairs A1111's `restart_sampler` visits for these sigmas. Under 20 steps: the sigmas
    as they are. From 20: Karras sigmas over the same range, fewer by the restart steps, and at the sigma nearest
    0.1 a jump back up to the one nearest 2 followed by (restart steps + 1) Karras sigmas back down: 9 restart steps
    once, or from 36 steps steps // 4 of them twice."""
    steps = len(sigmas) - 1
    if steps < 20:
        return [(sigmas[i], sigmas[i + 1]) for i in range(steps)]
    n_restart, times = (steps // 4, 2) if steps >= 36 else (9, 1)
    sigmas = a1111.karras_range(steps - n_restart * times, sigmas[-2].item(), sigmas[0].item())
    min_idx, max_idx = _nearest(sigmas, 0.1), _nearest(sigmas, 2.0)
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 == min_idx and max_idx < min_idx:
            restart = a1111.karras_range(n_restart + 1, sigmas[min_idx].item(), sigmas[max_idx].item())[:-1]
            pairs += list(zip(restart[:-1], restart[1:])) * times
    return pairs


def sample_restart(denoiser, x, sigmas, *, generator=None, callback=None):
    """Restart sampling (A1111's `restart_sampler`, s_noise 1): Heun steps over `restart_steps(sigmas)`, and where
    the next step starts above where the last one ended, fresh noise to lift x to that sigma."""
    x, sigmas = as_float32(x, sigmas)
    last = None
    for i, (sigma, sigma_next) in enumerate(restart_steps(sigmas)):
        if last is not None and last < sigma:
            x = x + draw_noise(x, generator) * (sigma**2 - last**2) ** 0.5
        x, denoised = _heun_step(denoiser, x, sigma, sigma_next)
        x = report(callback, i, x, sigma, sigma_next, denoised)
        last = sigma_next
    return x


def lcm_boundary(t: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's boundary-condition scalings (c_skip, c_out) at timestep t, with A1111's scaled timestep 10 t."""
    scaled = t * 10.0
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def sample_lcm(denoiser, x, sigmas, *, generator=None, callback=None, sigma_to_t=None):
    """Latent consistency sampling (A1111's `sample_lcm` with its LCM denoiser): each step jumps to the consistency
    function's estimate c_skip * x + c_out * D, at the LCM timestep sigma_to_t gives (a1111.LCMSigmas), then
    adds fresh noise of the next sigma (none on the step to 0). sigma_to_t: a plan's; by default SD 1.x's."""
    x, sigmas = as_float32(x, sigmas)
    sigma_to_t = sigma_to_t or a1111.LCMSigmas.from_schedule(NoiseSchedule())
    for i, sigma, sigma_next in step_pairs(sigmas):
        c_skip, c_out = lcm_boundary(sigma_to_t(sigma).float())
        denoised = c_out * denoiser(x, sigma) + c_skip * x
        x = denoised
        if sigma_next > 0:
            x = x + sigma_next * draw_noise(x, generator)
        x = report(callback, i, x, sigma, sigma_next, denoised)
    return x
