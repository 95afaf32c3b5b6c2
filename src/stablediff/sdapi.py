"""AUTOMATIC1111's /sdapi/v1 generation requests: their fields, their checks, and the job one becomes (`generate`).

server.py is the HTTP layer around this. `check_request` is the one place a txt2img/img2img request is checked
before it is queued: what no model could run (hires fix, scheduler, sampler, size, steps, seed) and the `Limits`
(the work asked for, the prompts' length in characters and CLIP tokens). `generate` runs on the worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import random
from pathlib import Path
from typing import Annotated, NamedTuple

from PIL import Image, ImageOps
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from . import __version__, images, samplers
from .limits import LimitError, Limits
from .pipeline import MAX_SEED, Cancelled, StableDiffusion, check_params
from .schedule import NoiseSchedule
from .worker import ClientError, Job

MAX_BATCH_SIZE = 16  # per iteration; A1111's web UI allows 8 (the Limits apply as well)
MAX_N_ITER = 100  # as A1111's web UI
MAX_IMAGE_PIXELS = 4096 * 4096  # of an uploaded image
SCHEDULERS = {"automatic": ("Automatic", None), "karras": ("Karras", "karras")}  # name -> (label, our schedule)


# --- requests -----------------------------------------------------------------------------------------------------

def _not_bool(value):
    if isinstance(value, bool):
        raise ValueError("a number is expected, not true/false")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool)]


class _Request(BaseModel):
    """Unknown fields are ignored (clients send many of A1111's) and null means the default."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class OverrideSettings(_Request):
    """A request's override_settings, and the body of POST /options (the options we have)."""

    sd_model_checkpoint: str | None = None
    CLIP_stop_at_last_layers: Int | None = Field(None, ge=1, le=12)


class Txt2ImgRequest(_Request):
    prompt: str = ""
    negative_prompt: str = ""
    seed: Int = Field(-1, ge=-1, le=MAX_SEED)  # -1: random
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # A1111's older name for sampler_name
    scheduler: str = "automatic"
    steps: Int = Field(50, ge=1, le=1000)
    cfg_scale: Number = Field(7.0, ge=0, le=100, allow_inf_nan=False)
    width: Int | None = Field(None, ge=64, le=4096)  # None: the model's native size
    height: Int | None = Field(None, ge=64, le=4096)
    batch_size: Int = Field(1, ge=1, le=MAX_BATCH_SIZE)
    n_iter: Int = Field(1, ge=1, le=MAX_N_ITER)
    override_settings: OverrideSettings = OverrideSettings()
    send_images: bool = True
    save_images: bool = False
    enable_hr: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(min_length=1, max_length=1)
    denoising_strength: Number = Field(0.75, gt=0, le=1, allow_inf_nan=False)
    mask: str | None = None  # white = repaint
    inpainting_mask_invert: Int = Field(0, ge=0, le=1)
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str


class Plan(NamedTuple):
    """What `check_request` worked out for a request."""

    sampler: str
    schedule: str | None
    width: int
    height: int
    steps: int  # sampler steps of one iteration (img2img runs only the last denoising_strength of them)


def output_size(req: Txt2ImgRequest, native_size: int, init_size: tuple[int, int] | None) -> tuple[int, int]:
    """width x height a request makes: as asked, else the init image's size rounded down to a multiple of 8
    (img2img), else the model's native size."""
    default = images.multiple_of_8(init_size) if init_size else (native_size, native_size)
    return req.width or default[0], req.height or default[1]


def check_work(req: Txt2ImgRequest, limits: Limits, width: int, height: int) -> None:
    """The work a request asks for against the limits: ClientError 422 naming the value, the limit and the flag."""
    try:
        limits.check_work(width=width, height=height, steps=req.steps, batch_size=req.batch_size,
                          images=req.batch_size * req.n_iter)
    except LimitError as e:
        raise ClientError(422, str(e)) from None


def check_prompts(req: Txt2ImgRequest, limits: Limits, tokens: bool = True) -> None:
    """The prompt and negative prompt against max_prompt_tokens: by characters, and by tokens unless `tokens` is
    False (ClientError 413)."""
    try:
        for name in ("prompt", "negative_prompt"):
            limits.check_prompt(getattr(req, name), name, tokens=tokens)
    except LimitError as e:
        raise ClientError(413, str(e)) from None


def check_request(req: Txt2ImgRequest, limits: Limits, native_size: int,
                  init_size: tuple[int, int] | None = None) -> Plan:
    """Every check of a txt2img/img2img request that needs no model, cheapest first: the prompts' length in
    characters (413), what no model could run (422: hires fix, scheduler, sampler, size, steps, seed ...), the work
    asked for (422), the prompts' length in tokens (413). A few ms; at most about 0.3 s for 20,000 characters of
    random letters. ClientError otherwise."""
    check_prompts(req, limits, tokens=False)
    if req.enable_hr:
        raise ClientError(422, "enable_hr: hires fix is not supported by this server")
    scheduler = req.scheduler.strip().lower()
    if scheduler not in SCHEDULERS:
        raise ClientError(422, f"scheduler {req.scheduler!r} is not supported; choose one of: {', '.join(SCHEDULERS)}")
    try:
        spec, alias_schedule = samplers.get_sampler(req.sampler_name or req.sampler_index)
    except ValueError as e:
        raise ClientError(422, f"sampler_name: {e}") from None
    schedule = SCHEDULERS[scheduler][1] or alias_schedule
    strength = getattr(req, "denoising_strength", 1.0) if init_size is not None else 1.0
    try:
        check_params(steps=req.steps, cfg_scale=req.cfg_scale, width=req.width, height=req.height,
                     batch_size=req.batch_size, sampler=spec.name, schedule=schedule,
                     seed=None if req.seed < 0 else req.seed)
        steps = len(samplers.prepare(spec.name, NoiseSchedule(), req.steps, schedule=schedule,
                                     strength=strength).sigmas) - 1
    except ValueError as e:
        raise ClientError(422, str(e)) from None
    width, height = output_size(req, native_size, init_size)
    check_work(req, limits, width, height)
    check_prompts(req, limits)
    return Plan(spec.name, schedule, width, height, steps)


def decode_image(data: str, name: str) -> Image.Image:
    """A base64 image (bare or a data: URL), fully read; ClientError (422) naming the field otherwise."""
    text = data.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(422, f"{name}: not valid base64 (starts {data[:20]!r})") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ClientError(422, f"{name}: image {image.width}x{image.height} is over the 4096x4096 limit")
            image.load()
            return image.copy()
    except ClientError:
        raise
    except Exception as e:  # PIL raises many kinds for bad data
        raise ClientError(422, f"{name}: not an image PIL can read ({type(e).__name__}: {e})") from None


def png_base64(image: Image.Image, parameters: str) -> str:
    """PNG bytes with A1111's `parameters` text chunk, base64-encoded as A1111 sends them."""
    return base64.b64encode(images.png_bytes(image, parameters)).decode("ascii")


def generate(job: Job, pipe: StableDiffusion, req: Txt2ImgRequest, plan: Plan, limits: Limits, clip_skip: int,
             init: Image.Image | None, mask: Image.Image | None, output_dir: Path) -> dict:
    """Run a txt2img/img2img request on the worker thread: n_iter pipeline calls of batch_size images each, image k
    seeded seed + k as A1111 does. Returns {"images": [base64 PNG], "info": A1111's info fields + ours}.

    The size is checked against the limits again when the model's native size turned out other than the route
    assumed. The response repeats the prompt and negative prompt for every image, as A1111 does: in info's
    all_prompts/all_negative_prompts and infotexts (JSON inside JSON: at most 14 bytes a character, 2 for
    printable ASCII) and in each PNG's parameters chunk (base64: 4/3 x UTF-8). So the text adds at most about
    33 x (len(prompt) + len(negative_prompt)) bytes an image; with the prompt caps of the default Limits (20,000
    characters and 1,000 tokens each) that is at most 1.3 MB an image, under 0.15 MB for printable ASCII, and the
    image count is capped by --max-images (the PNGs themselves, about 0.55 MB base64 at 512x512, add to it)."""
    seed = req.seed if req.seed >= 0 else random.randint(0, MAX_SEED - req.batch_size * req.n_iter)
    width, height = output_size(req, pipe.native_size, init.size if init is not None else None)
    if (width, height) != (plan.width, plan.height):
        check_work(req, limits, width, height)
    if init is not None:
        init = init.convert("RGB")
        if init.size != (width, height):
            init = init.resize((width, height), resample=Image.Resampling.LANCZOS)
        if mask is not None and req.inpainting_mask_invert:
            mask = ImageOps.invert(mask.convert("L"))

    def on_step(info):
        job.step, job.steps = info.step, info.total

    results, interrupted = [], False
    for i in range(req.n_iter):
        job.job_no, job.step = i, 0
        try:
            if job.cancel.is_set():
                raise Cancelled("interrupted between iterations")
            results.append(pipe(req.prompt, req.negative_prompt, steps=req.steps, cfg_scale=req.cfg_scale,
                                seed=seed + i * req.batch_size, width=width, height=height,
                                batch_size=req.batch_size, sampler=plan.sampler, schedule=plan.schedule,
                                clip_skip=clip_skip, init_image=init, mask_image=mask,
                                strength=req.denoising_strength if init is not None else None,
                                callback=on_step, cancel=job.cancel))
        except Cancelled:
            interrupted = True
            break
    pictures = [im for r in results for im in r.images]
    infotexts = [t for r in results for t in r.infotexts]
    seeds = [s for r in results for s in r.seeds]
    if req.save_images:
        for image, s, text in zip(pictures, seeds, infotexts):
            images.save_png(image, output_dir, s, text)
    encoded = [png_base64(im, t) for im, t in zip(pictures, infotexts)] if req.send_images else []
    schedule = plan.schedule
    info = dict(
        prompt=req.prompt, all_prompts=[req.prompt] * len(pictures), negative_prompt=req.negative_prompt,
        all_negative_prompts=[req.negative_prompt] * len(pictures), seed=seed, all_seeds=seeds, subseed=seed,
        all_subseeds=seeds, subseed_strength=0, width=width, height=height,
        sampler_name=samplers.SAMPLERS[plan.sampler].label,
        scheduler="karras" if schedule == "karras" else "automatic", cfg_scale=req.cfg_scale, steps=req.steps,
        batch_size=req.batch_size, n_iter=req.n_iter, restore_faces=False, face_restoration_model=None,
        sd_model_name=pipe.model_name, sd_model_hash=pipe.model_hash or None, sd_vae_name=None, sd_vae_hash=None,
        seed_resize_from_w=-1, seed_resize_from_h=-1,
        denoising_strength=req.denoising_strength if init is not None else None,
        extra_generation_params={"Denoising strength": req.denoising_strength} if init is not None else {},
        index_of_first_image=0, infotexts=infotexts, styles=[], job_timestamp=job.timestamp, clip_skip=clip_skip,
        is_using_inpainting_conditioning=mask is not None and pipe.unet.config.in_channels == 9,
        version=f"stablediff {__version__}",
        interrupted=interrupted, sampling_step=job.step, job_id=job.job_id, run_no=job.run_no)
    return {"images": encoded, "info": info}
