"""img2img and inpainting: init images (and a mask) -> what the sampler starts from.

A run with init images goes through these, in order (pipeline.StableDiffusion.generate):
1. `open_inits`: the images opened and checked, the size and strength defaulted from the first one;
2. `prepare`: each init image prepared as A1111 prepares inpainting (masking.prepare), or fitted to the output size;
3. `encode`: the images (and the masked image) encoded into a `Source`;
4. `start`: the sampler's first latents, the eps model (an inpainting U-Net's conditioning appended) and the latents
   an inpainting run keeps (masking.KnownLatents).
txt2img and hires fix's pass come through `start` too: with no Source, or only an inpainting U-Net's conditioning
(`txt2img_source`); with one of the pass's upscaled latents (hires.py).

An inpainting U-Net (9 input channels) reads 5 channels beside the latents: a mask (1 = to be made) and the latents
of the masked image. With a mask they are diffusers' inpainting pipeline's; without one A1111's: the mask all ones,
the masked image black (txt2img, `blank_condition`) or the image faded to gray by A1111's inpainting_mask_weight
(`unmasked_condition`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import ImageOps

from . import images, masking, rng, samplers
from .params import GenerationParams


class Encoded:
    """An exact encoding in the posterior's interface (`mean`, `sample(generators)`), for TAESD."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean


@dataclass
class Source:
    """What a run starts from besides noise. `posterior` (img2img, inpainting) or `latents` (hires fix's pass)."""

    posterior: Any = None  # the init images' encoding: `mean`, `sample(generators)`
    latents: torch.Tensor | None = None  # hires fix: the first pass's latents, upscaled (scaled)
    mask: torch.Tensor | None = None  # inpainting: the binary mask at the latents' size (diffusers')
    masked: Any = None  # inpainting: the masked image's encoding
    repaint: torch.Tensor | None = None  # A1111's samplers: A1111's latent mask (masking.latent_mask)
    fill: int = 1  # A1111's samplers: the masked content (masking.masked_content)
    condition: torch.Tensor | None = None  # an inpainting U-Net's 5 channels where no mask is given


def open_inits(init_image, mask_image, width: int | None, height: int | None, strength: float | None,
               native_size: int, cropped: bool = False):
    """(init images, mask, width, height, strength) as the run uses them: the images opened (init_image: one, or a
    list of them, one for each image of the batch), the size and strength defaulted from the (first) init image
    (img2img) or the model's native size (txt2img). cropped: inpainting works on the mask's box (only masked), so a
    size other than the init image's resizes nothing of it."""
    if mask_image is not None and init_image is None:
        raise ValueError("mask_image needs an init_image to inpaint")
    if init_image is None:
        if strength is not None and strength != 1.0:
            raise ValueError(f"strength {strength} needs an init_image (img2img)")
        return None, None, width or native_size, height or native_size, None
    inits = [images.open_image(im) for im in (init_image if isinstance(init_image, (list, tuple)) else [init_image])]
    if not inits:
        raise ValueError("init_image is an empty list: give one init image, or one for each image of the batch")
    width, height = images.init_size(inits[0].size, width, height, warn=not (cropped and mask_image is not None))
    if mask_image is not None:
        mask_image = images.open_image(mask_image)
        for im in inits:
            images.check_mask_size(mask_image.size, im.size)
    strength = (1.0 if mask_image is not None else 0.75) if strength is None else strength
    return inits, mask_image, width, height, strength


