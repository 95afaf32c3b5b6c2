"""ControlNet preprocessors that need no downloaded model, on numpy and PIL.

Each preprocessor is a function `PIL image -> PIL image` (RGB, the input's size unless its docstring says otherwise),
with the module names, parameter names, defaults and ranges of sd-webui-controlnet (its `scripts/processor.py` and
`scripts/preprocessor/model_free_preprocessors.py`). A parameter's name is the snake case of the extension's slider
label ("Low Threshold" -> `low_threshold`). `run(name, image, **params)` looks a module up in `PREPROCESSORS` and
checks the parameters before any pixel work; `fit` applies the extension's three resize modes.

The extension first resizes the input so its short side is the "Preprocessor Resolution" (512); here the caller
chooses the size (for example with `fit`) and the preprocessors work at the image's own size.

OpenCV is not a dependency: Canny, the Gaussian blur and area resampling are written out here, following OpenCV's
rules (3x3 Sobel with replicated borders, L1 gradient magnitude, reflect-101 blur borders, its kernel sizes).
"""

from __future__ import annotations

import inspect

import numpy as np
from PIL import Image

# slider ranges, by parameter name (a name means the same slider wherever it appears)
RANGES = {
    "low_threshold": (0, 256),
    "high_threshold": (0, 256),
    "binarization_threshold": (0, 255),
    "xdog_threshold": (1, 64),
    "down_sampling_rate": (1.0, 8.0),
    "sigma": (0.01, 64.0),
}

# the extension's ResizeMode values, in its order (the API also accepts their index)
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")


# --- pixels in and out ------------------------------------------------------------------------------------------

def rgb_array(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3). Transparency is composited over white, as the extension's HWC3 does for line art."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[:, :, 3:4] / 255.0
        return (rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).round().astype(np.uint8)
    return np.asarray(image.convert("RGB"))


def _to_image(array: np.ndarray) -> Image.Image:
    """An (H, W) or (H, W, 3) array as an RGB image (gray maps repeated over the three channels)."""
    array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return Image.fromarray(array, "RGB")


# --- Gaussian blur (OpenCV's GaussianBlur with ksize (0, 0)) ----------------------------------------------------

def gaussian_kernel_size(sigma: float, integer_input: bool) -> int:
    """OpenCV's size for a Gaussian of `sigma`: 3 sigma each side for 8-bit images, 4 sigma for float ones, odd."""
    reach = 3 if integer_input else 4
    return int(np.floor(sigma * reach * 2 + 1 + 0.5)) | 1


def gaussian_blur(array: np.ndarray, sigma: float, integer_input: bool = False) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) array in float32, borders mirrored without repeating the edge
    (OpenCV's BORDER_REFLECT_101, numpy's "reflect")."""
    size = gaussian_kernel_size(sigma, integer_input)
    offsets = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-(offsets ** 2) / (2 * sigma ** 2))
    kernel /= kernel.sum()
    result = np.asarray(array, dtype=np.float32)
    for axis in (0, 1):
        result = _convolve_axis(result, kernel.astype(np.float32), axis)
    return result


def _convolve_axis(array: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    reach = len(kernel) // 2
    pad = [(0, 0)] * array.ndim
    pad[axis] = (reach, reach)
    padded = np.pad(array, pad, mode="reflect")
    length = array.shape[axis]
    out = np.zeros_like(array)
    for tap, weight in enumerate(kernel):
        out += weight * np.take(padded, np.arange(tap, tap + length), axis=axis)
    return out


# --- Canny ------------------------------------------------------------------------------------------------------

_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # tan(22.5 degrees) in OpenCV's 15-bit fixed point


def sobel(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives (d/dx, d/dy) of an (H, W, C) uint8 array as int32, borders replicated."""
    p = np.pad(array.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    left = p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2]
    right = p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]
    top = p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:]
    bottom = p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]
    return right - left, bottom - top


