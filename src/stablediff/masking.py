"""Inpainting: what is repainted and what is kept. In pixels, AUTOMATIC1111's preparation: the mask blurred, the
masked area filled, the work cropped to the mask ("Only masked"), and the init image laid back over the result. In
latents (`KnownLatents`, end of the file), the init latents kept outside the mask while sampling, diffusers' way or
A1111's. The pipeline runs A1111's for A1111's samplers (samplers.py, family "a1111"), whose results are A1111's.

A1111 prepares an inpainting run from the init image and the mask like this (`prepare`):
1. The mask is blurred by a Gaussian of standard deviation `mask_blur` pixels across, then down (OpenCV's
   GaussianBlur of the 8-bit mask, kernel 2 * int(2.5 * sigma + 0.5) + 1 wide: `blur`, equal to OpenCV's own
   fixed-point arithmetic to the last bit).
2. Whole picture: the blurred mask and the init image are brought to the output size by the resize mode
   (images.resize_init); the init image is kept where the mask, doubled, is below white (`overlay`).
   Only masked: the mask's bounding box, grown by `padding` pixels and then to the output's aspect ratio
   (`crop_region`), is cut out of both and brought to the output size by resize mode 2 (resize and fill); the init
   image is kept where the blurred mask is below white, at the init image's own size.
3. Masked content "fill" (and "latent noise", "latent nothing", which then replace its latents) paints the masked
   area with the colours around it, blurred (`fill`); "original" leaves the init image as it is.
After decoding, the result (Only masked: resized by crop and resize to the box and pasted into it) gets the kept
init image composited over it (`apply_overlay`): outside the blurred mask the output is the init image itself.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from . import images, rng
# the fill: the masked-out image blurred by each radius, laid over the result that many times, in this order
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def blur_kernel(sigma: int) -> np.ndarray:
    """OpenCV's 8-bit Gaussian kernel for `sigma` and A1111's size: int64 taps in 1/256ths that sum to 256 exactly.
    The taps are exp(-d^2 / (2 sigma^2)) normalised, quantised outward from the first one with the rounding error
    carried on to the next (error diffusion); the centre tap takes what is left."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    half = size // 2
    # (OpenCV's own arithmetic: distances in half pixels x = 2d, exp(x^2 * -1/8 sigma^2); the centre's weight is 1)
    scale = -0.125 / (sigma * sigma)
    side = [np.exp(float(x * x) * scale) for x in range(1 - size, -1, 2)]
    total = 2 * sum(side) + 1.0
    weights = [w / total for w in side]
    taps, carry = np.zeros(size, dtype=np.int64), 0.0
    for i in range(half):
        exact = weights[i] * 256 + carry
        taps[i] = taps[size - 1 - i] = int(np.rint(exact))
        carry = exact - taps[i]
    taps[half] = 256 - 2 * taps[:half].sum()
    return taps


