"""Upscalers: ESRGAN / Real-ESRGAN (RRDBNet) and Real-ESRGAN Compact (SRVGGNetCompact) models read from their
files, and the model-free Lanczos and Nearest, with AUTOMATIC1111's sizing rules.

Files are `.pth` (through weights.read_pickle's restricted unpickler: tensors only; Real-ESRGAN's `params_ema` /
`params` wrappers are unwrapped) or `.safetensors`. The architecture and its sizes (scale, channels, blocks,
features) are read from the state dict's keys and shapes, as spandrel does; three RRDBNet key layouts are renamed
to one (Real-ESRGAN's `conv_first`/`body.N.rdb1.conv1`/`conv_body`/`conv_up1`/`conv_hr`/`conv_last`) through
`RRDB_RENAMES` and `old_esrgan_names`: the original ESRGAN's `model.N...` and BSRGAN's `RRDB_trunk...`. A file
that is none of these is refused with one line naming it.

Models run on CPU in float32, on RGB in [0, 1] (the order they were trained in; A1111 hands them BGR), in tiles
(`tile_spans`) so that memory stays bounded whatever the image size. Sizing follows A1111's `Upscaler.upscale`:
the target is int(size x scale) rounded down to a multiple of 8; a model runs again (up to 3 passes) while its
output is smaller than that, then Lanczos resizes to the target when the sizes differ.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import images
from .keymap import CheckpointError
from .weights import few, load_into, read_pickle, read_state_dict

MODEL_SUFFIXES = (".pth", ".safetensors")
RESAMPLERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
TILE, TILE_OVERLAP = 192, 16  # A1111's ESRGAN_tile (192) and a wider ESRGAN_tile_overlap (8 there)
MAX_SCALE = 8  # A1111's extras slider goes to 8
MAX_PASSES = 3  # as A1111: a 2x model run at most 3 times reaches 8x
WRAPPERS = ("params_ema", "params-ema", "params", "state_dict", "model")  # checked in this order, as spandrel


# --- the networks --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RRDBConfig:
    """ESRGAN's RRDBNet. Real-ESRGAN's x2 and x1 models pixel-unshuffle their input by 2 or 4 first (in_channels =
    out_channels x unshuffle^2) and still upsample 4x: their scale is 2**upsamples / unshuffle."""

    in_channels: int = 3
    out_channels: int = 3
    features: int = 64
    blocks: int = 23
    growth: int = 32
    upsamples: int = 2
    unshuffle: int = 1

    @property
    def scale(self) -> int:
        return 2**self.upsamples // self.unshuffle


@dataclass(frozen=True)
class SRVGGConfig:
    """Real-ESRGAN's SRVGGNetCompact with PReLU activations (the released models)."""

    in_channels: int = 3
    out_channels: int = 3
    features: int = 64
    convs: int = 16
    scale: int = 4


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, device="meta")


class ResidualDenseBlock(nn.Module):
    """Five convolutions, each seeing the block's input and every earlier output; residual scaled by 0.2."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        for i in range(5):
            cout = features if i == 4 else growth
            self.add_module(f"conv{i + 1}", conv3x3(features + i * growth, cout))

    def forward(self, x):
        seen = [x]
        for i in range(1, 5):
            seen.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(seen, 1)), 0.2))
        return self.conv5(torch.cat(seen, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, residual scaled by 0.2."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(features, growth) for _ in range(3))

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator, its modules named as Real-ESRGAN's checkpoints name them."""

    def __init__(self, config: RRDBConfig):
        super().__init__()
        c = config
        self.config = c
        self.conv_first = conv3x3(c.in_channels, c.features)
        self.body = nn.Sequential(*(RRDB(c.features, c.growth) for _ in range(c.blocks)))
        self.conv_body = conv3x3(c.features, c.features)
        for i in range(c.upsamples):
            self.add_module(f"conv_up{i + 1}", conv3x3(c.features, c.features))
        self.conv_hr = conv3x3(c.features, c.features)
        self.conv_last = conv3x3(c.features, c.out_channels)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x):
        h, w = x.shape[-2:]
        f = self.config.unshuffle
        if f > 1:  # reflect-pad to a multiple of f, as spandrel does; cropped again below
            x = F.pixel_unshuffle(F.pad(x, (0, -w % f, 0, -h % f), mode="reflect"), f)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.config.upsamples):
            conv = getattr(self, f"conv_up{i + 1}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))
        return out[..., :h * self.scale, :w * self.scale]


class SRVGGNetCompact(nn.Module):
    """A plain stack of convolutions and PReLUs in low resolution, a pixel shuffle, plus the nearest-upscaled input."""

    def __init__(self, config: SRVGGConfig):
        super().__init__()
        c = config
        self.config = c
        layers = [conv3x3(c.in_channels, c.features), nn.PReLU(c.features, device="meta")]
        for _ in range(c.convs):
            layers += [conv3x3(c.features, c.features), nn.PReLU(c.features, device="meta")]
        layers.append(conv3x3(c.features, c.out_channels * c.scale**2))
        self.body = nn.Sequential(*layers)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x):
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# --- reading a file: layout, architecture, sizes -------------------------------------------------------------------