def _strongest_channel(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel, the gradient of the channel with the largest L1 magnitude (the first one on a tie), as OpenCV."""
    magnitude = np.abs(dx) + np.abs(dy)
    pick = np.argmax(magnitude, axis=2)[:, :, None]
    return tuple(np.take_along_axis(a, pick, axis=2)[:, :, 0] for a in (dx, dy, magnitude))


def non_maximum_suppression(dx: np.ndarray, dy: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """Where the magnitude is a maximum across the edge: the gradient direction is rounded to horizontal, vertical
    or one of the diagonals with OpenCV's integer tests, and outside the image counts as zero. Ties keep the first
    pixel along the row or column (`>` before, `>=` after), as OpenCV does."""
    m = magnitude
    p = np.pad(m, 1)
    left, right, up, down = p[1:-1, :-2], p[1:-1, 2:], p[:-2, 1:-1], p[2:, 1:-1]
    up_left, up_right, down_left, down_right = p[:-2, :-2], p[:-2, 2:], p[2:, :-2], p[2:, 2:]
    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << 15
    tg22x = x * _TG22
    tg67x = tg22x + (x << 16)
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    same_sign = (dx ^ dy) >= 0
    return np.where(
        horizontal, (m > left) & (m >= right),
        np.where(vertical, (m > up) & (m >= down),
                 np.where(same_sign, (m > up_left) & (m > down_right), (m > up_right) & (m > down_left))))


def hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidates 8-connected to a strong pixel through other candidates (breadth first, a ring at a time)."""
    height, width = candidates.shape
    stride = width + 2
    allowed = np.pad(candidates, 1).ravel()
    edges = np.pad(strong & candidates, 1).ravel()
    offsets = np.array([-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1])
    frontier = np.flatnonzero(edges)
    while frontier.size:
        neighbours = (frontier[:, None] + offsets).ravel()
        neighbours = np.unique(neighbours[allowed[neighbours] & ~edges[neighbours]])
        edges[neighbours] = True
        frontier = neighbours
    return edges.reshape(height + 2, stride)[1:-1, 1:-1]


def canny_edges(array: np.ndarray, low_threshold: float, high_threshold: float) -> np.ndarray:
    """Boolean (H, W) edges of an (H, W, C) uint8 array, as `cv2.Canny(array, low, high)` with its defaults
    (aperture 3, L1 gradient). Thresholds are floored and swapped when low > high, as OpenCV does; a pixel is a
    candidate when its magnitude exceeds `low` and strong when it exceeds `high`."""
    low, high = sorted((int(np.floor(low_threshold)), int(np.floor(high_threshold))))
    dx, dy, magnitude = _strongest_channel(*sobel(array))
    candidates = (magnitude > low) & non_maximum_suppression(dx, dy, magnitude)
    return hysteresis(candidates, magnitude > high)


def canny(image: Image.Image, low_threshold: float = 100, high_threshold: float = 200) -> Image.Image:
    """"canny": white one-pixel edges on black. The extension calls cv2.Canny on the RGB image with no blur first."""
    return _to_image(canny_edges(rgb_array(image), low_threshold, high_threshold) * 255)


# --- line art, scribbles and thresholds -------------------------------------------------------------------------

def none(image: Image.Image) -> Image.Image:
    """"none": a ready-made control map (depth, pose, normal, edges) used as it is."""
    return image.convert("RGB")


def invert(image: Image.Image) -> Image.Image:
    """"invert (from white bg & black line)": 255 - pixel, so black lines on white become white on black."""
    return _to_image(255 - rgb_array(image))


def threshold(image: Image.Image, binarization_threshold: float = 127) -> Image.Image:
    """"threshold": white where every channel is above the threshold, black elsewhere."""
    return _to_image((rgb_array(image).min(axis=2) > binarization_threshold) * 255)


def scribble_xdog(image: Image.Image, xdog_threshold: float = 32) -> Image.Image:
    """"scribble_xdog": white where the pixel is darker than its neighbourhood by more than half the threshold,
    from a difference of Gaussians (sigma 0.5 minus sigma 5) taking the darkest channel.

    The extension doubles that difference in uint8 arithmetic, which wraps for differences of 128 and more and
    drops the middle of the darkest strokes; here the comparison is done without wrapping."""
    x = rgb_array(image).astype(np.float32)
    darker_by = (gaussian_blur(x, 5.0) - gaussian_blur(x, 0.5)).min(axis=2)
    dog = np.floor(np.clip(255 - darker_by, 0, 255))  # the extension's uint8 `dog` image
    return _to_image((2 * (255 - dog) > xdog_threshold) * 255)


def lineart_standard(image: Image.Image) -> Image.Image:
    """"lineart_standard (from white bg & black line)": how much darker each pixel is than a sigma-6 blur of its
    surroundings (darkest channel), scaled so the median stroke (among pixels darker by more than 8) is 127."""
    x = rgb_array(image).astype(np.float32)
    intensity = (gaussian_blur(x, 6.0) - x).min(axis=2).clip(0, 255)
    strokes = intensity[intensity > 8]
    scale = max(16.0, float(np.median(strokes))) if strokes.size else 16.0
    return _to_image(np.floor(intensity / scale * 127))


def blur_gaussian(image: Image.Image, sigma: float = 9.0) -> Image.Image:
    """"blur_gaussian": Gaussian blur of the 8-bit image (OpenCV's 3-sigma kernel for 8-bit input)."""
    blurred = gaussian_blur(rgb_array(image), sigma, integer_input=True)
    return _to_image(np.floor(blurred + 0.5))


def tile_resample(image: Image.Image, down_sampling_rate: float = 1.0) -> Image.Image:
    """"tile_resample": shrink by `down_sampling_rate` with area averaging; the result is SMALLER than the input
    and `fit` brings it back to the generation size, which is where the blur comes from. Rates under 1.1 leave
    the image as it is, as in the extension."""
    rgb = image.convert("RGB")
    if down_sampling_rate < 1.1:
        return rgb
    width, height = (max(1, int(side / down_sampling_rate)) for side in rgb.size)
    return area_resize(rgb, (width, height))


def _area_weights(old: int, new: int) -> np.ndarray:
    """(new, old) matrix: output pixel i averages input interval [i, i + 1) * old / new, partial pixels by overlap."""
    scale = old / new
    starts = np.arange(new)[:, None] * scale
    pixels = np.arange(old)[None, :]
    overlap = np.minimum(pixels + 1, starts + scale) - np.maximum(pixels, starts)
    return np.clip(overlap, 0, None) / scale


def area_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Shrink by exact area averaging (OpenCV's INTER_AREA); PIL's BOX filter counts a pixel whole or not at all."""
    array = np.asarray(image, dtype=np.float64)
    rows, cols = _area_weights(image.size[1], size[1]), _area_weights(image.size[0], size[0])
    result = np.einsum("ih,hwc,jw->ijc", rows, array.reshape(*array.shape[:2], -1), cols, optimize=True)
    result = np.floor(result + 0.5).clip(0, 255).astype(np.uint8)
    return Image.fromarray(result.reshape(size[1], size[0], *array.shape[2:]), image.mode)


# --- inpainting -------------------------------------------------------------------------------------------------

def inpaint(image: Image.Image, mask: Image.Image | None = None) -> Image.Image:
    """"inpaint_only" / "inpaint_global_harmonious": the image with the mask (white = repaint) in its alpha
    channel, an RGBA image. Without `mask` the image's own alpha is the mask, as the extension's sketch canvas gives
    it. `inpaint_hint` turns the result into what the ControlNet sees; the two modes differ only in the pipeline."""
    if mask is None:
        if image.mode != "RGBA":
            raise ValueError(f"inpaint needs a mask, or an RGBA image whose alpha is the mask (got mode {image.mode})")
        return image
    if not isinstance(mask, Image.Image):
        raise TypeError(f"inpaint mask must be a PIL image, got {type(mask).__name__}")
    if mask.size != image.size:
        raise ValueError(f"inpaint mask size {mask.size} differs from image size {image.size}")
    result = Image.fromarray(rgb_array(image), "RGB")
    result.putalpha(mask.convert("L"))
    return result


def inpaint_hint(image: Image.Image) -> np.ndarray:
    """The inpaint ControlNet's control image, float32 (H, W, 3): colours in [0, 1], and -1 where the mask (the
    alpha channel) is above half, the extension's "ControlNet inpaint protocol" `c * (1 - m) - m`."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    masked = rgba[:, :, 3:4] > 0.5
    return np.where(masked, -1.0, rgba[:, :, :3]).astype(np.float32)


# --- the registry -----------------------------------------------------------------------------------------------

PREPROCESSORS = {
    "none": none,
    "canny": canny,
    "invert": invert,
    "invert (from white bg & black line)": invert,
    "threshold": threshold,
    "scribble_xdog": scribble_xdog,
    "lineart_standard": lineart_standard,
    "lineart_standard (from white bg & black line)": lineart_standard,
    "blur_gaussian": blur_gaussian,
    "tile_resample": tile_resample,
    "inpaint": inpaint,
    "inpaint_global_harmonious": inpaint,
    "inpaint_only": inpaint,
}


def check_params(name: str, params: dict) -> None:
    """ValueError for an unknown preprocessor, a parameter it does not take, or a value outside its slider."""
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}; known: {', '.join(sorted(PREPROCESSORS))}")
    accepted = list(inspect.signature(PREPROCESSORS[name]).parameters)[1:]
    for key, value in params.items():
        if key not in accepted:
            takes = ", ".join(accepted) or "none"
            raise ValueError(f"preprocessor {name!r} takes no parameter {key!r}; it takes: {takes}")
        if key in RANGES:
            low, high = RANGES[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} {key}={value!r} is not a number in [{low}, {high}]")


