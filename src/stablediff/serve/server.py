"""`stablediff serve`: AUTOMATIC1111's HTTP API (the part clients use) and a small web page, on FastAPI + uvicorn.

    stablediff serve --models-dir models --port 7860          # then open http://127.0.0.1:7860/

Endpoints, with A1111's field names and defaults: POST /sdapi/v1/txt2img, /img2img, /interrupt, /skip, /options,
/png-info, /extra-single-image, /extra-batch-images, /refresh-checkpoints, /refresh-loras, /refresh-vae,
/refresh-embeddings; GET /sdapi/v1/progress, /samplers, /schedulers, /sd-models, /options, /cmd-flags, /memory,
/scripts, /script-info, /upscalers, /realesrgan-models, /face-restorers, /hypernetworks, /extensions, /embeddings,
/loras, /sd-vae, /prompt-styles, /latent-upscale-modes; GET /internal/ping ({}: clients ping it to see the server
is up); sd-webui-controlnet's GET /controlnet/version, /model_list, /module_list, /settings and POST
/controlnet/detect (controlnet_api.py); GET / (the web page, static/index.html). The lists beyond models
(resources.py) read their folders on every request, so the refresh routes but refresh-embeddings (which loads
--embeddings-dir into the model again, in queue order) have nothing to do.

How a request runs. The route validates it (types and ranges by pydantic; sampler, size, the work asked for and
the prompts' length by sdapi.check_request against the server's `Limits`, in a thread, as is decoding images),
then hands a `Job` to the `Worker` (worker.py, with the model catalog): one thread that owns the model and runs
jobs one at a time in the order they were accepted; a request that finds the queue full gets 503 with Retry-After.
The route awaits the job's future, so /progress and /interrupt answer while a job runs, and checks every
DISCONNECT_POLL_S seconds whether its client is still there: a job whose client went away is cancelled (a waiting
one never runs; a running one stops within a U-Net block). This file is the HTTP layer: the config, the errors
clients see, the routes (module-level functions on `router`, reaching what they share through request.app.state,
which create_app sets), the uvicorn server; sdapi.py holds the requests, their checks and the job a generation
request becomes (`generate`); guards.py the protections every request meets (Host check, auth, cross-site POSTs,
the body cap, the read deadline).

Decisions a client may notice:
- null in a request means "the default"; fields we do not know are ignored, and so are A1111 fields we do not
  implement (restore_faces); a hires upscaler that is
  not a latent mode, Lanczos, Nearest or a model in --upscaler-dir, a `script_name` and `alwayson_scripts` entries
  other than "controlnet" (no other scripts run here) are refused (422, naming them) rather than silently left out.
- ControlNet: alwayson_scripts.controlnet units as sd-webui-controlnet takes them, their models from
  --controlnet-dir (controlnet_api.py says what differs). inpainting_mask_invert
  takes 0/1 or true/false, as clients send both.
- what this server has not is listed as such: /face-restorers, /hypernetworks and /extensions answer [] (no face
  restoration, no hypernetworks; ControlNet's routes are built in, not an extension); /script-info has the one
  script /scripts names (controlnet, always on, once for txt2img and once for img2img, its units described by
  controlnet_api.py rather than as A1111's UI arguments); /realesrgan-models lists the --upscaler-dir models (the two
  networks Real-ESRGAN's models use, each usable as upscaler_1), not A1111's built-in downloads.
- /cmd-flags: only the A1111 flags with a counterpart here (cmd_flags), never --api-auth (A1111 sends the password)
  nor the folders (no answer shows the server's paths). /memory: "ram" is the machine's total, MemAvailable as free
  and this process's resident memory as used; "cuda" A1111's GPU figures when the server runs on CUDA, else
  {"error": "unavailable"} (resources.ram_memory, cuda_memory).
- extras: /extra-batch-images takes at most MAX_EXTRAS_IMAGES images (422 beyond); each is checked as
  /extra-single-image's one (upscaler, --max-pixels) before the job is queued, and an interrupt answers with the
  images done.
- styles: names from --styles-file (A1111's styles.csv), applied to the prompt and negative prompt in the order
  given (A1111's rule: into a style's {prompt}, else appended after ", "); the infotext and info show the styled
  prompts, `parameters` the request as sent. An unknown name is a 422.
- sd_vae (POST /options, override_settings): a file name from GET /sd-vae (--vae-dir), or "Automatic"/"None" for
  the model's own VAE (A1111's "Automatic" also looks for a VAE named after the checkpoint; we do not). Each job
  decodes with its request's choice, loaded on the worker thread before it runs, so an override lasts one
  request. The infotext names the file ("VAE: <file>").
- skip (A1111's /skip): the running job's current iteration (n_iter) is dropped and the next one runs; the answer
  has the images of the other iterations and info.interrupted false. A skip between two iterations is dropped.
- init_images: one, or up to batch_size of them (one for each image of the batch, which then has as many
  images, as A1111 does; more is a 422). The first gives the default size and the ControlNet units' image.
- width/height left out mean the model's native size (txt2img) or the init image's (img2img); either is rounded
  down to a multiple of 8 as A1111's latents round it (width 500 makes a 496-pixel image); an init image of
  another size and its mask are brought to width x height by resize_mode as A1111 does (0 just resize, 1 crop and
  resize, 2 resize and fill; 3, a latent upscale, is refused), a transparent init image flattened onto white, an
  RGBA mask with transparency read by its alpha, white over 128, any other mask by its gray (sdapi.fitted_images).
- inpainting takes A1111's mask_blur (or mask_blur_x/_y), inpainting_fill, inpaint_full_res and
  inpaint_full_res_padding with A1111's API defaults (4, 0 fill, true, 0), as masking.py prepares them; with
  A1111's samplers the latents are kept as A1111 keeps them (masking.KnownLatents). Only masked answers with the
  whole init image (its size, not width x height), as A1111 does.
- scheduler: "automatic" (the sampler name's own schedule: karras for "DPM++ 2M Karras") or "karras".
- limits (`stablediff serve --max-pixels --max-batch-pixels --max-steps --max-images --max-work
  --max-prompt-tokens`, defaults from limits.Limits): a request over one is refused before it is queued, in
  milliseconds, naming the value, the limit and the flag: 413 for a prompt or negative prompt that is too long
  (in characters, then in CLIP tokens, a BREAK counting as the 75 of the chunk it ends), 422 for the rest
  (images = batch_size x n_iter). Where width/height are
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
- security: HTTP Basic auth (--api-auth) guards every route, the web page and /docs included; bodies over 50 MB or
  with over 100,000 JSON values get 413; CORS headers only for --cors-origin origins; the Host header must name
  this machine (400 otherwise; add names with --allowed-hosts); a POST from a page on another site gets 403, and a
  POST body must be JSON (415; a bodiless POST such as webuiapi's /interrupt needs no Content-Type).
- slow clients: a request's headers must arrive within --read-timeout seconds (408), an idle keep-alive connection
  is closed after 5 s, and at most --limit-concurrency connections are served at once (503 beyond).
- shutdown (SIGINT/SIGTERM): the running job is cancelled and waiting ones fail with 503, so the process exits in
  seconds (after at most ServeConfig.shutdown_timeout s, requests still open are dropped).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import uvicorn
from uvicorn.logging import DefaultFormatter
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image

from .. import __version__, images, malloc, samplers
from .guards import BasicAuth, BodyLimit, HostCheck, PostGuard, read_timeout_protocol
from ..limits import NATIVE_SIZE, Limits
from ..pipeline import Cancelled, StableDiffusion, resolve_device
from .sdapi import (CONTROLNET_SCRIPT, SCHEDULERS, SETTINGS, ExtrasBatchImagesRequest, ExtrasRequest,
                    ExtrasSingleImageRequest, Img2ImgRequest, OverrideSettings, PngInfoRequest, Txt2ImgRequest,
                    check_extras, check_init_count, check_prompt_length, check_request, decode_image, extras,
                    fitted_images, generate, preview_png, upscaler_list)
from .controlnet_api import (API_VERSION, MAX_UNITS, DetectRequest, check_detect, detect, model_list,
                             module_list, request_controls)
from .resources import (LATENT_UPSCALE_MODES, cuda_memory, embedding_list, lora_list, ram_memory, style_list,
                        vae_list, vae_source)
from .worker import Catalog, ClientError, Job, ModelEntry, Worker, startup_model
from ..styles import read_styles

log = logging.getLogger("stablediff.serve.server")

STATIC = Path(__file__).parent.parent / "static"
MAX_BODY_BYTES = 50 * 2**20
DISCONNECT_POLL_S = 0.5
ALWAYSON_SCRIPTS = (CONTROLNET_SCRIPT,)  # the scripts requests may name (A1111's are per tab; ours run in both)
SCRIPT_TABS = ("txt2img", "img2img")


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
    upscaler_dir: Path | None = None  # .pth/.safetensors upscalers clients may name, besides Lanczos and Nearest
    vae_dir: Path | None = None  # VAE files clients may choose with the sd_vae option
    styles_file: Path | None = None  # A1111's styles.csv: the prompt styles requests may name
    controlnet_dir: Path | None = None  # ControlNet files and folders ControlNet units may name

    @property
    def host_names(self) -> tuple[str, ...]:
        """The Host names the server answers besides localhost and IP addresses."""
        own = () if self.host in ("", "0.0.0.0", "::") else (self.host,)
        return (*own, *self.allowed_hosts)


def is_loopback(host: str) -> bool:
    """Whether a --host value binds this machine only (localhost or a loopback address); "0.0.0.0", "" and a
    network address or name do not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, api_auth: str | None) -> str | None:
    """The warning to print when the server would be reachable from other machines without a password."""
    if api_auth or is_loopback(host):
        return None
    return f"--host {host} without --api-auth: anyone who can reach this address can use the server"


