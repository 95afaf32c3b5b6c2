"""img2img and inpainting against diffusers' Img2Img / Inpaint pipelines on random tiny models."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SD15, assert_close, tiny_diffusers_pipeline
from stablediff import StableDiffusion, samplers

LATENT_TOL = 5e-4


def picture(width, height, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 5.0)], axis=-1) * 255
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def mask(width, height):
    m = np.zeros((height, width), np.uint8)
    m[height // 4: 3 * height // 4, width // 3: width] = 255
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


def set_scheduler(ref, sampler, schedule=None):
    import diffusers

    spec = samplers.SAMPLERS[sampler]
    cls_name, kwargs = spec.diffusers_class, dict(spec.diffusers_kwargs)
    if schedule == "karras":
        kwargs = dict(kwargs, use_karras_sigmas=True)
    cls = getattr(diffusers, cls_name)
    ref.scheduler = cls.from_config(cls.load_config(str(SD15), subfolder="scheduler"), **kwargs)


def run_ref(ref, sampler, **kwargs):
    set_scheduler(ref, sampler)
    seed = kwargs.pop("seed")
    with torch.no_grad():
        return ref(generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **kwargs).images


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim", "heun", "unipc"])
@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(pipe, tiny_reference, sampler, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline(**tiny_reference.components)
    image = picture(80, 64)
    kw = dict(prompt="a cat on a sofa", negative_prompt="blurry", num_inference_steps=10, guidance_scale=6.0,
              strength=strength, seed=31)
    ref_latents = run_ref(ref, sampler, image=image, **kw)
    ours = pipe("a cat on a sofa", negative_prompt="blurry", steps=10, cfg_scale=6.0, strength=strength, seed=31,
                init_image=image, sampler=sampler)
    assert ours.images[0].size == (80, 64)
    assert_close(ours.latents, ref_latents, LATENT_TOL)
    assert "Denoising strength: " + str(strength) in ours.infotexts[0]


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_with_a_normal_unet_matches_diffusers(pipe, tiny_reference, sampler, strength):
    from diffusers import StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline(**tiny_reference.components)
    image, m = picture(64, 64, 1), mask(64, 64)
    kw = dict(prompt="a dog", num_inference_steps=8, guidance_scale=7.0, strength=strength, seed=5)
    ref_latents = run_ref(ref, sampler, image=image, mask_image=m, height=64, width=64, **kw)
    ours = pipe("a dog", steps=8, cfg_scale=7.0, strength=strength, seed=5, init_image=image, mask_image=m,
                sampler=sampler)
    assert_close(ours.latents, ref_latents, LATENT_TOL)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    import shutil

    path = tmp_path_factory.mktemp("tiny-inpaint") / "tiny-inpaint"
    tiny_diffusers_pipeline(seed=4, unet_overrides={"in_channels": 9}).save_pretrained(path)
    shutil.copy(SD15 / "scheduler" / "scheduler_config.json", path / "scheduler" / "scheduler_config.json")
    return path


@pytest.mark.parametrize("sampler,strength", [("euler", 1.0), ("euler_a", 1.0), ("dpmpp_2m", 0.75)])
def test_inpainting_checkpoint_matches_diffusers(inpaint_dir, sampler, strength):
    from diffusers import StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline.from_pretrained(inpaint_dir, safety_checker=None,
                                                         requires_safety_checker=False)
    pipe = StableDiffusion.from_pretrained(inpaint_dir)
    assert pipe.unet.config.in_channels == 9
    image, m = picture(64, 80, 2), mask(64, 80)
    ref_latents = run_ref(ref, sampler, prompt="a red hat", image=image, mask_image=m, height=80, width=64,
                          num_inference_steps=8, guidance_scale=7.5, strength=strength, seed=77)
    ours = pipe("a red hat", steps=8, cfg_scale=7.5, strength=strength, seed=77, init_image=image, mask_image=m,
                sampler=sampler)
    assert_close(ours.latents, ref_latents, LATENT_TOL)
    with pytest.raises(ValueError, match="inpainting checkpoint"):
        pipe("a red hat", steps=2)


def test_img2img_size_rules_and_bad_input(pipe, tmp_path):
    image = picture(70, 69)
    path = tmp_path / "in.png"
    image.save(path)
    with pytest.warns(UserWarning, match="70x69 is resized to 64x64"):
        out = pipe("x", init_image=path, steps=2, seed=1)
    assert out.images[0].size == (64, 64)
    with pytest.warns(UserWarning, match="resized to 96x96"):
        assert pipe("x", init_image=image, width=96, height=96, steps=2, seed=1).images[0].size == (96, 96)
    with pytest.raises(ValueError, match="strength 1.5"):
        pipe("x", init_image=picture(64, 64), strength=1.5, steps=2)
    with pytest.raises(ValueError, match="strength 0.01 leaves no step"):
        pipe("x", init_image=picture(64, 64), strength=0.01, steps=10)
    with pytest.raises(ValueError, match="mask_image needs an init_image"):
        pipe("x", mask_image=mask(64, 64), steps=2)
    with pytest.raises(ValueError, match="nope.png: cannot read image"):
        pipe("x", init_image=tmp_path / "nope.png", steps=2)


def run_cli(*args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "stablediff", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_img2img_and_inpaint_cli(tiny_model_dir, tmp_path):
    from stablediff.images import parse_infotext

    picture(64, 64).save(tmp_path / "in.png")
    mask(64, 64).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    r = run_cli("img2img", "a cat", "--init-image", tmp_path / "in.png", "--strength", "0.6", "--model",
                tiny_model_dir, "--steps", "4", "--seed", "3", "--output-dir", out, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("inpaint", "a dog", "--init-image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                "--model", tiny_model_dir, "--steps", "4", "--seed", "3", "--output-dir", out, "--quiet",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-3.png", "00001-3.png"]
    params = [parse_infotext(Image.open(f).text["parameters"]) for f in files]
    assert params[0]["Denoising strength"] == "0.6" and params[1]["Denoising strength"] == "1.0"
    for args, bad in [(["--strength", "1.5"], "--strength 1.5"), (["--strength", "0"], "--strength 0"),
                      (["--init-image", tmp_path / "missing.png"], "missing.png")]:
        base = ["img2img", "a cat", "--init-image", tmp_path / "in.png", "--model", tiny_model_dir]
        r = run_cli(*base, *args, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and bad in r.stderr
    r = run_cli("inpaint", "a cat", "--init-image", tmp_path / "in.png", "--mask", tmp_path / "in.png.nope",
                "--model", tiny_model_dir, cwd=tmp_path)
    assert r.returncode == 2 and "in.png.nope" in r.stderr


def test_cli_resize_mode_fits_the_init_image_as_a1111(tiny_model_dir, tmp_path):
    """--resize-mode crop-and-resize: an 80x64 init image asked at 64x64 gives the image that the init image cropped
    beforehand (images.resize_init, A1111's mode 1) gives; a mode we do not have is a one-line usage error."""
    from stablediff.images import resize_init

    picture(80, 64).save(tmp_path / "wide.png")
    resize_init(picture(80, 64), 64, 64, 1).save(tmp_path / "cropped.png")
    out = tmp_path / "out"
    common = ["a cat", "--model", tiny_model_dir, "--steps", "3", "--seed", "3", "--width", "64", "--height", "64",
              "--output-dir", out, "--quiet"]
    for name, extra in (("wide.png", ["--resize-mode", "crop-and-resize"]), ("cropped.png", []),
                        ("wide.png", [])):
        r = run_cli("img2img", *common, "--init-image", tmp_path / name, *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    crop, ref, stretch = (np.asarray(Image.open(f)) for f in sorted(out.glob("*.png")))
    assert np.array_equal(crop, ref) and not np.array_equal(crop, stretch)
    r = run_cli("img2img", *common, "--init-image", tmp_path / "wide.png", "--resize-mode", "3", cwd=tmp_path)
    assert r.returncode == 2 and "--resize-mode: '3' is not one of just-resize" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sampler,pure", [("Euler", False), ("DPM++ 2M", False), ("euler", True)])
def test_full_strength_inpainting_start(pipe, sampler, pure):
    """At strength 1 diffusers' inpainting starts from pure noise; A1111's noises the init latents to sigma_max, as
    its img2img does at any strength (x0 + noise * sigmas[0])."""
    from stablediff import rng

    plan = samplers.prepare(sampler, pipe.noise_schedule, 10, strength=1.0)
    x0 = torch.full((1, 4, 8, 8), 0.5)

    class Posterior:
        mean = x0 / pipe.vae.config.scaling_factor

        def sample(self, generators):
            return self.mean

    source = {"posterior": Posterior(), "masked": Posterior(), "mask": torch.ones(1, 1, 8, 8)}
    x, _, _ = pipe._start(plan, rng.ImageRNG((4, 8, 8), [3]), source, 1.0)
    noise = rng.ImageRNG((4, 8, 8), [3]).next()
    expected = noise * plan.init_noise_scale if pure else x0 + noise * plan.sigmas[0]
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x, noise * plan.sigmas[0], atol=1e-3) or pure


@pytest.mark.parametrize("sampler", ["Euler", "euler_a"])
def test_a_batch_of_init_images(pipe, sampler):
    """A list of init images, one for each image of the batch (A1111's img2img batch: the batch has as many images
    as given, at most batch_size): image k is image k's own run with seed + k (latents to batching's rounding)."""
    a, b = picture(64, 64, seed=1), picture(80, 64, seed=2)
    common = dict(steps=4, strength=0.6, sampler=sampler, width=64, height=64, cfg_scale=5.0)
    both = pipe("a cat", init_image=[a, b], batch_size=4, seed=8, **common)
    assert len(both.images) == 2 and both.seeds == [8, 9]
    for k, image in enumerate((a, b)):
        alone = pipe("a cat", init_image=image, seed=8 + k, **common)
        torch.testing.assert_close(both.latents[k:k + 1], alone.latents, rtol=0, atol=1e-4)
    assert not torch.allclose(both.latents[0], both.latents[1], atol=1e-2)
    # a mask is the same for every image; the overlay is each one's own
    m = mask(64, 64)
    masked = pipe("a cat", init_image=[a, a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], mask_image=m, batch_size=2,
                  seed=8, **common)
    keep = np.asarray(m) == 0
    if sampler == "Euler":  # A1111's inpainting lays each init image back over its result
        assert np.array_equal(np.asarray(masked.images[1])[keep],
                              np.asarray(a.transpose(Image.Transpose.FLIP_LEFT_RIGHT))[keep])
    with pytest.raises(ValueError, match="3 init images for batch size 2"):
        pipe("a cat", init_image=[a, a, a], batch_size=2, **common)