RRDB_RENAMES = [  # (pattern, replacement) from BSRGAN's / the old "new" ESRGAN's names to Real-ESRGAN's
    (r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.", r"body.\1.rdb\2.conv\3."),
    (r"trunk_conv\.", "conv_body."),
    (r"upconv(\d)\.", r"conv_up\1."),
    (r"HRconv\.", "conv_hr."),
]
OLD_RDB = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")


def read_weights(path) -> dict[str, torch.Tensor]:
    """The tensors of an upscaler file, read without running code; a wrapper dict (params_ema, ...) unwrapped."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors" or not path.is_file():
        return read_state_dict(path)
    obj = read_pickle(path, "cpu")
    for key in WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(obj, dict) else {}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors (a {type(obj).__name__}); expected an upscaler's weights")
    return sd


def indices(sd: dict, prefix: str) -> set[int]:
    """The N of the keys `prefix.N....`."""
    return {int(m[1]) for k in sd if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}


def sequence_length(sd: dict, prefix: str) -> int:
    """1 + the highest N of the keys `prefix.N....` (0 when there are none)."""
    return max(indices(sd, prefix), default=-1) + 1


def body_length(sd: dict, path) -> int:
    """The length of the `body.N` sequence, whose indices must have no gaps: CheckpointError otherwise, before a
    model of a million blocks is built for one stray key."""
    n = sequence_length(sd, "body")
    if indices(sd, "body") != set(range(n)):
        raise CheckpointError(f"{path}: body.N keys skip numbers below {n - 1}; a truncated or damaged file?")
    return n


def old_esrgan_names(sd: dict) -> dict:
    """The original ESRGAN's flat `model.N` sequence -> Real-ESRGAN's names. The sequence is conv, shortcut(RRDBs,
    conv), then per 2x upsample (upsample, conv, act), then conv, act, conv: 5 + 3 x upsamples entries."""
    ups = (sequence_length(sd, "model") - 5) // 3
    blocks = sequence_length(sd, "model.1.sub") - 1
    table = {"model.0": "conv_first", f"model.1.sub.{blocks}": "conv_body", f"model.{3 * ups + 2}": "conv_hr",
             f"model.{3 * ups + 4}": "conv_last", **{f"model.{3 * i}": f"conv_up{i}" for i in range(1, ups + 1)}}
    out = {}
    for key, value in sd.items():
        m = OLD_RDB.fullmatch(key)
        prefix, _, leaf = key.rpartition(".")
        out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}" if m else f"{table.get(prefix, prefix)}.{leaf}"] = value
    return out


def rrdb_names(sd: dict) -> dict:
    """Any of the three RRDBNet layouts -> Real-ESRGAN's names."""
    if "model.0.weight" in sd:
        return old_esrgan_names(sd)
    out = {}
    for key, value in sd.items():
        for pattern, replacement in RRDB_RENAMES:
            key = re.sub("^" + pattern, replacement, key)
        out[key] = value
    return out


def detect(sd: dict, path) -> RRDBConfig | SRVGGConfig:
    """The architecture and sizes a state dict (in our names for RRDBNet) holds; CheckpointError naming the file
    for one that is not an upscaler we know."""
    if {"conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight", "conv_last.weight"} <= sd.keys():
        return rrdb_config(sd, path)
    if {"body.0.weight", "body.1.weight"} <= sd.keys():
        return srvgg_config(sd, path)
    keys = sorted(sd)
    raise CheckpointError(f"{path}: not an upscaler stablediff knows (ESRGAN / Real-ESRGAN RRDBNet or "
                          f"SRVGGNetCompact); its keys: {few(keys)}")


def conv_shape(sd: dict, key: str, path) -> tuple[int, int]:
    """(out, in) channels of a convolution weight; CheckpointError for a missing one or a tensor that is not 4-D."""
    if key not in sd:
        raise CheckpointError(f"{path}: {key} is missing")
    shape = tuple(sd[key].shape)
    if len(shape) != 4:
        raise CheckpointError(f"{path}: {key} has shape {shape}, not a convolution's (4 dimensions)")
    return shape[0], shape[1]


def rrdb_config(sd: dict, path) -> RRDBConfig:
    features, cin = conv_shape(sd, "conv_first.weight", path)
    cout, _ = conv_shape(sd, "conv_last.weight", path)
    unshuffle = next((f for f in (2, 4) if cin == cout * f * f), 1)
    ups = sum(1 for k in sd if re.fullmatch(r"conv_up\d\.weight", k))
    if 2**ups < unshuffle:
        raise CheckpointError(f"{path}: RRDBNet that unshuffles by {unshuffle} but upsamples only {2**ups}x")
    return RRDBConfig(in_channels=cin, out_channels=cout, features=features, blocks=body_length(sd, path),
                      growth=conv_shape(sd, "body.0.rdb1.conv1.weight", path)[0], upsamples=ups,
                      unshuffle=unshuffle)


def is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def srvgg_config(sd: dict, path) -> SRVGGConfig:
    last = body_length(sd, path) - 1
    features, cin = conv_shape(sd, "body.0.weight", path)
    shuffled, _ = conv_shape(sd, f"body.{last}.weight", path)  # out_channels x scale^2
    cout = next((c for c in (cin, 3, 4, 1) if c and shuffled % c == 0 and is_square(shuffled // c)), None)
    if cout is None:
        raise CheckpointError(f"{path}: SRVGGNetCompact whose last layer has {shuffled} channels, which is no "
                              f"scale^2 x 1, 3 or 4 channels")
    return SRVGGConfig(in_channels=cin, out_channels=cout, features=features, convs=(last - 2) // 2,
                       scale=math.isqrt(shuffled // cout))


def read_upscaler(path) -> tuple[dict, RRDBConfig | SRVGGConfig]:
    """The state dict (in our names) and detected config of an upscaler file."""
    sd = read_weights(path)
    if "model.0.weight" in sd or "conv_first.weight" in sd:
        sd = rrdb_names(sd)
    config = detect(sd, path)
    image_channels = config.in_channels // (getattr(config, "unshuffle", 1) ** 2)
    if (image_channels, config.out_channels) != (3, 3) or config.scale < 1:
        raise CheckpointError(f"{path}: a model of {image_channels} input and {config.out_channels} output channels "
                              f"at scale {config.scale}; stablediff upscales RGB images (3 channels)")
    return sd, config


def load_upscaler(path) -> RRDBNet | SRVGGNetCompact:
    """An upscaler model from its file, built on the meta device and loaded (strict keys and shapes), in eval mode."""
    sd, config = read_upscaler(path)
    model = RRDBNet(config) if isinstance(config, RRDBConfig) else SRVGGNetCompact(config)
    load_into(model, {k: v.float() for k, v in sd.items()}, path=str(path), component=type(model).__name__)
    return model.eval()


def architecture(config: RRDBConfig | SRVGGConfig) -> str:
    """A short name of a detected model: ESRGAN (RRDBNet) or SRVGG (Real-ESRGAN Compact)."""
    return "ESRGAN" if isinstance(config, RRDBConfig) else "SRVGG"


def find_models(folder) -> dict[str, Path]:
    """Upscaler files under `folder` by name (their path relative to it, without the suffix), sorted; a file whose
    real path lies outside the folder (a symlink out) is left out."""
    root = Path(folder).resolve()
    found = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in MODEL_SUFFIXES and path.is_file() and root in path.resolve().parents:
            found[path.relative_to(root).with_suffix("").as_posix()] = path
    return found


# --- running -------------------------------------------------------------------------------------------------------

def tile_spans(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """Windows along one side: (start, end) of what a model call sees and (keep_start, keep_end) of the part whose
    output is kept. Windows are `tile` long and overlap by at least `overlap` (A1111's ESRGAN_tile and
    ESRGAN_tile_overlap; tile 0 = one window); each keeps its half of every overlap (a crop, no blend), so a kept
    pixel has overlap // 2 pixels of context or the image edge on each side, and the tiled output equals the
    untiled one for a model whose receptive field is within that. Starts are multiples of `align` (a
    pixel-unshuffling model's factor), so the windows see the unshuffle grid of the whole image."""
    if tile <= 0 or length <= tile:
        return [(0, length, 0, length)]
    stride = tile - overlap
    starts = sorted({min(i * stride, length - tile) // align * align for i in range(-(-(length - tile) // stride) + 1)})
    ends = [s + tile for s in starts[:-1]] + [length]
    cuts = [0] + [(s + e) // 2 for s, e in zip(starts[1:], ends)] + [length]
    return [(s, e, a, b) for s, e, a, b in zip(starts, ends, cuts, cuts[1:])]


def check_tiling(tile: int, overlap: int) -> None:
    """ValueError naming the bad value: tile 0 (off) or at least overlap + 8, overlap >= 0."""
    if overlap < 0:
        raise ValueError(f"tile overlap {overlap} must be >= 0")
    if tile < 0 or 0 < tile < overlap + 8:
        raise ValueError(f"tile size {tile} must be 0 (no tiles) or at least the overlap + 8 ({overlap + 8})")


@torch.inference_mode()
def run_tiled(model: nn.Module, x: torch.Tensor, *, tile: int = TILE, overlap: int = TILE_OVERLAP) -> torch.Tensor:
    """model(x) for a (1, C, H, W) tensor, one window of tile_spans at a time: memory grows with the tile, not the
    image (the output tensor aside)."""
    check_tiling(tile, overlap)
    s, align = model.scale, getattr(model.config, "unshuffle", 1)
    rows = tile_spans(x.shape[-2], tile, overlap, align)
    cols = tile_spans(x.shape[-1], tile, overlap, align)
    out = x.new_empty(x.shape[0], model.config.out_channels, x.shape[-2] * s, x.shape[-1] * s)
    for y0, y1, ya, yb in rows:
        for x0, x1, xa, xb in cols:
            y = model(x[..., y0:y1, x0:x1])
            out[..., ya * s:yb * s, xa * s:xb * s] = y[..., (ya - y0) * s:(yb - y0) * s, (xa - x0) * s:(xb - x0) * s]
    return out


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> RGB image, clamped and rounded (A1111 truncates)."""
    return Image.fromarray((x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def target_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """A1111's output size: int(side x scale) rounded down to a multiple of 8. ValueError naming the scale when
    that leaves nothing."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"upscale factor {scale} must be a number > 0")
    w, h = (int(side * scale) // 8 * 8 for side in size)
    if w < 8 or h < 8:
        raise ValueError(f"an image of {size[0]}x{size[1]} upscaled by {scale} is under 8 pixels on a side")
    return w, h


def upscale(image: Image.Image, scale: float, upscaler: str | nn.Module, *, tile: int = TILE,
            overlap: int = TILE_OVERLAP) -> Image.Image:
    """`image` upscaled by `scale` (target_size) with a loaded model or a RESAMPLERS name ("Lanczos", "Nearest",
    resizing straight to the target). A model runs once, and again while its output is smaller than the target
    (at most MAX_PASSES times in all); then Lanczos resizes to the target if it is not there exactly."""
    size = target_size(image.size, scale)
    image = image.convert("RGB")
    if isinstance(upscaler, str):
        return image.resize(size, resample=RESAMPLERS[upscaler])
    for _ in range(MAX_PASSES):
        before = image.size
        image = to_image(run_tiled(upscaler, to_tensor(image), tile=tile, overlap=overlap))
        if image.size == before or image.width >= size[0] and image.height >= size[1]:
            break
    return image if image.size == size else image.resize(size, resample=Image.Resampling.LANCZOS)


def postprocess_info(scale: float, name: str) -> str:
    """A1111's `postprocessing` text of an upscaled image."""
    return f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {name}"


def png_bytes(image: Image.Image, parameters: str | None, postprocessing: str | None) -> bytes:
    """The upscaled image's PNG file as A1111's extras write it: the source's generation `parameters` kept (when
    it had them) and a `postprocessing` text chunk saying how it was upscaled (when it was)."""
    texts = (("parameters", parameters), ("postprocessing", postprocessing))
    return images.png_file(image, {key: text for key, text in texts if text})


def source_seed(parameters: str | None) -> int:
    """The seed the source image's parameters name (the upscaled file is named after it), else 0."""
    seed = images.parse_infotext(parameters).get("Seed", "") if parameters else ""
    return int(seed) if seed.isdigit() else 0
