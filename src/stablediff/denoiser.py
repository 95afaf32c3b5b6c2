"""Denoisers D(x, sigma) for the samplers: an eps-prediction model wrapped into sigma space, and classifier-free
guidance as a wrapper around that.

In sigma space a latent at noise level sigma is x = x0 + sigma * eps. The U-Net was trained on the variance-preserving
latent x / sqrt(sigma**2 + 1) at timestep t(sigma) and predicts eps, so D(x, sigma) = x - sigma * eps
(Karras et al. 2022, table 1, "VP" column; k-diffusion's `DiscreteEpsDDPMDenoiser`).
"""

from __future__ import annotations

from typing import Callable

import torch


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (a float, a 0-d or a (B,) tensor) as a float tensor of shape (B,) on x's device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])


class EpsDenoiser:
    """eps-prediction model -> denoiser D(x, sigma) = x - sigma * eps(x / sqrt(sigma**2 + 1), t(sigma)).

    model(x_in, t, **kw) -> eps, with t a float tensor of shape (B,); sigma_to_t maps sigmas to the exact timesteps
    the schedule feeds the model (a plan's `sigma_to_t`). dtype: the dtype the model runs in (x_in and the tensors
    in kw, e.g. context, are cast to it; the result is always in x's dtype, so the samplers' math stays float32).
    """

    def __init__(self, model: Callable, sigma_to_t: Callable, dtype: torch.dtype | None = None):
        self.model, self.sigma_to_t, self.dtype = model, sigma_to_t, dtype

    def __call__(self, x: torch.Tensor, sigma, **kw) -> torch.Tensor:
        sigma = _per_sample(sigma, x)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        t = self.sigma_to_t(sigma).to(x.device, torch.float32)
        x_in = x / (s**2 + 1) ** 0.5
        dtype = self.dtype or x.dtype
        kw = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kw.items()}
        eps = self.model(x_in.to(dtype), t, **kw)
        return x - s * eps.to(x.dtype)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) as a wrapper: D = D_uncond + scale * (D_cond - D_uncond).

    cond / uncond: text embeddings (B or 1, L, C), handed to the inner denoiser as `context=`. With scale > 1 the
    inner denoiser runs once on a batch of 2B ordered [uncond; cond] (as diffusers batches it); with scale <= 1 it runs
    on cond only (diffusers' `do_classifier_free_guidance` is guidance_scale > 1).
    Guidance in denoised space equals diffusers' guidance in eps space: D is affine in eps with the same x.
    """

    def __init__(self, inner: Callable, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float):
        if scale > 1 and uncond is None:
            raise ValueError(f"guidance scale {scale} > 1 needs an unconditional embedding (uncond)")
        self.inner, self.cond, self.uncond, self.scale = inner, cond, uncond, scale

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        B = x.shape[0]
        cond = _batch(self.cond, B)
        if self.scale <= 1:
            return self.inner(x, sigma, context=cond)
        sigma = _per_sample(sigma, x)
        context = torch.cat([_batch(self.uncond, B), cond])
        d_uncond, d_cond = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), context=context).chunk(2)
        return d_uncond + self.scale * (d_cond - d_uncond)


def _batch(emb: torch.Tensor, B: int) -> torch.Tensor:
    if emb.shape[0] == B:
        return emb
    if emb.shape[0] == 1:
        return emb.expand(B, *emb.shape[1:])
    raise ValueError(f"text embeddings have batch {emb.shape[0]} but the latents have batch {B}")
