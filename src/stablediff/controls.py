"""ControlNet units in a generation: what a user asks for (`Control`), the hint it becomes, and the eps model that
adds every active unit's residuals to the U-Net's (`ControlledEps`).

The rules are sd-webui-controlnet's (its controlnet.py and hook.py):
- the hint: the preprocessor run on the control image, then fit to the output size by the resize mode, RGB in [0, 1]
  (the inpaint preprocessors' masked pixels -1, preprocess.inpaint_hint);
- guidance start / end: a unit runs at step i of n only where start <= i / n <= end;
- control modes: "Balanced" adds the residuals as they are; "My prompt is more important" is soft injection, residual
  i of the 13 (12 skips, then the mid block) scaled by 0.825 ** (12 - i); "ControlNet is more important" is soft
  injection with the residuals given to the conditional half of a guided batch only (the unconditional half gets
  none, so guidance pushes toward the control);
- guess_mode is diffusers': the ControlNet runs on the conditional half only and scales its residuals by
  logspace(-1, 0) (ControlNet.forward).
- hires fix (hr_option, its HiResFixOption): "Both" runs the unit in the first pass and, with a second hint made
  from the same image at the second pass's size, in the hires pass; "Low res only" in the first pass only; "High res
  only" in the hires pass only. Without hires fix every unit runs, whatever its hr_option.
Several units' residuals are summed (diffusers' MultiControlNetModel).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import images, preprocess
from .controlnet import ControlNet

CONTROLNET_SUFFIXES = ("", ".safetensors", ".pth", ".pt", ".ckpt", ".bin")  # "": a folder, or a full file name
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")
FIELDS = ("image", "model", "weight", "start", "end", "preprocessor", "resize_mode", "control_mode", "guess_mode",
          "params", "hr_option")  # Control's fields, as a batch job's row names them
DEMO_CONTROLNET = "demo-canny"  # the demo model's canny ControlNet, named as `--model demo` is
DEMO_CONTROLNET_DIR = Path(__file__).parent / "data" / "demo-controlnet-canny"
SOFT_INJECTION = 0.825  # the extension's per-layer factor: 0.825 ** 12 < 0.01 for the top skip


def find_controlnet(name: str, directory: Path) -> Path | None:
    """The ControlNet NAME stands for in `directory`: NAME as it is (a diffusers folder or a file named in full), else
    NAME with the first of CONTROLNET_SUFFIXES that exists; None when there is none."""
    return next((directory / f"{name}{s}" for s in CONTROLNET_SUFFIXES if (directory / f"{name}{s}").exists()),
                None)


@dataclass(frozen=True)
class Control:
    """One ControlNet unit. model: a ControlNet file or folder (load_controlnet), or a loaded ControlNet. image: a
    PIL image or a path. weight: the ControlNet's conditioning scale. start / end: the fraction of the steps where it
    begins and stops acting. params: the preprocessor's parameters (preprocess.run). hr_option: which passes of
    hires fix it runs in (HR_OPTIONS, see the module's docstring)."""

    image: object
    model: str | Path | ControlNet
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"
    resize_mode: str | int = "Crop and Resize"
    control_mode: str = "Balanced"
    guess_mode: bool = False
    params: dict = field(default_factory=dict)
    hr_option: str = "Both"

    def infotext(self) -> str:
        """The unit as sd-webui-controlnet records it in the infotext's `ControlNet N` entry (its keys; the model by
        its file name without the extension; the demo's by the name `--control` takes)."""
        if isinstance(self.model, ControlNet):
            name = "ControlNet"
        else:
            path = Path(self.model)
            name = DEMO_CONTROLNET if path.resolve() == DEMO_CONTROLNET_DIR.resolve() else path.stem
        mode = self.resize_mode_name
        hr = "" if self.hr_option == "Both" else f", Hr Option: {self.hr_option}"
        return (f"Module: {self.preprocessor}, Model: {name}, Weight: {self.weight:g}, Resize Mode: {mode}, "
                f"Guidance Start: {self.start:g}, Guidance End: {self.end:g}, Control Mode: {self.control_mode}{hr}")

    def to_row(self) -> dict:
        """The unit as a batch row's control (FIELDS; paths as text): what from_row and Control(**row) read."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in ((k, getattr(self, k)) for k in FIELDS)}

    def runs_in(self, hires_pass: bool) -> bool:
        """Whether the unit acts in hires fix's second pass (hires_pass) or in its first pass, by hr_option."""
        return self.hr_option == "Both" or (self.hr_option == "High res only") == hires_pass

    def check(self) -> None:
        """ValueError (one line, naming the value) for a unit no run could use; cheap, reads no model."""
        for name in ("weight", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"control {name} {value!r} is not a finite number")
        if not 0 <= self.start <= self.end <= 1:
            raise ValueError(f"control start {self.start} and end {self.end} must satisfy 0 <= start <= end <= 1")
        if self.control_mode not in CONTROL_MODES:
            raise ValueError(f"unknown control mode {self.control_mode!r}; known: {', '.join(CONTROL_MODES)}")
        if self.hr_option not in HR_OPTIONS:
            raise ValueError(f"unknown hr_option {self.hr_option!r}; known: {', '.join(HR_OPTIONS)}")
        if self.resize_mode not in preprocess.RESIZE_MODES and self.resize_mode not in range(3):
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; known: {', '.join(preprocess.RESIZE_MODES)}")
        preprocess.check_params(self.preprocessor, dict(self.params))
        if not isinstance(self.model, ControlNet) and not Path(self.model).expanduser().exists():
            raise ValueError(f"{self.model}: no such ControlNet file or folder")
        if not isinstance(self.image, Image.Image) and not Path(self.image).is_file():
            raise ValueError(f"{self.image}: no such control image file")

    @property
    def resize_mode_name(self) -> str:
        return self.resize_mode if isinstance(self.resize_mode, str) else preprocess.RESIZE_MODES[self.resize_mode]

    @property
    def soft(self) -> bool:
        return self.control_mode != "Balanced"

    @property
    def cond_only(self) -> bool:
        return self.guess_mode or self.control_mode == "ControlNet is more important"

    def cropped(self, size: tuple[int, int], box: tuple[int, int, int, int], width: int, height: int) -> "Control":
        """The unit for inpainting's only masked (masking.Inpainting.paste_to `box`, (left, top, width, height) in
        the init image's `size`), as sd-webui-controlnet crops it: its image brought to the init image's size by
        its resize mode (A1111's resize), cut to the box, and brought to width x height by resize and fill.
        Reference units, which take no map, stay as they are."""
        if self.preprocessor.startswith("reference"):
            return self
        x, y, w, h = box
        mode = preprocess.RESIZE_MODES.index(self.resize_mode_name)
        image = images.resize_init(images.open_image(self.image), *size, mode)
        return replace(self, image=images.resize_init(image.crop((x, y, x + w, y + h)), width, height, 2))

    def hint(self, width: int, height: int) -> torch.Tensor:
        """The control map (1, 3, height, width), float32: preprocessed, then fit to the size (with a note where
        the control image has another size, naming the resize mode that fits it)."""
        image = preprocess.run(self.preprocessor, images.open_image(self.image), **self.params)
        if image.size != (width, height):
            warnings.warn(f"control image {image.width}x{image.height} fit to {width}x{height} by "
                          f"{self.resize_mode_name!r}",
                          stacklevel=2)
        image = preprocess.fit(image, width, height, self.resize_mode)
        if image.mode == "RGBA":
            array = preprocess.inpaint_hint(image)
        else:
            array = preprocess.rgb_array(image).astype(np.float32) / 255.0
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]


