"""Hires fix: the latent path against diffusers (txt2img latents -> torch interpolate -> img2img on those latents),
A1111's target-size and step rules on hand-computed cases, the infotext, the command line and the API request."""

import re

import numpy as np
import pytest
import torch

from conftest import assert_close
from stablediff import StableDiffusion, a1111, hires
from stablediff.cli import build_parser
from stablediff.cli_options import UsageError, check_limits
from stablediff.limits import LimitError, Limits
from stablediff.params import GenerationParams
from stablediff.schedule import NoiseSchedule
from stablediff.serve import sdapi
from stablediff.serve.worker import ClientError
from test_img2img import set_scheduler

LATENT_TOL = 5e-4


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("sampler,upscaler,mode,antialias", [
    ("euler", "Latent", "bilinear", False),
    ("euler_a", "Latent (bicubic antialiased)", "bicubic", True),
    ("dpmpp_2m", "Latent (nearest-exact)", "nearest-exact", False),
])
def test_latent_hires_matches_diffusers_txt2img_interpolate_img2img(pipe, tiny_reference, sampler, upscaler, mode,
                                                                    antialias):
    from diffusers import StableDiffusionImg2ImgPipeline

    kw = dict(prompt="a cat on a sofa", negative_prompt="blurry", guidance_scale=6.0)
    set_scheduler(tiny_reference, sampler)
    with torch.no_grad():
        first = tiny_reference(num_inference_steps=8, width=64, height=80, output_type="latent",
                               generator=torch.Generator().manual_seed(7), **kw).images
        f = pipe.downscale  # 2 for the tiny VAE
        upscaled = torch.nn.functional.interpolate(first, size=(120 // f, 96 // f), mode=mode, antialias=antialias)
        img2img = StableDiffusionImg2ImgPipeline(**tiny_reference.components)
        ref = img2img(image=upscaled, num_inference_steps=6, strength=0.6, output_type="latent",
                      generator=torch.Generator().manual_seed(7), **kw).images
    ours = pipe.generate(GenerationParams(
        prompt="a cat on a sofa", negative_prompt="blurry", cfg_scale=6.0, steps=8, width=64, height=80, seed=7,
        sampler=sampler, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=6, strength=0.6))
    assert ours.images[0].size == (96, 120)
    assert_close(ours.latents, ref, LATENT_TOL)
    assert f"Size: 64x80, Model hash: {pipe.model_hash}, Model: " in ours.infotexts[0]
    assert ours.infotexts[0].endswith(f"Denoising strength: 0.6, RNG: CPU, Hires upscale: 1.5, Hires steps: 6, "
                                      f"Hires upscaler: {upscaler}, Version: stablediff 0.1.0")


def test_pixel_hires_upscales_the_decoded_image_and_encodes_it(pipe):
    """Lanczos: the second pass starts from the VAE's encoding (its mean) of the Lanczos-upscaled first image."""
    seen, run = {}, pipe.generate_latents

    def spy(prompt, negative, params, plan, seeds, source, step_callback, *controls):
        if source is None:
            return run(prompt, negative, params, plan, seeds, source, step_callback, *controls)
        seen["x0"], seen["size"] = source.latents, (params.width, params.height)
        return source.latents

    p = GenerationParams(prompt="a cat", steps=4, width=64, height=64, seed=3)
    first = pipe.generate(p)
    pipe.generate_latents = spy
    try:
        pipe.generate(p.replace(enable_hr=True, hr_resize_x=96, hr_upscaler="Lanczos"))
    finally:
        del pipe.generate_latents
    from stablediff import images

    big = first.images[0].resize((96, 96), resample=images.Image.Resampling.LANCZOS)
    with torch.no_grad():
        x0 = pipe.vae.encode(images.from_pil(big)).mean * pipe.vae.config.scaling_factor
    assert seen["size"] == (96, 96)
    assert_close(seen["x0"], x0, 1e-5)


def test_from_infotext_remakes_a_hires_image(pipe):
    import warnings

    first = pipe.generate(GenerationParams(prompt="a cat", steps=3, seed=4, sampler="Euler a", enable_hr=True,
                                           hr_scale=1.25, hr_second_pass_steps=2, strength=0.4,
                                           hr_prompt="a sharp cat"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of the infotext is left unused
        again = pipe.from_infotext(first.infotexts[0])
    assert torch.equal(again.latents, first.latents) and again.infotexts == first.infotexts


@pytest.mark.parametrize("size,scale,resize,upscale_to,truncate,image", [
    ((512, 512), 2.0, (0, 0), (1024, 1024), (0, 0), (1024, 1024)),
    ((512, 768), 1.5, (0, 0), (768, 1152), (0, 0), (768, 1152)),
    ((512, 512), 1.3, (0, 0), (665, 665), (0, 0), (664, 664)),  # int(665.6); the latents floor it to 83
    ((512, 768), 2.0, (1024, 0), (1024, 1536), (0, 0), (1024, 1536)),  # width given: the height keeps the ratio
    ((512, 768), 2.0, (0, 1024), (682, 1024), (0, 0), (680, 1024)),  # 1024 * 512 // 768
    ((512, 768), 2.0, (1024, 1024), (1024, 1536), (0, 64), (1024, 1024)),  # cover the box, crop 64 latent rows
    ((768, 512), 2.0, (1024, 1024), (1536, 1024), (64, 0), (1024, 1024)),
    ((512, 512), 2.0, (1920, 1080), (1920, 1920), (0, 105), (1920, 1080)),
    ((512, 512), 2.0, (1000, 1000), (1000, 1000), (0, 0), (1000, 1000)),
])
def test_target_size_follows_a1111(size, scale, resize, upscale_to, truncate, image):
    target = hires.target_size(*size, scale, *resize)
    assert target == (upscale_to, truncate)
    assert target.image_size() == image


def test_crop_takes_the_smaller_half_first():
    x = torch.arange(240.0).reshape(1, 1, 240, 1).expand(1, 1, 240, 3)
    out = hires.crop(x, (1, 105))
    assert out.shape == (1, 1, 135, 2)
    assert out[0, 0, 0, 0] == 52 and out[0, 0, -1, 0] == 186  # 52 rows before, 53 after


@pytest.mark.parametrize("hr_steps,strength,total", [(10, 0.5, 20), (7, 0.3, 23), (30, 1.0, 30), (1, 0.75, 1)])
def test_a1111_samplers_run_exactly_the_hires_steps_of_a_longer_schedule(hr_steps, strength, total):
    """A1111's fixed-steps rule: a schedule of int(steps / min(strength, 0.999)) steps, its last `steps` run."""
    params = GenerationParams(steps=20, sampler="DPM++ 2M", enable_hr=True, hr_second_pass_steps=hr_steps,
                              strength=strength).validate()
    plan = hires.plan(params, NoiseSchedule())
    full = a1111.sigmas(a1111.ModelSigmas.from_schedule(NoiseSchedule()), total, "karras")
    assert len(plan.sigmas) == hr_steps + 1
    assert torch.equal(plan.sigmas, full[total - hr_steps:])


def test_diffusers_samplers_use_the_diffusers_img2img_rule():
    params = GenerationParams(steps=20, sampler="euler", enable_hr=True, strength=0.5).validate()
    assert len(hires.plan(params, NoiseSchedule()).sigmas) - 1 == 10  # int(20 * 0.5) of 20
    other = params.replace(hr_sampler="Euler a", hr_second_pass_steps=8).validate()
    assert other.hr_schedule is None and len(hires.plan(other, NoiseSchedule()).sigmas) - 1 == 8


def test_validate_canonical_form_and_bad_values():
    p = GenerationParams(prompt="a", sampler="euler", enable_hr=True, hr_sampler="Use same sampler",
                         hr_schedule="Use same scheduler", hr_prompt="a").validate()
    assert (p.strength, p.hr_sampler, p.hr_schedule, p.hr_prompt) == (0.75, None, None, "")
    p = GenerationParams(sampler="euler", enable_hr=True, hr_sampler="DPM++ 2M Karras").validate()
    assert (p.hr_sampler, p.hr_schedule) == ("DPM++ 2M", "karras")
    p = GenerationParams(sampler="euler", enable_hr=True, hr_sampler="Euler a", hr_schedule="Automatic").validate()
    assert p.hr_schedule == "uniform"  # the hires sampler's own, as A1111 records it
    for changes, message in [(dict(hr_scale=0.5), "hires scale 0.5 is outside 1..8"),
                             (dict(hr_resize_x=32), "hires resize x 32 is not 0"),
                             (dict(hr_second_pass_steps=-1), "hires steps -1 is outside 0..1000"),
                             (dict(hr_sampler="nope"), "unknown sampler 'nope'"),
                             (dict(strength=0.0), r"strength 0.0 is outside \(0, 1\]"),
                             (dict(hr_scale=8.0, width=1024), "hires size 8192x4096 .* is outside 64..4096")]:
        with pytest.raises(ValueError, match=message):
            GenerationParams(enable_hr=True, **changes).validate()


def test_the_hires_work_is_bounded_by_the_limits():
    p = GenerationParams(width=512, height=512, steps=20, enable_hr=True)
    p.validate(Limits())
    with pytest.raises(LimitError, match="image size 1024x1024 = 1,048,576 is over the limit of 262,144"):
        p.validate(Limits(max_pixels=512 * 512))
    with pytest.raises(LimitError, match="steps 40 is over the limit of 30"):
        p.replace(sampler="Euler", hr_second_pass_steps=40).validate(Limits(max_steps=30))  # all 40 run


def test_infotext_reads_a1111s_hires_keys():
    text = ("a castle\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 512x768, "
            "Model hash: 6ce0161689, Denoising strength: 0.45, Hires prompt: \"a castle, detailed\", "
            "Hires resize: 1024x1024, Hires steps: 12, Hires upscaler: Latent (nearest-exact), Version: v1.10.1")
    p, unknown = GenerationParams.from_infotext(text)
    p = p.validate()
    assert (p.enable_hr, p.strength, p.hr_resize_x, p.hr_resize_y, p.hr_second_pass_steps) == (True, 0.45, 1024,
                                                                                                1024, 12)
    assert (p.hr_upscaler, p.hr_prompt, p.hr_scale) == ("Latent (nearest-exact)", "a castle, detailed", 2.0)
    assert unknown == {"Model hash": "6ce0161689", "Version": "v1.10.1"}
    # as A1111's paste: hires keys without a "Denoising strength" do not turn hires fix on (and are reported)
    off, unknown = GenerationParams.from_infotext("a\nSteps: 20, Seed: 5, Size: 512x512, Hires upscale: 2")
    assert not off.enable_hr and unknown == {"Hires upscale": "2"}
    assert p.to_infotext(version="0.1.0").endswith(
        "Denoising strength: 0.45, RNG: GPU, Hires prompt: \"a castle, detailed\", Hires resize: 1024x1024, "
        "Hires steps: 12, Hires upscaler: Latent (nearest-exact), Version: stablediff 0.1.0")


def test_a_model_upscaler_is_named_by_its_file_name_and_must_exist(tmp_path):
    p = GenerationParams(enable_hr=True, hr_upscaler=str(tmp_path / "4x-Ultra.pth")).validate()
    assert p.to_infotext().endswith("Hires upscale: 2, Hires upscaler: 4x-Ultra")
    with pytest.raises(ValueError, match="hires upscaler '4x-Ultra' is not one of: Latent, .*Nearest, or a model"):
        hires.load_upscaler("4x-Ultra", tmp_path)


def test_cli_hires_options():
    args = build_parser().parse_args(["generate", "--hr", "--hr-scale", "1.5", "--hr-upscaler", "Latent (bicubic)",
                                      "--hr-steps", "12", "--hr-strength", "0.4", "--hr-sampler", "Euler a",
                                      "--hr-schedule", "karras", "--hr-prompt", "sharp", "--hr-resize-x", "768",
                                      "a cat"])
    p = GenerationParams.from_args(args).validate()
    assert (p.enable_hr, p.hr_scale, p.hr_upscaler, p.hr_second_pass_steps, p.strength) == (
        True, 1.5, "Latent (bicubic)", 12, 0.4)
    assert (p.hr_sampler, p.hr_schedule, p.hr_prompt, p.hr_resize_x, p.hr_resize_y) == ("Euler a", "karras", "sharp",
                                                                                         768, 0)
    off = GenerationParams.from_args(build_parser().parse_args(["generate", "a cat"]))
    assert not off.enable_hr and off.strength is None
    with pytest.raises(UsageError, match="image size 1024x1024 = 1,048,576 is over the limit of 300,000"):
        check_limits(build_parser().parse_args(["generate", "--hr", "--max-pixels", "300000", "a cat"]))


def test_a1111_api_request_with_hires_fix():
    req = sdapi.Txt2ImgRequest(prompt="a cat", enable_hr=True, hr_scale=2, denoising_strength=0.55,
                               hr_upscaler="Latent (antialiased)", hr_second_pass_steps=10,
                               hr_sampler_name="Use same sampler", hr_scheduler="Karras", steps=20,
                               sampler_name="Euler")
    plan = sdapi.check_request(req, Limits(), 512)
    p = plan.params
    assert (p.enable_hr, p.strength, p.hr_scale, p.hr_upscaler, p.hr_sampler, p.hr_schedule) == (
        True, 0.55, 2, "Latent (antialiased)", None, "karras")
    assert plan.steps == 20 + 10
    plain = sdapi.check_request(sdapi.Txt2ImgRequest(prompt="a cat", denoising_strength=0), Limits(), 512)
    assert plain.params.strength is None and not plain.params.enable_hr
    # A1111's img2img has no hires fix: the field is ignored there, and denoising_strength is img2img's
    i2i = sdapi.check_request(sdapi.Img2ImgRequest(init_images=["x"], enable_hr=True, denoising_strength=0.3),
                              Limits(), 512, init_size=(64, 64))
    assert not i2i.params.enable_hr and i2i.params.strength == 0.3
    with pytest.raises(ClientError, match="image size 1024x1024 = 1,048,576 is over the limit of 262,144"):
        sdapi.check_request(req, Limits(max_pixels=512 * 512), 512)
    with pytest.raises(ClientError, match="hr_upscaler 'R-ESRGAN 4x\\+' is not one of: Latent"):
        sdapi.check_request(req.model_copy(update={"hr_upscaler": "R-ESRGAN 4x+"}), Limits(), 512)


def test_hires_fix_refuses_an_init_image(pipe):
    from PIL import Image

    with pytest.raises(ValueError, match="enable_hr: hires fix is a txt2img setting"):
        pipe.generate(GenerationParams(prompt="a cat", steps=2, enable_hr=True),
                      init_image=Image.new("RGB", (64, 64)))


def test_cli_from_png_remakes_a_hires_image(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from test_cli import _main_in_process

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["--model", str(tiny_model_dir), "--quiet"]
    res = _main_in_process(["generate", "a cat", "--steps", "2", "--seed", "9", "--hr", "--hr-scale", "1.5",
                            "--hr-strength", "0.5", "--hr-upscaler", "Nearest", "--hr-prompt", "a cat, sharp",
                            *args, "--output-dir", str(tmp_path / "a")], capsys)
    assert res.returncode == 0, res.stderr
    res = _main_in_process(["generate", "--from-png", str(tmp_path / "a" / "00000-9.png"), *args, "--output-dir",
                            str(tmp_path / "b")], capsys)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    with Image.open(tmp_path / "a" / "00000-9.png") as a, Image.open(tmp_path / "b" / "00000-9.png") as b:
        assert a.size == (96, 96) and a.text["parameters"] == b.text["parameters"]
        assert "Denoising strength: 0.5, RNG: CPU, Hires prompt: \"a cat, sharp\", Hires upscale: 1.5, " \
               "Hires upscaler: Nearest, " in a.text["parameters"]
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_server_hires_upscaler_names_come_from_the_upscaler_folder_only(tmp_path):
    pytest.importorskip("fastapi")
    from stablediff.limits import Limits
    from stablediff.serve.sdapi import Txt2ImgRequest, check_request
    from stablediff.serve.worker import ClientError

    (tmp_path / "4x-model.pth").write_bytes(b"not read until a job loads it")
    base = dict(enable_hr=True, width=64, height=64, steps=2)
    plan = check_request(Txt2ImgRequest(**base, hr_upscaler="4x-model"), Limits(), 512, upscaler_dir=tmp_path)
    assert plan.params.hr_upscaler == "4x-model"
    for name in [str(tmp_path / "4x-model.pth"), "../4x-model.pth", "nope"]:  # never a path a client gives
        with pytest.raises(ClientError, match=f"hr_upscaler '{re.escape(name)}' is not one of: Latent, .*4x-model"):
            check_request(Txt2ImgRequest(**base, hr_upscaler=name), Limits(), 512, upscaler_dir=tmp_path)