def run(name: str, image: Image.Image, **params) -> Image.Image:
    """Run the preprocessor `name` (a module name or alias of the extension) on `image`."""
    check_params(name, params)
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocessor {name!r} needs a PIL image, got {type(image).__name__}")
    return PREPROCESSORS[name](image, **params)


# --- resize modes -----------------------------------------------------------------------------------------------

def _colour_count(image: Image.Image) -> int:
    """Distinct RGB colours (sorting packed 24-bit values: np.unique is many times slower here)."""
    rgb = np.asarray(image.convert("RGB")).astype(np.uint32)
    packed = np.sort((rgb[:, :, 0] << 16 | rgb[:, :, 1] << 8 | rgb[:, :, 2]).ravel())
    return 1 + int(np.count_nonzero(packed[1:] != packed[:-1]))


def otsu_threshold(gray: np.ndarray) -> int:
    """Otsu's threshold of a uint8 array (OpenCV's THRESH_OTSU): the level that maximises the between-class
    variance of `<= level` against `> level`, the first such level on a tie."""
    p = np.bincount(gray.ravel(), minlength=256) / gray.size
    q1 = np.cumsum(p)
    q2 = 1.0 - q1
    first_moment = np.cumsum(np.arange(256) * p)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1 = first_moment / q1
        mu2 = (first_moment[-1] - first_moment) / q2
        sigma = q1 * q2 * (mu1 - mu2) ** 2
    eps = np.finfo(np.float32).eps
    sigma[(np.minimum(q1, q2) < eps) | (np.maximum(q1, q2) > 1 - eps)] = 0
    return int(np.argmax(sigma))


