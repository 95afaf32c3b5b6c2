"""GenerationParams: one object, checked once, that survives every way a user states it: the command line,
AUTOMATIC1111's API JSON, batch job rows and the PNG's infotext."""

import json
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stablediff import a1111, hires, samplers
from stablediff.cli import build_parser
from stablediff.limits import LimitError, Limits
from stablediff.params import MAX_SEED, SIGMA_PARAM_DEFAULTS, SIGMA_PARAM_RANGES, GenerationParams

TEXT = st.text(alphabet=string.ascii_letters + string.digits + " ,()[]:.-_<>|'\"", max_size=40).map(str.strip)
SIZE = st.integers(8, 512).map(lambda n: n * 8)
NUMBER = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def params(draw, infotext=False):
    """Valid, canonical params; for infotext, one image with its own seed and size (what an image records)."""
    name = draw(st.sampled_from(sorted(samplers.SAMPLERS)))
    spec = samplers.SAMPLERS[name]
    if spec.timestep_space:  # A1111's DDIM, PLMS, UniPC: their own timesteps, no schedule
        schedule = None
    elif spec.family == "a1111":  # canonical: "automatic" resolved to the sampler's own
        schedule = draw(st.sampled_from([k for k in a1111.SCHEDULES if k != "automatic"]))
    else:
        schedule = "karras" if spec.supports_karras and draw(st.booleans()) else None
    batch = 1 if infotext else draw(st.integers(1, 16))
    strength = draw(st.none() | st.floats(0.001, 1.0))
    seed = draw(st.integers(0, MAX_SEED - batch + 1) if infotext else st.none() | st.integers(0, MAX_SEED - batch + 1))
    size = SIZE if infotext else st.none() | SIZE
    return GenerationParams(
        prompt=draw(TEXT), negative_prompt=draw(TEXT),
        # DDIM: 1000 runs past t 999; LCM/TCD: 50; A1111's timestep samplers: at least 2 (UniPC 3)
        steps=draw(st.integers({"UniPC": 3}.get(name, 2) if spec.timestep_space else 1,
                               50 if spec.plan_args else 999)),
        cfg_scale=draw(st.floats(0, 100, allow_nan=False)), seed=seed, width=draw(size), height=draw(size),
        batch_size=batch, sampler=name, schedule=schedule, clip_skip=draw(st.integers(1, 12)),
        strength=strength,
        # (an infotext records extra noise only for img2img and hires fix: where there is a strength)
        extra_noise=draw(st.just(0.0) | st.floats(0, 1)) if strength is not None or not infotext else 0.0,
        loras=tuple(draw(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,9}", fullmatch=True),
                                         st.floats(-100, 100, allow_nan=False), max_size=3)).items()),
        cache_interval=draw(st.integers(1, 10)), rng=draw(st.sampled_from(["cpu", "gpu", "nv"])),
        ensd=draw(st.just(0) | st.integers(0, MAX_SEED)), tiling=draw(st.booleans()),
        # (the pipeline writes "Conditional mask weight" for an inpainting checkpoint's images: tested there)
        inpainting_mask_weight=1.0 if infotext else draw(st.just(1.0) | st.floats(0, 1)),
        # (an infotext records eta only where the sampler takes it and it is not the sampler's own)
        eta=None if infotext and spec.eta is None else draw(
            st.none() | st.floats(0, 1).filter(lambda e: e != spec.eta)),
        **draw(ngms(infotext)),
        # (an infotext records the churn settings only where the sampler takes them)
        **{name: draw(st.just(default) | st.floats(0, top).filter(lambda v, d=default: v != d))
           if not infotext or name in spec.sigma_params else default
           for (name, default), top in zip(SIGMA_PARAM_DEFAULTS.items(), SIGMA_PARAM_RANGES.values())},
        **draw(variation(batch, infotext)))


