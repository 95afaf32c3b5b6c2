"""`stablediff serve`: AUTOMATIC1111's HTTP API (the part clients use) and a small web page, on FastAPI + uvicorn.

    stablediff serve --models-dir models --port 7860          # then open http://127.0.0.1:7860/

Endpoints, with A1111's field names and defaults: POST /sdapi/v1/txt2img, /img2img, /interrupt, /options, /png-info;
GET /sdapi/v1/progress, /samplers, /schedulers, /sd-models, /options, /scripts; GET / (the web page, static/index.html).

How a request runs. The route validates it in the event loop (types and ranges by pydantic; sampler, size, the
work asked for and the prompts' length by `check_request`, against the server's `Limits`; images decoded in a
thread), then hands a `Job` to the `Worker` (worker.py, with the model catalog): one thread that owns the model and
runs jobs one at a time in the order they were accepted; a request that finds the queue full gets 503 with
Retry-After. The route awaits the job's future, so /progress and /interrupt answer while a job runs, and checks
every DISCONNECT_POLL_S seconds whether its client is still there: a job whose client went away is cancelled (a
waiting one never runs; a running one stops within a U-Net block). This file is the HTTP layer: requests and their
checks, the job a generation request becomes (`generate`), the errors clients see, the routes; guards.py holds the
protections every request meets (Host check, auth, cross-site POSTs, the body cap, the read deadline).

Decisions a client may notice:
- null in a request means "the default"; fields we do not know are ignored, and so are A1111 fields we do not
  implement (mask_blur, inpainting_fill, inpaint_full_res, resize_mode, restore_faces, tiling, subseed*, styles);
  `enable_hr` (hires fix) is refused rather than silently left out.
- width/height left out mean the model's native size (txt2img) or the init image's (img2img); an init image of
  another size is resized to width x height (A1111's resize mode 0).
- scheduler: "automatic" (the sampler name's own schedule: karras for "DPM++ 2M Karras") or "karras".
- limits (`stablediff serve --max-pixels --max-batch-pixels --max-steps --max-images --max-work
  --max-prompt-tokens`, defaults from limits.Limits): a request over one is refused before it is queued, in
  milliseconds, naming the value, the limit and the flag: 413 for a prompt or negative prompt that is too long
  (in characters, then in CLIP tokens), 422 for the rest (images = batch_size x n_iter). Where width/height are
  left out, the size checked is the model's native size when that model has been loaded before, else 512 (the
  native size of SD 1.x); the worker checks again with the real size before the first step.
- /progress: sampling_steps and job_count (n_iter) are right from the moment a job starts; queue_size counts the
  jobs waiting behind it.
- interrupt stops the running job (only that one, as in A1111) within a U-Net block. The pipeline drops a cancelled
  batch, so the response is a normal 200 with the images of the iterations (n_iter) already finished, possibly
  none, and info.interrupted.
- a model is named by a title from GET /sd-models (its path relative to --models-dir): never a client-given path.
  One model is in memory; POST /options {sd_model_checkpoint} loads it in queue order and makes it the default,
  override_settings.sd_model_checkpoint uses it for that request only (the next request loads the default back).
  `--model demo` is the bundled demo model. LoRAs and embeddings come from --lora-dir and --embeddings-dir, for
  every model loaded.
- errors: {"error": kind, "detail": one line}. Paths in it are shown relative to the folder they lie in
  (<models-dir>/..., <lora-dir>/...) or by their last part; a 500 names the kind of error, and the full error and
  traceback go to the server's log.
- security: HTTP Basic auth (--api-auth) guards every route, the web page and /docs included; bodies over 50 MB get
  413; CORS headers only for --cors-origin origins; the Host header must name this machine (400 otherwise; add
  names with --allowed-hosts); a POST from a page on another site gets 403, and a POST body must be JSON (415).
- slow clients: a request's headers must arrive within --read-timeout seconds (408), an idle keep-alive connection
  is closed after 5 s, and at most --limit-concurrency connections are served at once (503 beyond).
- shutdown (SIGINT/SIGTERM): the running job is cancelled and waiting ones fail with 503, so the process exits in
  seconds (after at most ServeConfig.shutdown_timeout s, requests still open are dropped).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import ipaddress
import json
import logging
import random
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, NamedTuple

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image, ImageOps
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from . import __version__, images, malloc, samplers
from .guards import BasicAuth, BodyLimit, HostCheck, PostGuard, read_timeout_protocol
from .limits import Limits, LimitError
from .pipeline import MAX_SEED, Cancelled, StableDiffusion, check_params, resolve_device
from .schedule import NoiseSchedule
from .tokenizer import PIECES, CLIPTokenizer, normalize
from .worker import Catalog, ClientError, Job, ModelEntry, Worker, startup_model

log = logging.getLogger("stablediff.server")

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 50 * 2**20
MAX_BATCH_SIZE = 16  # per iteration; A1111's web UI allows 8 (the Limits apply as well)
MAX_N_ITER = 100  # as A1111's web UI
MAX_IMAGE_PIXELS = 4096 * 4096  # of an uploaded image
SCHEDULERS = {"automatic": ("Automatic", None), "karras": ("Karras", "karras")}  # name -> (label, our schedule)
SD1_NATIVE_SIZE = 512  # the size checked for a model not loaded yet when width/height are left out
LONG_PIECE_BYTES = 64  # a longer run of letters is counted as one token a byte, not run through BPE
DISCONNECT_POLL_S = 0.5


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None  # default: the first checkpoint in models_dir, else DEFAULT_MODEL; "demo" works
    models_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: str | None = None  # "user:password"
    max_queue: int = 16
    output_dir: Path = Path("outputs")
    cors_origins: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "float32"
    max_body_bytes: int = MAX_BODY_BYTES
    limits: Limits = Limits()
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides localhost, IP addresses and `host`
    lora_dir: Path = Path("loras")
    embeddings_dir: Path = Path("embeddings")
    read_timeout: float = 10.0  # seconds for a request's headers (and the longest pause in a body)
    keep_alive: int = 5  # seconds an idle connection stays open after a response
    limit_concurrency: int = 64  # connections served at once; more get 503
    shutdown_timeout: int = 5  # seconds requests may still run after SIGINT/SIGTERM cancelled their jobs

    @property
    def host_names(self) -> tuple[str, ...]:
        """The Host names the server answers besides localhost and IP addresses."""
        own = () if self.host in ("", "0.0.0.0", "::") else (self.host,)
        return (*own, *self.allowed_hosts)


def bind_warning(host: str, api_auth: str | None) -> str | None:
    """The warning to print when the server would be reachable from other machines without a password."""
    if api_auth or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return f"--host {host} without --api-auth: anyone who can reach this address can use the server"


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


@functools.cache
def _tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()  # the bundled vocabulary, which every SD 1.x model uses


def count_tokens(text: str) -> int:
    """CLIP tokens of a prompt with BOS and EOS, as many as the pipeline makes or more. A piece (a run of letters or
    of punctuation) over LONG_PIECE_BYTES UTF-8 bytes, which no word is, counts as one token a byte (BPE never makes
    more) and is not run through BPE, whose time grows with the square of a piece's length: one 20,000-letter
    'word' takes 20 s there."""
    tokenizer, count = _tokenizer(), 2
    for piece in PIECES.findall(normalize(text)):
        size = len(piece.encode("utf-8"))
        count += size if size > LONG_PIECE_BYTES else len(tokenizer.encode(piece, add_special_tokens=False))
    return count


def output_size(req: Txt2ImgRequest, native_size: int, init_size: tuple[int, int] | None) -> tuple[int, int]:
    """width x height a request makes: as asked, else the init image's size rounded down to a multiple of 8
    (img2img), else the model's native size."""
    default = (init_size[0] - init_size[0] % 8, init_size[1] - init_size[1] % 8) if init_size else (native_size,) * 2
    return req.width or default[0], req.height or default[1]


