"""`stablediff ...`: the command line.

    stablediff generate PROMPT [options]   text -> PNG files in --output-dir, named NNNNN-SEED.png
    stablediff samplers                    the samplers, their AUTOMATIC1111 names and aliases
    stablediff info MODEL                  what a checkpoint holds, read from its weights without building a model
    stablediff serve [options]             AUTOMATIC1111's HTTP API and a web page (needs the `server` extra)

Only argparse and the standard library are imported at module level, so `stablediff --help` answers at once;
torch and the pipeline are imported inside the subcommands that need them. Bad input gets one line on stderr
(`stablediff: error: ...`) and exit code 2, before any model is loaded; so does asking for more work than the
--max-* limits allow (limits.py; the line ends with the flag that raises the bound). A failure while running (a
full disk, out of memory) is one line too, with exit code 1; Ctrl-C exits 130.

A new subcommand that generates (img2img, inpaint, ...) gets its options from `add_generation_options` and checks
its input with `check_generation_args` (both in cli_options.py), loads with `load_model`, calls the pipeline
through `run_pipeline` and writes with `save_results`, as `cmd_generate` does.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings
from pathlib import Path

from . import malloc
from .cli_options import (UsageError, add_generation_options, add_img2img_options, add_inpainting_options,
                          add_preview_options, check_generation_args, check_image_args, check_model_source,
                          check_output_dir, check_preview_args, error_reason, limits_from_args, pad_arg)
from .limits import Limits
from .params import DEFAULT_MODEL


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), so every bad input reads the same way."""

    def error(self, message):
        self.exit(2, f"stablediff: error: {message} (see `{self.prog} --help`)\n")