@st.composite
def with_hires(draw, infotext=False):
    """params(), and about half of them with hires fix in its canonical form (hires.check's); draws whose second
    pass no sampler could run (e.g. A1111's DDIM over more than 1000 steps) are left out."""
    p = draw(params(infotext))
    if not draw(st.booleans()):
        return p
    name = draw(st.none() | st.sampled_from(sorted(set(samplers.SAMPLERS) - {p.sampler})))
    spec = samplers.SAMPLERS[name or p.sampler]
    if spec.timestep_space:
        schedule = None
    elif spec.family == "a1111":
        schedule = draw(st.none() | st.sampled_from([k for k in a1111.SCHEDULES if k != "automatic"]))
    else:
        schedule = draw(st.sampled_from(["automatic", "karras"] if spec.supports_karras else ["automatic"]))
    resize = draw(st.just((0, 0)) | st.tuples(st.just(0) | st.integers(64, 512), st.just(0) | st.integers(64, 512)))
    # the infotext records hr_scale only without a resize
    p = p.replace(enable_hr=True, strength=draw(st.floats(0.05, 1.0)),
                  hr_scale=2.0 if any(resize) else draw(st.floats(1.0, 2.0)), hr_upscaler=draw(st.sampled_from(
                      [*hires.LATENT_MODES, "Lanczos", "Nearest", "4x-UltraSharp"])),
                  hr_second_pass_steps=draw(st.just(0) | st.integers(4, 30)), hr_resize_x=resize[0],
                  hr_resize_y=resize[1], hr_sampler=name, hr_schedule=schedule,
                  hr_prompt=draw(st.just("") | TEXT.filter(lambda t: t != p.prompt)),
                  hr_negative_prompt=draw(st.just("") | TEXT.filter(lambda t: t != p.negative_prompt)))
    try:
        p.validate()
    except ValueError:
        assume(False)
    return p


@st.composite
def ngms(draw, infotext):
    """A1111's NGMS: off, or a level (an infotext records "NGMS all steps" only with a level); skip_early_cond."""
    level = draw(st.just(0.0) | st.floats(0.001, 1000))
    return dict(s_min_uncond=level, s_min_uncond_all=draw(st.booleans()) if level or not infotext else False,
                skip_early_cond=draw(st.just(0.0) | st.floats(0, 1)), pad_cond_uncond=draw(st.booleans()))


@st.composite
def variation(draw, batch, infotext):
    """Variation-seed settings: none, or a subseed and strength (the infotext records a subseed only with a
    strength), and maybe a seed resize."""
    strength = draw(st.just(0.0) | st.floats(0.001, 1.0))
    subseed = draw(st.integers(0, MAX_SEED - batch + 1)) if strength or not infotext and draw(st.booleans()) else None
    resize = draw(st.none() | st.tuples(st.integers(64, 4096), st.integers(64, 4096)))
    return dict(subseed=subseed, subseed_strength=strength, seed_resize_from=resize)


@settings(max_examples=150, deadline=None)
@given(with_hires())
def test_params_round_trip_through_cli_args_a1111_json_and_job_rows(p):
    assert p.validate() == p  # canonical already
    assert GenerationParams.from_a1111(json.loads(json.dumps(p.to_a1111()))).validate() == p
    assert GenerationParams.from_row(json.loads(json.dumps(p.to_row()))).validate() == p
    command = ["generate"] if p.strength is None or p.enable_hr else ["img2img", "--init-image", "in.png"]
    args = build_parser().parse_args([*command, *p.to_argv()])
    assert GenerationParams.from_args(args).validate() == p


@settings(max_examples=150, deadline=None)
@given(with_hires(infotext=True))
def test_params_round_trip_through_infotext(p):
    text = p.to_infotext(model_hash="0123456789", model_name="sd15", version="0.1.0")
    back, unknown = GenerationParams.from_infotext(text)
    assert back.validate() == p
    assert unknown == {"Model hash": "0123456789", "Model": "sd15", "Version": "stablediff 0.1.0"}


def test_a1111_infotext_reads_with_its_labels_and_reports_what_it_does_not_use():
    text = ("a castle, (masterpiece:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: "
            "Karras, CFG scale: 7, Seed: 123, Size: 512x768, Model hash: 6ce0161689, Model: v1-5, Clip skip: 2, "
            "Hires upscale: 2, Version: v1.10.1")
    p, unknown = GenerationParams.from_infotext(text)
    assert p.validate() == GenerationParams(
        prompt="a castle, (masterpiece:1.2)", negative_prompt="blurry", steps=20, sampler="DPM++ 2M",
        schedule="karras", cfg_scale=7.0, seed=123, width=512, height=768, clip_skip=2, rng="gpu")  # no RNG: GPU
    assert unknown == {"Model hash": "6ce0161689", "Model": "v1-5", "Hires upscale": "2", "Version": "v1.10.1"}
    p, _ = GenerationParams.from_infotext("a\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, ENSD: 31337, RNG: NV")
    assert (p.rng, p.ensd) == ("nv", 31337)
    # stablediff 0.1 wrote no RNG and drew on the CPU
    p, _ = GenerationParams.from_infotext("a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Version: stablediff 0.1.0")
    assert p.rng == "cpu"
    with pytest.raises(ValueError, match="infotext Steps: 'x' is not a whole number"):
        GenerationParams.from_infotext("a\nSteps: x, Sampler: Euler, CFG scale: 7, Seed: 1")


