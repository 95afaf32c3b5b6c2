"""Hires fix, as AUTOMATIC1111 v1.10 runs it: a txt2img first pass at the asked size, its result upscaled, then an
img2img pass over the upscaled image (processing.py, StableDiffusionProcessingTxt2Img).

The settings are GenerationParams' hires fields, named as A1111's API names them (enable_hr, hr_scale, ...). The
second pass's denoising strength is GenerationParams.strength: A1111 takes it from the request's one
`denoising_strength` (its infotext's "Denoising strength"), which img2img uses for its own strength; hires fix is a
txt2img setting, so the two never meet. Left out it is A1111's 0.75 (DEFAULT_STRENGTH). A1111 v1.10 has no
separate hires CFG scale (hr_cfg is Forge's), so the second pass guides with cfg_scale as A1111 does.

The target size (`target_size`, A1111's calculate_target_resolution): hr_scale times the first pass's size, or
hr_resize_x / hr_resize_y: one of them keeps the aspect ratio; both cover the box with the aspect ratio kept and
crop the latents' overflow evenly (the image ends up within 8 pixels of the box).

Upscaling: a latent mode (LATENT_MODES, A1111's shared.latent_upscale_modes) interpolates the first pass's latents
with torch's mode and antialias; another upscaler (Lanczos, Nearest, or an ESRGAN-family model file or name in the
upscaler folder: upscalers.py) decodes them, upscales the pictures as A1111's resize_image does, and encodes them
again. A1111 takes a sample of the encoder's posterior drawn from torch's global generator; here it is the mean,
so that the image's own generators are not drawn from, and a target size that is not a multiple of the VAE's
factor is rounded down to one before encoding (A1111's VAE floors it inside its convolutions).

The second pass draws its noise from a fresh rng.ImageRNG with the first pass's seeds, as A1111 does, and runs
hr_second_pass_steps (0: steps) steps of hr_sampler (None: the first pass's) at the strength: A1111's samplers with
A1111's rule for a pass whose step count is given (img2img_fix_steps: a schedule of int(steps / strength) steps of
which the last `steps` run), diffusers' samplers with diffusers' img2img rule (int(steps * strength) of `steps`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from . import a1111, images, img2img, samplers, upscalers

if TYPE_CHECKING:
    from .params import GenerationParams

DEFAULT_UPSCALER = "Latent"
DEFAULT_STRENGTH = 0.75  # A1111's denoising_strength default for txt2img (its UI shows 0.7)
LATENT_MODES = {  # A1111's latent upscale modes: name -> (torch interpolate mode, antialias)
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
USE_SAME = ("use same", "use same sampler", "use same scheduler")  # A1111's hr_sampler_name / hr_scheduler labels
MAX_SCALE = upscalers.MAX_SCALE


class TargetSize(NamedTuple):
    """A1111's hr_upscale_to_x/_y (what the first pass is upscaled to) and truncate_x/_y (latent columns/rows
    cropped off after upscaling, half on each side)."""

    upscale_to: tuple[int, int]
    truncate: tuple[int, int]

    def latent_size(self, f: int = 8) -> tuple[int, int]:
        """(width, height) of the second pass's latents."""
        return self.upscale_to[0] // f - self.truncate[0], self.upscale_to[1] // f - self.truncate[1]

    def image_size(self, f: int = 8) -> tuple[int, int]:
        """(width, height) of the final image."""
        w, h = self.latent_size(f)
        return w * f, h * f


def use_same(value) -> bool:
    """A1111's "Use same ..." choice (or nothing) for the hires sampler or schedule."""
    return value is None or str(value).strip().lower() in USE_SAME


