"""The generating subcommands' options and what they ask for, checked before any model loads (cli.py builds the
parser and runs the commands).

Each `add_*_options` adds one group of options to a subcommand's parser; each `check_*` turns bad input into a
UsageError (one line, exit code 2): a model source that cannot exist, an output folder that cannot be written,
settings no model could run (GenerationParams.validate), work over the --max-* limits (limits.py), unreadable init
images and masks. Only argparse and the standard library are imported at module level, as for cli.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
from pathlib import Path

from .limits import LimitError, Limits
from .params import DEFAULT_MODEL, HUB_ID, WEIGHT_SUFFIXES


class UsageError(Exception):
    """A failure the user can act on: printed as one line, no traceback; exit code 2 (bad input) unless given."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# A1111's sampling settings beyond the sampler (GenerationParams.s_churn ... extra_noise): (flag, default, metavar,
# help), each a float option
SAMPLING_EXTRAS = [
    ("--s-churn", 0.0, "C", "A1111's sigma churn (Karras et al. 2022): noise added back before each step, 0..100, "
                            "for Euler, Heun and DPM2 (default: 0 = off; other samplers leave it unused)"),
    ("--s-tmin", 0.0, "S", "A1111's sigma tmin: churn only at noise levels sigma >= S (default: 0)"),
    ("--s-tmax", 0.0, "S", "A1111's sigma tmax: churn only at noise levels sigma <= S (default: 0 = no bound)"),
    ("--s-noise", 1.0, "N", "A1111's sigma noise: the scale of the noise churn adds, and of the noise of DPM2 a, "
                            "DPM++ 2S a, DPM fast and the SDE samplers (default: 1)"),
    ("--s-min-uncond", 0.0, "S", "A1111's negative guidance minimum sigma (NGMS), a speed-up: below this noise level "
                                 "(a timestep for A1111's DDIM, PLMS, UniPC) every other U-Net call leaves the "
                                 "negative prompt out (default: 0 = off)"),
    ("--skip-early-cond", 0.0, "F", "A1111's 'ignore negative prompt during early sampling': the first F (0..1) of "
                                    "the steps run without the negative prompt (default: 0 = off)"),
    ("--extra-noise", 0.0, "E", "A1111's 'extra noise multiplier for img2img and hires fix': img2img and the hires "
                                "pass start with E times their noise more, 0..1 (default: 0)"),
]


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
                        "DPM++ 2S a, the SDE samplers, DPM fast, DPM adaptive (default 1), DDIM, DDIM CFG++, ddim "
                        "(default 0), tcd (default 0.3)")
    for flag, default, metavar, text in SAMPLING_EXTRAS:
        p.add_argument(flag, type=float, default=default, metavar=metavar, help=text)
    p.add_argument("--s-min-uncond-all", action="store_true",
                   help="with --s-min-uncond: leave it out on every call below that level, not every other one")
    p.add_argument("--pad-conds", action="store_true", dest="pad_cond_uncond",
                   help="A1111's 'pad prompt/negative prompt': where the prompt and the negative prompt run to "
                        "different numbers of 75-token chunks, continue the shorter with the empty prompt's and run "
                        "them in one U-Net batch (default, as A1111's: each at its own length, in two)")
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
        raise UsageError(f"--output-dir {directory}: cannot write there ({error_reason(e)})") from None


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
        raise UsageError(f"--preview-file {path}: cannot make its folder ({error_reason(e)})") from None
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


def add_img2img_options(parser: argparse.ArgumentParser) -> None:
    """img2img's and inpaint's own options: --init-image, --resize-mode, --noise-multiplier."""
    parser.add_argument("--init-image", required=True, type=Path, action="append", metavar="IN.png",
                        help="the starting image; repeat the option for a batch of them, one for each image of the "
                             "batch (which then has as many; the size is the first one's)")
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


def parse_loras(values: list[str]) -> dict[str, float]:
    """--lora NAME[:SCALE] values -> {NAME: SCALE} (params.lora_arg; the last mention of a name wins)."""
    from .params import lora_arg

    try:
        return dict(lora_arg(v) for v in values)
    except ValueError as e:
        raise UsageError(str(e)) from None


def error_reason(error: OSError) -> str:
    """An OSError in a few words (its strerror), for a one-line message."""
    return error.strerror or str(error) or type(error).__name__