def _resample_method(colours: int, old_size: tuple[int, int], size: tuple[int, int]) -> str:
    """The extension's choice: nearest for maps of 3 to 199 colours (segmentation), area averaging to shrink,
    bicubic to enlarge."""
    if 2 < colours < 200:
        return "nearest"
    return "area" if size[0] * size[1] < old_size[0] * old_size[1] else "bicubic"


def _resize(image: Image.Image, size: tuple[int, int], method: str) -> Image.Image:
    if method == "area":
        return area_resize(image, size)
    return image.resize(size, Image.Resampling.NEAREST if method == "nearest" else Image.Resampling.BICUBIC)


def _binarize(image: Image.Image) -> Image.Image:
    """Mean of the channels cut at Otsu's level: a resized edge map stays black and white."""
    gray = np.asarray(image, dtype=np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
    return _to_image((gray > otsu_threshold(gray)) * 255)


def _resample(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize a control map as the extension's high_quality_resize does, except that it also thins one-pixel edge
    maps back to one pixel after enlarging (lvmin_thin), which is not done here. An alpha channel (the inpaint
    mask) is resized alike and cut at half."""
    if image.size == size:
        return image
    rgb = image.convert("RGB")
    colours = _colour_count(rgb)
    method = _resample_method(colours, image.size, size)
    result = _resize(rgb, size, method)
    extremes = rgb.getextrema()
    if colours == 2 and min(lo for lo, _ in extremes) < 16 and max(hi for _, hi in extremes) > 240:
        result = _binarize(result)  # two colours, near black and near white: an edge or scribble map
    if image.mode == "RGBA":
        result.putalpha(_resize(image.getchannel("A"), size, method).point(lambda v: 255 if v > 127 else 0))
    return result


def _border_colour(image: Image.Image) -> tuple[int, ...]:
    """Per channel, the median of the four border lines (an alpha channel is set to 255: fill is repainted)."""
    a = np.asarray(image)
    a = a[:, :, None] if a.ndim == 2 else a
    borders = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]], axis=0)
    colour = [int(v) for v in np.median(borders, axis=0).astype(a.dtype)]
    if image.mode == "RGBA":
        colour[3] = 255
    return tuple(colour)


def fit(image: Image.Image, width: int, height: int, mode: str | int = "Crop and Resize") -> Image.Image:
    """Bring a control map to width x height as sd-webui-controlnet does:
    "Just Resize" stretches; "Crop and Resize" scales to cover and crops the middle; "Resize and Fill" scales to fit
    inside and pads evenly (the extra pixel right/bottom) with the median border colour. Scaled sides are rounded.
    An RGBA image is an inpaint map (see `inpaint`): its padding is masked, to be repainted."""
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < len(RESIZE_MODES):
        mode = RESIZE_MODES[mode]
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; known: {', '.join(RESIZE_MODES)} (or 0, 1, 2)")
    if width < 1 or height < 1:
        raise ValueError(f"fit size {width}x{height} must be positive")
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    if mode == "Just Resize":
        return _resample(image, (width, height))
    old_w, old_h = image.size
    scale = (min if mode == "Resize and Fill" else max)(height / old_h, width / old_w)
    scaled = _resample(image, (max(1, round(old_w * scale)), max(1, round(old_h * scale))))
    new_w, new_h = scaled.size
    if mode == "Crop and Resize":
        left, top = max(0, (new_w - width) // 2), max(0, (new_h - height) // 2)
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new(image.mode, (width, height), _border_colour(image))
    canvas.paste(scaled, (max(0, (width - new_w) // 2), max(0, (height - new_h) // 2)))
    return canvas