def prepare(params: GenerationParams, inits: list | None, mask, keep_empty_mask: bool):
    """(init images, mask, inpaintings) as the run encodes them: each init image prepared as A1111 prepares
    inpainting (masking.prepare, one Inpainting each) where that is asked: always for A1111's samplers, and for
    diffusers' where one of A1111's inpainting settings is set (mask blur, masked content, only masked); otherwise
    brought to the output size by params.resize_mode (images.fit_init), inpaintings None. A mask that only masked
    finds empty drops out (img2img, as A1111 runs it) unless keep_empty_mask (an inpainting U-Net keeps it). The
    mask is inverted first where params.inpainting_mask_invert asks."""
    if not inits:
        return inits, mask, None
    if mask is not None and params.inpainting_mask_invert:  # (A1111's mask mode "Inpaint not masked")
        mask = ImageOps.invert(mask.convert("L"))
    a1111 = samplers.SAMPLERS[params.sampler].family == "a1111"
    if mask is not None and (a1111 or params.mask_blur_x or params.mask_blur_y or params.inpainting_fill != 1
                             or params.inpaint_full_res):
        prepared = [masking.prepare(im, images.mask_at(mask, im.size).convert("L"), params.width, params.height,
                                    blur_x=params.mask_blur_x, blur_y=params.mask_blur_y,
                                    masked_content=params.inpainting_fill, only_masked=params.inpaint_full_res,
                                    padding=params.inpaint_full_res_padding, resize_mode=params.resize_mode)
                    for im in inits]
        if prepared[0] is not None:
            return [p.image for p in prepared], prepared[0].mask, prepared
        if not keep_empty_mask:
            mask = None
    fitted = [images.fit_init(im.convert("RGB"), mask, (params.width, params.height), params.resize_mode)
              for im in inits]
    return [im for im, _ in fitted], fitted[0][1], None


def encoder(pipe) -> Callable:
    """pixels -> posterior: the VAE's, or with TAESD as the autoencoder TAESD's, whose encoding is exact, not a
    distribution, so the posterior's sample is its mean and draws no noise."""
    if not pipe.taesd_output:
        return functools.partial(pipe.vae.encode, tiled=pipe.vae_tiling)
    if pipe.taesd.encoder is None:
        raise ValueError("this TAESD has no encoder (a decoder file alone): img2img, and an inpainting "
                         "checkpoint's conditioning, need taesd_encoder too")
    sf = pipe.vae.config.scaling_factor
    return lambda x: Encoded(pipe.taesd.encode(x.float()) / sf)


def faded(pixels: torch.Tensor, masked: torch.Tensor, weight: float) -> torch.Tensor:
    """An inpainting U-Net's masked image: `masked` (gray, 0, under the mask) where weight is 1, the image itself
    where 0, in between linearly (A1111's inpainting_mask_weight)."""
    return masked if weight == 1 else pixels if weight == 0 else torch.lerp(pixels, masked, weight)