def resolve_model(name: str, directory: Path) -> Path | None:
    """A ControlNet as `generate --control` and batch rows name it: "demo-canny" (the demo model's), a file or folder
    as given, else NAME (with or without its suffix, find_controlnet) in `directory`; None where there is none."""
    if name == DEMO_CONTROLNET:
        return DEMO_CONTROLNET_DIR
    if Path(name).expanduser().exists():
        return Path(name).expanduser()
    return find_controlnet(name, directory)


def from_row(unit, directory: Path, base: Path) -> Control:
    """A batch row's control (an object of FIELDS, model and image required) as a checked Control: the model
    resolved as resolve_model does in `directory`, both paths absolute, a relative image taken from `base` (the job
    file's folder). ValueError names the bad field or value."""
    if not isinstance(unit, dict):
        raise ValueError(f"control {unit!r} is not an object")
    unknown = [k for k in unit if k not in FIELDS]
    if unknown:
        raise ValueError(f"control field {unknown[0]!r} is unknown; a control may set {', '.join(FIELDS)}")
    fields = {k: v for k, v in unit.items() if v is not None}
    for key, kind, what in (("model", str, "a name or path"), ("image", str, "a path"), ("preprocessor", str, "a name"),
                            ("guess_mode", bool, "true or false"), ("params", dict, "an object")):
        if key in fields and not isinstance(fields[key], kind) or key in ("model", "image") and not fields.get(key):
            raise ValueError(f"control {key} {fields.get(key)!r} is not {what}")
    model = resolve_model(fields["model"], directory)
    if model is None:
        raise ValueError(f"no ControlNet {fields['model']!r} (not a file or folder, nor a name in {directory})")
    image = os.path.abspath(Path(base) / Path(fields["image"]).expanduser())  # abspath: a link keeps its name
    control = Control(**{**fields, "model": Path(os.path.abspath(model)), "image": Path(image)})
    control.check()
    return control


