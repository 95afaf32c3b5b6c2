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

A new subcommand that generates (img2img, inpaint, ...) gets its parser from `add_generation_options`, checks
its input with `check_generation_args`, loads with `load_model`, calls the pipeline through `run_pipeline` and
writes with `save_results`, as `cmd_generate` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import warnings
import tempfile
from pathlib import Path

from . import malloc
from .limits import LimitError, Limits
from .params import DEFAULT_MODEL, HUB_ID, WEIGHT_SUFFIXES



class UsageError(Exception):
    """A failure the user can act on: printed as one line, no traceback; exit code 2 (bad input) unless given."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), so every bad input reads the same way."""

    def error(self, message):
        self.exit(2, f"stablediff: error: {message} (see `{self.prog} --help`)\n")


# --- parsers ----------------------------------------------------------------------------------------------------

def add_generation_options(p: argparse.ArgumentParser) -> None:
    """The options every generating subcommand shares (generate now; img2img, inpaint, batch later)."""
    p.add_argument("--negative-prompt", default="", metavar="TEXT", help="what the image should not show")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="M",
                   help="a .safetensors/.ckpt file, a diffusers folder or a Hugging Face Hub id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--steps", type=int, default=30, help="sampler steps, 1..1000 (default: 30)")
    p.add_argument("--cfg-scale", type=float, default=7.0, metavar="S",
                   help="classifier-free guidance scale (default: 7)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed of the first image; image k uses N+k (default: random)")
    p.add_argument("--width", type=int, default=None, metavar="W",
                   help="multiple of 8 in 64..4096 (default: the model's native size, 512 for SD 1.5)")
    p.add_argument("--height", type=int, default=None, metavar="H", help="as --width")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="images to make (default: 1)")
    p.add_argument("--sampler", default="euler",
                   help="sampler name or AUTOMATIC1111 label, e.g. euler_a or 'DPM++ 2M Karras'; "
                        "see `stablediff samplers` (default: euler)")
    p.add_argument("--schedule", default=None, metavar="NAME",
                   help="noise schedule: karras for diffusers' samplers that take it; any A1111 schedule type "
                        "(uniform, karras, exponential, ...) for A1111's samplers (see `stablediff samplers`)")
    p.add_argument("--rng", default="cpu", type=str.lower, choices=["cpu", "gpu", "nv"],
                   help="where the noise comes from, as A1111's RNG setting: cpu = torch's CPU generator, gpu = "
                        "CUDA's (computed exactly off CUDA), nv = CUDA's numbers on any device (default: cpu)")
    p.add_argument("--ensd", type=int, default=0, metavar="N",
                   help="A1111's eta noise seed delta: ancestral and SDE samplers draw their noise from seed+N")
    p.add_argument("--subseed", type=int, default=None, metavar="N",
                   help="A1111's variation seed: its noise is blended into the seed's (default: random)")
    p.add_argument("--subseed-strength", type=float, default=0.0, metavar="S",
                   help="how much of the variation seed's noise, 0..1 (default: 0 = none); every image then keeps "
                        "--seed and the variation seed counts up")
    p.add_argument("--seed-resize-from", default=None, metavar="WxH",
                   help="draw the seed's noise as at this size, so a seed keeps its composition at another size")
    p.add_argument("--tiling", action="store_true",
                   help="make an image that tiles seamlessly: the U-Net's and VAE's convolutions pad circularly "
                        "(A1111's tiling)")
    p.add_argument("--clip-skip", type=int, default=1, metavar="N",
                   help="use the text encoder's N-th layer from the end, 1..12 (default: 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run (default: auto = cuda, else mps, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="weights and activations of the text encoder and U-Net (default: float32)")
    p.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the VAE's dtype: float32 is exact; bfloat16 decodes several times faster on CPUs with "
                        "bfloat16 units, about 1/255 mean pixel error (default: float32)")
    p.add_argument("--vae", default=None, metavar="PATH",
                   help="a separate VAE instead of the model's own: a .safetensors/.ckpt/.pt file (e.g. "
                        "vae-ft-mse-840000-ema-pruned) or a diffusers VAE folder")
    p.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                   help="decode and encode in overlapping tiles (diffusers' enable_tiling): memory stays tile-sized "
                        "for large images, the result differs slightly (default: only where an untiled pass "
                        "would need over 8 GiB)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net: the first image compiles (a minute or more), later ones run "
                        "faster, mostly on GPUs")
    p.add_argument("--output-dir", default="outputs", metavar="DIR", type=Path,
                   help="where the PNGs go, created if missing (default: outputs)")
    p.add_argument("--cache-interval", type=int, default=1, metavar="N",
                   help="run the whole U-Net only every N-th step, its shallow branch in between (DeepCache): "
                        "faster, approximate (default: 1 = off)")
    p.add_argument("--token-merging-ratio", type=float, default=0.0, metavar="R",
                   help="A1111's token merging (ToMe): merge this share of the top level's tokens before "
                        "self-attention, 0..0.9; faster, approximate: the image changes (benchmarks/RESULTS.md) "
                        "(default: 0 = off)")
    p.add_argument("--eta", type=float, default=None, metavar="E",
                   help="the noise an ancestral or DDIM step adds, 0..1, where the sampler takes it: Euler a, DPM2 a, "
                        "DPM++ 2S a (default 1), DDIM, DDIM CFG++, ddim (default 0), tcd (default 0.3)")
    p.add_argument("--inpainting-mask-weight", type=float, default=1.0, metavar="W",
                   help="an inpainting checkpoint (U-Net with 9 input channels): how much of the image its "
                        "conditioning hides under the mask, 0..1, as A1111's 'Inpainting conditioning mask "
                        "strength' (default: 1; below 1 the image shows through and is kept more)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]",
                   help="merge a LoRA from --lora-dir (repeatable; scale default 1.0); <lora:NAME:SCALE> in the "
                        "prompt works too")
    p.add_argument("--lora-dir", default=Path("loras"), type=Path, metavar="DIR",
                   help="where LoRA names are looked up (default: ./loras)")
    p.add_argument("--control", action="append", default=[], metavar="MODEL:IMAGE[:WEIGHT][:PREPROCESSOR]",
                   help="guide the image by a ControlNet (repeatable; their residuals add up): MODEL a ControlNet "
                        "file or folder, demo-canny (the demo model's), or a name in --controlnet-dir; IMAGE the "
                        "control image; WEIGHT default 1.0; PREPROCESSOR default none (the image is a ready control "
                        "map), e.g. canny")
    p.add_argument("--controlnet-dir", default=Path("controlnet"), type=Path, metavar="DIR",
                   help="where --control model names are looked up (default: ./controlnet)")
    p.add_argument("--embeddings-dir", default=Path("embeddings"), type=Path, metavar="DIR",
                   help="textual-inversion embeddings; each file's name is its trigger word (default: ./embeddings)")
    p.add_argument("--safety-checker", nargs="?", const=True, default=False, metavar="PATH",
                   help="blur images SD 1.5's NSFW safety checker flags; PATH: a safety_checker folder or a "
                        "diffusers model folder (default: the model's own safety_checker/); put it after PROMPT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_hires_options(p)
    add_limit_options(p)


def add_preview_options(p: argparse.ArgumentParser) -> None:
    """The live preview file (preview_file.py) of the commands that make one image set: generate, img2img, inpaint."""
    p.add_argument("--preview-every", type=int, default=None, metavar="N",
                   help="write the image forming every N steps to --preview-file (TAESD's decode with a TAESD "
                        "--vae, else A1111's Approx cheap)")
    p.add_argument("--preview-file", type=Path, default=None, metavar="PATH",
                   help="where --preview-every writes, replaced atomically; never a file stablediff did not write "
                        "as a preview (default: OUTPUT_DIR/preview.png)")


def add_hires_options(p: argparse.ArgumentParser) -> None:
    """Hires fix (hires.py): A1111's enable_hr and hr_* settings."""
    p.add_argument("--hr", action="store_true",
                   help="hires fix: upscale the first pass's result and run an img2img pass over it (as A1111)")
    p.add_argument("--hr-scale", type=float, default=2.0, metavar="S", help="upscale factor, 1..8 (default: 2)")
    p.add_argument("--hr-resize-x", type=int, default=0, metavar="W",
                   help="upscale to this width instead (with --hr-resize-y: cover WxH, crop the rest)")
    p.add_argument("--hr-resize-y", type=int, default=0, metavar="H", help="as --hr-resize-x")
    p.add_argument("--hr-upscaler", default="Latent", metavar="NAME",
                   help="'Latent' (default), 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic "
                        "antialiased)', 'Latent (nearest)', 'Latent (nearest-exact)', Lanczos, Nearest, or an "
                        "ESRGAN-family .pth/.safetensors file")
    p.add_argument("--hr-steps", type=int, default=0, metavar="N",
                   help="steps of the hires pass (default: 0 = --steps)")
    p.add_argument("--hr-strength", type=float, default=None, metavar="S",
                   help="denoising strength of the hires pass, in (0, 1] (default: 0.75)")
    p.add_argument("--hr-sampler", default=None, metavar="NAME", help="sampler of the hires pass (default: --sampler)")
    p.add_argument("--hr-schedule", default=None, metavar="NAME",
                   help="schedule of the hires pass (default: --schedule; automatic: the hires sampler's own)")
    p.add_argument("--hr-prompt", default="", metavar="TEXT", help="prompt of the hires pass (default: the prompt)")
    p.add_argument("--hr-negative-prompt", default="", metavar="TEXT",
                   help="negative prompt of the hires pass (default: the negative prompt)")


_LIMIT_HELP = {"max_pixels": "width x height of one image", "max_batch_pixels": "batch size x width x height",
               "max_steps": "sampler steps", "max_images": "images the command makes",
               "max_work": "images x steps x width x height, counted in steps of a 512x512 image",
               "max_prompt_tokens": "CLIP tokens of the prompt, and of the negative prompt"}


def add_limit_options(p: argparse.ArgumentParser) -> None:
    """--max-pixels, --max-batch-pixels, ...: one flag per field of Limits, defaulted from Limits(), so a new bound
    there is a new flag here. A width or height left out counts as 512 (SD 1.x's native size)."""
    group = p.add_argument_group("limits", "refuse more work than this, before any model is loaded; a size left out "
                                           "counts as 512x512 (img2img: as the init image's)")
    for f in dataclasses.fields(Limits):
        group.add_argument(Limits.flag(f.name), dest=f.name, type=int, default=f.default, metavar="N",
                           help=f"{_LIMIT_HELP.get(f.name, f.name)} (default: {f.default:,})")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The Limits the --max-* flags set; a bound below 1 is a UsageError."""
    try:
        return Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    except ValueError as e:
        raise UsageError(str(e)) from None


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
    i2i.add_argument("--init-image", required=True, type=Path, action="append", metavar="IN.png",
                     help=INIT_IMAGE_HELP)
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
    inp.add_argument("--init-image", required=True, type=Path, action="append", metavar="IN.png",
                     help=INIT_IMAGE_HELP)
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

def check_model_source(model: str, label: str = "--model") -> None:
    """A source that looks like a local path must exist; a Hub id (`owner/name`) is left to the loader.

    `models/sd15` is taken for a path when a local `models/` folder exists, otherwise for a Hub id."""
    if Path(model).expanduser().exists():
        return
    suffix = model.lower().endswith(WEIGHT_SUFFIXES)
    if HUB_ID.fullmatch(model) and not suffix and not Path(model.split("/")[0]).is_dir():
        return
    separators = {"/", os.sep, os.altsep} - {None}
    if suffix or model.startswith("~") or any(sep in model for sep in separators):
        raise UsageError(f"{label} {model}: no such file or folder")


def check_output_dir(directory: Path) -> None:
    """Create the folder if needed and prove we can write there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UsageError(f"--output-dir {directory}: cannot write there ({_reason(e)})") from None


def check_generation_args(args: argparse.Namespace, default_size: tuple[int, int] | None = None) -> None:
    """Every check that needs no model, so bad input fails in a second, not after loading 4 GB. `default_size`:
    what a missing --width/--height stands for in the limits (img2img: the init image's size; else 512x512)."""
    from .params import GenerationParams

    try:
        params = GenerationParams.from_args(args)
        if getattr(args, "command", None) == "batch":  # its --seed is the base of its rows' seeds (jobs.row_seed)
            params = params.replace(seed=None)
        params.validate()  # imports torch
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_limits(args, default_size)
    check_model_source(args.model)
    from .lora import resolve

    for name in parse_loras(args.lora):
        if not Path(name).is_file():
            try:
                resolve(name, args.lora_dir)
            except ValueError as e:
                raise UsageError(str(e)) from None
    check_output_dir(args.output_dir)
    if args.device != "auto":
        import torch

        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available[args.device]:
            raise UsageError(f"--device {args.device} is not available on this machine")


def check_preview_args(args: argparse.Namespace) -> None:
    """--preview-every N and --preview-file: N at least 1, and a path that takes the preview (its folder made,
    not someone else's file: preview_file.check_path); the path defaulted to OUTPUT_DIR/preview.png."""
    from . import preview_file

    if args.preview_every is None:
        if args.preview_file is not None:
            raise UsageError(f"--preview-file {args.preview_file} needs --preview-every N")
        return
    if args.preview_every < 1:
        raise UsageError(f"--preview-every {args.preview_every} must be at least 1")
    path = args.preview_file = args.preview_file or args.output_dir / "preview.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--preview-file {path}: cannot make its folder ({_reason(e)})") from None
    try:
        preview_file.check_path(path)
    except ValueError as e:
        raise UsageError(f"--preview-file {e}") from None