def encode(pipe, inits: list, mask, params: GenerationParams) -> Source:
    """The init images (one, or one for each image of the batch) and the mask as tensors on the device, encoded
    where the run needs them."""
    width, height = params.width, params.height
    pixels = torch.cat([images.from_pil(im, width, height) for im in inits])
    pixels = pixels.to(pipe.device, pipe.vae.post_quant_conv.weight.dtype)
    encode_pixels = encoder(pipe)
    source = Source(posterior=encode_pixels(pixels))
    if mask is not None:
        m = images.mask_from_pil(mask, width, height).to(pixels)
        f = pipe.downscale
        source.mask = torch.nn.functional.interpolate(m, size=(height // f, width // f)).float()
        source.masked = encode_pixels(faded(pixels, pixels * (m < 0.5), params.inpainting_mask_weight))
        if samplers.SAMPLERS[params.sampler].family == "a1111":  # A1111's mask for the latents, and its fill
            source.repaint = masking.latent_mask(mask, width // f, height // f).to(pipe.device)
            source.fill = params.inpainting_fill
    elif pipe.inpainting_unet:
        source.condition = unmasked_condition(pipe, pixels, params.inpainting_mask_weight)
    return source


def unmasked_condition(pipe, pixels: torch.Tensor, weight: float) -> torch.Tensor:
    """An inpainting U-Net's extra input channels where no mask is given (img2img, hires fix's pass): a mask of
    ones (everything is to be made) and the latents of `pixels` (B, 3, H, W) in [-1, 1] faded to gray by `weight`
    (A1111's inpainting_mask_weight: the whole image is masked), the encoding's mean (A1111 draws a sample from an
    unseeded generator; the mean keeps each seed's noise as it is without the conditioning)."""
    pixels = faded(pixels, torch.zeros_like(pixels), weight)
    latents = encoder(pipe)(pixels.to(pipe.device, pipe.vae.post_quant_conv.weight.dtype)).mean.float()
    latents = latents * pipe.vae.config.scaling_factor
    return torch.cat([torch.ones_like(latents[:, :1]), latents], dim=1)


def blank_condition(pipe, width: int, height: int) -> torch.Tensor:
    """An inpainting U-Net's extra input channels where nothing is known, as A1111's txt2img makes them: the mask
    all ones and the masked image black. The last one made is kept (pipe.blank_kept) for calls of the same size,
    autoencoder, weights, tiling and padding: it is the same encoding, which costs a VAE encode of the image size."""
    model = pipe.taesd if pipe.taesd_output else pipe.vae
    weight = next(model.parameters())
    key = (width, height, id(model), weight.data_ptr(), weight._version, weight.dtype, str(weight.device),
           pipe.vae_tiling, tuple(m.padding_mode for m in model.modules() if isinstance(m, torch.nn.Conv2d)))
    if pipe.blank_kept is None or pipe.blank_kept[0] != key:
        pipe.blank_kept = key, unmasked_condition(pipe, torch.full((1, 3, height, width), -1.0), weight=0.0)
    return pipe.blank_kept[1]


def txt2img_source(pipe, params: GenerationParams) -> Source | None:
    """txt2img's source: None, or for an inpainting U-Net its conditioning (blank_condition)."""
    return Source(condition=blank_condition(pipe, params.width, params.height)) if pipe.inpainting_unet else None


def conditioned(eps, extra: torch.Tensor):
    """An inpainting U-Net's eps model over 4-channel latents: `extra` (its mask and masked-image channels, one for
    each image, or one for all) appended to every input (the guided batch holds the images k times)."""

    def model(x_in, t, context, **kw):
        cond = extra.expand(x_in.shape[0], -1, -1, -1) if extra.shape[0] == 1 else \
            torch.cat([extra] * (x_in.shape[0] // extra.shape[0]))
        return eps(torch.cat([x_in, cond.to(x_in)], dim=1), t, context, **kw)

    return model


def start(pipe, plan: samplers.SamplingPlan, noise_rng: rng.ImageRNG, source: Source | None, strength: float,
          eps: Callable, noise_multiplier: float = 1.0, extra_noise: float = 0.0):
    """(initial latents x in sigma space, the eps model, the inpainting's masking.KnownLatents or None) for a run
    from `source` (None: txt2img) over the U-Net's `eps`.

    Each image's generator is drawn in diffusers' order: init-image posterior sample, noise, masked-image posterior
    sample (each only where that pipeline draws it). img2img's start noise is scaled by noise_multiplier (A1111's
    initial noise multiplier). A1111's samplers take the posteriors' means and draw only the noise: A1111 samples
    the posteriors from torch's global generator (seeded by nothing of the image's), and its noise is each seed's
    first draw, which a sample drawn first would displace."""
    model = eps if source is None or source.condition is None else conditioned(eps, source.condition)
    if source is None or source.posterior is None and source.latents is None:  # txt2img
        return noise_rng.next() * plan.init_noise_scale, model, None
    sf = pipe.vae.config.scaling_factor
    inpaint = source.mask is not None
    # diffusers' inpainting starts from pure noise at full strength; A1111 noises the init latents at any strength
    pure_noise = inpaint and strength == 1 and plan.sampler.family == "diffusers"
    encoded = (lambda p: p.mean) if plan.sampler.family == "a1111" else (lambda p: p.sample(noise_rng.generators))
    x0 = source.latents
    if x0 is None and not (pipe.inpainting_unet and pure_noise):
        x0 = encoded(source.posterior).float() * sf
    noise = noise_rng.next()
    if source.repaint is not None:  # A1111's masked content: latent noise, latent nothing
        x0 = masking.masked_content(x0, source.repaint, source.fill, noise_rng)
    if pure_noise:
        x = noise * plan.init_noise_scale
    else:
        x = plan.noised(x0, noise if source.latents is not None else noise * noise_multiplier, extra_noise)
    if not inpaint:
        return x, model, None
    mask = source.mask.expand(len(noise), -1, -1, -1)
    masked = (encoded(source.masked).float() * sf).expand(len(noise), -1, -1, -1)  # (a mean: one for all)
    if pipe.inpainting_unet:
        model = conditioned(eps, torch.cat([mask, masked], dim=1))
    if source.repaint is None:  # diffusers: the known latents, noised, put back after every step
        return x, model, None if pipe.inpainting_unet else masking.KnownLatents(x0, mask, noise)
    known = masking.KnownLatents(x0, source.repaint.expand_as(x0), denoised=not plan.sampler.timestep_space)
    return x, (model if known.denoised else known.model_input(model)), known
