"""Images in and out: tensors <-> PIL, AUTOMATIC1111's `parameters` text, numbered PNG files, model hashes.

Nothing here imports torch at module level (the CLI's `--help` must stay fast); the two tensor helpers import it
when called. The text formats follow AUTOMATIC1111's `processing.create_infotext` and
`infotext_utils.parse_generation_parameters`, so its "PNG Info" tab and civitai read our files back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import time
import warnings
from pathlib import Path

from PIL import Image, PngImagePlugin

from . import usercache

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# The keys A1111 writes between "Model" and "Version", in its order. An `extra` item with one of these names
# takes that place; any other extra item goes after them, just before "Version" (A1111's extra_generation_params).
_PLACED_KEYS = (
    "Image CFG scale", "Face restoration", "VAE hash", "VAE", "Variation seed", "Variation seed strength",
    "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD",
    "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)
# where each placed key goes relative to the fixed head: before "Seed" / before "Size" / after "Model"
_BEFORE_SEED = ("Image CFG scale",)
_BEFORE_SIZE = ("Face restoration",)

# A1111's infotext_utils.re_param: `key: value` pairs, a value either a JSON string or anything up to a comma
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
_RE_NUMBERED = re.compile(r"^(\d+)-")


# --- the `parameters` text --------------------------------------------------------------------------------------

def _quote(value) -> str:
    """A1111's infotext_utils.quote: JSON-quote a value that holds a comma, newline or colon."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def infotext(prompt: str, negative_prompt: str, *, steps: int, sampler_label: str, schedule_label: str | None,
             cfg_scale: float, seed: int, width: int, height: int, model_hash: str | None, model_name: str | None,
             version: str, extra: dict | None = None) -> str:
    """One image's AUTOMATIC1111 `parameters` text:

        <prompt>
        Negative prompt: <negative>          (left out when empty)
        Steps: 30, Sampler: Euler, Schedule type: Karras, CFG scale: 7.0, Seed: 1, Size: 512x512, Model hash: ...

    Items whose value is None are left out (as A1111 does), and so is "Clip skip" at 1. `extra` items named like one
    of A1111's own keys ("Denoising strength", "Clip skip", ...) go where A1111 puts that key; others go just
    before "Version", in the order given.
    """
    extra = dict(extra or {})
    if "Clip skip" in extra and extra["Clip skip"] is not None and int(extra["Clip skip"]) <= 1:
        extra["Clip skip"] = None
    placed = {k: extra.pop(k) for k in _PLACED_KEYS if k in extra}

    params = {"Steps": steps, "Sampler": sampler_label, "Schedule type": schedule_label, "CFG scale": float(cfg_scale)}
    params.update({k: placed.pop(k) for k in _BEFORE_SEED if k in placed})
    params["Seed"] = seed
    params.update({k: placed.pop(k) for k in _BEFORE_SIZE if k in placed})
    params.update({"Size": f"{width}x{height}", "Model hash": model_hash or None, "Model": model_name or None})
    params.update(placed)  # already in A1111's order
    params.update(extra)
    params["Version"] = f"stablediff {version}" if version else None

    # A1111 writes a bare key where key == value (e.g. a flag-like extra item)
    text = ", ".join(k if k == v else f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{text}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """Read a `parameters` text back as A1111's `parse_generation_parameters` does.

    Returns {"Prompt": ..., "Negative prompt": ..., key: value, ...} with every value a string (quoted values
    unquoted) and a `WxH` value split into `<key>-1` / `<key>-2` (so "Size" gives "Size-1" and "Size-2").
    Unlike A1111 it does not fill in the web UI's defaults for keys the text leaves out.
    """
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:  # no parameters line: it is all prompt
        lines.append(last)
        last = ""

    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)

    res = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _RE_PARAM.findall(last):
        value = _unquote(value)
        size = _RE_IMAGESIZE.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    return res


# --- PNG files --------------------------------------------------------------------------------------------------

class SaveError(OSError):
    """A finished image that could not be written (disk full, folder gone or read-only), said in one line naming
    the folder and the reason. The image is not lost: `data` holds its whole PNG file (parameters included) and
    `seed` its seed, so that the caller can keep it and write it elsewhere with `save_png_bytes(e.data, folder,
    e.seed)`. An OSError, with the errno of the failure (errno.ENOSPC for a full disk)."""

    def __init__(self, directory: Path, seed: int, data: bytes, cause: OSError):
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno, f"{directory}: cannot save the image of seed {seed} ({reason}); it is kept "
                                      f"in memory, {len(data):,} bytes")
        self.directory, self.seed, self.data = directory, seed, data

    def __str__(self):
        return self.strerror


