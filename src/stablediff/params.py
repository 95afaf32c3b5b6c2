"""One set of generation settings: defined, defaulted, range-checked and written out in one place.

`GenerationParams` is what one generation call asks for. Every way a user states it converts to and from this one
object, so a setting added here reaches all of them:
- the command line: `to_argv()`, and `from_args(namespace)` for what argparse parsed (cli.py adds the options);
- AUTOMATIC1111's API JSON: `to_a1111()` / `from_a1111(body)` (two fields of ours, `loras` and `cache_interval`,
  which A1111 ignores);
- a `stablediff batch` job row: `to_row()` / `from_row(row)`;
- the PNG's `parameters` text: `to_infotext(...)` (the keys A1111 writes) / `from_infotext(text)`, which also
  returns the keys it does not know, so nothing is dropped silently.
`validate(limits)` checks every value (one line naming it) and returns the canonical form: the sampler by its
canonical name, a schedule that a name like "DPM++ 2M Karras" implies made explicit.

Settings that only the model can judge (a size the VAE cannot take, a LoRA that is not there) are checked when it
runs. Nothing here imports torch until `validate` looks the sampler up.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable

from .limits import NATIVE_SIZE, Limits

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the Hub id loaded when no model is named
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # a model source naming one weights file
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
MAX_SEED = 2**32 - 1
MAX_LORA_MULTIPLIER = 100.0
MAX_TOKEN_MERGING_RATIO = 0.9  # the most of a level's tokens ToMe may merge (tome.py)
MAX_MIN_UNCOND = 1000.0  # NGMS (s_min_uncond): a sigma, or a timestep for A1111's DDIM, PLMS, UniPC (slider 0..15)
MAX_NOISE_MULTIPLIER = 2.0  # img2img's initial noise multiplier (A1111's slider: 0.5..1.5)
MAX_MASK_BLUR, MAX_PADDING = 64, 256  # inpainting's mask blur and only-masked padding, in pixels (A1111's sliders)
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's names of inpainting_fill 0..3
INPAINTING_FIELDS = ("mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                     "inpainting_mask_invert")
# k-diffusion's churn parameters (GenerationParams.s_churn ...): A1111's infotext keys, defaults (s_tmax 0: no
# bound, as A1111 reads it) and largest values (A1111's sliders: churn 0..100, tmin 0..10, tmax 0..999, noise 0..1.1)
SIGMA_PARAM_KEYS = {"Sigma churn": "s_churn", "Sigma tmin": "s_tmin", "Sigma tmax": "s_tmax", "Sigma noise": "s_noise"}
SIGMA_PARAM_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
SIGMA_PARAM_RANGES = {"s_churn": 100.0, "s_tmin": 1000.0, "s_tmax": 1000.0, "s_noise": 10.0}
RNG_SOURCES = ("cpu", "gpu", "nv")  # where noise comes from: rng.py draws each
# infotext keys that record what made an image rather than say how to make it: not reported as unused
INFOTEXT_RECORDS = frozenset({"Model hash", "Model", "VAE hash", "VAE", "Version", "Lora hashes", "TI hashes",
                              "NSFW"})


@dataclass(frozen=True)
class GenerationParams:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 30
    cfg_scale: float = 7.0
    seed: int | None = None  # None: random; image k of a call uses seed + k
    width: int | None = None  # None: the model's native size (txt2img) or the init image's (img2img)
    height: int | None = None
    batch_size: int = 1
    sampler: str = "euler"  # canonical name, alias or A1111 label ("DPM++ 2M Karras")
    schedule: str | None = None  # a schedule name (a1111.SCHEDULES), or None for the sampler's own ("automatic")
    clip_skip: int = 1
    strength: float | None = None  # img2img/inpainting denoising strength; None: 0.75 (1.0 inpainting)
    loras: tuple[tuple[str, float], ...] = ()  # (file or name in the LoRA folder, multiplier), besides prompt tags
    cache_interval: int = 1  # DeepCache: the whole U-Net every N-th step
    rng: str = "cpu"  # noise source, A1111's "RNG": "cpu" (torch's CPU generator), "gpu" (CUDA's), "nv" (rng.py)
    ensd: int = 0  # A1111's eta noise seed delta: the sampler's own noise comes from generators seeded seed + ensd
    subseed: int | None = None  # A1111's variation seed (None: random, where subseed_strength > 0)
    subseed_strength: float = 0.0  # 0: the seed's noise; 1: the variation seed's (slerp between them)
    seed_resize_from: tuple[int, int] | None = None  # (width, height): the seed's noise as drawn at that size
    tiling: bool = False  # A1111's tiling: the U-Net's and VAE's convolutions pad circularly, the image tiles
    token_merging_ratio: float = 0.0  # ToMe (tome.py): the share of the top level's tokens merged before self-attention
    # the sampler's eta where it takes one (samplers.Sampler.eta: the noise an ancestral or DDIM step adds, 0..1);
    # None: the sampler's own (A1111's eta_ancestral 1, eta_ddim 0)
    eta: float | None = None
    # k-diffusion's churn (Karras et al. 2022) for A1111's Euler, Heun and DPM2, and s_noise for those and its other
    # ancestral and SDE samplers (samplers.Sampler.sigma_params; others leave them unused, as A1111 does): A1111's
    # "Sigma churn", "Sigma tmin", "Sigma tmax" (0: no bound) and "Sigma noise"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0
    s_noise: float = 1.0
    # A1111's "negative guidance minimum sigma" (NGMS), a speed-up: below this noise level (a timestep for its DDIM,
    # PLMS, UniPC) every other U-Net call leaves the negative prompt out (every call with s_min_uncond_all); 0: off
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    # A1111's "ignore negative prompt during early sampling" (skip_early_cond), 0..1: the share of the first steps
    # that leave the negative prompt out; 0: off
    skip_early_cond: float = 0.0
    # A1111's "extra noise multiplier for img2img and hires fix" (img2img_extra_noise), 0..1: the start noise times
    # this added once more (img2img and the hires pass; txt2img leaves it unused)
    extra_noise: float = 0.0
    # A1111's "pad prompt/negative prompt" (pad_cond_uncond): where their lengths (75-token chunks) differ, the shorter
    # continued with the empty prompt's chunk and one U-Net batch run; off (A1111's default): each at its own length
    pad_cond_uncond: bool = False
    # hires fix (hires.py), A1111's API names; its denoising strength is `strength` (None: 0.75)
    enable_hr: bool = False
    hr_scale: float = 2.0  # the first pass's size times this, unless hr_resize_x / hr_resize_y are given
    hr_upscaler: str = "Latent"  # a latent mode (hires.LATENT_MODES), Lanczos, Nearest, or an upscaler model
    hr_second_pass_steps: int = 0  # 0: steps
    hr_resize_x: int = 0  # 0: from hr_scale (or the aspect ratio, when hr_resize_y is given)
    hr_resize_y: int = 0
    hr_sampler: str | None = None  # None: the first pass's
    hr_schedule: str | None = None  # None: the first pass's; "automatic": the hires sampler's own
    hr_prompt: str = ""  # "": the first pass's
    hr_negative_prompt: str = ""
    # img2img: an init image (and mask) of another size than width x height is brought to it by A1111's resize mode
    resize_mode: int = 0  # 0 just resize, 1 crop and resize, 2 resize and fill (images.RESIZE_MODES)
    noise_multiplier: float = 1.0  # img2img: A1111's initial noise multiplier (the start's noise scaled by it)
    # inpainting as A1111 prepares it (masking.py), A1111's API names; diffusers' samplers keep the latents as diffusers
    mask_blur_x: int = 0  # the mask's Gaussian blur across, in pixels (A1111's API default: 4)
    mask_blur_y: int = 0  # and down
    inpainting_fill: int = 1  # masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = False  # inpaint area: False the whole picture, True only masked (cropped to the mask)
    inpaint_full_res_padding: int = 0  # only masked: pixels around the mask's box
    inpainting_mask_invert: bool = False  # mask mode: False inpaint masked (white), True inpaint not masked
    # an inpainting U-Net (9 input channels): how much of the image its conditioning hides under the mask, A1111's
    # "inpainting conditioning mask strength" (0: the whole image shows, 1: the masked part is gray)
    inpainting_mask_weight: float = 1.0

    def replace(self, **changes) -> "GenerationParams":
        return dataclasses.replace(self, **changes)

    # -- checks -------------------------------------------------------------------------------------------------
    def validate(self, limits: Limits | None = None, *, prompts: int = 1) -> "GenerationParams":
        """The canonical params, or ValueError (one line naming the value) for settings no model could run, and
        LimitError for work over `limits` (None: not bounded). prompts: how many prompts share these settings."""
        self._check_values()
        images = prompts * self.batch_size
        self._check_seeds(images)
        spec, schedule = self._sampler_and_schedule()
        if limits is not None:
            size = self.width or NATIVE_SIZE, self.height or NATIVE_SIZE
            limits.check_work(width=size[0], height=size[1], steps=self.steps, batch_size=self.batch_size,
                              images=images)
            limits.check_prompt(self.prompt, "prompt")
            limits.check_prompt(self.negative_prompt, "negative prompt")
        loras = tuple(dict(self.loras).items())  # one entry a LoRA: the last mention wins, as with prompt tags
        canonical = self.replace(sampler=spec.name, schedule=schedule, loras=loras, rng=self.rng.lower())
        return canonical._validate_hires(limits, images) if self.enable_hr else canonical

    def _check_values(self) -> None:
        """Each setting's type and range; the first that fails is the error."""
        _check_text("prompt", self.prompt)
        _check_text("negative prompt", self.negative_prompt)
        for name in ("width", "height"):
            _check_size(name, getattr(self, name))
        for holds, message in self._value_rules():
            if not holds():
                raise ValueError(message)
        for name, m in self.loras:
            if not _is_number(m) or abs(m) > MAX_LORA_MULTIPLIER:
                raise ValueError(f"LoRA {name}: multiplier {m!r} is outside -{MAX_LORA_MULTIPLIER:g}.."
                                 f"{MAX_LORA_MULTIPLIER:g}")

    def _value_rules(self) -> list[tuple[Callable[[], bool], str]]:
        """(does it hold, the error if not) for the settings with a plain range, in the order they are checked."""
        return [
            (lambda: _is_int(self.steps) and 1 <= self.steps <= 1000, f"steps {self.steps!r} is outside 1..1000"),
            (lambda: _is_int(self.batch_size) and self.batch_size >= 1,
             f"batch size {self.batch_size!r} must be at least 1"),
            (lambda: _is_number(self.cfg_scale), f"cfg scale {self.cfg_scale!r} is not a finite number"),
            (lambda: _is_int(self.clip_skip) and 1 <= self.clip_skip <= 12,
             f"clip skip {self.clip_skip!r} is outside 1..12"),
            (lambda: self.strength is None or _is_number(self.strength) and 0 < self.strength <= 1,
             f"strength {self.strength!r} is outside (0, 1]"),
            (lambda: str(self.rng).lower() in RNG_SOURCES,
             f"rng {self.rng!r} is not known; choose {', '.join(RNG_SOURCES)}"),
            (lambda: _is_int(self.ensd) and 0 <= self.ensd <= MAX_SEED, f"ensd {self.ensd!r} is outside 0..{MAX_SEED}"),
            (lambda: _is_int(self.cache_interval) and self.cache_interval >= 1,
             f"cache interval {self.cache_interval!r} must be an integer >= 1"),
            (lambda: isinstance(self.tiling, bool), f"tiling {self.tiling!r} is not true or false"),
            (lambda: _is_number(self.token_merging_ratio) and 0 <= self.token_merging_ratio <= MAX_TOKEN_MERGING_RATIO,
             f"token merging ratio {self.token_merging_ratio!r} is outside 0..{MAX_TOKEN_MERGING_RATIO}"),
            (lambda: self.eta is None or _is_number(self.eta) and 0 <= self.eta <= 1,
             f"eta {self.eta!r} is outside 0..1"),
            *[(lambda v=getattr(self, name), top=top: _is_number(v) and 0 <= v <= top,
               f"{name} {getattr(self, name)!r} is outside 0..{top:g}") for name, top in SIGMA_PARAM_RANGES.items()],
            (lambda: _is_number(self.s_min_uncond) and 0 <= self.s_min_uncond <= MAX_MIN_UNCOND,
             f"s_min_uncond {self.s_min_uncond!r} is outside 0..{MAX_MIN_UNCOND:g}"),
            (lambda: isinstance(self.s_min_uncond_all, bool),
             f"s_min_uncond_all {self.s_min_uncond_all!r} is not true or false"),
            (lambda: _is_number(self.skip_early_cond) and 0 <= self.skip_early_cond <= 1,
             f"skip_early_cond {self.skip_early_cond!r} is outside 0..1"),
            (lambda: _is_number(self.extra_noise) and 0 <= self.extra_noise <= 1,
             f"extra noise {self.extra_noise!r} is outside 0..1"),
            (lambda: isinstance(self.pad_cond_uncond, bool),
             f"pad_cond_uncond {self.pad_cond_uncond!r} is not true or false"),
            (lambda: _is_number(self.noise_multiplier) and 0 < self.noise_multiplier <= MAX_NOISE_MULTIPLIER,
             f"noise multiplier {self.noise_multiplier!r} is outside (0, {MAX_NOISE_MULTIPLIER:g}]"),
            (lambda: self.resize_mode in (0, 1, 2) and _is_int(self.resize_mode),
             f"resize mode {self.resize_mode!r} is not 0 (just resize), 1 (crop and resize) or 2 (resize and fill)"),
            *[(lambda v=v: _is_int(v) and 0 <= v <= MAX_MASK_BLUR, f"mask blur {v!r} is outside 0..{MAX_MASK_BLUR}")
              for v in (self.mask_blur_x, self.mask_blur_y)],
            (lambda: self.inpainting_fill in (0, 1, 2, 3) and _is_int(self.inpainting_fill),
             f"inpainting fill {self.inpainting_fill!r} is not 0 (fill), 1 (original), 2 (latent noise) or 3 "
             "(latent nothing)"),
            (lambda: isinstance(self.inpaint_full_res, bool),
             f"inpaint full res {self.inpaint_full_res!r} is not true or false"),
            (lambda: isinstance(self.inpainting_mask_invert, bool),
             f"inpainting mask invert {self.inpainting_mask_invert!r} is not true or false"),
            (lambda: _is_int(self.inpaint_full_res_padding) and 0 <= self.inpaint_full_res_padding <= MAX_PADDING,
             f"inpaint full res padding {self.inpaint_full_res_padding!r} is outside 0..{MAX_PADDING}"),
            (lambda: _is_number(self.inpainting_mask_weight) and 0 <= self.inpainting_mask_weight <= 1,
             f"inpainting mask weight {self.inpainting_mask_weight!r} is outside 0..1"),
        ]

    def _sampler_and_schedule(self):
        """The sampler and its canonical schedule. The step plan itself is tried (microseconds): it checks the
        schedule (any of A1111's names or labels for its samplers, only karras for diffusers' and where that class
        has it) and catches e.g. 1000 'leading' steps running past timestep 999."""
        from . import samplers  # torch
        from .schedule import NoiseSchedule

        spec, named = samplers.get_sampler(self.sampler)
        schedule = samplers.prepare(spec.name, NoiseSchedule(), self.steps, schedule=self.schedule or named).schedule
        if spec.timestep_space:  # A1111's DDIM, PLMS, UniPC run their own timesteps, whatever the schedule
            return spec, None
        if spec.family == "a1111":  # "automatic" resolved, as A1111 records it
            return spec, schedule or spec.default_schedule or "uniform"
        return spec, schedule

    def _validate_hires(self, limits: Limits | None, images: int) -> "GenerationParams":
        """The hires fields checked and canonical (hires.check), the second pass's plan tried, and its work (the
        upscaled size, the steps it runs) within `limits`."""
        from . import hires
        from .schedule import NoiseSchedule

        params = self.replace(**hires.check(self))
        width, height = hires.check_size(params, self.width or NATIVE_SIZE, self.height or NATIVE_SIZE)
        hr_steps = len(hires.plan(params, NoiseSchedule()).sigmas) - 1
        if limits is not None:
            limits.check_work(width=width, height=height, steps=hr_steps, batch_size=self.batch_size,
                              images=images)
            limits.check_prompt(params.hr_prompt, "hires prompt")
            limits.check_prompt(params.hr_negative_prompt, "hires negative prompt")
        return params

    def _check_seeds(self, images: int) -> None:
        """Seeds in range for every image: image k uses seed + k, or with variation seeds subseed + k."""
        if not _is_number(self.subseed_strength) or not 0 <= self.subseed_strength <= 1:
            raise ValueError(f"subseed strength {self.subseed_strength!r} is outside 0..1")
        counting = ("subseed", self.subseed) if self.subseed_strength else ("seed", self.seed)
        for name, value in (("seed", self.seed), ("subseed", self.subseed)):
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_SEED):
                raise ValueError(f"{name} {value!r} is outside 0..{MAX_SEED}")
        name, value = counting
        if value is not None and value + images - 1 > MAX_SEED:
            raise ValueError(f"{name} {value} + {images} images runs past {MAX_SEED} (image k uses {name} + k): "
                             f"give {name} {MAX_SEED - images + 1} or less")
        size = self.seed_resize_from
        if size is not None and not (isinstance(size, tuple) and len(size) == 2
                                     and all(_is_int(v) and 64 <= v <= 4096 for v in size)):
            raise ValueError(f"seed resize from {size!r} is not a (width, height) in 64..4096")

    def image_seeds(self, count: int) -> list[tuple[int, int | None]]:
        """(seed, variation seed) of each of `count` images, as A1111 numbers them: seed + k; with variation seeds
        (subseed_strength > 0) every image keeps the seed and the variation seed counts up. Call on params whose
        seed (and subseed, where used) are set."""
        if not self.subseed_strength:
            return [(self.seed + k, None) for k in range(count)]
        return [(self.seed, self.subseed + k) for k in range(count)]

    # -- the PNG's parameters text ------------------------------------------------------------------------------
    def to_infotext(self, *, model_hash: str | None = None, model_name: str | None = None, version: str = "",
                    extra: dict | None = None) -> str:
        """One image's `parameters` text, as A1111 writes it (call on validated params with the image's own seed
        and size). Settings at their default are left out where A1111 leaves them out; ours that A1111 lacks
        ("Cache interval", "LoRA weights") go before "Version", which A1111 keeps as unknown keys."""
        from . import a1111, hires, images, samplers

        spec = samplers.SAMPLERS[self.sampler]
        ours = {"Denoising strength": self.strength, "Clip skip": self.clip_skip,
                spec.eta_key: self.eta if None not in (self.eta, spec.eta) and self.eta != spec.eta else None,
                **self._sigma_infotext(), "NGMS": self.s_min_uncond or None,
                "NGMS all steps": "True" if self.s_min_uncond and self.s_min_uncond_all else None,
                "Skip Early CFG": self.skip_early_cond or None,
                "Extra noise": self.extra_noise if self.extra_noise and self.strength is not None else None,
                "Pad conds": "True" if self.pad_cond_uncond else None,
                "Cache interval": self.cache_interval if self.cache_interval > 1 else None,
                "LoRA weights": ", ".join(f"{n}:{float(m)!r}" for n, m in self.loras) or None,
                "ENSD": self.ensd or None, "Token merging ratio": self.token_merging_ratio or None,
                "Token merging ratio hr": self.token_merging_ratio if self.enable_hr and self.token_merging_ratio
                else None,  # the hires pass's: the same (A1111 writes its fallback to the first pass's too)
                "RNG": self.rng.upper(),
                "Variation seed": self.subseed if self.subseed_strength else None,
                "Variation seed strength": self.subseed_strength or None,
                "Seed resize from": "x".join(map(str, self.seed_resize_from)) if self.seed_resize_from else None,
                "Tiling": "True" if self.tiling else None,
                **(hires.infotext_fields(self) if self.enable_hr else {})}
        return images.infotext(self.prompt, self.negative_prompt, steps=self.steps,
                               sampler_label=samplers.SAMPLERS[self.sampler].label,
                               schedule_label=a1111.SCHEDULES[self.schedule or "automatic"], cfg_scale=self.cfg_scale,
                               seed=self.seed, width=self.width, height=self.height, model_hash=model_hash,
                               model_name=model_name, version=version, extra={**ours, **(extra or {})})

    def sigma_values(self) -> dict:
        """s_churn, s_tmin, s_tmax, s_noise by name (samplers.Sampler.sigma_options takes them)."""
        return {name: getattr(self, name) for name in SIGMA_PARAM_KEYS.values()}

    def _sigma_infotext(self) -> dict:
        """"Sigma churn" etc. where the run's sampler (or the hires pass's) takes them and they are not the default,
        as A1111 writes them when its options set them (it leaves out values an API request sent)."""
        from . import samplers

        names = {self.sampler, *([self.hr_sampler] if self.enable_hr and self.hr_sampler else [])}
        used = {k for name in names for k in samplers.get_sampler(name)[0].sigma_options(self.sigma_values())}
        return {key: getattr(self, name) for key, name in SIGMA_PARAM_KEYS.items() if name in used}

    def inpainting_infotext(self, only_masked: bool = True) -> dict:
        """The infotext keys A1111 writes for an inpainting run with these settings: "Mask mode" (where inverted),
        "Mask blur" (where both directions blur alike), "Masked content" (but "original"), "Inpaint area" and
        "Masked area padding" (where the run was cropped to the mask: `only_masked`, False where the mask was
        empty)."""
        blur = self.mask_blur_x if self.mask_blur_x == self.mask_blur_y else None
        cropped = self.inpaint_full_res and only_masked
        return {"Mask mode": "Inpaint not masked" if self.inpainting_mask_invert else None, "Mask blur": blur or None,
                "Masked content": MASKED_CONTENT[self.inpainting_fill] if self.inpainting_fill != 1 else None,
                "Inpaint area": "Only masked" if cropped else None,
                "Masked area padding": self.inpaint_full_res_padding if cropped else None}

    @classmethod
    def from_infotext(cls, text: str) -> tuple["GenerationParams", dict[str, str]]:
        """Settings from a `parameters` text (ours or A1111's), and the keys it holds that are not settings here
        (e.g. "Model hash", "Hires upscale"), so that a caller can report them."""
        from .images import parse_infotext

        fields = parse_infotext(text)
        take = fields.pop
        changes = {"prompt": take("Prompt", ""), "negative_prompt": take("Negative prompt", "")}
        changes.update(_hires_from_infotext(fields))  # before "Denoising strength" is taken
        readers = {"Steps": ("steps", int), "CFG scale": ("cfg_scale", float), "Seed": ("seed", int),
                   "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
                   "Size-1": ("width", int), "Size-2": ("height", int), "Denoising strength": ("strength", float),
                   "Clip skip": ("clip_skip", int), "Cache interval": ("cache_interval", int),
                   "Token merging ratio": ("token_merging_ratio", float),
                   "Noise multiplier": ("noise_multiplier", float),
                   "Conditional mask weight": ("inpainting_mask_weight", float), "Eta": ("eta", float),
                   "Eta DDIM": ("eta", float), **{key: (name, float) for key, name in SIGMA_PARAM_KEYS.items()},
                   "NGMS": ("s_min_uncond", float), "Skip Early CFG": ("skip_early_cond", float),
                   "Extra noise": ("extra_noise", float)}
        for key, (name, kind) in readers.items():
            if key in fields:
                changes[name] = _parse(kind, take(key), key)
        if "Sampler" in fields:
            changes["sampler"] = take("Sampler")
        schedule = take("Schedule type", "").strip().lower()
        if schedule not in ("", "automatic"):
            changes["schedule"] = schedule
        if "LoRA weights" in fields:
            changes["loras"] = _parse_loras(take("LoRA weights"))
        if "Seed resize from-1" in fields:
            changes["seed_resize_from"] = (_parse(int, take("Seed resize from-1"), "Seed resize from"),
                                           _parse(int, take("Seed resize from-2"), "Seed resize from"))
        if "ENSD" in fields:
            changes["ensd"] = _parse(int, take("ENSD"), "ENSD")
        if "Tiling" in fields:
            changes["tiling"] = _parse_bool(take("Tiling"), "Tiling")
        if "Pad conds" in fields:
            changes["pad_cond_uncond"] = _parse_bool(take("Pad conds"), "Pad conds")
        if "NGMS all steps" in fields:
            changes["s_min_uncond_all"] = _parse_bool(take("NGMS all steps"), "NGMS all steps")
        changes.update(_inpainting_from_infotext(fields))
        hr_ratio = fields.get("Token merging ratio hr")
        if hr_ratio is not None and _parse(float, hr_ratio, "Token merging ratio hr") == changes.get(
                "token_merging_ratio"):
            del fields["Token merging ratio hr"]  # the first pass's ratio repeated (another one: reported unused)
        # A1111 leaves RNG out for its default, GPU; stablediff 0.1 left it out and drew on the CPU
        ours = fields.get("Version", "").startswith("stablediff")
        changes["rng"] = take("RNG", "cpu" if ours else "gpu").strip().lower()
        return cls(**changes), fields

    # -- AUTOMATIC1111's API ------------------------------------------------------------------------------------
    def to_a1111(self) -> dict:
        """A txt2img/img2img request body as A1111's API takes it (seed -1 = random)."""
        body = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "steps": self.steps,
                "cfg_scale": self.cfg_scale, "seed": -1 if self.seed is None else self.seed,
                "width": self.width, "height": self.height, "batch_size": self.batch_size,
                "sampler_name": self.sampler, "scheduler": self.schedule or "automatic",
                "override_settings": {"CLIP_stop_at_last_layers": self.clip_skip, "randn_source": self.rng.upper(),
                                      "eta_noise_seed_delta": self.ensd,
                                      "inpainting_mask_weight": self.inpainting_mask_weight,
                                      "s_min_uncond_all": self.s_min_uncond_all,
                                      "skip_early_cond": self.skip_early_cond,
                                      "img2img_extra_noise": self.extra_noise,
                                      "pad_cond_uncond": self.pad_cond_uncond},
                "subseed": -1 if self.subseed is None else self.subseed, "subseed_strength": self.subseed_strength,
                "seed_resize_from_w": self.seed_resize_from[0] if self.seed_resize_from else -1,
                "seed_resize_from_h": self.seed_resize_from[1] if self.seed_resize_from else -1,
                "cache_interval": self.cache_interval, "loras": dict(self.loras), "eta": self.eta,
                **self.sigma_values(), "s_min_uncond": self.s_min_uncond,
                "enable_hr": self.enable_hr, "hr_scale": self.hr_scale, "hr_upscaler": self.hr_upscaler,
                "hr_second_pass_steps": self.hr_second_pass_steps, "hr_resize_x": self.hr_resize_x,
                "hr_resize_y": self.hr_resize_y, "hr_sampler_name": self.hr_sampler,
                "hr_scheduler": self.hr_schedule, "hr_prompt": self.hr_prompt,
                "hr_negative_prompt": self.hr_negative_prompt, "tiling": self.tiling,
                "token_merging_ratio": self.token_merging_ratio, "resize_mode": self.resize_mode,
                "initial_noise_multiplier": self.noise_multiplier,
                "mask_blur_x": self.mask_blur_x, "mask_blur_y": self.mask_blur_y,
                "inpainting_fill": self.inpainting_fill, "inpaint_full_res": self.inpaint_full_res,
                "inpaint_full_res_padding": self.inpaint_full_res_padding,
                "inpainting_mask_invert": int(self.inpainting_mask_invert)}
        if self.strength is not None:
            body["denoising_strength"] = self.strength
        return body

    @classmethod
    def from_a1111(cls, body: dict) -> "GenerationParams":
        """From an A1111 request body: null means the default, seed -1 means random, `sampler_index` is the older
        name of `sampler_name`, "automatic" is the sampler's own schedule."""
        get = {k: v for k, v in body.items() if v is not None}.get
        seed = get("seed", -1)
        scheduler = str(get("scheduler", "automatic")).strip().lower()
        override = get("override_settings") or {}
        return cls(prompt=get("prompt", ""), negative_prompt=get("negative_prompt", ""), steps=get("steps", 50),
                   cfg_scale=get("cfg_scale", 7.0), seed=None if seed == -1 else seed, width=get("width"),
                   height=get("height"), batch_size=get("batch_size", 1),
                   sampler=get("sampler_name") or get("sampler_index", "Euler"),
                   schedule=None if scheduler == "automatic" else scheduler,
                   clip_skip=override.get("CLIP_stop_at_last_layers") or 1, strength=get("denoising_strength"),
                   loras=tuple((str(k), v) for k, v in (get("loras") or {}).items()),
                   cache_interval=get("cache_interval", 1), rng=str(override.get("randn_source") or "gpu").lower(),
                   ensd=override.get("eta_noise_seed_delta") or 0,
                   subseed=None if get("subseed", -1) == -1 else get("subseed"),
                   subseed_strength=get("subseed_strength", 0.0), seed_resize_from=_resize_from(get),
                   tiling=get("tiling", False),
                   token_merging_ratio=get("token_merging_ratio") or override.get("token_merging_ratio") or 0.0,
                   inpainting_mask_weight=_option(override, "inpainting_mask_weight", 1.0),
                   eta=_eta_from_a1111(get, override), **_sigma_params_from_a1111(get, override),
                   s_min_uncond=get("s_min_uncond", _option(override, "s_min_uncond", 0.0)),
                   s_min_uncond_all=_option(override, "s_min_uncond_all", False),
                   skip_early_cond=_option(override, "skip_early_cond", 0.0),
                   extra_noise=_option(override, "img2img_extra_noise", 0.0),
                   pad_cond_uncond=_option(override, "pad_cond_uncond", False),
                   **_hires_from_a1111(get), **(_inpainting_from_a1111(get) if "init_images" in body else {}))

    # -- batch job rows and the command line --------------------------------------------------------------------
    def to_row(self) -> dict:
        """A `stablediff batch` JSONL row: every field, lists for loras."""
        row = dataclasses.asdict(self)
        row["loras"] = [list(pair) for pair in self.loras]
        return row

    @classmethod
    def from_row(cls, row: dict) -> "GenerationParams":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(row) - set(names))
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}; known: {', '.join(names)}")
        loras = row.get("loras") or ()
        if not isinstance(loras, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2
                                                           for p in loras):
            raise ValueError(f"loras {loras!r} is not a list of [name, multiplier] pairs")
        resize = row.get("seed_resize_from")
        if resize is not None:
            resize = tuple(resize) if isinstance(resize, (list, tuple)) else resize
        return cls(**{**row, "loras": tuple((str(n), m) for n, m in loras), "seed_resize_from": resize})

    def to_argv(self) -> list[str]:
        """Command-line arguments (after the subcommand) that parse back to these settings: options as
        `--flag=value` and the prompt after `--`, so that text starting with '-' is never read as an option."""
        values = {"--negative-prompt": self.negative_prompt, "--steps": self.steps, "--cfg-scale": self.cfg_scale,
                  "--seed": self.seed, "--width": self.width, "--height": self.height,
                  "--batch-size": self.batch_size, "--sampler": self.sampler, "--schedule": self.schedule,
                  "--clip-skip": self.clip_skip, "--strength": None if self.enable_hr else self.strength,
                  "--cache-interval": self.cache_interval, "--rng": self.rng, "--ensd": self.ensd,
                  "--subseed": self.subseed, "--subseed-strength": self.subseed_strength,
                  "--seed-resize-from": "x".join(map(str, self.seed_resize_from)) if self.seed_resize_from else None,
                  "--token-merging-ratio": self.token_merging_ratio or None, "--eta": self.eta,
                  **{f"--{name.replace('_', '-')}": None if value == SIGMA_PARAM_DEFAULTS[name] else value
                     for name, value in self.sigma_values().items()},
                  "--s-min-uncond": self.s_min_uncond or None, "--skip-early-cond": self.skip_early_cond or None,
                  "--extra-noise": self.extra_noise or None,
                  "--resize-mode": self.resize_mode or None,
                  "--noise-multiplier": None if self.noise_multiplier == 1 else self.noise_multiplier,
                  "--mask-blur": None if not (self.mask_blur_x or self.mask_blur_y) else self.mask_blur_x
                  if self.mask_blur_x == self.mask_blur_y else f"{self.mask_blur_x},{self.mask_blur_y}",
                  "--masked-content": MASKED_CONTENT[self.inpainting_fill].replace(" ", "-")
                  if self.inpainting_fill != 1 else None,
                  "--masked-padding": self.inpaint_full_res_padding or None,
                  "--inpainting-mask-weight": None if self.inpainting_mask_weight == 1 else self.inpainting_mask_weight}
        argv = [f"{flag}={v!r}" if isinstance(v, float) else f"{flag}={v}" for flag, v in values.items()
                if v is not None]
        argv += [f"--lora={name}:{float(m)!r}" for name, m in self.loras]
        argv += ["--tiling"] if self.tiling else []
        argv += ["--s-min-uncond-all"] if self.s_min_uncond_all else []
        argv += ["--pad-conds"] if self.pad_cond_uncond else []
        argv += ["--only-masked"] if self.inpaint_full_res else []
        argv += ["--invert-mask"] if self.inpainting_mask_invert else []
        return [*argv, *self._hires_argv(), "--", self.prompt]

    def _hires_argv(self) -> list[str]:
        """The --hr-* options (cli.add_generation_options); with --hr, the strength is --hr-strength."""
        if not self.enable_hr:
            return []
        values = {"--hr-scale": self.hr_scale, "--hr-upscaler": self.hr_upscaler,
                  "--hr-steps": self.hr_second_pass_steps, "--hr-resize-x": self.hr_resize_x,
                  "--hr-resize-y": self.hr_resize_y, "--hr-sampler": self.hr_sampler,
                  "--hr-schedule": self.hr_schedule, "--hr-prompt": self.hr_prompt,
                  "--hr-negative-prompt": self.hr_negative_prompt, "--hr-strength": self.strength}
        return ["--hr", *(f"{flag}={v!r}" if isinstance(v, float) else f"{flag}={v}" for flag, v in values.items()
                          if v is not None)]

    @classmethod
    def from_args(cls, args) -> "GenerationParams":
        """From an argparse namespace with the generation options (cli.add_generation_options); `batch` has no
        prompt (its rows do)."""
        loras = tuple(lora_arg(v) for v in getattr(args, "lora", None) or [])
        strength = args.hr_strength if args.hr else getattr(args, "strength", None)
        blur = getattr(args, "mask_blur", None) or (0, 0)
        return cls(prompt=getattr(args, "prompt", ""), negative_prompt=args.negative_prompt, steps=args.steps,
                   cfg_scale=args.cfg_scale, seed=args.seed, width=args.width, height=args.height,
                   batch_size=args.batch_size, sampler=args.sampler, schedule=args.schedule,
                   clip_skip=args.clip_skip, strength=strength, loras=loras,
                   cache_interval=args.cache_interval, rng=args.rng, ensd=args.ensd, subseed=args.subseed,
                   subseed_strength=args.subseed_strength, seed_resize_from=size_arg(args.seed_resize_from),
                   enable_hr=args.hr, hr_scale=args.hr_scale, hr_upscaler=args.hr_upscaler,
                   hr_second_pass_steps=args.hr_steps, hr_resize_x=args.hr_resize_x, hr_resize_y=args.hr_resize_y,
                   hr_sampler=args.hr_sampler, hr_schedule=args.hr_schedule, hr_prompt=args.hr_prompt,
                   hr_negative_prompt=args.hr_negative_prompt,
                   tiling=getattr(args, "tiling", False),
                   token_merging_ratio=getattr(args, "token_merging_ratio", 0.0), eta=getattr(args, "eta", None),
                   **{name: getattr(args, name, default) for name, default in SIGMA_PARAM_DEFAULTS.items()},
                   s_min_uncond=getattr(args, "s_min_uncond", 0.0),
                   s_min_uncond_all=getattr(args, "s_min_uncond_all", False),
                   skip_early_cond=getattr(args, "skip_early_cond", 0.0), extra_noise=getattr(args, "extra_noise", 0.0),
                   pad_cond_uncond=getattr(args, "pad_cond_uncond", False),
                   resize_mode=getattr(args, "resize_mode", 0), noise_multiplier=getattr(args, "noise_multiplier", 1.0),
                   mask_blur_x=blur[0], mask_blur_y=blur[1],
                   inpainting_fill=getattr(args, "masked_content", 1),
                   inpaint_full_res=getattr(args, "only_masked", False),
                   inpaint_full_res_padding=getattr(args, "masked_padding", 0),
                   inpainting_mask_invert=getattr(args, "invert_mask", False),
                   inpainting_mask_weight=getattr(args, "inpainting_mask_weight", 1.0))


