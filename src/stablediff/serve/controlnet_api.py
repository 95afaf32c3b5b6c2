"""sd-webui-controlnet's API on this server: ControlNet units in a txt2img/img2img request's
`alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`, and the extension's routes /controlnet/version,
/model_list, /module_list, /settings and /detect (server.py wires them).

A unit is a dict with the extension's fields (its ControlNetUnit, and the old key names its to_processing_unit still
takes: input_image, mask_image, guessmode, guidance, lowvram). `request_controls` makes controls.Control units of
them with every check done before the request is queued, a 422 naming the unit and the field otherwise: the model by
name in --controlnet-dir, the module among ours, threshold_a / threshold_b as the module's parameters, the resize and
control modes by name or index, the image decoded under sdapi.decode_image's limits. A unit that is not enabled, or
whose model is "None", is skipped, as the extension skips it.

Where this differs from the extension:
- processor_res and pixel_perfect are accepted and change nothing: the preprocessors here work at the control image's
  own size and the map is then fit to the output size (controls.Control.hint), so there is no preprocessor
  resolution to choose; of the extension's settings, pixel perfect (the resolution the map is later fit to) is the
  closest. low_vram is accepted and ignored.
- a model is named as /controlnet/model_list lists it, "NAME [hash]": NAME is looked up in --controlnet-dir by the
  command line's rule (controls.find_controlnet; never a path), and the hash is not compared.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import inspect
from pathlib import Path

from PIL import Image, ImageOps
from pydantic import Field, ValidationError, field_validator, model_validator

from .. import images, preprocess
from ..controls import CONTROL_MODES, CONTROLNET_SUFFIXES, Control, find_controlnet
from ..limits import LimitError, Limits
from .sdapi import CONTROLNET_SCRIPT, Int, Number, Txt2ImgRequest, RequestModel, decode_image
from .worker import ClientError

API_VERSION = 2  # the extension's external_code.get_api_version()
MAX_UNITS = 3  # units a request may use: the extension's default control_net_unit_count
# the extension's module names (its internal keys, in its order) for our preprocessors -> its UI names (alias_names)
MODULES = {"none": "none", "canny": "canny", "scribble_xdog": "scribble_xdog", "threshold": "threshold",
           "lineart_standard": "lineart_standard (from white bg & black line)", "tile_resample": "tile_resample",
           "invert": "invert (from white bg & black line)", "inpaint": "inpaint_global_harmonious",
           "inpaint_only": "inpaint_only", "blur_gaussian": "blur_gaussian"}
# the extension's older resize mode names
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                  "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
# the unit keys the extension renames before reading a unit (to_processing_unit's ext_compat_keys, and mask_image)
COMPAT_KEYS = {"guessmode": "guess_mode", "guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image",
               "mask_image": "mask"}


# --- units --------------------------------------------------------------------------------------------------------

def mode_name(value, names: tuple[str, ...], aliases: dict | None = None) -> str:
    """A resize or control mode given by name (or an alias) or by its index in `names`, as its name."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str) and (aliases or {}).get(value, value) in names:
        return (aliases or {}).get(value, value)
    raise ValueError(f"{value!r} is not one of: {', '.join(names)} (or 0 to {len(names) - 1})")


class ImageAndMask(RequestModel):
    image: str
    mask: str | None = None