def check_limits(args: argparse.Namespace, default_size: tuple[int, int] | None = None) -> None:
    """The work one command asks for (one prompt x --batch-size images) and its prompts against the --max-* flags.
    Checked after GenerationParams.validate, so a value no flag could allow (--steps 1001) is not blamed on a limit."""
    from .limits import NATIVE_SIZE

    limits = limits_from_args(args)
    width, height = default_size or (NATIVE_SIZE, NATIVE_SIZE)
    prompts = {name: getattr(args, name) for name in ("prompt", "negative_prompt") if hasattr(args, name)}
    try:
        limits.check_work(width=args.width or width, height=args.height or height, steps=args.steps,
                          batch_size=args.batch_size, images=args.batch_size)
        for name, text in prompts.items():
            limits.check_prompt(text, name.replace("_", " "))
        if args.hr:  # the hires pass's size and steps, which GenerationParams.validate counts
            from .params import GenerationParams

            size = dict(width=args.width or width, height=args.height or height)
            GenerationParams.from_args(args).replace(seed=None, **size).validate(limits)
    except LimitError as e:
        raise UsageError(str(e)) from None


def check_image_args(args: argparse.Namespace) -> tuple[int, int]:
    """img2img / inpaint: readable images and a strength in (0, 1], before any model is loaded. Returns the size
    the run has when --width/--height are left out: the init image's, rounded down to a multiple of 8."""
    if not (math.isfinite(args.strength) and 0 < args.strength <= 1):
        raise UsageError(f"--strength {args.strength} is outside (0, 1]")
    if args.command == "inpaint" and args.mask is None and args.pad is None:
        raise UsageError("inpaint needs --mask MASK.png, or --pad to outpaint")
    sizes = [_image_size("--init-image", path) for path in args.init_image]
    _check_init_count(args)
    from .images import check_mask_aspect, multiple_of_8

    if args.mask is not None:
        mask_size = _image_size("--mask", args.mask)
        try:
            for size in sizes:
                check_mask_aspect(mask_size, size)
        except ValueError as e:
            raise UsageError(str(e)) from None
    width, height = sizes[0]

    size = multiple_of_8((width, height))
    return size if args.pad is None else _padded_size(args, size)