def _reflect101(index: np.ndarray, length: int) -> np.ndarray:
    """OpenCV's default border: indices past an edge mirror without repeating the edge (...2 1 | 0 1 2 ... n-1 |
    n-2 ...), again and again for a kernel wider than the image."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.abs(index) % period
    return np.where(index >= length, period - index, index)


BLUR_ROWS = 256  # rows blurred at once (the convolution pads its one channel to a block of 16: 16x their floats)


def _blur_rows(a: np.ndarray, sigma: int) -> np.ndarray:
    """Each row of the uint8 array blurred by blur_kernel(sigma): sum(taps x pixels) / 256, rounded half up. The
    sums are whole numbers below 2^16, so float32 products and sums are exact in any order: a convolution computes
    them (the taps are symmetric, so correlation is convolution), BLUR_ROWS rows at a time."""
    taps = torch.from_numpy(blur_kernel(sigma)).float()[None, None]
    half = taps.shape[-1] // 2
    columns = torch.from_numpy(_reflect101(np.arange(-half, a.shape[1] + half), a.shape[1]))
    out = np.empty_like(a)
    for top in range(0, a.shape[0], BLUR_ROWS):
        rows = torch.from_numpy(a[top:top + BLUR_ROWS].astype(np.float32)).index_select(1, columns)[:, None]
        total = torch.nn.functional.conv1d(rows, taps)[:, 0].round()  # (round: whatever way it sums)
        out[top:top + BLUR_ROWS] = ((total + 128) / 256).floor().to(torch.uint8).numpy()
    return out


def blur(mask: Image.Image, x: int, y: int) -> Image.Image:
    """A1111's mask blur: the mode-L mask blurred across by sigma `x`, the result (rounded to 8 bits) down by
    sigma `y`; 0 skips a direction."""
    a = np.asarray(mask.convert("L"))
    if x > 0:
        a = _blur_rows(a, x)
    if y > 0:
        a = _blur_rows(a.T, y).T
    return Image.fromarray(np.ascontiguousarray(a))


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """A1111's "Only masked" box (left, top, right, bottom) in the mask's pixels: the bounding box of its non-zero
    pixels grown by `padding` on every side (within the mask), then grown along one axis to the aspect ratio of the
    width x height output, centred on the box and shifted back inside the image where it ran over (and cut at its
    edge where it cannot fit). None for a mask with no pixel set."""
    box = mask.getbbox()
    if box is None:
        return None
    mw, mh = mask.size
    x1, y1, x2, y2 = box
    if padding:
        x1, y1, x2, y2 = max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mw), min(y2 + padding, mh)
    aspect = width / height
    if (x2 - x1) / (y2 - y1) > aspect:
        y1, y2 = _grow(y1, y2, (x2 - x1) / aspect, mh)
    else:
        x1, x2 = _grow(x1, x2, (y2 - y1) * aspect, mw)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, length: float, limit: int) -> tuple[int, int]:
    """[lo, hi) grown to `length` (its fraction dropped) around its middle, the odd pixel after it; moved back
    inside [0, limit) where it runs over an end; cut at `limit` where it is longer than that."""
    extra = int(length - (hi - lo))
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def _kept(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image where the mask is black, fading out where it is gray, transparent where it is white: premultiplied
    (RGBa), as A1111 pastes it."""
    out = Image.new("RGBa", image.size)
    out.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return out


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the area under the mask painted with the colours around it. The image outside the mask is
    blurred by radius 256, 64, 16, 4, 2 and 0 (FILL_LAYERS), each blur laid over the last (alpha compositing, the
    sharper ones repeated), so the masked area takes the nearest colours and the rest stays the image."""
    kept = _kept(image, mask)
    out = Image.new("RGBA", image.size)
    for radius, times in FILL_LAYERS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


@dataclass(frozen=True)
class Inpainting:
    """What `prepare` makes of an init image and mask: the image to encode and the mask the latents follow (both
    width x height), and what `apply_overlay` needs to put the result back: the init image as kept over the
    result, and the box the result goes into (Only masked; None for the whole picture)."""

    image: Image.Image  # RGB, width x height: encoded as the init latents (filled where masked content is not original)
    mask: Image.Image  # L, width x height: the blurred mask, white = repaint
    overlay: Image.Image  # RGBA, the output's size: the init image where kept, transparent where repainted
    paste_to: tuple[int, int, int, int] | None = None  # (left, top, width, height) in the init image's pixels


def prepare(init: Image.Image, mask: Image.Image, width: int, height: int, *, blur_x: int = 0, blur_y: int = 0,
            masked_content: int = 1, only_masked: bool = False, padding: int = 0,
            resize_mode: int = 0) -> Inpainting | None:
    """An RGB init image and its mode-L mask (the init image's size; white = repaint) prepared as A1111 prepares
    an inpainting run for a width x height output (see the module's text). None where Only masked finds no pixel
    of the mask set: A1111 then runs plain img2img (with a warning here)."""
    init = init.convert("RGB")
    mask = blur(mask, blur_x, blur_y)
    paste_to = None
    if only_masked:
        box = crop_region(mask, padding, width, height)
        if box is None:
            warnings.warn("the mask is empty: Only masked has nothing to crop to, so this runs as img2img",
                          stacklevel=3)
            return None
        x1, y1, x2, y2 = box
        overlay = _kept(init, mask).convert("RGBA")
        image = images.resize_init(init.crop(box), width, height, 2)
        mask = images.resize_init(mask.crop(box), width, height, 2)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
    else:
        image = images.resize_init(init, width, height, resize_mode)
        mask = images.resize_init(mask, width, height, resize_mode)
        doubled = np.clip(np.asarray(mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
        overlay = _kept(image, Image.fromarray(doubled)).convert("RGBA")
    if masked_content != 1:
        image = fill(image, mask)
    return Inpainting(image, mask, overlay, paste_to)


def apply_overlay(image: Image.Image, inpainting: Inpainting) -> Image.Image:
    """A decoded result put back as A1111 does: Only masked, resized (crop and resize) to the box and pasted into a
    transparent image of the init image's size; then the kept init image composited over it."""
    if inpainting.paste_to is not None:
        x, y, w, h = inpainting.paste_to
        base = Image.new("RGBA", inpainting.overlay.size)
        base.paste(images.resize_init(image, w, h, 1), (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(inpainting.overlay)
    return image.convert("RGB")


def latent_mask(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """The mask the latents follow, (1, 1, height, width) float32 of 0/1 (1 = repaint): the mask resized bicubic
    to the latent size and rounded (half to even), as A1111 makes it."""
    small = mask.convert("L").resize((width, height), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.around(np.asarray(small).astype(np.float32) / 255)[None, None].copy())


# -- the latents ------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class KnownLatents:
    """Inpainting's init latents, kept outside the mask (`repaint` 1 = repaint, at the latents' size).

    diffusers' way (`noise`, the run's own): after every step x outside the mask becomes the init latents noised to
    the next sigma (`after_step`), and the result the init latents themselves (`final`).
    A1111's way: every prediction of the denoised image is the init latents outside the mask (`wrap`; its
    k-diffusion samplers, `denoised`), or, for its DDIM, PLMS and UniPC, the model's input is
    (`model_input`: the clean init latents blended into the VP latent, as A1111's timestep samplers do); then the
    result is blended as in diffusers' way."""

    latents: torch.Tensor
    repaint: torch.Tensor
    noise: torch.Tensor | None = None
    denoised: bool = False

    def after_step(self, x: torch.Tensor, sigma_next: float) -> torch.Tensor:
        known = self.latents + self.noise * sigma_next
        return (1 - self.repaint) * known + self.repaint * x

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.repaint) * self.latents + self.repaint * x

    def wrap(self, denoiser: Callable) -> Callable:
        if not self.denoised:
            return denoiser
        return lambda x, sigma, **kw: self.final(denoiser(x, sigma, **kw))

    def model_input(self, model: Callable) -> Callable:
        def blended(x_in, t, context, **kw):
            repeats = x_in.shape[0] // self.latents.shape[0]
            latents, repaint = (torch.cat([v] * repeats) if repeats > 1 else v for v in (self.latents, self.repaint))
            return model((1 - repaint.to(x_in)) * latents.to(x_in) + repaint.to(x_in) * x_in, t, context, **kw)
        return blended


def masked_content(x0: torch.Tensor, repaint: torch.Tensor, fill: int, noise: rng.ImageRNG) -> torch.Tensor:
    """A1111's init latents for masked content 2 (latent noise: under the mask, each image's seed's first noise,
    drawn afresh: no variation seed, no ENSD) and 3 (latent nothing: zeros there); x0 as it is for the others."""
    if fill == 2:
        fresh = torch.stack([rng.draw(rng.create_generator(noise.source, s, noise.device), noise.shape, noise.device)
                             for s in noise.seeds]).to(x0)
        return x0 * (1 - repaint) + fresh * repaint
    if fill == 3:
        return x0 * (1 - repaint)
    return x0
