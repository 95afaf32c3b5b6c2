"""AUTOMATIC1111's /sdapi/v1 generation requests: their fields, their checks, and the job one becomes (`generate`).

server.py is the HTTP layer around this. `check_request` is the one place a txt2img/img2img request is checked
before it is queued: it turns the request into the one settings object, `params.GenerationParams` (`from_a1111`),
whose `validate` judges what no model could run (sampler, size, steps, seed ...) and the `Limits` (the work asked
for, the prompts' length in CLIP tokens); this file adds only what is the API's own: the prompts' length in
characters first, the scripts named (only ControlNet's runs: controlnet_api.request_controls checks its units right
after) and the `scheduler` field, the styles and the VAE a request names (resources.py), and the status codes (413
for a prompt too long, 422 for the rest). `generate` runs on the worker thread.
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import logging
import random
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .. import __version__, a1111, hires, images, samplers, upscalers
from ..controls import Control
from ..limits import LimitError, Limits
from ..params import (MAX_MASK_BLUR, MAX_MIN_UNCOND, MAX_NOISE_MULTIPLIER, MAX_PADDING, MAX_SEED,
                      MAX_TOKEN_MERGING_RATIO, SIGMA_PARAM_DEFAULTS, SIGMA_PARAM_RANGES, GenerationParams)
from ..pipeline import Cancelled, StableDiffusion
from ..schedule import NoiseSchedule
from ..styles import Style, apply_styles
from .resources import chosen_styles, vae_source
from .worker import ClientError, Job

log = logging.getLogger("stablediff.serve.sdapi")

MAX_BATCH_SIZE = 16  # per iteration; A1111's web UI allows 8 (the Limits apply as well)
MAX_N_ITER = 100  # as A1111's web UI
MAX_IMAGE_PIXELS = 4096 * 4096  # of an uploaded image
SCHEDULERS = a1111.SCHEDULES  # A1111's "Schedule type" names -> labels; "automatic": the sampler's own
CONTROLNET_SCRIPT = "controlnet"  # the one always-on script run here (controlnet_api.py), named in any case


# --- requests -----------------------------------------------------------------------------------------------------

def _not_bool(value):
    if isinstance(value, bool):
        raise ValueError("a number is expected, not true/false")
    return value


def _flag(value):
    if value in (0, 1) and not isinstance(value, float):  # true/false too (bool is an int)
        return int(value)
    raise ValueError("0, 1, true or false is expected")


Int = Annotated[int, BeforeValidator(_not_bool)]
Number = Annotated[float, BeforeValidator(_not_bool)]
Flag = Annotated[int, BeforeValidator(_flag)]  # an int A1111 declares that clients send as 0/1 or true/false


class RequestModel(BaseModel):
    """A request body, or a part of one. Unknown fields are ignored (clients send many of A1111's) and null means
    the default."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class SamplerExtras(RequestModel):
    """k-diffusion's churn and noise scale and A1111's NGMS (GenerationParams.s_churn ... s_min_uncond), which A1111
    takes both as request fields and as options: a request's value runs, unless the option (override_settings, POST
    /options) of a churn setting is not its default, which then wins; s_min_uncond: the request's, else the
    option's. s_tmax 0: no bound."""

    s_churn: Number | None = Field(None, ge=0, le=SIGMA_PARAM_RANGES["s_churn"], allow_inf_nan=False)
    s_tmin: Number | None = Field(None, ge=0, le=SIGMA_PARAM_RANGES["s_tmin"], allow_inf_nan=False)
    s_tmax: Number | None = Field(None, ge=0, le=SIGMA_PARAM_RANGES["s_tmax"], allow_inf_nan=False)
    s_noise: Number | None = Field(None, ge=0, le=SIGMA_PARAM_RANGES["s_noise"], allow_inf_nan=False)
    s_min_uncond: Number | None = Field(None, ge=0, le=MAX_MIN_UNCOND, allow_inf_nan=False)


class OverrideSettings(SamplerExtras):
    """A request's override_settings, and the body of POST /options (the options we have)."""

    sd_model_checkpoint: str | None = None
    CLIP_stop_at_last_layers: Int | None = Field(None, ge=1, le=12)
    randn_source: Literal["GPU", "CPU", "NV"] | None = None  # A1111's "RNG"
    eta_noise_seed_delta: Int | None = Field(None, ge=0, le=MAX_SEED)  # A1111's "ENSD"
    sd_vae: str | None = None  # a file name from GET /sd-vae, or "Automatic"/"None": the model's own VAE
    live_previews_enable: bool | None = None  # /progress's current_image: the image forming
    show_progress_every_n_steps: Int | None = Field(None, ge=-1, le=1000)  # a new preview every N steps (-1: off)
    token_merging_ratio: Number | None = Field(None, ge=0, le=MAX_TOKEN_MERGING_RATIO, allow_inf_nan=False)  # ToMe
    initial_noise_multiplier: Number | None = Field(None, gt=0, le=MAX_NOISE_MULTIPLIER, allow_inf_nan=False)  # img2img
    # an inpainting checkpoint's conditioning: 1 hides the masked part (gray), 0 shows the whole image
    inpainting_mask_weight: Number | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    # the eta of a request that sends none: A1111's samplers but DDIM (eta_ancestral), DDIM and DDIM CFG++ (eta_ddim)
    eta_ancestral: Number | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    eta_ddim: Number | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    s_min_uncond_all: bool | None = None  # "NGMS all steps"
    # "ignore negative prompt during early sampling": the share of the first steps without it (option only, as A1111)
    skip_early_cond: Number | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    img2img_extra_noise: Number | None = Field(None, ge=0, le=1, allow_inf_nan=False)  # img2img's and hires fix's
    pad_cond_uncond: bool | None = None  # "pad prompt/negative prompt" to one length (A1111's default: off)


# the generation settings POST /options sets for later requests, at A1111's defaults
SETTINGS = {"CLIP_stop_at_last_layers": 1, "randn_source": "GPU", "eta_noise_seed_delta": 0, "sd_vae": "Automatic",
            "live_previews_enable": True, "show_progress_every_n_steps": 10, "token_merging_ratio": 0.0,
            "initial_noise_multiplier": 1.0, "inpainting_mask_weight": 1.0, "eta_ancestral": 1.0, "eta_ddim": 0.0,
            **SIGMA_PARAM_DEFAULTS, "s_min_uncond": 0.0, "s_min_uncond_all": False,
            "skip_early_cond": 0.0, "img2img_extra_noise": 0.0,
            "pad_cond_uncond": False}


class Txt2ImgRequest(SamplerExtras):
    prompt: str = ""
    negative_prompt: str = ""
    seed: Int = Field(-1, ge=-1, le=MAX_SEED)  # -1: random
    subseed: Int = Field(-1, ge=-1, le=MAX_SEED)  # A1111's variation seed; -1: random
    subseed_strength: Number = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    seed_resize_from_w: Int = Field(-1, ge=-1, le=4096)  # <= 0: off
    seed_resize_from_h: Int = Field(-1, ge=-1, le=4096)
    tiling: bool = False  # seamless tiling (circular padding)
    # ToMe (tome.py); 0 or left out: the token_merging_ratio option's (override_settings, POST /options)
    token_merging_ratio: Number = Field(0.0, ge=0, le=MAX_TOKEN_MERGING_RATIO, allow_inf_nan=False)
    # the sampler's eta where it takes one (null: the eta_ancestral / eta_ddim option's); webuiapi sends 1.0
    eta: Number | None = Field(None, ge=0, le=1, allow_inf_nan=False)
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
    enable_hr: bool = False  # hires fix (hires.py), with A1111's hr_* fields; denoising_strength is its strength
    denoising_strength: Number | None = Field(None, ge=0, le=1, allow_inf_nan=False)  # txt2img: used with enable_hr
    hr_scale: Number = Field(2.0, ge=1, le=upscalers.MAX_SCALE, allow_inf_nan=False)
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: Int = Field(0, ge=0, le=1000)
    hr_resize_x: Int = Field(0, ge=0, le=4096)
    hr_resize_y: Int = Field(0, ge=0, le=4096)
    hr_sampler_name: str | None = None  # None or "Use same sampler": sampler_name
    hr_scheduler: str | None = None  # None or "Use same scheduler": scheduler
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    styles: list[str] = []  # names from GET /prompt-styles, applied to the prompts in this order
    script_name: str | None = None  # no scripts here: a name is refused
    alwayson_scripts: dict[str, Any] = {}  # only "controlnet" (controlnet_api.py): another entry is refused

    @field_validator("script_name")
    @classmethod
    def _no_script(cls, name: str) -> str:
        if name.strip():
            raise ValueError(f"script {name!r} is not available: this server runs no scripts (GET /sdapi/v1/scripts)")
        return name

    @field_validator("alwayson_scripts")
    @classmethod
    def _only_controlnet(cls, scripts: dict) -> dict:
        others = [name for name in scripts if name.lower() != CONTROLNET_SCRIPT]
        if others:
            raise ValueError(f"always-on scripts {', '.join(map(repr, others))} are not available: this server "
                             f"runs only ControlNet's (GET /sdapi/v1/scripts)")
        return scripts


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(min_length=1, max_length=MAX_BATCH_SIZE)  # one, or one for each of batch_size
    denoising_strength: Number = Field(0.75, gt=0, le=1, allow_inf_nan=False)
    mask: str | None = None  # white = repaint; an RGBA mask with transparency: its alpha marks the area
    inpainting_mask_invert: Flag = 0
    include_init_images: bool = False
    resize_mode: Int = 0  # A1111's: init image and mask to width x height (images.resize_init)
    initial_noise_multiplier: Number | None = Field(None, gt=0, le=MAX_NOISE_MULTIPLIER, allow_inf_nan=False)
    # inpainting (masking.py), with A1111's API defaults; mask_blur, where given, sets both directions
    mask_blur: Int | None = Field(None, ge=0, le=MAX_MASK_BLUR)
    mask_blur_x: Int = Field(4, ge=0, le=MAX_MASK_BLUR)
    mask_blur_y: Int = Field(4, ge=0, le=MAX_MASK_BLUR)
    inpainting_fill: Int = Field(0, ge=0, le=3)  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: Flag = 1  # only masked (A1111's API default), 0 the whole picture
    inpaint_full_res_padding: Int = Field(0, ge=0, le=MAX_PADDING)

    @field_validator("resize_mode")
    @classmethod
    def _resize_mode(cls, mode: int) -> int:
        if mode not in range(len(images.RESIZE_MODES)):
            modes = ", ".join(f"{i} ({name})" for i, name in enumerate(images.RESIZE_MODES))
            raise ValueError(f"resize_mode {mode} is not one of {modes}; 3 (latent upscale) is not supported")
        return mode


class PngInfoRequest(BaseModel):
    image: str


class Plan(NamedTuple):
    """What `check_request` worked out for a request."""

    params: GenerationParams  # validated; width/height filled in as checked against the limits; styles applied
    steps: int  # sampler steps of one iteration (img2img runs only the last denoising_strength of them)
    vae: Path | None = None  # the VAE file to decode with (sd_vae); None: the model's own


def output_size(req: Txt2ImgRequest, native_size: int, init_size: tuple[int, int] | None) -> tuple[int, int]:
    """width x height a request makes: as asked, else the init image's size (img2img), else the model's native
    size; rounded down to a multiple of 8, as A1111's latents round it (width 500 makes a 496-pixel image)."""
    default = init_size or (native_size, native_size)
    return images.multiple_of_8((req.width or default[0], req.height or default[1]))


def check_prompt_length(req: Txt2ImgRequest, limits: Limits) -> None:
    """The prompts' length in characters (ClientError 413): the check that comes before anything heavier (decoding
    images, counting tokens), so a 10 MB prompt costs nothing more. `validated` counts their tokens."""
    try:
        for text, name in ((req.prompt, "prompt"), (req.negative_prompt, "negative prompt"),
                           (req.hr_prompt, "hires prompt"), (req.hr_negative_prompt, "hires negative prompt")):
            limits.check_prompt(text, name, tokens=False)
    except LimitError as e:
        raise ClientError(413, str(e)) from None


def validated(params: GenerationParams, limits: Limits, n_iter: int) -> GenerationParams:
    """params.validate against the limits, the n_iter iterations counting as that many prompts (image k of the
    request is seeded seed + k). ClientError: 413 for a prompt over --max-prompt-tokens, 422 for the rest."""
    try:
        return params.validate(limits, prompts=n_iter)
    except LimitError as e:
        raise ClientError(413 if e.flag.startswith(Limits.flag("max_prompt_tokens")) else 422, str(e)) from None
    except ValueError as e:
        raise ClientError(422, str(e)) from None


def sampler_steps(params: GenerationParams) -> int:
    """The sampler steps one pipeline call of validated `params` runs: all of them for txt2img; img2img's strength
    keeps only the last ones, as many as samplers.prepare decides (ValueError for a strength that leaves none,
    which `validate`, trying the plan without the strength, does not see)."""
    if params.enable_hr:  # both passes
        return params.steps + len(hires.plan(params, NoiseSchedule()).sigmas) - 1
    if params.strength is None:
        return params.steps
    plan = samplers.prepare(params.sampler, NoiseSchedule(), params.steps, schedule=params.schedule,
                            strength=params.strength)
    return len(plan.sigmas) - 1


def check_offered(req: Txt2ImgRequest, upscaler_dir: Path | None = None) -> None:
    """What this API does not offer (ClientError 422): a hires upscaler other than the latent modes, the resamplers
    and the models in `upscaler_dir` (by name only: never a path a client gives), a scheduler we do not have."""
    if req.enable_hr and not isinstance(req, Img2ImgRequest):
        models = upscalers.find_models(upscaler_dir) if upscaler_dir is not None else {}  # read only when asked
        offered = (*hires.LATENT_MODES, *upscalers.RESAMPLERS, *models)
        if req.hr_upscaler not in offered:
            raise ClientError(422, f"hr_upscaler {req.hr_upscaler!r} is not one of: {', '.join(offered)}")
    try:
        a1111.schedule_name(req.scheduler)
    except ValueError:
        raise ClientError(422, f"scheduler {req.scheduler!r} is not supported; choose one of: "
                               f"{', '.join(SCHEDULERS)}") from None


def check_request(req: Txt2ImgRequest, limits: Limits, native_size: int, init_size: tuple[int, int] | None = None,
                  *, settings: dict | None = None, styles: dict[str, Style] | None = None,
                  vae_dir: Path | None = None, upscaler_dir: Path | None = None,
                  init_sizes: list[tuple[int, int]] | None = None) -> Plan:
    """Every check of a txt2img/img2img request that needs no model, cheapest first: the prompts' length in
    characters (413), what this API does not offer (422: hires fix, a scheduler), the styles and the VAE it names
    (422; `styles` from --styles-file, VAE files from `vae_dir`), then GenerationParams.validate (`validated`: what
    no model could run, the work asked for, the styled prompts' tokens). settings: the server's options (SETTINGS'
    keys), for what a request's override_settings leave out. Width/height left out are the init image's (img2img)
    or `native_size`; init_sizes: every init image's (only masked answers with images of those sizes; default:
    init_size). ClientError otherwise."""
    check_prompt_length(req, limits)
    check_offered(req, upscaler_dir)
    prompt, negative = apply_styles(req.prompt, req.negative_prompt, chosen_styles(req.styles, styles or {}))
    body = req.model_dump()
    override = {k: v for k, v in body["override_settings"].items() if v is not None}
    body.update(prompt=prompt, negative_prompt=negative, override_settings={**SETTINGS, **(settings or {}), **override})
    if isinstance(req, Img2ImgRequest):
        body["enable_hr"] = False  # A1111's img2img has no hires fix and ignores the field
        if len(req.init_images) > 1:  # A1111: a batch of as many images (at most batch_size: check_init_count)
            body["batch_size"] = len(req.init_images)
    elif not req.enable_hr:
        body["denoising_strength"] = None  # clients send txt2img a denoising_strength of 0
    vae = vae_source(body["override_settings"]["sd_vae"], vae_dir)
    width, height = output_size(req, native_size, init_size)
    params = validated(GenerationParams.from_a1111(body).replace(width=width, height=height), limits, req.n_iter)
    if isinstance(req, Img2ImgRequest) and req.mask is not None and params.inpaint_full_res and init_size:
        try:  # only masked answers with images of the init image's size
            for w, h in init_sizes or [init_size]:
                limits.check("max_pixels", f"init image {w}x{h} (only masked returns its size) =", w * h)
        except LimitError as e:
            raise ClientError(422, str(e)) from None
    try:
        return Plan(params, sampler_steps(params), vae)
    except ValueError as e:
        raise ClientError(422, str(e)) from None


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


# --- the job ------------------------------------------------------------------------------------------------------

def generate(job: Job, pipe: StableDiffusion, req: Txt2ImgRequest, params: GenerationParams, limits: Limits,
             init: list[Image.Image] | None, mask: Image.Image | None, output_dir: Path,
             upscaler_dir: Path | None = None, controls: list[Control] = ()) -> dict:
    """Run a txt2img/img2img request (`params` from check_request) on the worker thread: n_iter pipeline calls of
    batch_size images each, image k seeded seed + k as A1111 does, with the ControlNet units `controls`
    (controlnet_api.request_controls). Returns {"images": [base64 PNG], "info": A1111's
    info fields + ours}.

    The response repeats the prompt and negative prompt for every image, as A1111 does: in info's
    all_prompts/all_negative_prompts and infotexts (JSON inside JSON: at most 14 bytes a character, 2 for
    printable ASCII) and in each PNG's parameters chunk (base64: 4/3 x UTF-8). So the text adds at most about
    33 x (len(prompt) + len(negative_prompt)) bytes an image; with the prompt caps of the default Limits (20,000
    characters and 1,000 tokens each) that is at most 1.3 MB an image, under 0.15 MB for printable ASCII, and the
    image count is capped by --max-images (the PNGs themselves, about 0.55 MB base64 at 512x512, add to it)."""
    params = native_params(req, params, limits, pipe.native_size, init[0] if init else None)
    count = req.batch_size * req.n_iter
    if params.seed is None:
        params = params.replace(seed=random.randint(0, MAX_SEED - count))
    if params.subseed is None:
        params = params.replace(subseed=random.randint(0, MAX_SEED - count))  # A1111 picks one either way
    results, interrupted = run_iterations(job, pipe, params, req.n_iter, init, mask, upscaler_dir, controls)
    pictures = [im for r in results for im in r.images]
    infotexts = [t for r in results for t in r.infotexts]
    seeds = [s for r in results for s in r.seeds]
    subseeds = [s for r in results for s in r.subseeds]
    encoded = deliver(req, pictures, seeds, infotexts, output_dir)
    info = response_info(job, pipe, params, req.n_iter, seeds, subseeds, infotexts, interrupted=interrupted,
                         styles=req.styles)
    return {"images": encoded, "info": info}


def native_params(req: Txt2ImgRequest, params: GenerationParams, limits: Limits, native_size: int,
                  init: Image.Image | None) -> GenerationParams:
    """params with the size left out taken from the loaded model: the route checked the native size it knew of
    (512 for a model not loaded before), so another one is checked against the limits again."""
    width, height = output_size(req, native_size, init.size if init is not None else None)
    if (width, height) == (params.width, params.height):
        return params
    return validated(params.replace(width=width, height=height), limits, req.n_iter)


def check_init_count(req: Img2ImgRequest) -> None:
    """One init image, or at most batch_size of them (ClientError 422): checked before any is decoded."""
    if len(req.init_images) > req.batch_size:
        raise ClientError(422, f"init_images: {len(req.init_images)} images for batch_size {req.batch_size}; give "
                               "one, or at most batch_size")


def fitted_images(inits: list[Image.Image] | None,
                  mask: Image.Image | None) -> tuple[list[Image.Image] | None, Image.Image | None]:
    """The init images and mask as A1111's img2img takes them: each init image flattened onto white (its default
    img2img background colour), the mask made gray (A1111's create_binary_mask: an RGBA mask with transparency is
    its alpha, white over 128, else its gray as it is) and checked to have each init image's aspect ratio
    (ClientError 422; the route calls this before the job is queued). The pipeline inverts the mask where asked
    (params.inpainting_mask_invert), brings them to the output size (params.resize_mode) and prepares the
    inpainting (masking.py)."""
    if not inits:
        return None, None
    inits = [_flattened(im) for im in inits]
    if mask is not None:
        if mask.mode == "RGBA" and mask.getextrema()[3] != (255, 255):
            mask = mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
        else:
            mask = mask.convert("L")
        try:
            for im in inits:
                images.check_mask_aspect(mask.size, im.size)
        except ValueError as e:  # a mask of another aspect ratio
            raise ClientError(422, str(e)) from None
    return inits, mask


def _flattened(image: Image.Image) -> Image.Image:
    """An RGB image; a transparent one laid on white first."""
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        white.paste(image, mask=image)
        image = white
    return image.convert("RGB")


def run_iterations(job: Job, pipe: StableDiffusion, params: GenerationParams, n_iter: int,
                   init: Image.Image | None, mask: Image.Image | None,
                   upscaler_dir: Path | None = None, controls: list[Control] = ()) -> tuple[list, bool]:
    """The pipeline's results of the n_iter iterations (params.seed set), and whether the job was interrupted: an
    interrupt drops the iteration it stops and runs no more; a skip (A1111's /skip) drops only the iteration it
    stops (a skip that comes between two iterations is dropped: the image it meant is done)."""
    def on_step(info):
        job.step, job.steps = info.step, info.total
        every = job.preview_every
        if every > 0 and info.denoised is not None and (info.step % every == 0 or info.step == info.total):
            job.preview = (info.step, pipe, info.denoised[:1].detach().cpu())

    results = []
    for i in range(n_iter):
        job.job_no, job.step = i, 0
        if not job.resume():
            return results, True
        try:
            results.append(pipe.generate(iteration(params, i),
                                         init_image=init, mask_image=mask, callback=on_step, cancel=job.cancel,
                                         upscaler_dir=upscaler_dir, controls=controls))
        except Cancelled:
            if job.stopped:
                return results, True
    return results, False


def preview_png(pipe: StableDiffusion, latents) -> str:
    """/progress's current_image: the pipeline's quick preview (TAESD when loaded, else A1111's Approx cheap) of a
    step's denoised latents, as base64 PNG."""
    return base64.b64encode(images.png_bytes(pipe.preview(latents)[0], "")).decode()


def iteration(params: GenerationParams, i: int) -> GenerationParams:
    """The settings of iteration i of n_iter: its first image's seed (or variation seed) counts on from the last."""
    offset = i * params.batch_size
    if params.subseed_strength:
        return params.replace(subseed=params.subseed + offset)
    return params.replace(seed=params.seed + offset)


def deliver(req: Txt2ImgRequest, pictures: list[Image.Image], seeds: list[int], infotexts: list[str],
            output_dir: Path) -> list[str]:
    """The images as the request asks: saved to output_dir (save_images), and returned as base64 PNGs
    (send_images; else an empty list)."""
    if req.save_images:
        for image, seed, text in zip(pictures, seeds, infotexts):
            images.save_png(image, output_dir, seed, text)
    return [png_base64(im, t) for im, t in zip(pictures, infotexts)] if req.send_images else []


def response_info(job: Job, pipe: StableDiffusion, params: GenerationParams, n_iter: int, seeds: list[int],
                  subseeds: list[int | None], infotexts: list[str], *, interrupted: bool, styles: list[str]) -> dict:
    """A1111's `info` of a response (which clients read as JSON), with our job fields: job_id and run_no."""
    n = len(seeds)
    strength = params.strength
    return dict(
        prompt=params.prompt, all_prompts=[params.prompt] * n, negative_prompt=params.negative_prompt,
        all_negative_prompts=[params.negative_prompt] * n, seed=params.seed, all_seeds=seeds, subseed=params.subseed,
        all_subseeds=[s if s is not None else params.subseed for s in subseeds],
        subseed_strength=params.subseed_strength, width=params.width, height=params.height,
        sampler_name=samplers.SAMPLERS[params.sampler].label, scheduler=params.schedule or "automatic",
        cfg_scale=params.cfg_scale,
        steps=params.steps, batch_size=params.batch_size, n_iter=n_iter, restore_faces=False,
        face_restoration_model=None, sd_model_name=pipe.model_name, sd_model_hash=pipe.model_hash or None,
        sd_vae_name=pipe.vae_name, sd_vae_hash=pipe.vae_hash,
        seed_resize_from_w=params.seed_resize_from[0] if params.seed_resize_from else -1,
        seed_resize_from_h=params.seed_resize_from[1] if params.seed_resize_from else -1,
        denoising_strength=strength,
        extra_generation_params={"Denoising strength": strength} if strength is not None else {},
        index_of_first_image=0, infotexts=infotexts, styles=styles, job_timestamp=job.timestamp,
        clip_skip=params.clip_skip, is_using_inpainting_conditioning=pipe.inpainting_unet,
        version=f"stablediff {__version__}",
        interrupted=interrupted, sampling_step=job.step, job_id=job.job_id, run_no=job.run_no)


# --- extras: upscaling --------------------------------------------------------------------------------------------

NO_UPSCALER = "None"
LISTED_SCALE = 4  # the scale A1111 lists for its model-free upscalers
MAX_EXTRAS_IMAGES = 16  # images in one /extra-batch-images request (A1111 sets none): each is upscaled up to
# --max-pixels and sent back as a PNG in one JSON answer; a client with more sends more requests


class ExtrasRequest(RequestModel):
    """A1111's extras options (its ExtrasBaseRequest), shared by /extra-single-image and /extra-batch-images. Only
    upscaling by a factor (resize_mode 0) with upscaler_1 is done; the other features are refused when asked for,
    not left out silently. `inputs` says which images a request brings."""

    resize_mode: Int = Field(0, ge=0, le=1)  # 0: by upscaling_resize; 1 (to a width and height) is refused
    show_extras_results: bool = True
    gfpgan_visibility: Number = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_visibility: Number = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_weight: Number = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscaling_resize: Number = Field(2, ge=1, le=upscalers.MAX_SCALE, allow_inf_nan=False)
    upscaling_resize_w: Int = Field(512, ge=1)
    upscaling_resize_h: Int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = NO_UPSCALER
    upscaler_2: str = NO_UPSCALER
    extras_upscaler_2_visibility: Number = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscale_first: bool = False

    def inputs(self) -> list[tuple[str, str]]:
        """(field name, as errors name it; base64 image) of each image to work on, in order."""
        raise NotImplementedError


class ExtrasSingleImageRequest(ExtrasRequest):
    """A1111's /extra-single-image request: one image."""

    image: str

    def inputs(self) -> list[tuple[str, str]]:
        return [("image", self.image)]


class FileData(RequestModel):
    """One image of /extra-batch-images. A1111 takes the name for the files it saves; the API saves none, so it is
    unused (and may be left out)."""

    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    """A1111's /extra-batch-images request: the same work on each image of imageList (at most MAX_EXTRAS_IMAGES)."""

    imageList: list[FileData] = Field(max_length=MAX_EXTRAS_IMAGES)

    def inputs(self) -> list[tuple[str, str]]:
        return [(f"imageList[{i}].data", item.data) for i, item in enumerate(self.imageList)]


def upscaler_list(folder: Path | None) -> list[dict]:
    """A1111's /upscalers: None, Lanczos and Nearest, then the model files in `folder` by name (their path relative
    to it, without the suffix; `model_path` is that relative path, never the server's), with the architecture and
    scale read from their weights. A file that is not an upscaler we can read is logged and left out."""
    rows = [dict(name=name, model_name=None, model_path=None, model_url=None, scale=LISTED_SCALE)
            for name in (NO_UPSCALER, *upscalers.RESAMPLERS)]
    for name, path in (upscalers.find_models(folder) if folder is not None else {}).items():
        try:
            _, config = upscalers.read_upscaler(path)
        except ValueError as e:
            log.warning("upscaler %s left out: %s", name, e)
            continue
        rows.append(dict(name=name, model_name=upscalers.architecture(config), model_path=name + path.suffix,
                         model_url=None, scale=config.scale))
    return rows


def upscaler_source(name: str, folder: Path | None) -> str | Path:
    """What an upscaler name stands for: "None", a RESAMPLERS name or a file in `folder` (by name only: a file that
    is no upscaler is refused when the job loads it); ClientError (422) naming the choices for another."""
    if name == NO_UPSCALER or name in upscalers.RESAMPLERS:
        return name
    models = upscalers.find_models(folder) if folder is not None else {}
    if name not in models:
        choices = ", ".join([NO_UPSCALER, *upscalers.RESAMPLERS, *models])
        raise ClientError(422, f"upscaler_1 {name!r} is not one of: {choices}")
    return models[name]


def check_extras(req: ExtrasRequest, limits: Limits, folder: Path | None) -> tuple[list[Image.Image], str | Path]:
    """An extras request checked before it is queued -> (its images, its upscaler: upscaler_source's). What we do
    not offer (resize to a size, face restoration, a second upscaler) and an output over --max-pixels: 422, naming
    the image."""
    if req.resize_mode != 0:
        raise ClientError(422, "resize_mode 1 (to a width and height) is not supported; use resize_mode 0 and "
                               "upscaling_resize")
    if req.gfpgan_visibility or req.codeformer_visibility:
        raise ClientError(422, "gfpgan_visibility/codeformer_visibility: face restoration is not supported")
    if req.upscaler_2 != NO_UPSCALER and req.extras_upscaler_2_visibility:
        raise ClientError(422, "upscaler_2: a second upscaler is not supported")
    source = upscaler_source(req.upscaler_1, folder)
    return [extras_image(data, name, req.upscaling_resize, source, limits) for name, data in req.inputs()], source


def extras_image(data: str, name: str, scale: float, source: str | Path, limits: Limits) -> Image.Image:
    """One base64 image of an extras request, decoded; ClientError (422) naming the field `name` if it is no image
    or would be upscaled over --max-pixels."""
    image = decode_image(data, name)
    if source != NO_UPSCALER:
        try:
            width, height = upscalers.target_size(image.size, scale)
            limits.check("max_pixels", f"{name}: upscaled size {width}x{height} =", width * height)
        except ValueError as e:  # a LimitError too
            raise ClientError(422, str(e)) from None
    return image


def extras(job: Job, req: ExtrasRequest, pictures: list[Image.Image], source: str | Path) -> dict:
    """Run an extras request (check_extras's images and upscaler) on the worker thread: {"html_info", "images"}
    as A1111's /extra-batch-images answers (/extra-single-image sends the one image as "image"), each PNG keeping
    its source's generation parameters. The upscaler model is loaded once for all images; job.job_no counts the
    images done (for /progress), and a stopped job (/interrupt) stops before its next image and answers with the
    images done, as A1111's batch loop does."""
    upscaler, info = None, None
    if source != NO_UPSCALER:
        upscaler = source if isinstance(source, str) else upscalers.load_upscaler(source)
        info = upscalers.postprocess_info(req.upscaling_resize, req.upscaler_1)
    done = []
    for i, image in enumerate(pictures):
        if job.stopped:
            break
        job.job_no = i
        done.append(upscaled_png(image, req.upscaling_resize, upscaler, info))
    return {"html_info": f"<p>{html.escape(info or '')}</p>", "images": done}


def upscaled_png(image: Image.Image, scale: float, upscaler, info: str | None) -> str:
    """`image` upscaled by `upscaler` (a RESAMPLERS name or a loaded model; None: as it is), as a base64 PNG with
    the source's `parameters` and the postprocessing `info`."""
    parameters = image.info.get("parameters")
    if upscaler is not None:
        image = upscalers.upscale(image, scale, upscaler)
    return base64.b64encode(upscalers.png_bytes(image, parameters, info)).decode("ascii")