def check_work(req: Txt2ImgRequest, limits: Limits, width: int, height: int) -> None:
    """The work a request asks for against the limits: ClientError 422 naming the value, the limit and the flag."""
    try:
        limits.check_work(width=width, height=height, steps=req.steps, batch_size=req.batch_size,
                          images=req.batch_size * req.n_iter)
    except LimitError as e:
        raise ClientError(422, str(e)) from None


def check_request(req: Txt2ImgRequest, limits: Limits, native_size: int,
                  init_size: tuple[int, int] | None = None) -> Plan:
    """Every check of a txt2img/img2img request that needs no model, cheapest first: the prompts' length in
    characters (413), what no model could run (422: hires fix, scheduler, sampler, size, steps, seed ...), the work
    asked for (422), the prompts' length in tokens (413). A few ms; at most about 0.3 s for 20,000 characters of
    random letters. ClientError otherwise."""
    prompts = {"prompt": req.prompt, "negative_prompt": req.negative_prompt}
    try:
        for name, text in prompts.items():
            limits.check_prompt(text, name)
    except LimitError as e:
        raise ClientError(413, str(e)) from None
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
    try:
        for name, text in prompts.items():
            limits.check_prompt(text, name, count_tokens=count_tokens)
    except LimitError as e:
        raise ClientError(413, str(e)) from None
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