def cmd_flags(config: ServeConfig) -> dict:
    """A1111's /cmd-flags, kept to the flags with a counterpart here, by A1111's names with this server's values
    (A1111 sends all of its own). Left out on purpose: --api-auth, whose value is the password (A1111 sends it),
    and the folders (ckpt_dir, lora_dir, embeddings_dir, vae_dir ...), as no answer shows the server's paths."""
    return {"api": True, "listen": not is_loopback(config.host), "server_name": config.host, "port": config.port,
            "cors_allow_origins": ",".join(config.cors_origins) or None, "timeout_keep_alive": config.keep_alive,
            "api_server_stop": False}  # no /server-kill, /server-restart, /server-stop here


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


# --- the app: errors ----------------------------------------------------------------------------------------------

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
             (config.embeddings_dir, "<embeddings-dir>"), (config.output_dir, "<output-dir>"),
             (config.vae_dir, "<vae-dir>"), (config.upscaler_dir, "<upscaler-dir>"),
             (config.controlnet_dir, "<controlnet-dir>")]
    found = {}
    for folder, label in roots:
        if folder is not None:
            for form in {str(Path(folder).absolute()), str(Path(folder).resolve())}:
                found[form.rstrip("/")] = label
    startup = catalog.startup
    if startup is not None and Path(startup.source).is_absolute():
        found.setdefault(startup.source, startup.title)
    return sorted(found.items(), key=lambda item: -len(item[0]))