class ControlNetUnit(RequestModel):
    """One entry of alwayson_scripts.controlnet.args, with the extension's fields and defaults."""

    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: Number = Field(1.0, allow_inf_nan=False)
    image: str | ImageAndMask | None = None  # base64, a data: URL, or {"image", "mask"}
    mask: str | None = None
    resize_mode: str = "Crop and Resize"  # a name, an old name, or 0/1/2
    low_vram: bool = False
    processor_res: Int = -1
    threshold_a: Number = Field(-1, allow_inf_nan=False)  # negative: the module's default
    threshold_b: Number = Field(-1, allow_inf_nan=False)
    guidance_start: Number = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    guidance_end: Number = Field(1.0, ge=0, le=1, allow_inf_nan=False)
    pixel_perfect: bool = False
    control_mode: str = "Balanced"  # a name or 0/1/2
    guess_mode: bool = False

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data):
        return {COMPAT_KEYS.get(k, k): v for k, v in data.items()} if isinstance(data, dict) else data

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_mode(cls, value):
        return mode_name(value, preprocess.RESIZE_MODES, RESIZE_ALIASES)

    @field_validator("control_mode", mode="before")
    @classmethod
    def _control_mode(cls, value):
        return mode_name(value, CONTROL_MODES)


def _parsed(model: type[RequestModel], data, name: str):
    """`data` validated as `model`; ClientError (422) naming the fields otherwise, in one line."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = [f"{name}{''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in x['loc'])}: "
                  f"{str(x['msg']).removeprefix('Value error, ')}" for x in e.errors()]
        raise ClientError(422, "; ".join(errors)) from None


def check_module(module: str, name: str) -> str:
    """A module name we have (ClientError 422 listing the extension's names for ours otherwise)."""
    if module not in preprocess.PREPROCESSORS:
        raise ClientError(422, f"{name}: unknown module {module!r}; known: {', '.join(MODULES)}")
    return module


def slider_params(module: str) -> list[str]:
    """The module's parameters that threshold_a and threshold_b set, in that order: those with a slider."""
    names = list(inspect.signature(preprocess.PREPROCESSORS[module]).parameters)[1:]
    return [p for p in names if p in preprocess.RANGES]


def module_params(module: str, threshold_a: float, threshold_b: float) -> dict:
    """threshold_a / threshold_b as the module's parameters; a negative one (the extension's -1) or one the module
    has no slider for is left out, so the preprocessor's default holds, as in the extension."""
    return {p: v for p, v in zip(slider_params(module), (threshold_a, threshold_b)) if v >= 0}


def mask_params(module: str, image: Image.Image, mask: Image.Image | None, name: str) -> dict:
    """{"mask": mask} for a module that takes one (the inpaint modules), else {} (the extension ignores a mask there).
    ClientError (422) for an inpaint module with neither a mask of the image's size nor an RGBA image."""
    if "mask" not in inspect.signature(preprocess.PREPROCESSORS[module]).parameters:
        return {}
    if mask is None:
        if image.mode != "RGBA":
            raise ClientError(422, f"{name}: module {module!r} needs a mask (or an RGBA image whose alpha is one)")
        return {}
    if mask.size != image.size:
        raise ClientError(422, f"{name}: mask size {mask.size} differs from image size {image.size}")
    return {"mask": mask}


def model_files(directory: Path | None) -> dict[str, Path]:
    """Name -> path of the ControlNets in `directory` that find_controlnet finds by that name: files with a
    ControlNet suffix (by their stem) and diffusers folders (by their name), hidden ones left out, sorted."""
    if directory is None or not Path(directory).is_dir():
        return {}
    found = {}
    for entry in sorted(Path(directory).iterdir()):
        is_model = (entry / "config.json").is_file() if entry.is_dir() else entry.suffix in CONTROLNET_SUFFIXES[1:]
        name = entry.name if entry.is_dir() else entry.stem
        if is_model and not entry.name.startswith(".") and find_controlnet(name, Path(directory)) == entry:
            found[name] = entry
    return found


def find_model(model: str, directory: Path | None, name: str) -> Path:
    """The file or folder of a unit's model "NAME [hash]" (or NAME) in `directory`; ClientError (422) naming it and
    at most three close names otherwise (never the folder's path)."""
    if directory is None:
        raise ClientError(422, f"{name}.model {model!r}: this server has no ControlNet models (see --controlnet-dir)")
    stem = model.split(" [")[0]
    path = find_controlnet(stem, Path(directory)) if stem not in ("", ".", "..") and Path(stem).name == stem else None
    if path is None:
        close = difflib.get_close_matches(stem, list(model_files(directory)), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (GET /controlnet/model_list)"
        raise ClientError(422, f"{name}.model {model!r} is not in --controlnet-dir{hint}")
    return path


def unit_images(unit: ControlNetUnit, name: str, init: Image.Image | None,
                mask: Image.Image | None) -> tuple[Image.Image, Image.Image | None]:
    """A unit's image and mask, decoded; without an image, img2img's init image and mask (as the extension does),
    and ClientError (422) for txt2img."""
    if unit.image is None:
        if init is None:
            raise ClientError(422, f"{name}: no image; a txt2img unit needs one (img2img units use the init image)")
        return init, mask
    pair = unit.image if isinstance(unit.image, ImageAndMask) else ImageAndMask(image=unit.image, mask=unit.mask)
    image = decode_image(pair.image, f"{name}.image")
    return image, decode_image(pair.mask, f"{name}.mask") if pair.mask else None


def unit_control(data, name: str, directory: Path | None, init: Image.Image | None,
                 mask: Image.Image | None) -> Control | None:
    """One unit as a checked Control; None for a unit that is disabled or has no model."""
    unit = _parsed(ControlNetUnit, data, name)
    if not unit.enabled or unit.model == "None":
        return None
    module = check_module(unit.module, f"{name}.module")
    path = find_model(unit.model, directory, name)
    image, unit_mask = unit_images(unit, name, init, mask)
    params = {**module_params(module, unit.threshold_a, unit.threshold_b),
              **mask_params(module, image, unit_mask, name)}
    control = Control(image, path, weight=unit.weight, start=unit.guidance_start, end=unit.guidance_end,
                      preprocessor=module, resize_mode=unit.resize_mode, control_mode=unit.control_mode,
                      guess_mode=unit.guess_mode, params=params)
    try:
        control.check()
    except ValueError as e:
        raise ClientError(422, f"{name}: {e}") from None
    return control


def controlnet_args(scripts: dict) -> list:
    """The unit list of a request's alwayson_scripts (its "controlnet" entry, in any case; [] without one)."""
    entry = next((v for k, v in scripts.items() if k.lower() == CONTROLNET_SCRIPT), None)
    if entry is None:
        return []
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
        raise ClientError(422, 'alwayson_scripts.controlnet: give {"args": [unit, ...]} with each unit an object')
    return args


def request_controls(req: Txt2ImgRequest, directory: Path | None, init: Image.Image | None = None,
                     mask: Image.Image | None = None) -> list[Control]:
    """The ControlNet units of a txt2img/img2img request as checked Controls (see the module's docstring), at most
    MAX_UNITS. init / mask: img2img's init image and mask (inverted where the request asks), for units without an
    image. ClientError (422) naming the unit otherwise."""
    if mask is not None and getattr(req, "inpainting_mask_invert", 0):
        mask = ImageOps.invert(mask.convert("L"))
    controls = []
    for i, data in enumerate(controlnet_args(req.alwayson_scripts)):
        control = unit_control(data, f"alwayson_scripts.controlnet.args[{i}]", directory, init, mask)
        if control is not None:
            controls.append(control)
        if len(controls) > MAX_UNITS:
            raise ClientError(422, f"alwayson_scripts.controlnet: more than {MAX_UNITS} units in use")
    return controls


# --- the routes ---------------------------------------------------------------------------------------------------

def short_hash(path: Path) -> str:
    """The "[hash]" the extension lists a model with: A1111's old model hash, the first 8 hex digits of the sha256
    of the 64 KiB at offset 1 MiB (of a folder: of its weights file); "NOFILE" where there is none, as A1111."""
    if path.is_dir():
        path = next(iter(sorted(path.glob("diffusion_pytorch_model*"))), path / "diffusion_pytorch_model")
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"


def model_list(directory: Path | None) -> dict:
    """/controlnet/model_list: the models in --controlnet-dir as "NAME [hash]", what a unit's model takes."""
    return {"model_list": [f"{name} [{short_hash(path)}]" for name, path in model_files(directory).items()]}


def sliders(module: str) -> list:
    """The extension's slider list of a module: [resolution, threshold_a's, threshold_b's], the resolution None
    here (see processor_res), empty for a module without sliders; each {name, value, min, max} from preprocess."""
    params = inspect.signature(preprocess.PREPROCESSORS[module]).parameters
    rows = [{"name": p.replace("_", " ").title(), "value": params[p].default, "min": preprocess.RANGES[p][0],
             "max": preprocess.RANGES[p][1]} for p in slider_params(module)]
    return [None, *rows] if rows else []


def module_list(alias_names: bool = False) -> dict:
    """/controlnet/module_list: our modules by the extension's names (its UI names with alias_names), and their
    sliders; none needs no ControlNet model, so model_free (the extension's reference_* modules) is false."""
    names = {key: alias if alias_names else key for key, alias in MODULES.items()}
    return {"module_list": list(names.values()),
            "module_detail": {shown: {"model_free": False, "sliders": sliders(key)} for key, shown in names.items()}}


class DetectRequest(RequestModel):
    """/controlnet/detect's body, with the extension's fields (processor_res and low_vram change nothing here)."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    controlnet_masks: list[str] = []
    controlnet_processor_res: Int = -1
    controlnet_threshold_a: Number = Field(-1, allow_inf_nan=False)
    controlnet_threshold_b: Number = Field(-1, allow_inf_nan=False)
    low_vram: bool = False


def preprocess_check(module: str, params: dict) -> None:
    """preprocess.check_params as a ClientError (422): a threshold outside the module's slider."""
    try:
        preprocess.check_params(module, params)
    except ValueError as e:
        raise ClientError(422, str(e)) from None


def check_detect(req: DetectRequest, limits: Limits) -> tuple[str, list[tuple[Image.Image, dict]]]:
    """A detect request checked before it is queued -> (module, [(image, preprocessor parameters)]): the
    module (422 listing ours), the image count (--max-images) and each image's size (--max-pixels, and
    decode_image's limit), the masks' count and sizes."""
    module = check_module(req.controlnet_module, "controlnet_module")
    images_in, masks = req.controlnet_input_images, req.controlnet_masks
    if not images_in:
        raise ClientError(422, "controlnet_input_images: no image given")
    if masks and len(masks) != len(images_in):
        raise ClientError(422, f"controlnet_masks: {len(masks)} masks for {len(images_in)} images")
    try:
        limits.check("max_images", "controlnet_input_images: images", len(images_in))
    except LimitError as e:
        raise ClientError(422, str(e)) from None
    params = module_params(module, req.controlnet_threshold_a, req.controlnet_threshold_b)
    preprocess_check(module, params)
    out = []
    for i, data in enumerate(images_in):
        name = f"controlnet_input_images[{i}]"
        image = decode_image(data, name)
        try:
            limits.check("max_pixels", f"{name}: image size {image.width}x{image.height} =", image.width * image.height)
        except LimitError as e:
            raise ClientError(422, str(e)) from None
        mask = decode_image(masks[i], f"controlnet_masks[{i}]") if masks else None
        out.append((image, {**params, **mask_params(module, image, mask, name)}))
    return module, out


def detect(module: str, inputs: list[tuple[Image.Image, dict]]) -> dict:
    """/controlnet/detect's answer (run on the worker thread): each image's control map as a base64 PNG."""
    maps = [preprocess.run(module, image, **params) for image, params in inputs]
    return {"images": [base64.b64encode(images.png_bytes(m, "")).decode("ascii") for m in maps], "info": "Success"}