# --- what clients see of errors -----------------------------------------------------------------------------------

ABSOLUTE_PATH = re.compile(r"""(?<![\w.:/>~-])(?:/|[A-Za-z]:\\)[^\s'"<>(),;]+""")


def public_message(text: str, roots: list[tuple[str, str]]) -> str:
    """One line for a client: each of `roots` (absolute folder, label) shown as its label (<lora-dir>/x.safetensors),
    any other absolute path by its last part (.../unet.safetensors), at most 500 characters."""
    line = " ".join(str(text).split())
    for root, label in roots:
        line = line.replace(root, label)

    def last_part(m: re.Match) -> str:
        parts = [p for p in re.split(r"[/\\]", m.group()) if p]
        return ".../" + parts[-1] if parts else "..."

    line = ABSOLUTE_PATH.sub(last_part, line)
    return line if len(line) <= 500 else line[:497] + "..."


def client_error(e: BaseException, roots: list[tuple[str, str]], logged: bool = False) -> ClientError:
    """The answer to an error out of a job: 422 for input only the loaded model can judge (a ValueError, e.g. a LoRA
    that is not there), 500 for the rest, with the full error in the server's log (unless already `logged`)."""
    if isinstance(e, ClientError):
        return e
    if isinstance(e, ValueError):
        log.warning("request refused: %s", e)
        return ClientError(422, public_message(e, roots))
    if not logged:
        log.error("request failed", exc_info=e)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return ClientError(500, "out of memory making this request; ask for fewer or smaller images "
                                "(the server goes on)")
    return ClientError(500, f"{type(e).__name__}: {public_message(e, roots)}")


# --- the app ------------------------------------------------------------------------------------------------------

def _field_errors(errors) -> list[dict]:
    out = []
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
        got = repr(e.get("input"))
        out.append({"field": name, "message": str(e.get("msg", "invalid")).removeprefix("Value error, "),
                    "got": got if len(got) <= 60 else got[:57] + "..."})
    return out


def _error_roots(config: ServeConfig, catalog: Catalog) -> list[tuple[str, str]]:
    """(absolute folder, label) for public_message, longest first, so a file in one shows relative to it."""
    roots = [(config.models_dir, "<models-dir>"), (config.lora_dir, "<lora-dir>"),
             (config.embeddings_dir, "<embeddings-dir>"), (config.output_dir, "<output-dir>")]
    found = {}
    for folder, label in roots:
        if folder is not None:
            for form in {str(Path(folder).absolute()), str(Path(folder).resolve())}:
                found[form.rstrip("/")] = label
    startup = catalog.startup
    if startup is not None and Path(startup.source).is_absolute():
        found.setdefault(startup.source, startup.title)
    return sorted(found.items(), key=lambda item: -len(item[0]))