# --- parsers ----------------------------------------------------------------------------------------------------


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="stablediff", description="Stable Diffusion 1.x text-to-image, from the components up.")
    parser.add_argument("--version", action="version", version=f"stablediff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="make images from a text prompt",
                         description="Make images from a text prompt; prints each saved PNG's path.")
    gen.add_argument("prompt", metavar="PROMPT", nargs="?", help="what the image should show")
    gen.add_argument("--from-png", type=Path, metavar="IMAGE.png",
                     help="remake the image whose generation parameters (A1111's or ours) this PNG holds; "
                          "PROMPT and the options given here replace the PNG's")
    add_generation_options(gen)
    add_preview_options(gen)
    gen.set_defaults(func=cmd_generate)
    if not defaults:  # for given_options: an option the command line leaves out is then absent
        for action in gen._actions:
            action.default = argparse.SUPPRESS

    i2i = sub.add_parser("img2img", help="repaint an image following a prompt",
                         description="Encode --init-image, noise it as --strength says, and denoise it toward "
                                     "PROMPT. The size defaults to the image's (rounded down to a multiple of 8).")
    i2i.add_argument("prompt", metavar="PROMPT", help="what the image should show")
    i2i.add_argument("--strength", type=float, default=0.75, metavar="S",
                     help="how much to change it, in (0, 1] (default: 0.75)")
    add_img2img_options(i2i)
    add_generation_options(i2i)
    add_preview_options(i2i)
    i2i.set_defaults(func=cmd_img2img, mask=None, pad=None)

    inp = sub.add_parser("inpaint", help="repaint the white part of a mask, or outpaint",
                         description="Repaint the white area of --mask in --init-image following PROMPT. With --pad "
                                     "(outpainting) the image is extended first, its new border repeating the edge "
                                     "pixels; the border, and 8 pixels into the image (without --mask), are "
                                     "repainted.")
    inp.add_argument("prompt", metavar="PROMPT", help="what the repainted area should show")
    inp.add_argument("--mask", type=Path, metavar="MASK.png", help="white = repaint, black = keep")
    inp.add_argument("--pad", metavar="L,R,T,B|N",
                     help="outpaint: extend the image by these pixels left, right, top, bottom (or N on every side), "
                          "multiples of 8; --mask, if given, is padded with white")
    inp.add_argument("--strength", type=float, default=1.0, metavar="S",
                     help="how much to change the masked area, in (0, 1] (default: 1.0)")
    add_img2img_options(inp)
    add_inpainting_options(inp)
    add_generation_options(inp)
    add_preview_options(inp)
    inp.set_defaults(func=cmd_img2img)

    bat = sub.add_parser("batch", help="make every image a job file lists (resumable; locally or on Ray)",
                         description="Make the images of a job file: a .txt (one prompt a line), .csv (a header "
                                     "line, then one row a line) or .jsonl (one JSON object a line) whose rows may "
                                     "set prompt, negative_prompt, seed, steps, cfg_scale, sampler, schedule, width, "
                                     "height, batch_size, clip_skip and controls (ControlNet units: a list of "
                                     "objects with model, image, weight, ...; images relative to the job file); "
                                     "the options below are the defaults. Files "
                                     "are DIR/LINE-SEED-SAMPLER.png plus DIR/manifest.jsonl; running the same "
                                     "command again makes only what is missing. A row without a seed gets one "
                                     "derived from --seed (default 0) and its line number.")
    bat.add_argument("jobs", metavar="JOBS", type=Path, nargs="?", help="the job file (.txt, .csv or .jsonl)")
    bat.add_argument("--seeds", metavar="LIST", help="sweep: make every row with each of these seeds, e.g. 1-100 "
                                                      "or 1,5,9-12 (instead of the row's seed and batch size)")
    bat.add_argument("--samplers", metavar="LIST",
                     help="sweep: make every row with each of these samplers, e.g. euler,dpmpp_2m")
    bat.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run on Ray Data: a new local Ray, or the cluster at ADDRESS (auto, HOST:6379 or "
                          "ray://HOST:10001); needs the ray extra: pip install -e \".[ray]\"")
    bat.add_argument("--workers", type=int, default=None, metavar="N",
                     help="with --ray: pipelines (Ray actors) to run, each on its own GPU where the cluster has "
                          "GPUs (default: one per GPU, else 1)")
    bat.add_argument("--skip-bad", action="store_true", help="report bad rows and make the others")
    add_generation_options(bat)
    bat.set_defaults(func=cmd_batch)

    smp = sub.add_parser("samplers", help="list the samplers and their names",
                         description="List the samplers: canonical name, AUTOMATIC1111 label, aliases, karras.")
    smp.set_defaults(func=cmd_samplers)

    info = sub.add_parser("info", help="describe a checkpoint without building the models",
                          description="Layout, family, dtypes, parameter counts and native size of a checkpoint.")
    info.add_argument("model", metavar="MODEL", help="a .safetensors/.ckpt file, a diffusers folder or a Hub id")
    info.set_defaults(func=cmd_info)

    ups = sub.add_parser("upscale", help="upscale an image with an ESRGAN / Real-ESRGAN model, Lanczos or Nearest",
                         description="Upscale IN.png by --scale with an upscaler model file (ESRGAN, Real-ESRGAN "
                                     "RRDBNet or Compact, .pth or .safetensors) or a resampling filter; prints the "
                                     "saved PNG's path. As AUTOMATIC1111: the size is int(side x scale) rounded down "
                                     "to a multiple of 8; a model of another scale is run again or Lanczos-resized.")
    ups.add_argument("image", metavar="IN.png", type=Path, help="the image to upscale")
    ups.add_argument("--upscaler", required=True, metavar="FILE|lanczos|nearest",
                     help="a .pth/.safetensors upscaler model, or lanczos or nearest")
    ups.add_argument("--scale", type=float, default=2.0, metavar="S", help="upscale factor in 1..8 (default: 2)")
    ups.add_argument("--tile", type=int, default=None, metavar="PX",
                     help="a model sees tiles of this many pixels a side, 0 = the whole image (default: 192, "
                          "A1111's ESRGAN_tile)")
    ups.add_argument("--tile-overlap", type=int, default=None, metavar="PX",
                     help="pixels neighbouring tiles share; each keeps its half (default: 16)")
    ups.add_argument("--output-dir", default="outputs", metavar="DIR", type=Path,
                     help="where the PNG goes, created if missing, named NNNNN-SEED.png (default: outputs)")
    from .limits import Limits  # a local name of this function (the serve block imports it too)

    ups.add_argument("--max-pixels", type=int, default=Limits.max_pixels, metavar="N",
                     help=f"refuse an output of more pixels than this (default: {Limits.max_pixels:,})")
    ups.set_defaults(func=cmd_upscale)

    srv = sub.add_parser("serve", help="serve AUTOMATIC1111's HTTP API and a web page",
                         description="Serve AUTOMATIC1111's /sdapi/v1 API (txt2img, img2img, progress, interrupt, "
                                     "options, ...) and a web page at /, on FastAPI + uvicorn. Needs the `server` "
                                     "extra: pip install 'stablediff[server]'.")
    srv.add_argument("--model", default=None, metavar="M",
                     help="the model loaded first: a title listed from --models-dir, a file or folder, or a Hub id "
                          f"(default: the first checkpoint in --models-dir, else {DEFAULT_MODEL})")
    srv.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                     help="the .safetensors/.ckpt files and diffusers folders clients may switch between")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    srv.add_argument("--api-auth", default=None, metavar="USER:PASS",
                     help="require HTTP Basic auth with this user and password on every route")
    srv.add_argument("--max-queue", type=int, default=16, metavar="N",
                     help="requests that may wait behind the running one; more get 503 (default: 16)")
    srv.add_argument("--output-dir", default="outputs", metavar="DIR", type=Path,
                     help="where requests with save_images go (default: outputs)")
    srv.add_argument("--cors-origin", action="append", default=[], metavar="URL",
                     help="allow browser pages from this origin to call the API (repeatable; default: none)")
    srv.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                     help="where to run (default: auto = cuda, else mps, else cpu)")
    srv.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="weights and activations of the text encoder and U-Net (default: float32)")
    srv.add_argument("--lora-dir", type=Path, default=Path("loras"), metavar="DIR",
                     help="where <lora:NAME:w> tags in prompts are looked up, for every model (default: ./loras)")
    srv.add_argument("--embeddings-dir", type=Path, default=Path("embeddings"), metavar="DIR",
                     help="textual-inversion embeddings loaded into every model (default: ./embeddings)")
    srv.add_argument("--vae-dir", type=Path, default=None, metavar="DIR",
                     help="VAE files (.safetensors/.ckpt/.pt) clients may choose with the sd_vae option "
                          "(default: none, only the model's own)")
    srv.add_argument("--upscaler-dir", type=Path, default=None, metavar="DIR",
                     help="ESRGAN-family upscaler files clients may name in /extra-single-image, besides Lanczos "
                          "and Nearest (default: none)")
    srv.add_argument("--controlnet-dir", type=Path, default=None, metavar="DIR",
                     help="ControlNet files and diffusers folders clients may name in alwayson_scripts.controlnet "
                          "units and list at /controlnet/model_list (default: none)")
    srv.add_argument("--styles-file", type=Path, default=None, metavar="CSV",
                     help="AUTOMATIC1111's styles.csv (name,prompt,negative_prompt): the prompt styles requests "
                          "may name in `styles` (default: none)")
    srv.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME",
                     help="a Host name to answer besides localhost, IP addresses and --host (repeatable; '*' for "
                          "any); other names get 400, which stops DNS-rebinding pages")
    srv.add_argument("--read-timeout", type=float, default=10.0, metavar="S",
                     help="seconds a client has to send a request's headers, and the longest pause in a body "
                          "(default: 10)")
    srv.add_argument("--limit-concurrency", type=int, default=64, metavar="N",
                     help="connections served at once; more get 503 (default: 64)")
    import dataclasses

    from .limits import Limits  # torch-free

    limit_help = {"max_pixels": "width x height of one image", "max_batch_pixels": "batch_size x width x height",
                  "max_images": "images of one request (batch_size x n_iter)",
                  "max_work": "images x steps x width x height / 512^2 of one request",
                  "max_prompt_tokens": "CLIP tokens of a prompt or negative prompt (and 20 characters a token)"}
    for f in dataclasses.fields(Limits):
        srv.add_argument(Limits.flag(f.name), type=int, default=f.default, metavar="N",
                         help=f"refuse requests over this: {limit_help.get(f.name, f.name[4:].replace('_', ' '))} "
                              f"(default: {f.default:,})")
    srv.set_defaults(func=cmd_serve)
    return parser