async def refused(request: Request, e: ClientError) -> JSONResponse:
    return JSONResponse({"error": type(e).__name__, "detail": public_message(e, request.app.state.roots)}, e.status,
                        headers=e.headers)


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = _field_errors(e.errors())
    detail = "; ".join(f"{x['field']}: {x['message']} (got {x['got']})" for x in errors)
    return JSONResponse({"error": "ValidationError", "detail": detail, "errors": errors}, 422)


async def failed(request: Request, e: Exception) -> JSONResponse:  # starlette then logs e with its traceback
    answer = client_error(e, request.app.state.roots, logged=True)
    return JSONResponse({"error": "InternalError", "detail": str(answer)}, answer.status)


# --- the app: jobs ------------------------------------------------------------------------------------------------

async def run(request: Request, job: Job, *, watch_client: bool = True):
    """Queue a job and wait for it without blocking the loop. With `watch_client`, a client that goes away (checked
    every DISCONNECT_POLL_S s) cancels its job: a waiting one is dropped, a running one stops."""
    worker = request.app.state.worker
    future = asyncio.wrap_future(worker.submit(job))
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "exception never retrieved"
    try:
        while not future.done():
            await asyncio.wait([future], timeout=DISCONNECT_POLL_S)
            if watch_client and not future.done() and await request.is_disconnected():
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
        raise client_error(e, request.app.state.roots) from None


async def request_model(state, override: OverrideSettings) -> ModelEntry:
    """The model a generation request uses: its override_settings', else the server's option."""
    if override.sd_model_checkpoint is None:
        return state.options["checkpoint"]
    return await asyncio.to_thread(state.catalog.find, override.sd_model_checkpoint)