def create_app(config: ServeConfig, *, load: Callable[[ModelEntry], StableDiffusion] | None = None) -> FastAPI:
    """The FastAPI app with its worker; the startup model is loaded before this returns (errors raise here)."""
    if load is None:
        import torch

        def load(entry):
            return StableDiffusion.from_pretrained(entry.source, device=config.device,
                                                   dtype=getattr(torch, config.dtype))

    def load_with_addons(entry: ModelEntry) -> StableDiffusion:
        pipe = load(entry)
        pipe.lora_dir = Path(config.lora_dir)
        for line in pipe.load_embeddings(config.embeddings_dir):
            log.warning("skipped embedding %s", line)
        return pipe

    catalog = Catalog(config.models_dir, startup_model(config.model, config.models_dir))
    if resolve_device(config.device).type == "cpu":
        malloc.keep_freed_memory()  # before the worker thread first allocates (it then shares the main heap)
    worker = Worker(load_with_addons, config.max_queue)
    options = {"checkpoint": catalog.startup, "clip_skip": 1}
    roots = _error_roots(config, catalog)
    try:
        worker.submit(Job("load model", lambda job: worker.use(catalog.startup))).result()
    except BaseException:
        worker.close()
        raise

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="stablediff", version=__version__, lifespan=lifespan)
    app.state.worker, app.state.catalog, app.state.options = worker, catalog, options

    @app.exception_handler(ClientError)
    async def refused(request: Request, e: ClientError):
        return JSONResponse({"error": type(e).__name__, "detail": public_message(e, roots)}, e.status,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = _field_errors(e.errors())
        detail = "; ".join(f"{x['field']}: {x['message']} (got {x['got']})" for x in errors)
        return JSONResponse({"error": "ValidationError", "detail": detail, "errors": errors}, 422)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):  # starlette then logs e with its traceback
        answer = client_error(e, roots, logged=True)
        return JSONResponse({"error": "InternalError", "detail": str(answer)}, answer.status)

    async def run(job: Job, request: Request | None = None):
        """Queue a job and wait for it without blocking the loop. With `request`, a client that goes away (checked
        every DISCONNECT_POLL_S s) cancels its job: a waiting one is dropped, a running one stops."""
        future = asyncio.wrap_future(worker.submit(job))
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception never retrieved"
        try:
            while not future.done():
                await asyncio.wait([future], timeout=DISCONNECT_POLL_S)
                if request is not None and not future.done() and await request.is_disconnected():
                    worker.cancel(job)
                    log.info("job %d (%s) cancelled: its client went away", job.job_id, job.kind)
                    raise ClientError(499, "the client closed the connection; the job was cancelled")
            return future.result()
        except asyncio.CancelledError:  # uvicorn gave up waiting for this request (shutdown)
            worker.cancel(job)
            raise
        except Cancelled:
            raise ClientError(503 if worker.closed else 499, "the job was cancelled before it started") from None
        except Exception as e:
            raise client_error(e, roots) from None

    async def generation(kind: str, req: Txt2ImgRequest, request: Request):
        override = req.override_settings
        entry = options["checkpoint"]
        if override.sd_model_checkpoint is not None:
            entry = await asyncio.to_thread(catalog.find, override.sd_model_checkpoint)
        clip_skip = override.CLIP_stop_at_last_layers or options["clip_skip"]
        init = mask = None
        if kind == "img2img":
            try:
                config.limits.check_prompt(req.prompt, "prompt")  # no decoding images for a request refused anyway
                config.limits.check_prompt(req.negative_prompt, "negative_prompt")
            except LimitError as e:
                raise ClientError(413, str(e)) from None
            init = await asyncio.to_thread(decode_image, req.init_images[0], "init_images[0]")
            if req.mask:
                mask = await asyncio.to_thread(decode_image, req.mask, "mask")
        native = worker.native_sizes.get(entry, SD1_NATIVE_SIZE)
        plan = await asyncio.to_thread(check_request, req, config.limits, native,
                                       init.size if init is not None else None)
        job = Job(kind, lambda job: generate(job, worker.use(entry), req, plan, config.limits, clip_skip, init, mask,
                                             config.output_dir), job_count=req.n_iter, steps=plan.steps)
        result = await run(job, request)
        if result["info"]["interrupted"] and worker.closed:
            raise ClientError(503, "the server is shutting down; the job was stopped")
        parameters = req.model_dump(mode="json")
        if kind == "img2img" and not req.include_init_images:
            parameters.update(init_images=None, mask=None)
        return {"images": result["images"], "parameters": parameters, "info": json.dumps(result["info"])}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await generation("txt2img", req, request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest, request: Request):
        return await generation("img2img", req, request)

    @app.get("/sdapi/v1/progress")
    async def progress():
        return worker.progress()

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.get("/sdapi/v1/samplers")
    async def sampler_list():
        return [{"name": s.label, "aliases": [s.name, *s.aliases],
                 "options": {}} for s in samplers.SAMPLERS.values()]

    @app.get("/sdapi/v1/schedulers")
    async def scheduler_list():
        return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1.0,
                 "need_inner_model": False} for name, (label, _) in SCHEDULERS.items()]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        entries = await asyncio.to_thread(catalog.entries)
        loaded, sha = worker.loaded, worker.sha256
        return [{"title": e.title, "model_name": e.model_name, "hash": sha[:10] if e == loaded and sha else None,
                 "sha256": sha if e == loaded else None, "filename": e.title, "config": None}
                for e in entries.values()]

    @app.get("/sdapi/v1/options")
    async def get_options():
        entry = options["checkpoint"]
        return {"sd_model_checkpoint": entry.title, "sd_checkpoint_hash": worker.sha256 if worker.loaded == entry
                else None, "CLIP_stop_at_last_layers": options["clip_skip"], "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(update: OverrideSettings):
        """CLIP_stop_at_last_layers applies to requests accepted after it; sd_model_checkpoint too, and the model is
        loaded in queue order before this answers (on failure the previous model stays the default)."""
        entry = None
        if update.sd_model_checkpoint is not None:
            entry = await asyncio.to_thread(catalog.find, update.sd_model_checkpoint)
        if update.CLIP_stop_at_last_layers is not None:
            options["clip_skip"] = update.CLIP_stop_at_last_layers
        if entry is not None:
            previous, options["checkpoint"] = options["checkpoint"], entry
            try:
                await run(Job("load model", lambda job: worker.use(entry)))
            except ClientError:
                if options["checkpoint"] == entry:
                    options["checkpoint"] = previous
                raise
        return None

    @app.post("/sdapi/v1/png-info")
    async def png_info(req: PngInfoRequest):
        image = await asyncio.to_thread(decode_image, req.image, "image")
        text = image.info.get("parameters", "")
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
        return {"info": text, "items": items, "parameters": images.parse_infotext(text) if text else {}}

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # outermost last: the Host check, CORS (answers preflights), auth, the cross-site POST guard, the body cap
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(PostGuard, cors_origins=config.cors_origins)
    if config.api_auth:
        app.add_middleware(BasicAuth, credentials=config.api_auth)
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=bool(config.api_auth))
    app.add_middleware(HostCheck, allowed=config.host_names)
    return app