# --- checks and shared steps ------------------------------------------------------------------------------------


def load_model(args: argparse.Namespace):
    """StableDiffusion.from_pretrained with the shared options; a bad checkpoint is a UsageError (one line)."""
    import torch

    from .pipeline import StableDiffusion

    parse_controls(args)  # bad --control values fail before the model loads
    try:
        pipe = StableDiffusion.from_pretrained(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                                               safety_checker=getattr(args, "safety_checker", False),
                                               vae_dtype=getattr(torch, getattr(args, "vae_dtype", "float32")),
                                               vae=getattr(args, "vae", None))
        pipe.vae_tiling = getattr(args, "vae_tiling", None)
        if getattr(args, "compile", False):
            pipe.compile()
        pipe.lora_dir = args.lora_dir
        for line in pipe.load_embeddings(args.embeddings_dir):
            print(f"stablediff: warning: skipped embedding {line}", file=sys.stderr)
        return pipe
    except (ValueError, OSError) as e:  # CheckpointError, LoraError and EmbeddingError are ValueErrors
        raise UsageError(str(e)) from None


def save_results(result, output_dir: Path) -> list[Path]:
    """Save each image of a GenerationResult with its infotext; print and return the paths.

    An image that cannot be saved (a full disk, ...) does not cost the others, which took minutes to compute:
    every image is tried, the ones that failed are saved to a fallback folder (save_elsewhere), and then a
    UsageError (exit 1) says how many failed where and why, where they went, and the --seed that makes them again."""
    paths, unsaved, error = [], [], None
    for item in zip(result.images, result.seeds, result.infotexts, result.nsfw or [False] * len(result.images)):
        try:
            paths.append(_save_one(output_dir, *item))
        except OSError as e:
            unsaved.append(item)
            error = error or e
    if unsaved:
        where, saved = save_elsewhere(unsaved)
        seeds = ", ".join(str(seed) for _, seed, _, _ in unsaved)
        kept = (f"saved them to {where} instead" if saved == len(unsaved) else
                f"saved {saved} of them to {where}, the rest nowhere" if saved else "they are not saved anywhere")
        raise UsageError(f"could not save {len(unsaved)} of {len(result.images)} images to {output_dir} "
                         f"({error_reason(error)}): seeds {seeds}; {kept}; the same command with --seed {result.seeds[0]} "
                         "makes them again (image k has seed + k)", code=1)
    return paths