@dataclass
class ActiveControl:
    """A unit ready to run: its ControlNet and its hint on the model's device."""

    control: Control
    net: ControlNet
    hint: torch.Tensor

    def residuals(self, x_in, t, context, uncond_rows: int):
        """(down, mid) for the whole batch; rows [0, uncond_rows) zero for a conditional-only unit."""
        c = self.control
        rows = slice(uncond_rows if c.cond_only else 0, None)
        down, mid = self.net(x_in[rows], t[rows], context[rows], self.hint, conditioning_scale=c.weight,
                             guess_mode=c.guess_mode)
        outs = down + [mid]
        if c.soft:
            outs = [o * SOFT_INJECTION ** (len(outs) - 1 - i) for i, o in enumerate(outs)]
        if rows.start:
            outs = [torch.cat([o.new_zeros((rows.start, *o.shape[1:])), o]) for o in outs]
        return outs[:-1], outs[-1]


class ControlledEps:
    """An eps model (model(x_in, t, context, **kw), e.g. StableDiffusion.eps) with the residuals of the units active
    at the current step added to its U-Net's. The step is where t falls among the plan's step timesteps
    (`step_ts`, descending): a sampler's in-between evaluations count to the step they lead to.

    batch: the latents' batch B; a guided batch ([uncond; cond ...], more than B rows) has its first B rows
    unconditional, unless the guidance wrapper says how many are (`uncond_rows`: it runs the unconditional rows
    apart where the negative prompt's length differs from the prompt's)."""

    def __init__(self, model, units: list[ActiveControl], step_ts: torch.Tensor, batch: int):
        self.model, self.units, self.batch = model, units, batch
        self.step_ts = step_ts.float().cpu()

    def active(self, t: torch.Tensor) -> list[ActiveControl]:
        n = len(self.step_ts)
        step = int((self.step_ts > float(t.reshape(-1)[0]) + 1e-3).sum())
        return [u for u in self.units if u.control.start <= step / n <= u.control.end]

    def __call__(self, x_in, t, context, uncond_rows: int | None = None, **kw):
        if uncond_rows is None:
            uncond_rows = self.batch if x_in.shape[0] > self.batch else 0
        units = [u for u in self.active(t) if uncond_rows < x_in.shape[0] or not u.control.cond_only]
        if not units:
            return self.model(x_in, t, context, **kw)
        t = torch.as_tensor(t, device=x_in.device).reshape(-1).expand(x_in.shape[0])
        down, mid = units[0].residuals(x_in, t, context, uncond_rows)
        for unit in units[1:]:
            more_down, more_mid = unit.residuals(x_in, t, context, uncond_rows)
            down, mid = [a + b for a, b in zip(down, more_down)], mid + more_mid
        return self.model(x_in, t, context, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid, **kw)