def target_size(width: int, height: int, scale: float, resize_x: int = 0, resize_y: int = 0,
                f: int = 8) -> TargetSize:
    """A1111's calculate_target_resolution for a first pass of width x height."""
    if not resize_x and not resize_y:
        return TargetSize((int(width * scale), int(height * scale)), (0, 0))
    if not resize_y:
        return TargetSize((resize_x, resize_x * height // width), (0, 0))
    if not resize_x:
        return TargetSize((resize_y * width // height, resize_y), (0, 0))
    if width / height < resize_x / resize_y:  # wider box: fit the width, crop the height
        to = (resize_x, resize_x * height // width)
    else:
        to = (resize_y * width // height, resize_y)
    return TargetSize(to, ((to[0] - resize_x) // f, (to[1] - resize_y) // f))


def steps(params: GenerationParams) -> int:
    """The second pass's requested steps: hr_second_pass_steps, 0 meaning the first pass's."""
    return params.hr_second_pass_steps or params.steps


def plan(params: GenerationParams, noise_schedule) -> samplers.SamplingPlan:
    """The second pass's sampling plan (see the module's docstring for the step rules). params: validated."""
    name = params.hr_sampler or params.sampler
    schedule = params.schedule if params.hr_schedule is None else params.hr_schedule
    schedule = None if schedule == "automatic" else schedule
    strength, wanted = params.strength, steps(params)
    if samplers.get_sampler(name)[0].family != "a1111":
        return samplers.prepare(name, noise_schedule, wanted, schedule=schedule, strength=strength)
    total = int(wanted / min(strength, 0.999))
    # prepare() keeps t_enc = int(min(s, 0.999) * total) steps past the first of `total` (A1111's other rule);
    # this s makes t_enc = wanted - 1, so the last `wanted` steps run, as with A1111's fixed steps
    return samplers.prepare(name, noise_schedule, total, schedule=schedule, strength=(wanted - 0.5) / total)


def check(params: GenerationParams) -> dict:
    """The hires fields of params (enable_hr set) checked (ValueError naming the value) and made canonical: the
    sampler by its canonical name, None where it is the first pass's; the schedule by name; a prompt equal to
    the first pass's empty; strength defaulted. Returns the changed fields."""
    scale, rx, ry = params.hr_scale, params.hr_resize_x, params.hr_resize_y
    if not _is_number(scale) or not 1 <= scale <= MAX_SCALE:
        raise ValueError(f"hires scale {scale!r} is outside 1..{MAX_SCALE}")
    for name, v in (("hires resize x", rx), ("hires resize y", ry)):
        if not _is_int(v) or v and not 64 <= v <= 4096:
            raise ValueError(f"{name} {v!r} is not 0 (unset) or in 64..4096")
    if not _is_int(params.hr_second_pass_steps) or not 0 <= params.hr_second_pass_steps <= 1000:
        raise ValueError(f"hires steps {params.hr_second_pass_steps!r} is outside 0..1000 (0: the same as steps)")
    if not isinstance(params.hr_upscaler, str) or not params.hr_upscaler.strip():
        raise ValueError(f"hires upscaler {params.hr_upscaler!r} is not a name")
    for name in ("hr_prompt", "hr_negative_prompt"):
        if not isinstance(getattr(params, name), str):
            raise ValueError(f"{name.replace('_', ' ')} {getattr(params, name)!r} is not text")
    sampler, named = (None, None) if use_same(params.hr_sampler) else samplers.get_sampler(params.hr_sampler)
    schedule = None if use_same(params.hr_schedule) else a1111.schedule_name(params.hr_schedule) or "automatic"
    schedule = named or schedule
    spec = sampler or samplers.get_sampler(params.sampler)[0]
    if spec.timestep_space:
        schedule = None
    elif schedule == "automatic" and spec.family == "a1111":
        schedule = spec.default_schedule or "uniform"
    return dict(hr_sampler=None if sampler is None or sampler.name == params.sampler else sampler.name,
                hr_schedule=schedule, hr_upscaler=params.hr_upscaler.strip(),
                strength=DEFAULT_STRENGTH if params.strength is None else params.strength,
                hr_prompt="" if params.hr_prompt == params.prompt else params.hr_prompt,
                hr_negative_prompt="" if params.hr_negative_prompt == params.negative_prompt
                else params.hr_negative_prompt)


def check_size(params: GenerationParams, width: int, height: int) -> tuple[int, int]:
    """The final image's size for a first pass of width x height (an SD 1.x VAE's factor 8: checked before a model
    is loaded); ValueError when outside 64..4096."""
    w, h = target_size(width, height, params.hr_scale, params.hr_resize_x, params.hr_resize_y).image_size()
    if not (64 <= w <= 4096 and 64 <= h <= 4096):
        raise ValueError(f"hires size {w}x{h} (from {width}x{height}) is outside 64..4096")
    return w, h


def infotext_fields(params: GenerationParams) -> dict:
    """A1111's hires infotext keys, in its order, for params with enable_hr (canonical)."""
    resize = params.hr_resize_x or params.hr_resize_y
    sampler = params.hr_sampler and samplers.SAMPLERS[params.hr_sampler].label
    return {"Hires sampler": sampler,
            "Hires schedule type": params.hr_schedule and a1111.SCHEDULES[params.hr_schedule],
            "Hires prompt": params.hr_prompt or None, "Hires negative prompt": params.hr_negative_prompt or None,
            "Hires upscale": None if resize else _number(params.hr_scale),
            "Hires resize": f"{params.hr_resize_x}x{params.hr_resize_y}" if resize else None,
            "Hires steps": params.hr_second_pass_steps or None, "Hires upscaler": upscaler_label(params.hr_upscaler)}


def upscaler_label(name: str) -> str:
    """How the infotext names an upscaler: a model file by its name (stem), never its path."""
    path = Path(name)
    return path.stem if path.suffix.lower() in upscalers.MODEL_SUFFIXES else name


def load_upscaler(name: str, folder: Path | None = None):
    """What hr_upscaler names: None for a latent mode, a RESAMPLERS name, or a loaded model (a model file, or a name
    in `folder` as upscalers.find_models lists them). ValueError naming the choices otherwise."""
    if name in LATENT_MODES:
        return None
    if name in upscalers.RESAMPLERS:
        return name
    path = Path(name)
    models = upscalers.find_models(folder) if folder is not None and Path(folder).is_dir() else {}
    if not (path.suffix.lower() in upscalers.MODEL_SUFFIXES and path.is_file()):
        if name not in models:
            raise ValueError(f"hires upscaler {name!r} is not one of: "
                             f"{', '.join([*LATENT_MODES, *upscalers.RESAMPLERS, *models])}, or a model file")
        path = models[name]
    return upscalers.load_upscaler(path)


# --- the second pass ------------------------------------------------------------------------------------------------

def upscale_latents(latents: torch.Tensor, mode: str, size: TargetSize, f: int = 8) -> torch.Tensor:
    """A latent mode: interpolate to the target's latent size (the overflow not yet cropped: `crop`)."""
    interp, antialias = LATENT_MODES[mode]
    to_w, to_h = size.upscale_to
    return F.interpolate(latents.float(), size=(to_h // f, to_w // f), mode=interp, antialias=antialias)


def crop(latents: torch.Tensor, truncate: tuple[int, int]) -> torch.Tensor:
    """A1111's crop of truncate_x/_y latent columns/rows: the smaller half before, the larger after."""
    tx, ty = truncate
    h, w = latents.shape[-2:]
    return latents[..., ty // 2:h - (ty + 1) // 2, tx // 2:w - (tx + 1) // 2]


def resize_image(image: Image.Image, size: tuple[int, int], upscaler) -> Image.Image:
    """A1111's resize_image (mode 0, just resize) with an upscaler: the upscaler (a RESAMPLERS name or a model) by
    the larger of the two factors when that enlarges, then Lanczos to the exact size where it differs."""
    scale = max(size[0] / image.width, size[1] / image.height)
    if scale > 1:
        image = upscalers.upscale(image, scale, upscaler)
    return image if image.size == size else image.resize(size, resample=Image.Resampling.LANCZOS)


def upscale_pixels(pipe, latents: torch.Tensor, upscaler, size: TargetSize) -> tuple[torch.Tensor, torch.Tensor]:
    """Another upscaler: decode, upscale each picture, encode again -> the second pass's start latents (scaled, the
    overflow not yet cropped) and the upscaled pixels."""
    f = pipe.downscale
    to = (size.upscale_to[0] // f * f, size.upscale_to[1] // f * f)
    vae_dtype = pipe.vae.post_quant_conv.weight.dtype
    pictures = [resize_image(im, to, upscaler) for im in images.to_pil(pipe.decode(latents))]
    pixels = torch.cat([images.from_pil(im) for im in pictures]).to(pipe.device, vae_dtype)
    return pipe.vae.encode(pixels, tiled=pipe.vae_tiling).mean.float() * pipe.vae.config.scaling_factor, pixels


def inpainting_condition(pipe, x0: torch.Tensor, pixels: torch.Tensor | None, weight: float) -> torch.Tensor:
    """An inpainting U-Net's conditioning for the pass (uncropped), as A1111's hires fix makes it: after a latent
    mode, a black image's (txt2img's) where weight is 1, else the decoded upscaled latents faded to gray by it;
    after an upscaler, the upscaled pixels faded to gray by it."""
    if pixels is None and weight == 1:
        return img2img.blank_condition(pipe, x0.shape[3] * pipe.downscale, x0.shape[2] * pipe.downscale)
    return img2img.unmasked_condition(pipe, pipe.decode(x0) if pixels is None else pixels, weight)


def second_pass(pipe, prompt: str, negative: str, params: GenerationParams, latents: torch.Tensor, seeds,
                upscaler, step_callback_for, controls=(), happened: set[str] | None = None) -> torch.Tensor:
    """The hires pass over one prompt's first-pass latents: upscale them (a latent mode when `upscaler` is None,
    load_upscaler's otherwise), then img2img from them. step_callback_for(total steps) makes the pass's callback.
    controls: the ControlNet units of this pass (controls.ActiveControl, their hints at this pass's image size, as
    sd-webui-controlnet makes its hr_hint_cond), run over its own steps as in any img2img. happened:
    generate_latents'."""
    f = pipe.downscale
    size = target_size(params.width, params.height, params.hr_scale, params.hr_resize_x, params.hr_resize_y, f)
    pixels = None
    if upscaler is None:
        x0 = upscale_latents(latents, params.hr_upscaler, size, f)
    else:
        x0, pixels = upscale_pixels(pipe, latents, upscaler, size)
    source = img2img.Source(latents=crop(x0, size.truncate).to(pipe.device))
    if pipe.inpainting_unet:
        source.condition = crop(inpainting_condition(pipe, x0, pixels, params.inpainting_mask_weight), size.truncate)
    w, h = size.latent_size(f)
    hr_plan = plan(params, pipe.noise_schedule)
    hr_params = params.replace(width=w * f, height=h * f, steps=steps(params),
                               sampler=params.hr_sampler or params.sampler)
    callback = step_callback_for(len(hr_plan.sigmas) - 1)
    try:
        return pipe.generate_latents(params.hr_prompt or prompt, params.hr_negative_prompt or negative, hr_params,
                                     hr_plan, seeds, source, callback, controls, happened)
    finally:
        callback.close()


def _number(v: float):
    """2.0 -> 2, 1.5 -> 1.5 (as A1111's infotext shows the slider's value)."""
    return int(v) if float(v).is_integer() else v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
