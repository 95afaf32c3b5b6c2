"""`stablediff serve`: AUTOMATIC1111's HTTP API (the part clients use) and a small web page, on FastAPI + uvicorn.

    stablediff serve --models-dir models --port 7860          # then open http://127.0.0.1:7860/

Endpoints, with A1111's field names and defaults: POST /sdapi/v1/txt2img, /img2img, /interrupt, /options, /png-info;
GET /sdapi/v1/progress, /samplers, /schedulers, /sd-models, /options, /scripts; GET / (the web page, static/index.html).

How a request runs. The route validates it in the event loop (types and ranges by pydantic, sampler and size by
`check_params`, images decoded in a thread), then hands a `Job` to the `Worker` (worker.py, with the model catalog):
one thread that owns the model and runs jobs one at a time in the order they were accepted; a request that finds
the queue full gets 503 with Retry-After. An accepted job always runs exactly once, even if its client goes away.
The route awaits the job's future, so /progress and /interrupt answer while a job runs. This file is the HTTP layer:
requests and their checks, the job a generation request becomes (`generate`), auth and the body cap, the routes.

Decisions a client may notice:
- null in a request means "the default"; fields we do not know are ignored, and so are A1111 fields we do not
  implement (mask_blur, inpainting_fill, inpaint_full_res, resize_mode, restore_faces, tiling, subseed*, styles);
  `enable_hr` (hires fix) is refused rather than silently left out.
- width/height left out mean the model's native size (txt2img) or the init image's (img2img); an init image of
  another size is resized to width x height (A1111's resize mode 0).
- scheduler: "automatic" (the sampler name's own schedule: karras for "DPM++ 2M Karras") or "karras".
- interrupt stops the running job after the step in progress. The pipeline drops a cancelled batch, so the response
  is a normal 200 with the images of the iterations (n_iter) already finished, possibly none, and info.interrupted.
- a model is named by a title from GET /sd-models (its path relative to --models-dir): never a client-given path.
  One model is in memory; POST /options {sd_model_checkpoint} loads it in queue order and makes it the default,
  override_settings.sd_model_checkpoint uses it for that request only (the next request loads the default back).
- security: HTTP Basic auth (--api-auth) guards every route, the web page and /docs included; bodies over 50 MB get
  413; CORS headers only for --cors-origin origins.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import ipaddress
import json
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image, ImageOps
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from . import __version__, images, malloc, samplers
from .pipeline import MAX_SEED, Cancelled, StableDiffusion, check_params, resolve_device
from .worker import Catalog, ClientError, Job, ModelEntry, Worker, startup_model

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 50 * 2**20
MAX_BATCH_SIZE = 16  # per iteration; A1111's web UI allows 8
MAX_N_ITER = 100  # as A1111's web UI
MAX_IMAGE_PIXELS = 4096 * 4096  # of an uploaded image
SCHEDULERS = {"automatic": ("Automatic", None), "karras": ("Karras", "karras")}  # name -> (label, our schedule)


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None  # default: the first checkpoint in models_dir, else DEFAULT_MODEL
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


def _sampler(req: Txt2ImgRequest) -> tuple[str, str | None]:
    """(sampler name, schedule) for a request, after the checks that need no model; ClientError (422) otherwise."""
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
    try:
        check_params(steps=req.steps, cfg_scale=req.cfg_scale, width=req.width, height=req.height,
                     batch_size=req.batch_size, sampler=spec.name, schedule=schedule,
                     seed=None if req.seed < 0 else req.seed)
    except ValueError as e:
        raise ClientError(422, str(e)) from None
    return spec.name, schedule


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


def generate(job: Job, pipe: StableDiffusion, req: Txt2ImgRequest, sampler: str, schedule: str | None,
             clip_skip: int, init: Image.Image | None, mask: Image.Image | None, output_dir: Path) -> dict:
    """Run a txt2img/img2img request on the worker thread: n_iter pipeline calls of batch_size images each, image k
    seeded seed + k as A1111 does. Returns {"images": [base64 PNG], "info": A1111's info fields + ours}."""
    seed = req.seed if req.seed >= 0 else random.randint(0, MAX_SEED - req.batch_size * req.n_iter)
    size = (init.width - init.width % 8, init.height - init.height % 8) if init is not None else (pipe.native_size,) * 2
    width, height = req.width or size[0], req.height or size[1]
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
                                batch_size=req.batch_size, sampler=sampler, schedule=schedule, clip_skip=clip_skip,
                                init_image=init, mask_image=mask,
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
    info = dict(
        prompt=req.prompt, all_prompts=[req.prompt] * len(pictures), negative_prompt=req.negative_prompt,
        all_negative_prompts=[req.negative_prompt] * len(pictures), seed=seed, all_seeds=seeds, subseed=seed,
        all_subseeds=seeds, subseed_strength=0, width=width, height=height,
        sampler_name=samplers.SAMPLERS[sampler].label, scheduler="karras" if schedule == "karras" else "automatic",
        cfg_scale=req.cfg_scale, steps=req.steps,
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


# --- middleware: HTTP Basic auth and the body cap, on every route -------------------------------------------------

class BasicAuth:
    """HTTP Basic auth on every request (API, web page, docs); user and password compared in constant time."""

    def __init__(self, app, credentials: str):
        user, _, password = credentials.partition(":")
        self.app, self.user, self.password = app, user.encode(), password.encode()

    def _allowed(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        user_ok = hmac.compare_digest(user, self.user)  # both compared, so the time says nothing about which
        password_ok = hmac.compare_digest(password, self.password)
        return scheme.lower() == b"basic" and bool(sep) and user_ok and password_ok

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" or self._allowed(dict(scope["headers"]).get(b"authorization", b"")):
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            await JSONResponse({"detail": "incorrect or missing username and password (HTTP Basic auth)"}, 401,
                               headers={"WWW-Authenticate": 'Basic realm="stablediff", charset="UTF-8"'})(
                scope, receive, send)
        else:  # a websocket
            await send({"type": "websocket.close", "code": 1008})


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413: by Content-Length before reading, or while reading a
    chunked body (which is then handed on from memory)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, scope, receive, send, status=413, message=None):
        size = f"{self.limit / 2**20:g} MB" if self.limit >= 2**20 else f"{self.limit} byte"
        message = message or f"request body over the {size} limit"
        await JSONResponse({"detail": message}, status)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._refuse(scope, receive, send, 400, f"bad Content-Length {length[:20]!r}")
            if int(length) > self.limit:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


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


def create_app(config: ServeConfig, *, load: Callable[[ModelEntry], StableDiffusion] | None = None) -> FastAPI:
    """The FastAPI app with its worker; the startup model is loaded before this returns (errors raise here)."""
    if load is None:
        import torch

        def load(entry):
            return StableDiffusion.from_pretrained(entry.source, device=config.device,
                                                   dtype=getattr(torch, config.dtype))

    catalog = Catalog(config.models_dir, startup_model(config.model, config.models_dir))
    if resolve_device(config.device).type == "cpu":
        malloc.keep_freed_memory()  # before the worker thread first allocates (it then shares the main heap)
    worker = Worker(load, config.max_queue)
    options = {"checkpoint": catalog.startup, "clip_skip": 1}
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
    async def client_error(request: Request, e: ClientError):
        return JSONResponse({"error": type(e).__name__, "detail": str(e)}, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = _field_errors(e.errors())
        detail = "; ".join(f"{x['field']}: {x['message']} (got {x['got']})" for x in errors)
        return JSONResponse({"error": "ValidationError", "detail": detail, "errors": errors}, 422)

    async def run(job: Job):
        """Queue a job and wait for it without blocking the loop; a vanished client does not cancel it."""
        try:
            return await asyncio.shield(asyncio.wrap_future(worker.submit(job)))
        except (ClientError, asyncio.CancelledError):
            raise
        except ValueError as e:  # input only the loaded model can judge
            raise ClientError(422, str(e)) from None
        except Exception as e:
            raise ClientError(500, f"{type(e).__name__}: {e}") from None

    async def generation(kind: str, req: Txt2ImgRequest):
        sampler, schedule = _sampler(req)
        override = req.override_settings
        entry = options["checkpoint"]
        if override.sd_model_checkpoint is not None:
            entry = await asyncio.to_thread(catalog.find, override.sd_model_checkpoint)
        clip_skip = override.CLIP_stop_at_last_layers or options["clip_skip"]
        init = mask = None
        if kind == "img2img":
            init = await asyncio.to_thread(decode_image, req.init_images[0], "init_images[0]")
            if req.mask:
                mask = await asyncio.to_thread(decode_image, req.mask, "mask")
        job = Job(kind, lambda job: generate(job, worker.use(entry), req, sampler, schedule, clip_skip, init, mask,
                                             config.output_dir), job_count=req.n_iter)
        result = await run(job)
        parameters = req.model_dump(mode="json")
        if kind == "img2img" and not req.include_init_images:
            parameters.update(init_images=None, mask=None)
        return {"images": result["images"], "parameters": parameters, "info": json.dumps(result["info"])}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest):
        return await generation("txt2img", req)

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest):
        return await generation("img2img", req)

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

    # outermost last: CORS answers preflights, then auth, then the body cap
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    if config.api_auth:
        app.add_middleware(BasicAuth, credentials=config.api_auth)
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=bool(config.api_auth))
    return app


def serve(config: ServeConfig, app: FastAPI | None = None) -> None:
    """Run the server until Ctrl-C; requests in flight are finished first."""
    uvicorn.run(app or create_app(config), host=config.host, port=config.port, log_level="info")