async def request_images(req: Img2ImgRequest, limits: Limits) -> tuple[list[Image.Image], Image.Image | None]:
    """An img2img request's init images and mask, decoded in a thread once its prompts' length passed and the
    number of init images fits its batch size (no decoding images for a request refused anyway)."""
    check_prompt_length(req, limits)
    check_init_count(req)
    inits = [await asyncio.to_thread(decode_image, data, f"init_images[{i}]") for i, data in enumerate(req.init_images)]
    mask = await asyncio.to_thread(decode_image, req.mask, "mask") if req.mask else None
    return inits, mask


async def generation(kind: str, req: Txt2ImgRequest, request: Request) -> dict:
    """A txt2img/img2img request, checked (sdapi.check_request, in a thread), run as a job, answered as A1111."""
    state = request.app.state
    worker, config = state.worker, state.config
    entry = await request_model(state, req.override_settings)
    inits, mask = await request_images(req, config.limits) if kind == "img2img" else (None, None)
    init = inits[0] if inits else None  # (the first one gives the size, and ControlNet units without an image)
    plan = await asyncio.to_thread(check_request, req, config.limits, worker.native_sizes.get(entry, NATIVE_SIZE),
                                   init.size if init is not None else None, settings=state.options["settings"],
                                   styles=state.styles, vae_dir=config.vae_dir, upscaler_dir=config.upscaler_dir,
                                   init_sizes=[im.size for im in inits] if inits else None)
    controls = await asyncio.to_thread(request_controls, req, config.controlnet_dir, init, mask)
    # the images as the pipeline takes them (a mask of another aspect ratio: 422 here, before the job waits)
    fitted, gray = await asyncio.to_thread(fitted_images, inits, mask) if inits else (None, None)
    job = Job(kind, lambda job: generate(job, worker.use(entry, plan.vae), req, plan.params, config.limits, fitted,
                                         gray, config.output_dir, config.upscaler_dir, controls),
              job_count=req.n_iter, steps=plan.steps,
              preview_every=preview_every(state.options["settings"], req.override_settings))
    result = await run(request, job)
    if result["info"]["interrupted"] and worker.closed:
        raise ClientError(503, "the server is shutting down; the job was stopped")
    parameters = req.model_dump(mode="json")
    if kind == "img2img" and not req.include_init_images:
        parameters.update(init_images=None, mask=None)
    return {"images": result["images"], "parameters": parameters, "info": json.dumps(result["info"])}


# --- the app: routes ----------------------------------------------------------------------------------------------

router = APIRouter()


@router.post("/sdapi/v1/txt2img")
async def txt2img(req: Txt2ImgRequest, request: Request):
    return await generation("txt2img", req, request)


@router.post("/sdapi/v1/img2img")
async def img2img(req: Img2ImgRequest, request: Request):
    return await generation("img2img", req, request)


def preview_every(settings: dict, override: OverrideSettings) -> int:
    """Steps between live previews (0: none): A1111's live_previews_enable and show_progress_every_n_steps, the
    request's override_settings over the server's options."""
    live = {**settings, **override.model_dump(exclude_none=True)}
    return max(live["show_progress_every_n_steps"], 0) if live["live_previews_enable"] else 0


@router.get("/sdapi/v1/progress")
async def progress(request: Request, skip_current_image: bool = False):
    """A1111's /progress, with current_image (the running job's latest live preview) unless skipped."""
    worker = request.app.state.worker
    answer, job = worker.progress(), worker.current
    if not skip_current_image and job is not None and job.preview is not None:
        step, pipe, latents = job.preview
        if job.preview_png is None or job.preview_png[0] != step:
            job.preview_png = (step, await asyncio.to_thread(preview_png, pipe, latents))
        answer["current_image"] = job.preview_png[1]
    return answer


@router.post("/sdapi/v1/interrupt")
async def interrupt(request: Request):
    request.app.state.worker.interrupt()
    return {}


@router.post("/sdapi/v1/skip")
async def skip(request: Request):
    """Drop the running job's current iteration (n_iter) and go on with its next one."""
    request.app.state.worker.skip()
    return {}


@router.get("/sdapi/v1/samplers")
async def sampler_list():
    return [{"name": s.label, "aliases": [s.name, *s.aliases], "options": {}} for s in samplers.SAMPLERS.values()]


@router.get("/sdapi/v1/schedulers")
async def scheduler_list():
    return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1.0,
             "need_inner_model": False} for name, label in SCHEDULERS.items()]