def _save_one(directory: Path, image, seed: int, text: str, flagged: bool) -> Path:
    """images.save_png, printing the path (and a warning for an image the safety checker blurred)."""
    from .images import save_png

    path = save_png(image, directory, seed, text)
    print(path, flush=True)
    if flagged:
        print(f"stablediff: warning: {path}: flagged by the safety checker (seed {seed}); saved blurred",
              file=sys.stderr)
    return path


def save_elsewhere(items: list[tuple]) -> tuple[Path | None, int]:
    """Save (image, seed, infotext, flagged) items in a new folder in the system's temporary folder (often another
    disk, or memory), until one fails; returns the folder (None if it could not be made) and how many were saved."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="stablediff-unsaved-"))
    except OSError:
        return None, 0
    for saved, item in enumerate(items):
        try:
            _save_one(folder, *item)
        except OSError:
            return folder, saved
    return folder, len(items)


# --- subcommands ------------------------------------------------------------------------------------------------

def _weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"weight {text!r} is not a number") from None


def parse_controls(args: argparse.Namespace) -> list:
    """--control MODEL:IMAGE[:WEIGHT][:PREPROCESSOR] values -> controls.Control units, each checked (files exist,
    weight a number, preprocessor known): a UsageError names the bad value."""
    from .controls import Control, resolve_model

    values = getattr(args, "control", [])
    units = []
    for value in values:
        parts = value.split(":")
        if not 2 <= len(parts) <= 4 or not all(parts[:2]):
            raise UsageError(f"--control {value}: give MODEL:IMAGE[:WEIGHT][:PREPROCESSOR]")
        model = resolve_model(parts[0], args.controlnet_dir)
        if model is None:
            raise UsageError(f"--control {value}: no ControlNet {parts[0]!r} (not a file or folder, nor a name in "
                             f"{args.controlnet_dir})")
        try:
            weight = _weight(parts[2]) if len(parts) > 2 and parts[2] else 1.0
            unit = Control(parts[1], model, weight=weight, preprocessor=parts[3] if len(parts) > 3 else "none")
            unit.check()
        except ValueError as e:
            raise UsageError(f"--control {value}: {e}") from None
        units.append(unit)
    return units


def run_pipeline(pipe, args: argparse.Namespace, **images):
    """Run the command's settings (GenerationParams.from_args) through the pipeline, with `images` (init_image,
    mask_image) for img2img and inpainting; its errors become one line each."""
    import torch

    from .params import GenerationParams
    from .preview_file import PreviewWriter

    every = getattr(args, "preview_every", None)
    preview = PreviewWriter(args.preview_file, every, pipe.preview) if every else None
    try:
        return pipe.generate(GenerationParams.from_args(args), controls=parse_controls(args),
                             progress=not args.quiet, callback=preview, **images)
    except ValueError as e:  # input only the loaded model can judge (e.g. a size its VAE cannot take)
        raise UsageError(str(e)) from None
    except FloatingPointError as e:  # NaN latents
        raise UsageError(str(e), code=1) from None
    except torch.cuda.OutOfMemoryError:
        raise UsageError(f"out of memory on {pipe.device} making {args.batch_size} image(s) at "
                         f"{args.width or pipe.native_size}x{args.height or pipe.native_size}: try a smaller size "
                         "or --batch-size, or --dtype float16", code=1) from None


def given_options(argv: list[str] | None) -> set[str]:
    """The options (argparse dests) a `generate` command line sets itself rather than leaves at their default."""
    return set(vars(build_parser(defaults=False).parse_args(argv)))


_HIRES_ARGS = {"enable_hr": "hr", "strength": "hr_strength", "hr_scale": "hr_scale", "hr_upscaler": "hr_upscaler",
               "hr_second_pass_steps": "hr_steps", "hr_resize_x": "hr_resize_x", "hr_resize_y": "hr_resize_y",
               "hr_sampler": "hr_sampler", "hr_schedule": "hr_schedule", "hr_prompt": "hr_prompt",
               "hr_negative_prompt": "hr_negative_prompt"}  # GenerationParams field -> --hr-* option's dest


def settings_from_png(args: argparse.Namespace, given: set[str]) -> None:
    """--from-png: the PNG's generation parameters (A1111's or ours) into `args`, except what the command line
    gives itself; settings of the PNG this run does not use are named in one warning."""
    from . import images
    from .params import txt2img_from_infotext

    try:
        params, unused = txt2img_from_infotext(images.read_parameters(args.from_png))
    except ValueError as e:
        raise UsageError(f"--from-png {e}") from None
    for name in ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "sampler",
                 "schedule", "clip_skip", "cache_interval", "rng", "ensd", "subseed", "subseed_strength",
                 "seed_resize_from", "tiling", "token_merging_ratio", "eta", "inpainting_mask_weight", "s_churn",
                 "s_tmin", "s_tmax", "s_noise", "s_min_uncond", "s_min_uncond_all",
                 "skip_early_cond", "extra_noise", "pad_cond_uncond"):
        if name not in given:
            setattr(args, name, getattr(params, name))
    if "lora" not in given and params.loras:
        args.lora = [f"{name}:{m!r}" for name, m in params.loras]
    for name, dest in _HIRES_ARGS.items() if params.enable_hr else ():
        if dest not in given:
            setattr(args, dest, getattr(params, name))
    if unused:
        warnings.warn(f"{args.from_png}: settings this run does not use: {'; '.join(unused)}")


def cmd_generate(args: argparse.Namespace) -> int:
    if args.from_png is not None:
        settings_from_png(args, args.given)
    elif args.prompt is None:
        raise UsageError("give a PROMPT (or --from-png IMAGE.png)")
    check_generation_args(args)
    check_preview_args(args)
    pipe = load_model(args)
    result = run_pipeline(pipe, args)
    save_results(result, args.output_dir)
    return 0


def cmd_img2img(args: argparse.Namespace) -> int:
    """img2img, and inpaint when --mask is given; --pad outpaints (images.outpaint_images)."""
    default_size = check_image_args(args)
    check_generation_args(args, default_size=default_size)
    check_preview_args(args)
    inits = args.init_image[0] if len(args.init_image) == 1 else args.init_image
    init, mask = (inits, args.mask) if args.pad is None else _outpaint_images(args)
    pipe = load_model(args)
    result = run_pipeline(pipe, args, init_image=init, mask_image=mask)
    save_results(result, args.output_dir)
    return 0


def _outpaint_images(args: argparse.Namespace):
    """--pad: the init image extended and its mask (images.outpaint_images), made before the model loads."""
    from .images import check_mask_size, open_image, outpaint_images

    try:
        init = open_image(args.init_image[0])
        mask = None if args.mask is None else open_image(args.mask)
        if mask is not None:
            check_mask_size(mask.size, init.size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return outpaint_images(init, pad_arg(args.pad), mask)


def cmd_batch(args: argparse.Namespace) -> int:
    """A job file's images, resumably (see serve/batch.py); exit 1 when some images could not be made."""
    _check_batch_args(args)
    # on Ray the pipelines run on the cluster's machines, whose devices are not this one's
    check_generation_args(argparse.Namespace(**{**vars(args), "device": "auto"}) if args.ray else args)
    summary = _run_batch(args)
    print(summary)
    return 1 if summary.failed else 0


