"""AUTOMATIC1111's sigma schedules and sampler noise, for the "A1111" sampler family (see samplers.py).

A1111 (v1.10) samples with k-diffusion: the model is wrapped as k-diffusion's `CompVisDenoiser`, whose table of
training sigmas comes from the LDM model's `alphas_cumprod` (betas and their cumulative product in float64, stored
as float32), and whose sigma <-> t maps are continuous:
  * sigma_to_t: linear interpolation in log-sigma between the two training timesteps around sigma (float32), and the
    U-Net is fed that fractional t unrounded;
  * t_to_sigma: linear interpolation of log-sigma between floor(t) and ceil(t).
A run starts from unit noise * sigmas[0] (not sqrt(1 + sigma**2) as diffusers' VP schedulers) and ends at the last
sigma, which the VAE decodes as it is.

The "Schedule type" names and their sigma rules are A1111's `sd_schedulers.py`; each returns steps + 1 sigmas in
float32 (the `ddim` rule returns as many as its stride gives, and `kl_optimal` ends at sigma_min, not 0: both as
A1111 does). "Automatic" is each sampler's default (`default_schedule` in samplers.SAMPLERS), else `uniform`.
Samplers that A1111 marks discard_next_to_last_sigma (DPM2, DPM2 a, DPM++ 3M SDE) get one step more and then lose
the next-to-last sigma.

Noise: ancestral samplers draw per image from each image's CPU generator (A1111 with the "CPU" RNG source: one
(C, H, W) draw per image in batch order, which is what samplers' noise helper draws with a list of generators).
The SDE samplers A1111 marks brownian_noise draw from k-diffusion's Brownian tree, one tree per image seeded with
that image's seed; that needs torchsde, an optional dependency imported only then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import rng
from .schedule import NoiseSchedule

# A1111's "Schedule type" names -> labels (what the infotext and the UI say)
SCHEDULES = {
    "automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
    "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps", "simple": "Simple", "normal": "Normal", "ddim": "DDIM", "beta": "Beta",
}
_SCHEDULE_ALIASES = {"sgmuniform": "sgm_uniform"}
# the AYS paper's 10-step sigmas for SD 1.5; other step counts interpolate them log-linearly
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
BETA_ALPHA, BETA_BETA = 0.6, 0.6  # A1111's defaults for the beta schedule's distribution


def schedule_name(name: str | None) -> str | None:
    """The canonical schedule name for a name or label ("Karras", "sgm uniform", "SGMUniform"), None for automatic."""
    if name is None:
        return None
    key = " ".join(str(name).lower().split())
    for canon, label in SCHEDULES.items():
        if key in (canon, label.lower()) or _SCHEDULE_ALIASES.get(key) == canon:
            return None if canon == "automatic" else canon
    raise ValueError(f"schedule {name!r} is not known; choose one of: {', '.join(SCHEDULES)}")


def schedule_suffix(name: str) -> tuple[str, str | None]:
    """Split a legacy sampler name like "DPM++ 2M Karras" into ("DPM++ 2M", "karras"); (name, None) without one."""
    lowered = name.lower()
    options = [(o.lower(), canon) for canon, label in SCHEDULES.items() if canon != "automatic"
               for o in (canon, label)] + list(_SCHEDULE_ALIASES.items())
    for option, canon in sorted(options, key=lambda o: -len(o[0])):
        if lowered.endswith(" " + option):
            return name[: -len(option) - 1].rstrip(), canon
    return name, None


# ---------------------------------------------------------------------------------------------------------------
# the model's sigma table and k-diffusion's sigma <-> t


def _ldm_betas(ns: NoiseSchedule) -> np.ndarray:
    """float64 betas as the LDM model computes them (its "linear" is diffusers' "scaled_linear")."""
    T = ns.num_train_timesteps
    if ns.trained_betas is not None:
        return np.asarray(ns.trained_betas, dtype=np.float64)
    if ns.beta_schedule == "scaled_linear":
        return (torch.linspace(ns.beta_start**0.5, ns.beta_end**0.5, T, dtype=torch.float64) ** 2).numpy()
    if ns.beta_schedule == "linear":
        return torch.linspace(ns.beta_start, ns.beta_end, T, dtype=torch.float64).numpy()
    return ns.betas.double().numpy()


def ldm_alphas_cumprod(ns: NoiseSchedule) -> torch.Tensor:
    """The LDM model's alphas_cumprod, which A1111's samplers read: cumprod in float64, stored as float32."""
    return torch.tensor(np.cumprod(1.0 - _ldm_betas(ns)), dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class ModelSigmas:
    """The training sigmas as A1111's k-diffusion wrapper holds them, with its continuous sigma <-> t maps.
    Called on sigmas it is the plan's `sigma_to_t`."""

    sigmas: torch.Tensor  # float32 (T,), ascending in t

    @classmethod
    def from_schedule(cls, ns: NoiseSchedule) -> "ModelSigmas":
        alphas_cumprod = ldm_alphas_cumprod(ns)
        return cls(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """Fractional timestep: log-sigma interpolation between neighbouring training timesteps, in float32."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * (low_idx + 1)).view(sigma.shape)

    __call__ = sigma_to_t

    def t_to_sigma(self, t) -> torch.Tensor:
        """sigma at a fractional timestep: log-sigma interpolated linearly between floor(t) and ceil(t)."""
        t = torch.as_tensor(t).float()
        log_sigmas = self.sigmas.log()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    @property
    def t_max(self) -> int:
        return len(self.sigmas) - 1

    @property
    def t_min(self) -> int:
        return 0


@dataclass(frozen=True, eq=False)
class LCMSigmas(ModelSigmas):
    """A1111's LCM denoiser (sd_samplers_lcm.LCMCompVisDenoiser): the training sigmas at LCM's 50 original
    timesteps t = 19, 39, ..., 999, and a sigma_to_t that snaps to the nearest of them (in log-sigma), so the U-Net
    is fed only those. `sigmas` holds the 50, so every schedule works over them (sigma_min is t = 19's, about 0.134),
    as A1111's schedules do over this denoiser."""

    skip: int = 20  # 1000 training timesteps / 50 original ones

    @classmethod
    def from_schedule(cls, ns: NoiseSchedule) -> "LCMSigmas":
        full = ModelSigmas.from_schedule(ns).sigmas
        skip = len(full) // 50
        return cls(full[skip - 1::skip], skip)

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """The LCM timestep nearest sigma in log-sigma, as a float (an integer value)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log() - self.sigmas.log().to(sigma.device)[:, None]
        return (dists.abs().argmin(dim=0) * self.skip + (self.skip - 1)).view(sigma.shape).float()

    __call__ = sigma_to_t

    def t_to_sigma(self, t) -> torch.Tensor:
        t = torch.as_tensor(t).float()
        return super().t_to_sigma(((t - (self.skip - 1)) / self.skip).clamp(0, len(self.sigmas) - 1))

    @property
    def t_max(self) -> int:
        return len(self.sigmas) * self.skip - 1

    @property
    def t_min(self) -> int:
        return self.skip - 1


# ---------------------------------------------------------------------------------------------------------------
# A1111's schedules: n steps -> n + 1 float32 sigmas (see the module docstring for the two that differ)


def _append_zero(sigmas) -> torch.Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def uniform(n: int, m: ModelSigmas) -> torch.Tensor:
    """k-diffusion's `get_sigmas` (and A1111's LCM denoiser's): t evenly from t_max down to t_min, through t_to_sigma."""
    return _append_zero(m.t_to_sigma(torch.linspace(m.t_max, m.t_min, n)))


def karras_range(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 from sigma_max to sigma_min, then 0: k-diffusion's `get_sigmas_karras` (float32)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def karras(n: int, m: ModelSigmas, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 over the model's sigma range."""
    return karras_range(n, m.sigma_min, m.sigma_max, rho)


def exponential(n: int, m: ModelSigmas) -> torch.Tensor:
    """Evenly spaced in log-sigma."""
    return _append_zero(torch.linspace(math.log(m.sigma_max), math.log(m.sigma_min), n).exp())


def polyexponential(n: int, m: ModelSigmas, rho: float = 1.0) -> torch.Tensor:
    """log-sigma a polynomial of degree rho in the step (rho 1: exponential, up to rounding)."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(m.sigma_max) - math.log(m.sigma_min)) + math.log(m.sigma_min)))


def _t_range(n_points: int, m: ModelSigmas) -> torch.Tensor:
    start, end = m.sigma_to_t(torch.tensor(m.sigma_max)), m.sigma_to_t(torch.tensor(m.sigma_min))
    return torch.linspace(start, end, n_points)


def sgm_uniform(n: int, m: ModelSigmas) -> torch.Tensor:
    """SGM's uniform: n + 1 timesteps evenly over the model's range, the last dropped for 0."""
    return _append_zero([m.t_to_sigma(t) for t in _t_range(n + 1, m)[:-1]])


def normal(n: int, m: ModelSigmas) -> torch.Tensor:
    """n timesteps evenly over the model's range, both ends included, then 0."""
    return _append_zero([m.t_to_sigma(t) for t in _t_range(n, m)])


def kl_optimal(n: int, m: ModelSigmas) -> torch.Tensor:
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024), from sigma_max to sigma_min; no 0 is appended."""
    alpha_min, alpha_max = torch.arctan(torch.tensor(m.sigma_min)), torch.arctan(torch.tensor(m.sigma_max))
    step = torch.arange(n + 1) / n
    return torch.tan(step * alpha_min + (1.0 - step) * alpha_max)


def align_your_steps(n: int, m: ModelSigmas) -> torch.Tensor:
    """AYS' SD 1.5 sigmas; for a step count other than the table's length, log-linearly interpolated to n points
    (the table has 11 values, so 11 steps use it as it is and 10 interpolate, as A1111 does)."""
    if n == len(AYS_SD15):
        return _append_zero(AYS_SD15)
    xs, ys = np.linspace(0, 1, len(AYS_SD15)), np.log(AYS_SD15[::-1])
    return _append_zero(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy())


def simple(n: int, m: ModelSigmas) -> torch.Tensor:
    """Every (T / n)-th training sigma from the top, truncated to an index."""
    stride = len(m.sigmas) / n
    return _append_zero([float(m.sigmas[-(1 + int(i * stride))]) for i in range(n)])


def ddim(n: int, m: ModelSigmas) -> torch.Tensor:
    """Training sigmas at t = 1, 1 + T // n, ... below T, descending: as many steps as that stride gives."""
    stride = max(len(m.sigmas) // n, 1)
    return _append_zero([float(m.sigmas[t]) for t in range(1, len(m.sigmas), stride)][::-1])


def beta(n: int, m: ModelSigmas, alpha: float = BETA_ALPHA, beta_: float = BETA_BETA) -> torch.Tensor:
    """Beta-distribution quantiles over [sigma_min, sigma_max] (Lee et al. 2024); needs scipy's `beta.ppf`."""
    try:
        from scipy import stats
    except ImportError as e:
        raise ImportError("the beta schedule needs scipy (pip install scipy)") from e
    quantiles = [stats.beta.ppf(q, alpha, beta_) for q in 1 - np.linspace(0, 1, n)]
    return _append_zero([m.sigma_min + q * (m.sigma_max - m.sigma_min) for q in quantiles])


SCHEDULE_FUNCTIONS = {
    "uniform": uniform, "karras": karras, "exponential": exponential, "polyexponential": polyexponential,
    "sgm_uniform": sgm_uniform, "kl_optimal": kl_optimal, "align_your_steps": align_your_steps, "simple": simple,
    "normal": normal, "ddim": ddim, "beta": beta,
}


def sigmas(m: ModelSigmas, steps: int, schedule: str, *, discard_penultimate: bool = False) -> torch.Tensor:
    """The float32 sigmas A1111 samples `steps` steps with: the schedule's, with one step more and the next-to-last
    sigma dropped for samplers marked discard_next_to_last_sigma."""
    out = SCHEDULE_FUNCTIONS[schedule](steps + int(discard_penultimate), m)
    return torch.cat([out[:-2], out[-1:]]) if discard_penultimate else out


def unipc_times(ns: NoiseSchedule, n: int, t_start: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's UniPC discretisation (skip type time_uniform on UniPC's discrete NoiseScheduleVP): n steps evenly in
    continuous time from t_start down to 1/T, where training step i sits at t = (i + 1) / T and log(alpha) is
    interpolated linearly in t between them. Returns the sigmas (n + 1, sigma = std / alpha) and the timesteps the
    U-Net is fed there, (t - 1/T) * 1000 (fractional)."""
    log_alphas = 0.5 * ldm_alphas_cumprod(ns).log()
    T = len(log_alphas)
    knots = torch.linspace(0.0, 1.0, T + 1)[1:]
    t = torch.linspace(t_start, 1.0 / T, n + 1)
    k = (torch.searchsorted(knots, t) - 1).clamp(0, T - 2)
    log_alpha = log_alphas[k] + (t - knots[k]) * (log_alphas[k + 1] - log_alphas[k]) / (knots[k + 1] - knots[k])
    sigmas = (1.0 - (2.0 * log_alpha).exp()).sqrt() / log_alpha.exp()
    return sigmas, (t - 1.0 / T) * 1000.0


# ---------------------------------------------------------------------------------------------------------------
# Brownian-tree noise


def _seeds(generator) -> int | list[int]:
    """A1111 seeds each image's tree with that image's seed (not seed + ENSD): the ImageRNG's seeds, or the seed each
    generator was started with."""
    if isinstance(generator, rng.ImageRNG):
        return list(generator.seeds)
    if isinstance(generator, (list, tuple)):
        return [g.initial_seed() for g in generator]
    if generator is None:
        return int(torch.randint(0, 2**63 - 1, []).item())
    return generator.initial_seed()


def _query(tree, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    """tree(t0, t1) with both times clamped into the tree's own interval first, as torchsde clamps them, so the
    noise is the same. torchsde keeps the interval's ends rounded (sigma_min 0.0291675... became 0.029168), so a
    step to the lowest or from the highest sigma fell just outside, and each such query warned "Should have
    ta>=t0 ..." (a CLI user saw it as our warning); a torchsde without these attributes is queried as given."""
    interval = getattr(tree, "_interval", None)
    start, end = getattr(interval, "_start", None), getattr(interval, "_end", None)
    if not isinstance(start, float) or not isinstance(end, float):
        return tree(t0, t1)
    return tree(min(max(float(t0), start), end), min(max(float(t1), start), end))


class BrownianNoise:
    """Unit-variance noise for a step sigma -> sigma_next from a Brownian motion over [sigma_min, sigma_max], as
    k-diffusion's `BrownianTreeNoiseSampler` (one `torchsde.BrownianTree` per image when given a generator per
    image). The same sigmas give the same noise whatever the step sizes, which is what makes the SDE samplers
    converge as steps grow. Drawn in float32 on the CPU, returned on x's device."""

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, generator=None):
        try:
            import torchsde
        except ImportError as e:
            raise ImportError("A1111's SDE samplers draw Brownian-tree noise with torchsde: pip install torchsde") from e
        self.device = x.device
        seeds = _seeds(generator)
        self.batched = isinstance(seeds, list)
        w0 = torch.zeros(x.shape[1:] if self.batched else x.shape, dtype=torch.float32)
        t0, t1 = torch.as_tensor(sigma_min).float().cpu(), torch.as_tensor(sigma_max).float().cpu()
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in (seeds if self.batched else [seeds])]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        # the trees run from sigma_min up to sigma_max; a step goes down, so the increment changes sign
        t0, t1 = torch.as_tensor(sigma_next).float().cpu(), torch.as_tensor(sigma).float().cpu()
        w = torch.stack([_query(tree, t0, t1) for tree in self.trees]) * -1
        w = w if self.batched else w[0]
        return (w / (t1 - t0).abs().sqrt()).to(self.device)