def size_arg(value: str | None) -> tuple[int, int] | None:
    """`WxH` -> (W, H); None and (W, H) stay as they are."""
    if value is None or isinstance(value, tuple):
        return value
    w, sep, h = str(value).lower().partition("x")
    if not (sep and w.strip().isdigit() and h.strip().isdigit()):
        raise ValueError(f"size {value!r} is not WIDTHxHEIGHT, e.g. 512x512")
    return int(w), int(h)


def _eta_from_a1111(get, override: dict) -> float | None:
    """A1111's eta: the request's, else for its own samplers its option for the sampler's kind (eta_ddim for DDIM,
    whose default is 0, eta_ancestral for the others) where that is not the kind's default; None: each sampler's
    own (so a hires pass with a sampler of the other kind keeps its own, as in A1111)."""
    from .samplers import get_sampler

    if get("eta") is not None:
        return get("eta")
    try:
        spec, _ = get_sampler(get("sampler_name") or get("sampler_index", "Euler"))
    except ValueError:  # (validate names it)
        return None
    if spec.family != "a1111" or spec.eta is None:
        return None
    option = override.get("eta_ddim" if spec.eta == 0 else "eta_ancestral")
    return None if option == spec.eta else option


def _sigma_params_from_a1111(get, override: dict) -> dict:
    """A1111's s_churn, s_tmin, s_tmax, s_noise: its option (override_settings) where that is not the default, else
    the request's (as A1111's Sampler.initialize)."""
    values = {}
    for name, default in SIGMA_PARAM_DEFAULTS.items():
        option = override.get(name)
        values[name] = option if option not in (None, default) else get(name, default)
    return values