@router.get("/sdapi/v1/sd-models")
async def sd_models(request: Request):
    worker = request.app.state.worker
    entries = await asyncio.to_thread(request.app.state.catalog.entries)
    loaded, sha = worker.loaded, worker.sha256
    return [{"title": e.title, "model_name": e.model_name, "hash": sha[:10] if e == loaded and sha else None,
             "sha256": sha if e == loaded else None, "filename": e.title, "config": None}
            for e in entries.values()]


@router.get("/sdapi/v1/options")
async def get_options(request: Request):
    worker, options = request.app.state.worker, request.app.state.options
    entry = options["checkpoint"]
    return {"sd_model_checkpoint": entry.title, "sd_checkpoint_hash": worker.sha256 if worker.loaded == entry
            else None, **options["settings"], "samples_format": "png"}


@router.post("/sdapi/v1/options")
async def set_options(update: OverrideSettings, request: Request):
    """The generation settings (CLIP_stop_at_last_layers, randn_source, eta_noise_seed_delta, sd_vae) apply to
    requests accepted after it; sd_model_checkpoint too. The model, then the VAE, are loaded in queue order before
    this answers (on failure the previous one stays the default)."""
    state = request.app.state
    entry = None
    if update.sd_model_checkpoint is not None:
        entry = await asyncio.to_thread(state.catalog.find, update.sd_model_checkpoint)
    vae = await asyncio.to_thread(vae_source, update.sd_vae, state.config.vae_dir) if update.sd_vae else None
    changed = {k: v for k, v in update.model_dump().items() if k in SETTINGS and v is not None and k != "sd_vae"}
    state.options["settings"].update(changed)
    if entry is not None:
        await switch_model(request, entry)
    if update.sd_vae is not None:
        worker, checkpoint = state.worker, state.options["checkpoint"]
        await run(request, Job("load vae", lambda job: worker.use(checkpoint, vae)), watch_client=False)
        state.options["settings"]["sd_vae"] = update.sd_vae
    return None


async def switch_model(request: Request, entry: ModelEntry) -> None:
    """Make `entry` the default model and load it in queue order; on failure the previous one stays the default
    (unless another request chose a third meanwhile)."""
    options, worker = request.app.state.options, request.app.state.worker
    previous, options["checkpoint"] = options["checkpoint"], entry
    try:
        await run(request, Job("load model", lambda job: worker.use(entry)), watch_client=False)
    except ClientError:
        if options["checkpoint"] == entry:
            options["checkpoint"] = previous
        raise


@router.post("/sdapi/v1/png-info")
async def png_info(req: PngInfoRequest):
    image = await asyncio.to_thread(decode_image, req.image, "image")
    text = image.info.get("parameters", "")
    items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
    return {"info": text, "items": items, "parameters": images.parse_infotext(text) if text else {}}


@router.get("/sdapi/v1/upscalers")
async def upscalers(request: Request):
    return await asyncio.to_thread(upscaler_list, request.app.state.config.upscaler_dir)


@router.get("/sdapi/v1/realesrgan-models")
async def realesrgan_models(request: Request):
    return await asyncio.to_thread(realesrgan_list, request.app.state.config.upscaler_dir)


def realesrgan_list(folder: Path | None) -> list[dict]:
    """A1111's /realesrgan-models: the models of /upscalers (--upscaler-dir; RRDBNet and SRVGGNetCompact, the
    networks Real-ESRGAN's models use, though an ESRGAN-era RRDBNet is listed too): name (what upscaler_1 takes),
    path (relative to the folder, never the server's) and scale. A1111 lists its built-in R-ESRGAN downloads; this
    server downloads none, so without the folder the list is empty."""
    return [{"name": row["name"], "path": row["model_path"], "scale": row["scale"]}
            for row in upscaler_list(folder) if row["model_path"] is not None]


async def run_extras(req: ExtrasRequest, request: Request) -> dict:
    """An extras request checked (sdapi.check_extras, in a thread), then run as a job in queue order (sdapi.extras):
    {"html_info", "images"}. A shutdown that stopped it before its last image is a 503, as for generations."""
    config = request.app.state.config
    pictures, source = await asyncio.to_thread(check_extras, req, config.limits, config.upscaler_dir)
    job = Job("extras", lambda job: extras(job, req, pictures, source), job_count=max(len(pictures), 1))
    result = await run(request, job)
    if len(result["images"]) < len(pictures) and request.app.state.worker.closed:
        raise ClientError(503, "the server is shutting down; the job was stopped")
    return result