def _check_batch_args(args: argparse.Namespace) -> None:
    """The options only `batch` has: UsageError for a bad one."""
    _give_jobs_back(args)
    if args.jobs is None:
        raise UsageError("JOBS is missing: give a .txt, .csv or .jsonl job file")
    if args.workers is not None and (args.ray is None or args.workers < 1):
        raise UsageError(f"--workers {args.workers}: " + ("needs --ray" if args.ray is None else "must be at least 1"))
    if args.lora and args.ray:  # Ray's workers load their own pipelines, on machines whose folders are not ours
        raise UsageError("--lora is not supported with --ray yet; use <lora:NAME:w> tags only without --ray")


def _give_jobs_back(args: argparse.Namespace) -> None:
    """`batch --ray jobs.jsonl`: --ray took JOBS as its address; JOBS gets it back and Ray runs locally."""
    if args.jobs is None and args.ray and Path(args.ray).suffix.lower() in (".txt", ".csv", ".jsonl"):
        args.jobs, args.ray = Path(args.ray), "local"


def _run_batch(args: argparse.Namespace):
    """batch.run_batch with the command line's settings as the rows' defaults (its --seed is the base of the rows'
    seeds); its errors as UsageErrors: exit 2 for bad input, 1 for a file that cannot be written."""
    from .serve import batch
    from .params import GenerationParams

    defaults = GenerationParams.from_args(args).replace(seed=None)
    try:
        return batch.run_batch(args.jobs, args.output_dir, model=args.model, defaults=defaults, seeds=args.seeds,
                               samplers=args.samplers, base_seed=args.seed, skip_bad=args.skip_bad, ray=args.ray,
                               workers=args.workers, device=args.device, dtype=args.dtype,
                               safety_checker=args.safety_checker, load=lambda: load_model(args),
                               progress=not args.quiet, limits=limits_from_args(args),
                               controls=parse_controls(args), controlnet_dir=args.controlnet_dir)
    except batch.JobError as e:
        for problem in e.problems if len(e.problems) > 1 else []:  # one is the error line itself
            print(f"stablediff: error: {problem}", file=sys.stderr)
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    except batch.WriteError as e:
        raise UsageError(str(e), code=1) from None
    except OSError as e:  # the manifest or its lock file (a full disk, a folder of that name, ...)
        raise UsageError(f"{e.filename or args.output_dir}: {error_reason(e)}", code=1) from None


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_samplers(args: argparse.Namespace) -> int:
    from .samplers import sampler_table

    rows = [["NAME", "FAMILY", "AUTOMATIC SCHEDULE", "SCHEDULES", "ALIASES"]]
    for r in sampler_table():
        schedules = "all of A1111's" if len(r["schedules"]) > 2 else ", ".join(r["schedules"])
        rows.append([r["name"], r["family"], r["automatic"], schedules, ", ".join(r["aliases"])])
    print(_table(rows))
    print("\ndiffusers' samplers (snake_case) give diffusers' results; A1111's (its labels) give AUTOMATIC1111's. "
          "A schedule: --schedule NAME, or A1111's label + ' Karras' (any schedule label).")
    return 0


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def cmd_info(args: argparse.Namespace) -> int:
    check_model_source(args.model, label="MODEL")
    from .weights import load_checkpoint

    try:
        ckpt = load_checkpoint(args.model)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None

    conv_in = ckpt.unet.get("conv_in.weight")  # the weights, not the config, say what the U-Net takes
    in_channels = int(conv_in.shape[1]) if conv_in is not None else ckpt.unet_config.in_channels
    native = ckpt.unet_config.sample_size * ckpt.vae_config.downscale
    kind = {4: "text-to-image", 9: "inpainting (image + mask conditioning)"}.get(in_channels, "other")

    rows = [["path", str(ckpt.path)], ["layout", ckpt.layout], ["family", ckpt.family],
            ["native size", f"{native}x{native}"], ["unet in_channels", f"{in_channels} ({kind})"]]
    for name in ("unet", "vae", "text_encoder"):
        sd = getattr(ckpt, name)
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
        total = sum(t.numel() for t in sd.values())
        rows.append([name, f"{_count(total)} parameters in {len(sd)} tensors, {'/'.join(dtypes) or '-'}"])
    print(_table(rows))
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    """Upscale one image (upscalers.upscale) and save it as A1111's extras do: the input's generation parameters
    kept, a postprocessing text added, never over an existing file. Bad input exits 2 before any work."""
    from . import upscalers
    from .images import save_png_bytes

    image, parameters, tile, overlap = _check_upscale_args(args)
    name, upscaler = _upscaler_arg(args.upscaler)
    check_output_dir(args.output_dir)
    image = upscalers.upscale(image, args.scale, upscaler, tile=tile, overlap=overlap)
    data = upscalers.png_bytes(image, parameters, upscalers.postprocess_info(args.scale, name))
    try:
        print(save_png_bytes(data, args.output_dir, upscalers.source_seed(parameters)), flush=True)
    except OSError as e:
        raise UsageError(str(e), code=1) from None
    return 0