def _option(override: dict, name: str, default):
    """An A1111 option from a request's override_settings: `default` where it is missing or null (0 is a value)."""
    value = override.get(name)
    return default if value is None else value


def _resize_from(get) -> tuple[int, int] | None:
    """A1111's seed_resize_from_w/_h: off when either is missing, 0 or -1."""
    w, h = get("seed_resize_from_w", -1), get("seed_resize_from_h", -1)
    return (w, h) if w > 0 and h > 0 else None


def _hires_from_a1111(get) -> dict:
    """A1111's hires request fields; "Use same ..." (or null) sampler and scheduler are None."""
    from .hires import DEFAULT_UPSCALER, use_same

    return dict(enable_hr=bool(get("enable_hr", False)), hr_scale=get("hr_scale", 2.0),
                hr_upscaler=get("hr_upscaler", DEFAULT_UPSCALER),
                hr_second_pass_steps=get("hr_second_pass_steps", 0), hr_resize_x=get("hr_resize_x", 0),
                hr_resize_y=get("hr_resize_y", 0),
                hr_sampler=None if use_same(get("hr_sampler_name")) else get("hr_sampler_name"),
                hr_schedule=None if use_same(get("hr_scheduler")) else get("hr_scheduler"),
                hr_prompt=get("hr_prompt", ""), hr_negative_prompt=get("hr_negative_prompt", ""))