@router.post("/sdapi/v1/extra-single-image")
async def extra_single_image(req: ExtrasSingleImageRequest, request: Request):
    """Upscale one image; "image" is null if an interrupt came before it was done (A1111's field may be null)."""
    result = await run_extras(req, request)
    return {"html_info": result["html_info"], "image": result["images"][0] if result["images"] else None}


@router.post("/sdapi/v1/extra-batch-images")
async def extra_batch_images(req: ExtrasBatchImagesRequest, request: Request):
    """Upscale each image of imageList the same way, one job for all: {"html_info", "images"} in their order."""
    return await run_extras(req, request)


@router.get("/sdapi/v1/scripts")
async def scripts():
    return {tab: list(ALWAYSON_SCRIPTS) for tab in SCRIPT_TABS}


@router.get("/sdapi/v1/script-info")
async def script_info():
    """A1111's ScriptInfo of each script of /scripts, once a tab. args is empty: a ControlNet unit is a dict of the
    fields controlnet_api.py reads, not a list of A1111 UI components' values."""
    return [{"name": name, "is_alwayson": True, "is_img2img": tab == "img2img", "args": []}
            for tab in SCRIPT_TABS for name in ALWAYSON_SCRIPTS]


@router.get("/sdapi/v1/face-restorers")
@router.get("/sdapi/v1/hypernetworks")
@router.get("/sdapi/v1/extensions")
async def none_here():
    """What this server has none of: face restoration models, hypernetworks, A1111 extensions (ControlNet's routes
    are built in)."""
    return []


@router.get("/sdapi/v1/cmd-flags")
async def get_cmd_flags(request: Request):
    return cmd_flags(request.app.state.config)


@router.get("/sdapi/v1/memory")
async def memory(request: Request):
    """A1111's /memory: {"ram", "cuda"} (resources.ram_memory, cuda_memory) for the device the server runs on."""
    device = resolve_device(request.app.state.config.device)
    return {"ram": await asyncio.to_thread(ram_memory), "cuda": cuda_memory(device)}


@router.get("/internal/ping")
async def ping():
    """A1111's /internal/ping (from its web UI): {} while the server is up."""
    return {}


@router.get("/sdapi/v1/embeddings")
async def embeddings(request: Request):
    pipe = request.app.state.worker.pipe
    loaded = dict(pipe.embedding_files) if pipe is not None else {}
    return await asyncio.to_thread(embedding_list, loaded, request.app.state.config.embeddings_dir)


@router.get("/sdapi/v1/loras")
async def loras(request: Request):
    return await asyncio.to_thread(lora_list, request.app.state.config.lora_dir)


@router.get("/sdapi/v1/sd-vae")
async def sd_vae(request: Request):
    return await asyncio.to_thread(vae_list, request.app.state.config.vae_dir)


@router.get("/sdapi/v1/prompt-styles")
async def prompt_styles(request: Request):
    return style_list(request.app.state.styles)


@router.get("/sdapi/v1/latent-upscale-modes")
async def latent_upscale_modes():
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


@router.post("/sdapi/v1/refresh-checkpoints")
@router.post("/sdapi/v1/refresh-loras")
@router.post("/sdapi/v1/refresh-vae")
async def refresh():
    """Nothing to do: models, LoRAs and VAEs are looked up in their folders on every request."""
    return None


@router.post("/sdapi/v1/refresh-embeddings")
async def refresh_embeddings(request: Request):
    """Load --embeddings-dir into the loaded model again, in queue order (a model loaded later reads it anyway)."""
    worker, folder = request.app.state.worker, request.app.state.config.embeddings_dir
    await run(request, Job("refresh embeddings", lambda job: load_embeddings(worker.pipe, folder)),
              watch_client=False)
    return None


@router.get("/controlnet/version")
async def controlnet_version():
    return {"version": API_VERSION}


@router.get("/controlnet/model_list")
async def controlnet_model_list(request: Request, update: bool = True):
    """The folder is read on every request, so `update` has nothing to do."""
    return await asyncio.to_thread(model_list, request.app.state.config.controlnet_dir)


@router.get("/controlnet/module_list")
async def controlnet_module_list(alias_names: bool = False):
    return module_list(alias_names)