def _check_upscale_args(args: argparse.Namespace):
    """The scale, tiling, image and output size of `upscale`, checked -> (image, its parameters or None, tile,
    overlap)."""
    from . import upscalers
    from .images import open_image

    if not (math.isfinite(args.scale) and 1 <= args.scale <= upscalers.MAX_SCALE):
        raise UsageError(f"--scale {args.scale} is outside 1..{upscalers.MAX_SCALE}")
    tile = upscalers.TILE if args.tile is None else args.tile
    overlap = upscalers.TILE_OVERLAP if args.tile_overlap is None else args.tile_overlap
    try:
        upscalers.check_tiling(tile, overlap)
    except ValueError as e:
        raise UsageError(f"--tile {tile} --tile-overlap {overlap}: {e}") from None
    try:
        image = open_image(args.image)
        width, height = upscalers.target_size(image.size, args.scale)
        Limits(max_pixels=args.max_pixels).check("max_pixels", f"upscaled size {width}x{height} =", width * height)
    except ValueError as e:  # a LimitError, a bound below 1, an unreadable image
        raise UsageError(str(e)) from None
    return image, image.info.get("parameters"), tile, overlap


def _upscaler_arg(value: str):
    """--upscaler -> (its name for the postprocessing text, a RESAMPLERS name or the loaded model)."""
    from . import upscalers

    resampler = {name.lower(): name for name in upscalers.RESAMPLERS}.get(value.lower())
    if resampler is not None and not Path(value).is_file():
        return resampler, resampler
    if not Path(value).is_file():
        raise UsageError(f"--upscaler {value}: no such file; give a .pth/.safetensors upscaler model, lanczos or "
                         "nearest")
    try:
        return Path(value).stem, upscalers.load_upscaler(value)
    except ValueError as e:  # CheckpointError
        raise UsageError(f"--upscaler {e}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    user, _, password = (args.api_auth or "").partition(":")
    if args.api_auth is not None and not (user and password):
        raise UsageError("--api-auth must be USER:PASSWORD, both non-empty")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is outside 1..65535")
    if args.max_queue < 1:
        raise UsageError(f"--max-queue {args.max_queue} must be at least 1")
    for flag, folder in (("--models-dir", args.models_dir), ("--vae-dir", args.vae_dir),
                         ("--upscaler-dir", args.upscaler_dir), ("--controlnet-dir", args.controlnet_dir)):
        if folder is not None and not folder.is_dir():
            raise UsageError(f"{flag} {folder}: no such folder")
    if not 0 < args.read_timeout <= 3600:
        raise UsageError(f"--read-timeout {args.read_timeout} is outside (0, 3600] seconds")
    if args.limit_concurrency < 2:
        raise UsageError(f"--limit-concurrency {args.limit_concurrency} must be at least 2")
    limits = limits_from_args(args)
    check_output_dir(args.output_dir)
    try:
        from .serve import server  # fastapi, uvicorn, torch
    except ImportError as e:
        raise UsageError(f"`stablediff serve` needs the server extra ({e}): pip install 'stablediff[server]'") from None
    warning = server.bind_warning(args.host, args.api_auth)
    if warning:
        print(f"stablediff: warning: {warning}", file=sys.stderr)
    config = server.ServeConfig(model=args.model, models_dir=args.models_dir, host=args.host, port=args.port,
                                api_auth=args.api_auth, max_queue=args.max_queue, output_dir=args.output_dir,
                                cors_origins=tuple(args.cors_origin), device=args.device, dtype=args.dtype,
                                limits=limits, allowed_hosts=tuple(args.allowed_hosts), lora_dir=args.lora_dir,
                                embeddings_dir=args.embeddings_dir, read_timeout=args.read_timeout,
                                limit_concurrency=args.limit_concurrency, vae_dir=args.vae_dir,
                                upscaler_dir=args.upscaler_dir, styles_file=args.styles_file,
                                controlnet_dir=args.controlnet_dir)
    server.log_to_stderr()
    try:
        app = server.create_app(config)
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError
        raise UsageError(str(e)) from None
    server.serve(config, app)
    return 0


# --- entry point ------------------------------------------------------------------------------------------------

def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (an init image resized, bfloat16 run as float32, ...) as one line each, like the errors."""
    print(f"stablediff: warning: {_one_line(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.error("choose a command: generate, img2img, inpaint, samplers, info or serve")
        if getattr(args, "from_png", None) is not None:
            args.given = given_options(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            malloc.keep_freed_memory()  # before torch is imported: its threads and the server's share the heap
            try:
                return args.func(args)
            except UsageError as e:
                print(f"stablediff: error: {_one_line(e)}", file=sys.stderr)
                return e.code
    except KeyboardInterrupt:  # also while an error is being printed
        return 130


if __name__ == "__main__":
    sys.exit(main())