def _inpainting_from_a1111(get) -> dict:
    """A1111's img2img fields (an img2img body: one with init_images), with its API's defaults (which are not its
    web page's): mask blur 4, masked content 0 (fill), only masked, padding 0. `mask_blur`, where given, sets both
    directions. The noise multiplier: the request's, else its override_settings' (A1111's option)."""
    blur = get("mask_blur")
    override = get("override_settings") or {}
    return dict(resize_mode=get("resize_mode", 0),
                noise_multiplier=get("initial_noise_multiplier") or override.get("initial_noise_multiplier") or 1.0,
                mask_blur_x=get("mask_blur_x", 4) if blur is None else blur,
                mask_blur_y=get("mask_blur_y", 4) if blur is None else blur, inpainting_fill=get("inpainting_fill", 0),
                inpaint_full_res=bool(get("inpaint_full_res", True)),
                inpaint_full_res_padding=get("inpaint_full_res_padding", 0),
                inpainting_mask_invert=bool(get("inpainting_mask_invert", 0)))


def _inpainting_from_infotext(fields: dict) -> dict:
    """The inpainting keys of an infotext (taken out of `fields`): Mask mode, Mask blur, Masked content, Inpaint
    area, Masked area padding."""
    take, changes = fields.pop, {}
    if "Mask mode" in fields:
        changes["inpainting_mask_invert"] = take("Mask mode").strip().lower() == "inpaint not masked"
    if "Mask blur" in fields:
        changes["mask_blur_x"] = changes["mask_blur_y"] = _parse(int, take("Mask blur"), "Mask blur")
    if "Masked content" in fields:
        content = take("Masked content").strip().lower()
        if content not in MASKED_CONTENT:
            raise ValueError(f"infotext Masked content: {content!r} is not one of {', '.join(MASKED_CONTENT)}")
        changes["inpainting_fill"] = MASKED_CONTENT.index(content)
    if "Inpaint area" in fields:
        changes["inpaint_full_res"] = take("Inpaint area").strip().lower() == "only masked"
    if "Masked area padding" in fields:
        changes["inpaint_full_res_padding"] = _parse(int, take("Masked area padding"), "Masked area padding")
    return changes