INIT_IMAGE_HELP = ("the starting image; repeat the option for a batch of them, one for each image of the batch "
                   "(which then has as many; the size is the first one's)")


def add_img2img_options(parser: argparse.ArgumentParser) -> None:
    """img2img's and inpaint's own options: --resize-mode, --noise-multiplier."""
    parser.add_argument("--noise-multiplier", type=float, default=1.0, metavar="M",
                        help="scale the noise img2img starts from, as A1111's 'Noise multiplier for img2img' "
                             "(default: 1)")
    parser.add_argument("--resize-mode", type=resize_mode_arg, default=0, metavar="MODE",
                        help="how an init image (and mask) of another aspect ratio than --width x --height is "
                             "brought to that size, as A1111's resize mode: just-resize (stretch; the default), "
                             "crop-and-resize (cover and crop the middle), resize-and-fill (fit inside and fill "
                             "the rest from its edges); or 0, 1, 2")


def add_inpainting_options(parser: argparse.ArgumentParser) -> None:
    """A1111's inpainting settings (masking.py); its samplers also keep the latents as A1111 does."""
    parser.add_argument("--mask-blur", type=mask_blur_arg, default=None, metavar="N|X,Y",
                        help="blur the mask by a Gaussian of N pixels (X across, Y down) before use, as A1111's "
                             "mask blur (its default: 4; here 0)")
    parser.add_argument("--masked-content", type=masked_content_arg, default=1, metavar="KIND",
                        help="what the masked area starts from, as A1111's: original (the default), fill (the "
                             "colours around it), latent-noise, latent-nothing; or 0..3")
    parser.add_argument("--only-masked", action="store_true",
                        help="A1111's inpaint area 'Only masked': work on the mask's box (grown by --masked-padding "
                             "and to --width x --height's aspect ratio) at --width x --height, and paste the result "
                             "back into the whole image")
    parser.add_argument("--masked-padding", type=int, default=0, metavar="PX",
                        help="--only-masked: pixels around the mask's box (default: 0)")
    parser.add_argument("--invert-mask", action="store_true",
                        help="repaint the black part of the mask instead (A1111's mask mode 'Inpaint not masked')")


