"""The noise schedule: betas -> alphas_cumprod -> sigmas, timestep spacings, Karras sigmas, sigma <-> t.

Everything the samplers see is in sigma ("VE", k-diffusion) space: a latent x at noise level sigma is
x = x0 + sigma * eps. A diffusers "VP" latent is x_vp = x / sqrt(1 + sigma**2), with alpha_t = 1 / sqrt(1 + sigma**2).
The training sigmas are sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]) for t = 0 .. T-1.

The subtle numeric choices are diffusers' own and named here, so the sigmas and timesteps equal theirs bit for bit:
  * betas, alphas_cumprod and the training sigmas are float32 tensors, computed with torch as diffusers does;
  * spacings run in float64 numpy; Euler-style ("k") spacings keep fractional float32 timesteps (999.0, 964.5517...),
    DDIM- and DPM-style ones round to integers, and DPM-style spaces steps + 1 points and drops t = 0;
  * sigmas between training timesteps are linear interpolation in t (`np.interp`), not in log-sigma;
  * `sigma_to_t` is diffusers' `_sigma_to_t`: linear interpolation in log-sigma between training timesteps;
  * Karras sigmas are computed in float64 and stored as float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import Config

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True)
class NoiseSchedule(Config):
    """The training noise schedule of a checkpoint (its `scheduler_config.json`); defaults are SD 1.5's."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    # None: every sampler uses its diffusers class' default spacing, as `from_config` of a config without the key does
    timestep_spacing: str | None = None
    # LCM / TCD: the length of the distillation schedule their timesteps are picked from (`consistency_timesteps`)
    original_inference_steps: int = 50

    # config keys whose other values would change the math in ways we do not implement
    _fixed = {
        "rescale_betas_zero_snr": (False, None),
        "thresholding": (False, None),
        "timestep_type": ("discrete", None),
        "interpolation_type": ("linear", None),
        "timestep_scaling": (10.0, None),  # LCM's boundary condition scalings (samplers.lcm_scalings)
    }
    # SD 1.x / 2.x: 1000 timesteps, betas 0.00085..0.012, steps_offset 1 (bounds far above; they stop a
    # hostile scheduler_config.json before `betas` allocates num_train_timesteps floats)
    _ranges = {"num_train_timesteps": (1, 10000), "beta_start": (0, 1), "beta_end": (0, 1),
               "trained_betas": (0, 1, 10000), "steps_offset": (0, 1000),
               "original_inference_steps": (1, 10000)}

    def __post_init__(self):
        super().__post_init__()
        if self.beta_schedule not in BETA_SCHEDULES and self.trained_betas is None:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported (expected one of "
                             f"{list(BETA_SCHEDULES)} or trained_betas)")
        if self.prediction_type != "epsilon":
            raise NotImplementedError(
                f"prediction_type {self.prediction_type!r} is not supported: stablediff runs epsilon-prediction "
                "SD 1.x models (v_prediction is SD 2.x 768-v)")
        if self.timestep_spacing not in (None, *SPACINGS):
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not supported "
                             f"(expected one of {list(SPACINGS)})")
        if self.original_inference_steps > self.num_train_timesteps:
            raise ValueError(f"original_inference_steps {self.original_inference_steps} is more than "
                             f"num_train_timesteps {self.num_train_timesteps}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps is "
                             f"{self.num_train_timesteps}")

    @classmethod
    def from_config(cls, d: dict | None, source: str = "scheduler config") -> "NoiseSchedule":
        """From a diffusers scheduler config dict; unknown keys are ignored, None -> SD 1.5 defaults.
        (`from_json(path)` reads a `scheduler_config.json`.)"""
        return cls() if d is None else cls.from_dict(d, source=source)

    @property
    def betas(self) -> torch.Tensor:
        T = self.num_train_timesteps
        if self.trained_betas is not None:
            return torch.tensor(self.trained_betas, dtype=torch.float32)
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        return _cosine_betas(T)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """float32 (T,), exactly diffusers' `torch.cumprod(1 - betas)`."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def sigmas(self) -> torch.Tensor:
        """The training sigmas, float32 (T,), ascending in t."""
        a = self.alphas_cumprod
        return ((1 - a) / a) ** 0.5

    @property
    def log_sigmas(self) -> np.ndarray:
        """float32 numpy log of the training sigmas, the table `sigma_to_t` interpolates in (as diffusers)."""
        return np.log(self.sigmas.numpy())

    @property
    def final_alpha_sigma(self) -> float:
        """Where DDIM and PNDM end: sigma of `final_alpha_cumprod` (1 or alphas_cumprod[0], by set_alpha_to_one)."""
        return 0.0 if self.set_alpha_to_one else float(self.sigmas[0])


def _cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's squaredcos_cap_v2 betas, as diffusers' `betas_for_alpha_bar`."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# timestep spacings, Karras sigmas, sigma <-> t


def spaced_timesteps(spacing: str, steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0, *,
                     rounded: bool = True, drop_last: bool = False) -> np.ndarray:
    """The `steps` timesteps a diffusers scheduler visits, descending, as a float64 array of exact values.

    linspace: evenly from T-1 down to 0 (fractional float32 values unless `rounded`);
    leading:  multiples of T // n from 0 (n points), plus `steps_offset` (DDIM paper; SD 1.x's steps_offset is 1);
    trailing: evenly from T down, minus 1 (ends at T/steps - 1, never at 0).
    drop_last: the DPM-Solver/UniPC/DEIS variant that spaces steps + 1 points and drops the last (t = 0 side).
    """
    T = num_train_timesteps
    if steps < 1 or steps > T:
        raise ValueError(f"steps must be between 1 and {T}, got {steps}")
    n = steps + 1 if drop_last else steps
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n)
        t = t.round() if rounded else t.astype(np.float32)
        t = t[::-1][:steps]
    elif spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1][:steps] + steps_offset
    elif spacing == "trailing":
        t = np.arange(T, 0, -T / steps).round() - 1
    else:
        raise ValueError(f"timestep spacing {spacing!r} is not known (expected one of {list(SPACINGS)})")
    return np.ascontiguousarray(t, dtype=np.float64)


def consistency_timesteps(steps: int, num_train_timesteps: int = 1000, original_steps: int = 50,
                          strength: float = 1.0) -> np.ndarray:
    """LCM's and TCD's timesteps (diffusers' LCMScheduler / TCDScheduler `set_timesteps`), descending, float64.

    The distillation schedule is every k-th training timestep ending in k - 1: k - 1, 2k - 1, ..., with
    k = T // original_steps (19, 39, ..., 999 for SD's 50 of 1000). img2img keeps its first
    int(original_steps * strength) (the low-noise end) and still runs `steps` steps; `steps` of them are taken at the
    indices floor(linspace(0, n, steps, endpoint=False)) counted from the top.
    """
    k = num_train_timesteps // original_steps
    origin = np.arange(1, int(original_steps * strength) + 1) * k - 1
    if steps < 1 or steps > len(origin):
        raise ValueError(f"{steps} steps: LCM/TCD pick them from {len(origin)} timesteps (original_inference_steps "
                         f"{original_steps} x strength {strength}); use 1..{len(origin)} steps")
    indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[::-1][indices].astype(np.float64)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: sigma_max ** (1/rho) to sigma_min ** (1/rho) evenly, to the power rho (float64)."""
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma: linear interpolation in log-sigma between the two training timesteps around
    it (clamped to [0, T-1]), exactly diffusers' / k-diffusion's `_sigma_to_t`. float64 array shaped like sigma."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10)).reshape(-1)
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def t_to_sigma(t, train_sigmas: np.ndarray) -> np.ndarray:
    """Sigma at fractional timesteps: linear interpolation in t between training sigmas (diffusers' `np.interp`)."""
    return np.interp(t, np.arange(len(train_sigmas)), train_sigmas)


def discretize(ns: NoiseSchedule, steps: int, *, style: str, spacing: str, final: str, karras: bool = False,
               karras_round: bool = False, strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The sigmas (steps + 1, float32, the last one where sampling ends) and timesteps (steps, float32) that a
    diffusers scheduler class would use.

    style: "k" (Euler, Heun, LMS, KDPM2: fractional timesteps, sigmas by np.interp, Karras range from those sigmas),
           "dpm" (DPM-Solver, UniPC, DEIS: steps + 1 integer points without t = 0, Karras range = training range),
           "ddim" (DDIM, PNDM, DDPM: integer timesteps indexing alphas_cumprod),
           "lcm" (LCM, TCD: `consistency_timesteps`, integers; their img2img `strength` acts here, not by slicing);
    final: "zero", "final_alpha" (DDIM/PNDM: sigma of final_alpha_cumprod), "sigma_min" (DEIS: sigma(t=0), or with
           Karras its last Karras sigma again);
    karras_round: round the timesteps fed to the U-Net at Karras sigmas (KDPM2, DPM-Solver, UniPC, DEIS do).

    DDIM and PNDM step from t to t - T // steps, which is the next timestep only with "leading" spacing (their
    default); with a config's linspace or trailing spacing they relabel the sample between steps, which has no sigma
    schedule: these sigmas then step to the next listed timestep instead.
    """
    spacing = ns.timestep_spacing or spacing
    T = ns.num_train_timesteps
    train = ns.sigmas.numpy()
    if style == "ddim" and karras:
        raise ValueError("the karras schedule needs a sigma-space scheduler; DDIM-style schedules have none")
    if style == "lcm":
        t = consistency_timesteps(steps, T, ns.original_inference_steps, strength)
    else:
        t = spaced_timesteps(spacing, steps, T, ns.steps_offset, rounded=style != "k", drop_last=style == "dpm")
    if t.max() > T - 1 or t.min() < 0:
        raise ValueError(f"{steps} steps with {spacing} spacing and steps_offset {ns.steps_offset} reach timestep "
                         f"{int(t.max())}, outside 0..{T - 1}")
    s = t_to_sigma(t, train)
    if karras:
        lo, hi = (s[-1], s[0]) if style == "k" else (train[0], train[-1])
        s = karras_sigmas(steps, float(lo), float(hi))
        t = sigma_to_t(s, np.log(train))
        if karras_round:
            t = t.round()
    if final == "zero":
        last = 0.0
    elif final == "final_alpha":
        last = ns.final_alpha_sigma
    elif final == "sigma_min":
        last = s[-1] if karras else train[0]
    else:
        raise ValueError(f"final sigma rule {final!r} is not known")
    return np.append(s, last).astype(np.float32), t.astype(np.float32)


@dataclass(frozen=True, eq=False)
class TimestepMap:
    """sigma -> the timestep the U-Net is fed: exactly `timesteps[i]` at `sigmas[i]` (a plan's own sigmas, which may
    be rounded or fractional as its diffusers class has them), log-sigma interpolation (`sigma_to_t`) elsewhere."""

    sigmas: torch.Tensor  # float32 (N,)
    timesteps: torch.Tensor  # float32 (N,)
    log_sigmas: np.ndarray  # float32 (T,)

    def __call__(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        flat = sigma.detach().to("cpu", torch.float32).reshape(-1)
        hit = flat[:, None] == self.sigmas[None, :]
        t = torch.from_numpy(sigma_to_t(flat.double().numpy(), self.log_sigmas)).float()
        t = torch.where(hit.any(1), self.timesteps[hit.int().argmax(1)], t)
        return t.reshape(sigma.shape).to(sigma.device)
