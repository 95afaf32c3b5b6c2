"""Denoisers D(x, sigma) for the samplers: an eps-prediction model wrapped into sigma space, and classifier-free
guidance as a wrapper around that (with A1111's prompt editing and AND composition: ScheduledCFGDenoiser).

In sigma space a latent at noise level sigma is x = x0 + sigma * eps. The U-Net was trained on the variance-preserving
latent x / sqrt(sigma**2 + 1) at timestep t(sigma) and predicts eps, so D(x, sigma) = x - sigma * eps
(Karras et al. 2022, table 1, "VP" column; k-diffusion's `DiscreteEpsDDPMDenoiser`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .prompt_schedule import piece_at


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


Schedule = Sequence[tuple[int, torch.Tensor]]  # (end_step, text embedding) pieces, end steps ascending


class ScheduledCFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) with AUTOMATIC1111's prompt editing and composition:
    D = D_uncond + sum_i weight_i * scale * (D_cond_i - D_uncond)  (composable diffusion, Liu et al. 2022; A1111's
    `combine_denoised`, which adds the terms in sub-prompt order).

    conds: one (weight, schedule) per AND sub-prompt (prompt_schedule.composable_schedules, each piece's text
    encoded); uncond: the negative prompt's schedule. Embeddings are (B or 1, L, C), of any lengths L (75-token
    chunks). As A1111 (v1.10, its defaults) runs them: the sub-prompts' embeddings at a call are brought to one
    length by repeating their last vector (its stack_conds); where the negative prompt's length differs from that,
    the unconditional rows run in a U-Net call of their own (the inner model is told which rows are unconditional,
    `uncond_rows`, there and where they are left out: see min_uncond), unless `pad` (the empty prompt's embedding,
    A1111's "pad prompt/negative prompt" option) is given, which continues the shorter with it and runs one batch
    (`happened` then holds "Pad conds").

    Which piece: the denoiser counts its calls from 0, and call k uses the first piece whose end_step >= k
    (prompt_schedule.piece_at), as A1111 does. A1111 builds its schedules over twice the steps for the samplers that
    call the denoiser twice a step (its second_order ones), so a caller does the same and `when` counts calls.
    `step` is the number of calls so far; a new run needs a new denoiser (or step = 0).

    Guided (scale > 1, or more than one sub-prompt, or a weight other than 1): the inner denoiser runs once on a
    batch of (K + 1) B ordered [uncond; cond_1; ...; cond_K] (twice, [cond_1; ...] and [uncond], where their
    lengths differ). Otherwise it runs on cond only (diffusers' `do_classifier_free_guidance` is guidance_scale >
    1). A sampler that steps with the unconditional prediction
    itself (DDIM CFG++) calls `with_uncond` instead, which returns it besides the guided one: the wrapper stays the
    only place guidance is computed, and the sampler asks for what it needs explicitly, per call.

    min_uncond: A1111's "negative guidance minimum sigma" (NGMS, its s_min_uncond; 0: off), a speed-up: on every
    other call (every call with `min_uncond_all`) whose noise level is below it the unconditional half is not run,
    and D is the conditional one (combined at scale 1 with AND sub-prompts, the first standing in for the
    unconditional, as A1111's CFGDenoiser). `level(sigma)` is what is compared: the sigma itself, or the timestep
    for A1111's timestep samplers (DDIM, PLMS, UniPC), which hand its CFGDenoiser timesteps. skip_early: A1111's
    "ignore negative prompt during early sampling" (its skip_early_cond; 0: off): calls k with k / total_calls <=
    skip_early leave the unconditional half out the same way (total_calls: A1111's total steps, the steps run times
    2 for its second-order samplers).
    """

    def __init__(self, inner: Callable, conds: Sequence[tuple[float, Schedule]], uncond: Schedule | None,
                 scale: float, *, min_uncond: float = 0.0, min_uncond_all: bool = False,
                 level: Callable | None = None, skip_early: float = 0.0, total_calls: int = 1,
                 pad: torch.Tensor | None = None):
        if not conds:
            raise ValueError("no conditioning: conds must hold at least one (weight, schedule)")
        schedules = [s for _, s in conds] + ([uncond] if uncond is not None else [])
        for schedule in schedules:
            _check_schedule(schedule)
        widths = {emb.shape[-1] for schedule in schedules for _, emb in schedule}
        if len(widths) > 1:
            raise ValueError(f"text embeddings differ in width {sorted(widths)}: they come from different encoders")
        self.guided = scale > 1 or len(conds) > 1 or float(conds[0][0]) != 1
        if self.guided and uncond is None:
            raise ValueError(f"guidance scale {scale} > 1 needs an unconditional embedding (uncond)" if scale > 1 else
                             f"{len(conds)} sub-prompts with weights {[w for w, _ in conds]} need an unconditional "
                             "embedding (uncond)")
        self.inner, self.scale, self.step = inner, scale, 0
        self.weights = [float(w) for w, _ in conds]
        self.conds = [_split(s) for _, s in conds]
        self.uncond = _split(uncond) if uncond is not None else None
        self.min_uncond, self.min_uncond_all, self.level = min_uncond, min_uncond_all, level or (lambda s: s)
        self.skip_early, self.total_calls = skip_early, total_calls
        self.pad = pad
        self.happened: set[str] = set()  # A1111's infotext keys of what this run did: "NGMS", "Pad conds"

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        step, self.step = self.step, self.step + 1
        if not self.guided:
            return self.inner(x, sigma, context=_batch(_at(self.conds[0], step), x.shape[0]))
        return self._guide(x, sigma, step, self.scale)[0]

    def with_uncond(self, x: torch.Tensor, sigma, scale_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided D, unconditional D) for samplers that step with the unconditional prediction apart (CFG++,
        Chung et al. 2024): the guided one with the scale times `scale_factor`. It counts as one call, and runs the
        unconditional batch whatever the scale, as A1111 does for them (it needs uncond)."""
        if self.uncond is None:
            raise ValueError("this sampler needs the unconditional prediction: give an unconditional embedding "
                             "(uncond)")
        step, self.step = self.step, self.step + 1
        return self._guide(x, sigma, step, self.scale * scale_factor)

    def skips_uncond(self, step: int, sigma) -> bool:
        """Whether call `step` at noise level `sigma` leaves the unconditional half out (`skip_early`,
        `min_uncond`)."""
        if self.skip_early and step / self.total_calls <= self.skip_early:
            return True
        if not self.min_uncond or not (step % 2 or self.min_uncond_all):
            return False
        level = torch.as_tensor(self.level(torch.as_tensor(sigma))).reshape(-1)[0].float()
        if level < torch.tensor(self.min_uncond, dtype=torch.float32):  # in float32, as A1111 compares
            self.happened.add("NGMS")
            return True
        return False

    def _guide(self, x: torch.Tensor, sigma, step: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        conds = _same_length([_batch(_at(schedule, step), B) for schedule in self.conds])
        if self.skips_uncond(step, sigma):
            n = len(conds)
            d_conds = self.inner(torch.cat([x] * n), torch.cat([_per_sample(sigma, x)] * n),
                                 context=torch.cat(conds), uncond_rows=0).chunk(n)
            denoised = d_conds[0]  # the first sub-prompt's stands in for the unconditional, guided at scale 1
            for weight, d_cond in zip(self.weights, d_conds):
                denoised = denoised + weight * (d_cond - d_conds[0])
            return denoised, d_conds[0]
        sigma = _per_sample(sigma, x)
        n = len(conds) + 1
        uncond = _batch(_at(self.uncond, step), B)
        if uncond.shape[1] != conds[0].shape[1] and self.pad is not None:
            uncond, conds = _pad_pair(uncond, conds, self.pad)
            self.happened.add("Pad conds")
        if uncond.shape[1] == conds[0].shape[1]:
            context = torch.cat([uncond, *conds])
            d_uncond, *d_conds = self.inner(torch.cat([x] * n), torch.cat([sigma] * n), context=context).chunk(n)
        else:  # A1111: the conditional rows, then the unconditional ones, each at its own length
            d_conds = self.inner(torch.cat([x] * (n - 1)), torch.cat([sigma] * (n - 1)), context=torch.cat(conds),
                                 uncond_rows=0).chunk(n - 1)
            d_uncond = self.inner(x, sigma, context=uncond, uncond_rows=B)
        denoised = d_uncond
        for weight, d_cond in zip(self.weights, d_conds):
            denoised = denoised + (weight * scale) * (d_cond - d_uncond)
        return denoised, d_uncond


class CFGDenoiser(ScheduledCFGDenoiser):
    """Plain classifier-free guidance: D = D_uncond + scale * (D_cond - D_uncond), one prompt and one negative
    without editing. cond / uncond: text embeddings (B or 1, L, C). Guidance in denoised space equals diffusers'
    guidance in eps space: D is affine in eps with the same x."""

    def __init__(self, inner: Callable, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float):
        super().__init__(inner, [(1.0, [(1, cond)])], None if uncond is None else [(1, uncond)], scale)


def _same_length(embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sub-prompts' embeddings at one length, the shorter continued with their own last vector (A1111's
    stack_conds)."""
    length = max(e.shape[1] for e in embeddings)
    return [e if e.shape[1] == length else torch.cat([e, e[:, -1:].expand(-1, length - e.shape[1], -1)], dim=1)
            for e in embeddings]