@router.get("/controlnet/settings")
async def controlnet_settings():
    return {"control_net_unit_count": MAX_UNITS}


@router.post("/controlnet/detect")
async def controlnet_detect(req: DetectRequest, request: Request):
    """Run a preprocessor on images (controlnet_api.check_detect, then detect as a job in queue order)."""
    module, inputs = await asyncio.to_thread(check_detect, req, request.app.state.config.limits)
    return await run(request, Job("detect", lambda job: detect(module, inputs)))


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")


# --- the app: wiring ----------------------------------------------------------------------------------------------

def load_pretrained(config: ServeConfig, entry: ModelEntry) -> StableDiffusion:
    """The default loader: from_pretrained on the config's device and dtype."""
    import torch

    return StableDiffusion.from_pretrained(entry.source, device=config.device, dtype=getattr(torch, config.dtype))


def load_with_addons(load: Callable[[ModelEntry], StableDiffusion], config: ServeConfig,
                     entry: ModelEntry) -> StableDiffusion:
    """`load(entry)` with the config's LoRA folder and embeddings (an embedding that does not fit is logged)."""
    pipe = load(entry)
    pipe.lora_dir = Path(config.lora_dir)
    load_embeddings(pipe, config.embeddings_dir)
    return pipe


def load_embeddings(pipe: StableDiffusion, folder: Path) -> None:
    """The folder's embeddings into `pipe` (an embedding that does not fit is logged and left out)."""
    for line in pipe.load_embeddings(folder):
        log.warning("skipped embedding %s", line)


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    await asyncio.to_thread(app.state.worker.close)


def start_worker(config: ServeConfig, catalog: Catalog, load: Callable[[ModelEntry], StableDiffusion]) -> Worker:
    """The worker thread, with the startup model loaded (its error raises here)."""
    if resolve_device(config.device).type == "cpu":
        malloc.keep_freed_memory()  # before the worker thread first allocates (it then shares the main heap)
    worker = Worker(functools.partial(load_with_addons, load, config), config.max_queue)
    try:
        worker.submit(Job("load model", lambda job: worker.use(catalog.startup))).result()
    except BaseException:
        worker.close()
        raise
    return worker


def add_middleware(app: FastAPI, config: ServeConfig) -> None:
    """Outermost last: the Host check, CORS (answers preflights), auth, the cross-site POST guard, the body cap."""
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(PostGuard, cors_origins=config.cors_origins)
    if config.api_auth:
        app.add_middleware(BasicAuth, credentials=config.api_auth)
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=bool(config.api_auth))
    app.add_middleware(HostCheck, allowed=config.host_names)


def create_app(config: ServeConfig, *, load: Callable[[ModelEntry], StableDiffusion] | None = None) -> FastAPI:
    """The FastAPI app with its worker; the startup model is loaded before this returns (errors raise here). The
    routes reach what they share through app.state: config, catalog, worker, options (the model and clip skip
    requests use by default; POST /options changes them) and roots (for public_message)."""
    catalog = Catalog(config.models_dir, startup_model(config.model, config.models_dir))
    styles = read_styles(config.styles_file) if config.styles_file is not None else {}  # before the slow load
    worker = start_worker(config, catalog, load or functools.partial(load_pretrained, config))
    app = FastAPI(title="stablediff", version=__version__, lifespan=lifespan)
    app.state.config, app.state.catalog, app.state.worker = config, catalog, worker
    app.state.options = {"checkpoint": catalog.startup, "settings": dict(SETTINGS)}
    app.state.styles = styles
    app.state.roots = _error_roots(config, catalog)
    app.add_exception_handler(ClientError, refused)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, failed)
    app.include_router(router)
    add_middleware(app, config)
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
    options = dict(host=config.host, port=config.port, log_level="info",
                   http=read_timeout_protocol(config.read_timeout), timeout_keep_alive=config.keep_alive,
                   limit_concurrency=config.limit_concurrency, timeout_graceful_shutdown=config.shutdown_timeout)
    return Server(uvicorn.Config(app, **{**options, **uvicorn_options}), app.state.worker)


def log_to_stderr() -> None:
    """Send this package's log (refused and failed requests, skipped embeddings) to stderr as uvicorn writes its own."""
    logger = logging.getLogger("stablediff")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def serve(config: ServeConfig, app: FastAPI | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; the running job is then cancelled and the process exits in seconds."""
    log_to_stderr()
    make_server(config, app or create_app(config)).run()