STALE_SECONDS = 3600  # a temp file of ours this old is left over from a killed save, whatever its pid says
_TEMP = re.compile(r"^\.tmp-(?:(\d+)-)?\w+\.png$")  # ours: .tmp-PID-RANDOM.png (earlier versions: .tmp-RANDOM.png)


def _next_number(directory: Path) -> int:
    """One past the highest `NNNNN-` prefix of any file in the folder (0 for none), as A1111 numbers files."""
    numbers = [int(m.group(1)) for name in os.listdir(directory) if (m := _RE_NUMBERED.match(name))]
    return max(numbers, default=-1) + 1


def _alive(pid: int) -> bool:
    """Is process `pid` running on this machine? (Windows: always assumed, as signal 0 means Ctrl+C there.)"""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # someone else's process, or a number no process has
        return True
    return True


def _remove_stale_temps(directory: Path) -> None:
    """Delete the temp files a killed save left behind (kill -9, power loss): ours whose writing process is gone,
    after a minute (in a folder shared over the network the pid may be another machine's, whose save takes
    milliseconds), and any of ours an hour old. Failing to delete is ignored: cleaning must not fail a save."""
    now = time.time()
    for entry in os.scandir(directory):
        m = _TEMP.match(entry.name)
        if m is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            if age > STALE_SECONDS or (age > 60 and m.group(1) and not _alive(int(m.group(1)))):
                os.unlink(entry.path)
        except OSError:
            pass


