"""Images in and out: tensors <-> PIL, AUTOMATIC1111's `parameters` text, numbered PNG files, model hashes.

Nothing here imports torch at module level (the CLI's `--help` must stay fast); the two tensor helpers import it
when called. The text formats follow AUTOMATIC1111's `processing.create_infotext` and
`infotext_utils.parse_generation_parameters`, so its "PNG Info" tab and civitai read our files back.
"""

from __future__ import annotations

import hashlib
import json
import io
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

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

def _next_number(directory: Path) -> int:
    """One past the highest `NNNNN-` prefix of any file in the folder (0 for none), as A1111 numbers files."""
    numbers = [int(m.group(1)) for name in os.listdir(directory) if (m := _RE_NUMBERED.match(name))]
    return max(numbers, default=-1) + 1


def _claim(tmp: Path, target: Path) -> bool:
    """Give the finished temp file the name `target` unless that name exists; True when it did."""
    try:
        os.link(tmp, target)  # atomic, and fails rather than replace an existing file
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: reserve the name, then move over the reservation
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        os.replace(tmp, target)
        return True


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """The PNG file of `image` with `parameters` in a text chunk (tEXt, or iTXt when the text is not Latin-1), as
    AUTOMATIC1111 writes it."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, directory: str | Path, seed: int, parameters: str) -> Path:
    """Save as `<directory>/NNNNN-SEED.png`, NNNNN one past the highest number already there, with `parameters`
    in a PNG text chunk (tEXt, or iTXt when the text is not Latin-1) as A1111 writes it.

    The file is written under a temporary name and then linked into place, so a reader never sees a half-written
    PNG and an existing file is never overwritten: if the name is taken meanwhile, the next number is used.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = png_bytes(image, parameters)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        number = _next_number(directory)
        while not _claim(tmp, directory / f"{number:05d}-{seed}.png"):
            number += 1
        return directory / f"{number:05d}-{seed}.png"
    finally:
        tmp.unlink(missing_ok=True)


# --- model hashes -----------------------------------------------------------------------------------------------

def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stablediff" / "hashes.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


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
    cache_path = _cache_file()
    entry = _read_cache(cache_path).get(key)
    if (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str)):
        return entry["sha256"]

    sha = _hash_file(path)
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_cache(cache_path)  # reread: another process may have added entries meanwhile
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", suffix=".json", dir=cache_path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, cache_path)
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


def open_image(image) -> Image.Image:
    """A PIL image as it is, or a path opened (fully read, so the file is closed); errors name the path."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError) as e:
        raise ValueError(f"{image}: cannot read image ({e})") from None