def _pad_pair(uncond: torch.Tensor, conds: list[torch.Tensor], empty: torch.Tensor):
    """A1111's pad_cond_uncond: the shorter of uncond and the conds continued with the empty prompt's embedding
    (one chunk, repeated) to the other's length."""
    chunks = (conds[0].shape[1] - uncond.shape[1]) // empty.shape[1]
    more = lambda e, k: torch.cat([e, empty.to(e).expand(e.shape[0], -1, -1).repeat(1, k, 1)], dim=1)
    if chunks > 0:
        return more(uncond, chunks), conds
    return uncond, [more(c, -chunks) for c in conds]


def _check_schedule(schedule: Schedule) -> None:
    ends = [end for end, _ in schedule]
    if not ends or any(not isinstance(e, int) or isinstance(e, bool) for e in ends) or ends != sorted(set(ends)):
        raise ValueError(f"a conditioning schedule needs (end_step, embedding) pieces with whole, rising end steps; "
                         f"got end steps {ends}")


def _split(schedule: Schedule) -> tuple[list[int], list[torch.Tensor]]:
    return [end for end, _ in schedule], [emb for _, emb in schedule]


def _at(schedule: tuple[list[int], list[torch.Tensor]], step: int) -> torch.Tensor:
    ends, embeddings = schedule
    return embeddings[piece_at(ends, step)]


def _batch(emb: torch.Tensor, B: int) -> torch.Tensor:
    if emb.shape[0] == B:
        return emb
    if emb.shape[0] == 1:
        return emb.expand(B, *emb.shape[1:])
    raise ValueError(f"text embeddings have batch {emb.shape[0]} but the latents have batch {B}")