def _hires_from_infotext(fields: dict) -> dict:
    """The hires keys of an infotext (taken out of `fields`); hires fix is on where "Denoising strength" and any of
    "Hires upscale", "Hires resize" or "Hires upscaler" are there, as A1111's paste reads it."""
    if "Denoising strength" not in fields or not any(k in fields for k in ("Hires upscale", "Hires resize-1",
                                                                           "Hires upscaler")):
        return {}
    take = fields.pop
    changes = {"enable_hr": True}
    readers = {"Hires upscale": ("hr_scale", float), "Hires resize-1": ("hr_resize_x", int),
               "Hires resize-2": ("hr_resize_y", int), "Hires steps": ("hr_second_pass_steps", int)}
    for key, (name, kind) in readers.items():
        if key in fields:
            changes[name] = _parse(kind, take(key), key)
    texts = {"Hires upscaler": "hr_upscaler", "Hires sampler": "hr_sampler", "Hires schedule type": "hr_schedule",
             "Hires prompt": "hr_prompt", "Hires negative prompt": "hr_negative_prompt"}
    changes.update({name: take(key) for key, name in texts.items() if key in fields})
    return changes


def txt2img_from_infotext(text: str, *, keep_strength: bool = False,
                          model_hash: str | None = None) -> tuple[GenerationParams, list[str]]:
    """A parameters text read for a txt2img remake: the settings, and the ones this run does not use as
    "key: value" notes (first a Model hash other than `model_hash`, the model's that runs; then unused_settings';
    then the denoising strength of an image made without hires fix: an img2img setting, dropped unless
    keep_strength)."""
    params, unknown = GenerationParams.from_infotext(text)
    notes = unused_settings(unknown)
    theirs = unknown.get("Model hash", "").lower()
    if theirs and model_hash and theirs != model_hash.lower():
        notes.insert(0, f"Model hash: {theirs} (this model's is {model_hash})")
    if params.strength is not None and not params.enable_hr and not keep_strength:
        notes.append(f"Denoising strength: {params.strength} (an img2img or hires fix setting)")
        params = params.replace(strength=None)
    if params.noise_multiplier != 1:
        notes.append(f"Noise multiplier: {params.noise_multiplier} (an img2img setting)")
        params = params.replace(noise_multiplier=1.0)
    inpainting = {k: v for k, v in params.inpainting_infotext().items() if v is not None}
    if inpainting:  # read, but a txt2img remake has no mask to use them on
        notes += [f"{k}: {v} (an inpainting setting)" for k, v in inpainting.items()]
        params = params.replace(**{f: GenerationParams.__dataclass_fields__[f].default for f in INPAINTING_FIELDS})
    return params, notes