def _write(fd: int, data: bytes) -> None:
    """All of `data` to the file descriptor (one os.write may write only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_temp(directory: Path, data: bytes) -> Path:
    """`data` in a new `.tmp-PID-RANDOM.png`, created exclusively and with mode 0666 less the umask, as any file
    (tempfile's 0600 would make every saved image private); removed again when the write fails."""
    tmp = directory / f".tmp-{os.getpid()}-{secrets.token_hex(8)}.png"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:  # closed here too: on some filesystems close reports ENOSPC
            _write(f.fileno(), data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


@contextlib.contextmanager
def _numbering_lock(directory: Path):
    """An exclusive flock on the folder while a number is picked and claimed. Without it two processes saving at
    once (two `generate` runs, a server and a batch) both pick one past the same highest number and, their seeds
    differing, both claim it. Where flock is missing (Windows) or refused (some network filesystems), saving
    goes on unlocked: names still never collide, numbers may."""
    try:
        fd = os.open(directory, os.O_RDONLY) if fcntl is not None else None
    except OSError:
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _claim(tmp: Path, target: Path) -> bool:
    """Give the finished temp file the name `target` unless that name exists; True when it did."""
    try:
        os.link(tmp, target)  # atomic, and fails rather than replace an existing file
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: reserve the name (O_EXCL), then move over the reservation
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            return False
        try:
            os.replace(tmp, target)
        except OSError:
            target.unlink(missing_ok=True)  # no empty reservation left behind
            raise
        return True


def png_file(image: Image.Image, texts: dict[str, str]) -> bytes:
    """The PNG file of `image` with each (key, text) of `texts` in a text chunk (tEXt, or iTXt when the text is not
    Latin-1)."""
    info = PngImagePlugin.PngInfo()
    for key, text in texts.items():
        info.add_text(key, text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """The PNG file of `image` with `parameters` in a text chunk, as AUTOMATIC1111 writes it."""
    return png_file(image, {"parameters": parameters})


def save_png(image: Image.Image, directory: str | Path, seed: int, parameters: str) -> Path:
    """Save as `<directory>/NNNNN-SEED.png` with `parameters` in a PNG text chunk as A1111 writes it (see
    `save_png_bytes`); SaveError, carrying the PNG bytes, when it cannot be written."""
    return save_png_bytes(png_bytes(image, parameters), directory, seed)


def save_png_bytes(data: bytes, directory: str | Path, seed: int) -> Path:
    """Write a finished PNG file as `<directory>/NNNNN-SEED.png`, NNNNN one past the highest number already there.

    The file is written under a temporary name and then linked into place, so a reader never sees a half-written
    PNG and an existing file is never overwritten; the number is picked under a lock on the folder, so concurrent
    processes never share one. It gets the mode of any new file (0644 under umask 022). Temp files that a killed
    save left are removed on the way. Any OSError (ENOSPC...) becomes a SaveError that keeps `data`.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(directory)
        tmp = write_temp(directory, data)
        try:
            with _numbering_lock(directory):
                number = _next_number(directory)
                while not _claim(tmp, directory / f"{number:05d}-{seed}.png"):
                    number += 1
            return directory / f"{number:05d}-{seed}.png"
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise SaveError(directory, seed, data, e) from None


# --- model hashes -----------------------------------------------------------------------------------------------

def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The file's full sha256 (hex). Remembered in `$XDG_CACHE_HOME/stablediff/hashes.json` keyed by absolute path,
    size and mtime, so a 4 GB checkpoint is read once; a corrupt or unwritable cache only costs the rehash."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    cache_path = usercache.path("hashes.json")
    entry = usercache.read(cache_path).get(key)
    if (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str)):
        return entry["sha256"]

    sha = _hash_file(path)
    cache = usercache.read(cache_path)  # reread: another process may have added entries meanwhile
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    try:
        usercache.write(cache_path, cache)
    except OSError:
        pass
    return sha


def model_hash(path: str | Path) -> str:
    """AUTOMATIC1111's "Model hash": the first 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]


# --- tensors <-> PIL --------------------------------------------------------------------------------------------

def to_pil(pixels) -> list[Image.Image]:
    """(B, 3, H, W) tensor in [-1, 1] -> B RGB images, rounded as diffusers' VaeImageProcessor.postprocess does."""
    import numpy as np

    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
    x = (pixels * 0.5 + 0.5).clamp(0, 1)
    x = x.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    x = (x * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in x]


def from_pil(image: Image.Image, width: int | None = None, height: int | None = None):
    """A PIL image -> (1, 3, height, width) float32 tensor in [-1, 1], as diffusers' VaeImageProcessor.preprocess
    makes it (Lanczos resize, /255, *2-1). A missing width/height is the image's, rounded down to a multiple of 8.
    Any mode is converted to RGB first (diffusers would pass RGBA or L through and break the VAE)."""
    import numpy as np
    import torch

    image = image.convert("RGB")
    width = width if width is not None else image.width - image.width % 8
    height = height if height is not None else image.height - image.height % 8
    if width < 8 or height < 8:
        raise ValueError(f"image size {width}x{height} is too small (need at least 8x8)")
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    x = np.array(image).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(x.transpose(2, 0, 1)[None].copy()) - 1.0


def mask_from_pil(mask: Image.Image, width: int, height: int):
    """An inpainting mask -> (1, 1, height, width) float32 tensor of 0/1, white (>= 0.5) = repaint, as diffusers'
    mask processor makes it (grayscale, Lanczos resize, /255, binarize at 0.5)."""
    import numpy as np
    import torch

    mask = mask.convert("L").resize((width, height), resample=Image.Resampling.LANCZOS)
    m = np.array(mask).astype(np.float32) / 255.0
    m = (m >= 0.5).astype(np.float32)
    return torch.from_numpy(m[None, None].copy())


# --- init images and masks --------------------------------------------------------------------------------------

MAX_IMAGE_PIXELS = 8192 * 8192  # of an image file read as an init image or mask: a 48 MP photo passes
MIN_INIT_SIZE = 64  # the smallest side of an init image: the smallest side stablediff generates


def open_header(path) -> Image.Image:
    """The image file opened but not decoded (PIL reads only the header), refused with a ValueError naming the
    file and its size when it has over MAX_IMAGE_PIXELS pixels: a 12000x12000 PNG of a few kilobytes would
    decode to 430 MB. PIL's own decompression-bomb limits (a warning, then an error at twice as many pixels) are
    above ours; its error becomes the same one-line ValueError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own bound below is lower
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        raise ValueError(f"{path}: image of {size} is over the limit of {MAX_IMAGE_PIXELS:,} pixels (a "
                         f"decompression bomb?)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        image.close()
        raise ValueError(f"{path}: image {image.width}x{image.height} ({image.width * image.height:,} pixels) is "
                         f"over the limit of {MAX_IMAGE_PIXELS:,} pixels; scale it down first")
    return image


def image_size(path) -> tuple[int, int]:
    """(width, height) of an image file, from its header only (open_header's checks), e.g. to check the
    arguments of a command before any image is decoded or model loaded."""
    with open_header(path) as image:
        return image.size


def read_parameters(path) -> str:
    """The generation `parameters` text an image file holds (A1111 and stablediff write it as a PNG text chunk
    before the pixels, so the header read suffices); ValueError naming the file when it holds none."""
    with open_header(path) as image:
        text = image.info.get("parameters")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{path}: holds no generation parameters (no 'parameters' text in the image)")
    return text


def open_image(image) -> Image.Image:
    """A PIL image as it is, or a path opened (size checked from the header before decoding; fully read, so the
    file is closed); errors are a one-line ValueError naming the path."""
    if isinstance(image, Image.Image):
        return image
    with open_header(image) as im:
        try:
            im.load()
            return im.copy()
        except (OSError, ValueError) as e:
            raise ValueError(f"{image}: cannot read image ({e})") from None


def multiple_of_8(size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) rounded down to multiples of 8, the VAE's downscale: the size an init image gives a run."""
    return size[0] - size[0] % 8, size[1] - size[1] % 8


def init_size(image_size: tuple[int, int], width: int | None, height: int | None,
              warn: bool = True) -> tuple[int, int]:
    """The output size of an img2img or inpainting run from the init image's (width, height) (`image.size`, or
    `image_size(path)` before anything is decoded): the width and height asked for, or else the image's own,
    rounded down to a multiple of 8 (the VAE's downscale). An init image under MIN_INIT_SIZE on a side is refused:
    4x4 pixels hold nothing to start from, and rounding them would ask for 0x0. A size other than the image's
    warns (one line) that it is resized, unless `warn` is False."""
    iw, ih = image_size
    if iw < MIN_INIT_SIZE or ih < MIN_INIT_SIZE:
        raise ValueError(f"init image {iw}x{ih} is smaller than {MIN_INIT_SIZE}x{MIN_INIT_SIZE}; use a larger image")
    rw, rh = multiple_of_8(image_size)
    size = (width or rw, height or rh)
    if size != (iw, ih) and warn:
        warnings.warn(f"init image {iw}x{ih} is resized to {size[0]}x{size[1]}", stacklevel=2)
    return size


# AUTOMATIC1111's img2img resize modes (its `resize_mode` 0, 1, 2; its 3, "Just resize (latent upscale)", resizes
# the encoded latents instead, which we do not do)
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")


def resize_init(image: Image.Image, width: int, height: int, mode: int = 0) -> Image.Image:
    """An init image or mask brought to width x height by A1111's img2img resize mode (Lanczos throughout, in the
    image's own mode):
    0, just resize: stretched to the size.
    1, crop and resize: scaled to cover the size (the scaled side's length floored), the middle kept.
    2, resize and fill: scaled to fit inside, centred, and the bands left over filled with the scaled image's
    edge rows (or columns) stretched across them, as A1111 fills them (Pillow's resize of the edge's zero-wide box).
    Both scaled sides are as A1111 computes them, so the same init image gives the same pixels."""
    if mode not in range(len(RESIZE_MODES)):
        raise ValueError(f"resize mode {mode!r} is not one of 0 ({RESIZE_MODES[0]}), 1 ({RESIZE_MODES[1]}), "
                         f"2 ({RESIZE_MODES[2]})")
    lanczos = Image.Resampling.LANCZOS
    if mode == 0 or image.size == (width, height):
        return image if image.size == (width, height) else image.resize((width, height), resample=lanczos)
    w, h = image.size
    wider = width * h > w * height  # the target is wider than the image (compared exactly, not by float ratios)
    covers = wider if mode == 1 else not wider  # scale to the width (else to the height)
    scaled_w, scaled_h = (width, h * width // w) if covers else (w * height // h, height)
    scaled = image.resize((scaled_w, scaled_h), resample=lanczos)
    out = Image.new(image.mode, (width, height))
    left, top = width // 2 - scaled_w // 2, height // 2 - scaled_h // 2
    out.paste(scaled, (left, top))  # (mode 1: a negative offset crops the middle)
    if mode == 2 and top > 0:  # bands above and below
        out.paste(scaled.resize((width, top), lanczos, box=(0, 0, width, 0)), (0, 0))
        out.paste(scaled.resize((width, top), lanczos, box=(0, scaled_h, width, scaled_h)), (0, top + scaled_h))
    elif mode == 2 and left > 0:  # bands left and right
        out.paste(scaled.resize((left, height), lanczos, box=(0, 0, 0, height)), (0, 0))
        out.paste(scaled.resize((left, height), lanczos, box=(scaled_w, 0, scaled_w, height)), (left + scaled_w, 0))
    return out


def fit_init(init: Image.Image, mask: Image.Image | None, size: tuple[int, int],
             mode: int = 0) -> tuple[Image.Image, Image.Image | None]:
    """An init image and its mask brought to `size` alike by resize mode `mode` (resize_init): the mask, which must
    have the init image's size or aspect ratio (check_mask_size: ValueError otherwise), first to the init image's
    size, so that both are scaled, cropped and filled the same way."""
    mask = None if mask is None else mask_at(mask, init.size)
    return resize_init(init, *size, mode), None if mask is None else resize_init(mask, *size, mode)


def mask_at(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at the init image's `size`: as it is, or resized (Lanczos) where it has its aspect ratio
    (check_mask_aspect: ValueError otherwise; the caller that opened it warned of the resize, check_mask_size)."""
    if mask.size == size:
        return mask
    check_mask_aspect(mask.size, size)
    return mask.resize(size, resample=Image.Resampling.LANCZOS)


def check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """An inpainting mask must be the init image's size, or its aspect ratio (within 1%; then it is resized, with
    a one-line warning). Another aspect ratio is refused (ValueError naming both sizes): stretched, the mask would
    mark another area than the one drawn."""
    (mw, mh), (iw, ih) = mask_size, image_size
    if (mw, mh) == (iw, ih):
        return
    check_mask_aspect(mask_size, image_size)
    warnings.warn(f"mask {mw}x{mh} is resized to the init image's {iw}x{ih}", stacklevel=2)


def check_mask_aspect(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """check_mask_size's refusal (ValueError) of a mask of another aspect ratio than the init image's (over 1%),
    without its warning."""
    (mw, mh), (iw, ih) = mask_size, image_size
    if abs(mw * ih - mh * iw) > 0.01 * mh * iw:
        raise ValueError(f"mask {mw}x{mh} does not have the aspect ratio of the init image {iw}x{ih}; stretched, "
                         f"it would mark another area: make the mask the init image's size")


# --- outpainting ------------------------------------------------------------------------------------------------

# pixels the outpainting mask reaches into the image from each padded side, so that the new border is painted
# over the seam: A1111's poor man's outpainting at its default mask blur (4, which it doubles)
OUTPAINT_OVERLAP = 8


def check_pad(pad) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) pixels to pad: whole numbers >= 0, multiples of 8 (the VAE's downscale, so that
    the image keeps its place on the latent grid), not all 0; else ValueError naming the value."""
    if not (isinstance(pad, tuple) and len(pad) == 4 and all(isinstance(v, int) and v >= 0 for v in pad)):
        raise ValueError(f"pad {pad!r} is not 4 whole numbers >= 0 (left, right, top, bottom)")
    if any(v % 8 for v in pad) or not any(pad):
        raise ValueError(f"pad {pad!r} must be multiples of 8, not all 0")
    return pad


def outpaint_images(image: Image.Image, pad: tuple[int, int, int, int],
                    mask: Image.Image | None = None) -> tuple[Image.Image, Image.Image]:
    """An init image and inpainting mask that extend `image` by pad = (left, right, top, bottom) pixels
    (outpainting by inpainting). The new border repeats the image's edge pixels outward (numpy's "edge" padding),
    a neutral start that counts only at a strength below 1 (at 1 the masked area starts from noise). The mask is
    white over the border and OUTPAINT_OVERLAP pixels into the image on each padded side, black elsewhere; a
    given `mask` (the image's size, or resized to it) keeps its own values inside and is padded with white."""
    import numpy as np

    left, right, top, bottom = check_pad(pad)
    pixels = np.array(image.convert("RGB"))
    padded = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    if mask is None:
        inside = np.zeros(pixels.shape[:2], dtype=np.uint8)
        o = OUTPAINT_OVERLAP
        for side, strip in ((top, np.s_[:o]), (bottom, np.s_[-o:]), (left, np.s_[:, :o]), (right, np.s_[:, -o:])):
            if side:
                inside[strip] = 255
    else:
        inside = np.array(mask.convert("L").resize(image.size, resample=Image.Resampling.LANCZOS))
    outside = np.pad(inside, ((top, bottom), (left, right)), constant_values=255)
    return Image.fromarray(padded), Image.fromarray(outside)