def test_a1111_defaults_and_the_sampler_name_forms():
    p = GenerationParams.from_a1111({"prompt": "a", "seed": -1, "sampler_index": "Euler a", "width": None})
    assert p == GenerationParams(prompt="a", steps=50, sampler="Euler a", rng="gpu")  # A1111's API defaults
    assert p.validate().sampler == "Euler a" and p.validate().schedule == "uniform"  # A1111's, its own schedule
    assert GenerationParams(sampler="euler_a").validate().sampler == "euler_a"  # diffusers'
    assert GenerationParams(sampler="DPM++ 2M Karras").validate().schedule == "karras"
    assert GenerationParams(sampler="DPM++ 2M SDE").validate().schedule == "exponential"  # A1111's "Automatic"


@pytest.mark.parametrize("changes,message", [
    (dict(width=36), "width 36 is not a multiple of 8"),
    (dict(height=8), "height 8 is outside 64..4096"),
    (dict(steps=0), "steps 0 is outside 1..1000"),
    (dict(steps=True), "steps True is outside"),
    (dict(cfg_scale=float("nan")), "cfg scale nan is not a finite number"),
    (dict(clip_skip=13), "clip skip 13 is outside 1..12"),
    (dict(seed=-2), "seed -2 is outside"),
    (dict(seed=MAX_SEED, batch_size=2), "seed 4294967295 \\+ 2 images runs past 4294967295"),
    (dict(strength=0), "strength 0 is outside \\(0, 1\\]"),
    (dict(cache_interval=0), "cache interval 0 must be an integer >= 1"),
    (dict(loras=(("x", 1e308),)), "LoRA x: multiplier 1e\\+308 is outside -100..100"),
    (dict(sampler="ddim", schedule="karras"), "sampler 'ddim' does not take the karras schedule"),
    (dict(schedule="exotic"), "schedule 'exotic' is not known"),
    (dict(sampler="nope"), "unknown sampler 'nope'"),
    (dict(prompt=5), "prompt 5 is not text"),
])
def test_validate_names_the_bad_value(changes, message):
    with pytest.raises(ValueError, match=message):
        GenerationParams(**changes).validate()


def test_limits_are_checked_with_the_defaults_for_missing_sizes():
    limits = Limits(max_pixels=512 * 512)
    GenerationParams().validate(limits)  # None sizes count as 512x512
    with pytest.raises(LimitError, match="image size 520x512 = 266,240 is over the limit of 262,144 "
                                         "\\(set with --max-pixels\\)"):
        GenerationParams(width=520).validate(limits)
    with pytest.raises(LimitError, match="images 20 is over the limit of 16"):
        GenerationParams(batch_size=10).validate(Limits(max_images=16), prompts=2)
    with pytest.raises(LimitError, match="negative prompt length in characters 20,001"):
        GenerationParams(negative_prompt="x" * 20_001).validate(Limits())


def test_a_lora_named_twice_keeps_its_last_multiplier():
    assert GenerationParams(loras=(("a", 1.0), ("b", 0.5), ("a", 2.0))).validate().loras == (("a", 2.0), ("b", 0.5))


def test_variation_seeds_read_count_and_check_as_a1111():
    p, unknown = GenerationParams.from_infotext(
        "a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Variation seed: 77, "
        "Variation seed strength: 0.3, Seed resize from: 512x768, Version: v1.10.1")
    assert (p.subseed, p.subseed_strength, p.seed_resize_from) == (77, 0.3, (512, 768))
    assert unknown == {"Version": "v1.10.1"}
    # every image keeps the seed and the variation seed counts up; without a strength the seed counts
    assert p.replace(batch_size=3).image_seeds(3) == [(1, 77), (1, 78), (1, 79)]
    assert p.replace(subseed_strength=0.0).image_seeds(2) == [(1, None), (2, None)]
    GenerationParams(seed=MAX_SEED, subseed=0, subseed_strength=0.5, batch_size=2).validate()  # the seed stays
    with pytest.raises(ValueError, match=f"subseed {MAX_SEED} \\+ 2 images runs past"):
        GenerationParams(seed=0, subseed=MAX_SEED, subseed_strength=0.5, batch_size=2).validate()
    with pytest.raises(ValueError, match="subseed strength 1.5 is outside 0..1"):
        GenerationParams(subseed_strength=1.5).validate()
    with pytest.raises(ValueError, match=r"seed resize from \(8, 8\)"):
        GenerationParams(seed_resize_from=(8, 8)).validate()
    body = GenerationParams(subseed=5, subseed_strength=0.25, seed_resize_from=(256, 320)).to_a1111()
    assert (body["subseed"], body["subseed_strength"], body["seed_resize_from_w"], body["seed_resize_from_h"]) == (
        5, 0.25, 256, 320)
    assert GenerationParams.from_a1111({"seed_resize_from_w": 0, "seed_resize_from_h": 512}).seed_resize_from is None