def unused_settings(unknown: dict[str, str]) -> list[str]:
    """`from_infotext`'s unknown keys that are settings (not records such as "Model hash"), as "key: value"."""
    return [f"{k}: {v}" for k, v in unknown.items() if k not in INFOTEXT_RECORDS]


def lora_arg(value: str) -> tuple[str, float]:
    """`--lora NAME[:SCALE]` -> (NAME, SCALE): the scale is after the last colon (default 1.0)."""
    name, sep, scale = value.rpartition(":")
    if not sep:
        name, scale = value, "1"
    try:
        m = float(scale)
    except ValueError:
        raise ValueError(f"--lora {value}: scale {scale!r} is not a number") from None
    if not name or not math.isfinite(m):
        raise ValueError(f"--lora {value}: give NAME or NAME:SCALE with a finite scale")
    return name, m


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_size(name: str, v) -> None:
    if v is not None and (not _is_int(v) or v % 8):
        raise ValueError(f"{name} {v!r} is not a multiple of 8")
    if v is not None and not 64 <= v <= 4096:
        raise ValueError(f"{name} {v} is outside 64..4096")


def _check_text(name: str, value) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} {value!r} is not text")


def _parse(kind, text: str, key: str):
    try:
        return kind(text.strip())
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"infotext {key}: {text!r} is not {what}") from None


def _parse_bool(text: str, key: str) -> bool:
    value = {"true": True, "false": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(f"infotext {key}: {text!r} is not True or False")
    return value


def _parse_loras(text: str) -> tuple[tuple[str, float], ...]:
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, m = item.rpartition(":")
        pairs.append((name, _parse(float, m, "LoRA weights")))
    return tuple(pairs)