def mask_blur_arg(value: str) -> tuple[int, int]:
    """--mask-blur N or X,Y -> (x, y), whole numbers (their range is GenerationParams's to check)."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{value!r} is not N or X,Y (whole pixels)")
    return (int(parts[0]), int(parts[-1]))


def masked_content_arg(value: str) -> int:
    """--masked-content: A1111's masked content by name (hyphens or spaces) or number -> 0..3."""
    from .params import MASKED_CONTENT

    key = value.strip().lower().replace("-", " ")
    if key in MASKED_CONTENT:
        return MASKED_CONTENT.index(key)
    if key in ("0", "1", "2", "3"):
        return int(key)
    raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(c.replace(' ', '-') for c in MASKED_CONTENT)}"
                                     " or 0..3")


def resize_mode_arg(value: str) -> int:
    """--resize-mode: an A1111 resize mode by name (any case, spaces or hyphens) or number -> 0, 1 or 2."""
    from .images import RESIZE_MODES

    names = [n.lower().replace(" ", "-") for n in RESIZE_MODES]
    key = value.strip().lower().replace(" ", "-")
    if key in names:
        return names.index(key)
    if key in ("0", "1", "2"):
        return int(key)
    raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(names)} (or 0, 1, 2)")


def pad_arg(value: str) -> tuple[int, int, int, int]:
    """`--pad L,R,T,B` or `--pad N` (every side) -> (left, right, top, bottom), checked (images.check_pad)."""
    from .images import check_pad

    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (1, 4) or not all(p.isdigit() for p in parts):
        raise UsageError(f"--pad {value}: give LEFT,RIGHT,TOP,BOTTOM or one N for every side, in pixels")
    try:
        return check_pad(tuple(int(p) for p in parts) * (4 // len(parts)))
    except ValueError as e:
        raise UsageError(f"--pad {value}: {e}") from None


def _padded_size(args: argparse.Namespace, size: tuple[int, int]) -> tuple[int, int]:
    """The size of the init image `size` padded by --pad, checked as a --width/--height would be."""
    from .params import GenerationParams

    left, right, top, bottom = pad_arg(args.pad)
    padded = size[0] + left + right, size[1] + top + bottom
    try:
        GenerationParams(width=args.width or padded[0], height=args.height or padded[1]).validate()
    except ValueError as e:
        raise UsageError(f"--pad {args.pad}: padded size {padded[0]}x{padded[1]}: {e}") from None
    return padded


def _check_init_count(args: argparse.Namespace) -> None:
    """Several --init-image: a batch of that many images, one from each, as A1111's img2img takes a batch of init
    images (--batch-size, where given, at least as many); --pad outpaints one image."""
    n = len(args.init_image)
    if n == 1:
        return
    if args.pad is not None:
        raise UsageError(f"--pad outpaints one --init-image, not {n}")
    if 1 < args.batch_size < n:
        raise UsageError(f"{n} --init-image for --batch-size {args.batch_size}: give at most --batch-size images, "
                         "or leave --batch-size out")
    args.batch_size = n


def _image_size(flag: str, path: Path) -> tuple[int, int]:
    """The size of a readable image. PIL refuses a picture of over 179M pixels from its header (a decompression
    bomb) with an error that is no ValueError: one line too."""
    from PIL import Image

    from .images import open_image

    try:
        return open_image(path).size
    except Image.DecompressionBombError as e:
        raise UsageError(f"{flag} {path}: {e}") from None
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from None


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


def parse_loras(values: list[str]) -> dict[str, float]:
    """--lora NAME[:SCALE] values -> {NAME: SCALE} (params.lora_arg; the last mention of a name wins)."""
    from .params import lora_arg

    try:
        return dict(lora_arg(v) for v in values)
    except ValueError as e:
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
                         f"({_reason(error)}): seeds {seeds}; {kept}; the same command with --seed {result.seeds[0]} "
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


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


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
                 "seed_resize_from", "tiling", "token_merging_ratio", "eta", "inpainting_mask_weight"):
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
        raise UsageError(f"{e.filename or args.output_dir}: {_reason(e)}", code=1) from None


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