class Server(uvicorn.Server):
    """uvicorn's server, which on SIGINT/SIGTERM first cancels the running job and fails the waiting ones (so the
    requests in flight answer at once), then does uvicorn's graceful shutdown and the app's lifespan end, where the
    worker thread is joined."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets=None):
        self.worker.shutdown()
        await super().shutdown(sockets)


def make_server(config: ServeConfig, app: FastAPI, **uvicorn_options) -> Server:
    """The uvicorn server for `app` with the config's timeouts and limits (the read deadline, keep-alive,
    limit_concurrency, the graceful-shutdown bound); uvicorn_options (e.g. log_level) are passed on."""
    options = dict(host=config.host, port=config.port, log_level="info", http=read_timeout_protocol(config.read_timeout),
                   timeout_keep_alive=config.keep_alive, limit_concurrency=config.limit_concurrency,
                   timeout_graceful_shutdown=config.shutdown_timeout)
    return Server(uvicorn.Config(app, **{**options, **uvicorn_options}), app.state.worker)


def log_to_stderr() -> None:
    """Send this package's log (refused and failed requests, skipped embeddings) to stderr as uvicorn writes its own."""
    logger = logging.getLogger("stablediff")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(uvicorn.logging.DefaultFormatter("%(levelprefix)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def serve(config: ServeConfig, app: FastAPI | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; the running job is then cancelled and the process exits in seconds."""
    log_to_stderr()
    make_server(config, app or create_app(config)).run()
