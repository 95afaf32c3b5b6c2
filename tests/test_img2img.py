"""img2img and inpainting against diffusers' Img2Img / Inpaint pipelines on random tiny models."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SD15, assert_close, tiny_diffusers_pipeline
from stablediff import StableDiffusion, img2img, samplers
from stablediff.params import GenerationParams

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


@pytest.fixture(scope="module")
def inpaint_models(inpaint_dir):
    from diffusers import StableDiffusionInpaintPipeline

    ref = StableDiffusionInpaintPipeline.from_pretrained(inpaint_dir, safety_checker=None,
                                                         requires_safety_checker=False)
    return StableDiffusion.from_pretrained(inpaint_dir), ref


def faded(ref, image, keep, weight):
    """diffusers' preprocessed init image, faded towards keep * image (the masked image) by weight. Contiguous as
    ours: a constant image (all gray) encodes differently channels-last, its GroupNorms dividing rounding noise by
    a variance of 0."""
    pixels = ref.image_processor.preprocess(image).float().contiguous()
    return torch.lerp(pixels, pixels * keep, weight)


def mean_latents(ref, pixels):
    with torch.no_grad():
        return ref.vae.encode(pixels).latent_dist.mean * ref.vae.config.scaling_factor


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_txt2img_with_an_inpainting_checkpoint_matches_diffusers(inpaint_models, sampler):
    """A1111 makes txt2img images with an inpainting model: mask all ones, the masked image black. diffusers'
    inpainting pipeline at strength 1 with an all-white mask and those masked-image latents starts from pure noise
    (the seed's first draw, as txt2img) and runs the full schedule: the same run."""
    pipe, ref = inpaint_models
    white = Image.new("L", (64, 80), 255)
    black = mean_latents(ref, -torch.ones(1, 3, 80, 64))
    ref_latents = run_ref(ref, sampler, prompt="a red hat", negative_prompt="blur", image=picture(64, 80),
                          mask_image=white, masked_image_latents=black, height=80, width=64,
                          num_inference_steps=6, guidance_scale=7.5, strength=1.0, seed=12)
    ours = pipe("a red hat", negative_prompt="blur", steps=6, cfg_scale=7.5, seed=12, width=64, height=80,
                sampler=sampler)
    assert_close(ours.latents, ref_latents, LATENT_TOL)
    assert "Conditional mask weight: 1.0" in ours.infotexts[0] and "Denoising strength" not in ours.infotexts[0]


def test_txt2img_with_an_inpainting_checkpoint_encodes_its_black_image_once(inpaint_models):
    """The black image's encoding is kept for the next call of the same size, autoencoder and tiling (the same
    latents); another size or circular padding encodes afresh."""
    pipe, _ = inpaint_models
    pipe.blank_kept = None  # (the module's other tests ran at this size)
    encodes = []
    hook = pipe.vae.encoder.register_forward_pre_hook(lambda m, args: encodes.append(tuple(args[0].shape)))
    kw = dict(steps=2, seed=4, width=64, height=80, sampler="euler")
    try:
        first, again = pipe("a hat", **kw), pipe("a hat", **kw)
        assert encodes == [(1, 3, 80, 64)] and torch.equal(first.latents, again.latents)
        pipe("a hat", **{**kw, "width": 72})
        pipe("a hat", tiling=True, **kw)
        pipe("a hat", **kw)
    finally:
        hook.remove()
    assert encodes == [(1, 3, 80, 64), (1, 3, 80, 72), (1, 3, 80, 64), (1, 3, 80, 64)]


@pytest.mark.parametrize("weight", [1.0, 0.4, 0.0])
def test_img2img_with_an_inpainting_checkpoint_matches_diffusers(inpaint_models, weight):
    """img2img without a mask: mask all ones, the masked image the init image faded to gray by the weight (A1111's
    inpainting_mask_weight), its latents the encoding's mean. diffusers: its inpainting pipeline at strength 0.7
    (which noises the init image's sampled latents, as img2img does) with an all-white mask and those latents."""
    pipe, ref = inpaint_models
    image = picture(64, 80, 3)
    masked = mean_latents(ref, faded(ref, image, 0.0, weight))
    ref_latents = run_ref(ref, "euler", prompt="a boat", image=image, mask_image=Image.new("L", (64, 80), 255),
                          masked_image_latents=masked, height=80, width=64, num_inference_steps=8,
                          guidance_scale=7.0, strength=0.7, seed=5)
    ours = pipe("a boat", steps=8, cfg_scale=7.0, strength=0.7, seed=5, init_image=image, sampler="euler",
                inpainting_mask_weight=weight)
    assert_close(ours.latents, ref_latents, LATENT_TOL)
    assert f"Conditional mask weight: {weight}" in ours.infotexts[0]
    assert GenerationParams.from_infotext(ours.infotexts[0])[0].inpainting_mask_weight == weight
    with pytest.raises(ValueError, match="inpainting mask weight 1.5 is outside 0..1"):
        pipe("a boat", init_image=image, inpainting_mask_weight=1.5)


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_inpainting_mask_weight_matches_diffusers(inpaint_models, weight):
    """Inpainting with a weight below 1: the masked image is the init image faded towards its masked version;
    diffusers encodes that image (its masked_image_latents given as pixels) with the generator, as ours does."""
    pipe, ref = inpaint_models
    image, m = picture(64, 80, 2), mask(64, 80)
    keep = (ref.mask_processor.preprocess(m, height=80, width=64) < 0.5).float()
    ref_latents = run_ref(ref, "euler_a", prompt="a red hat", image=image, mask_image=m,
                          masked_image_latents=faded(ref, image, keep, weight), height=80, width=64,
                          num_inference_steps=8, guidance_scale=7.5, strength=0.75, seed=77)
    ours = pipe("a red hat", steps=8, cfg_scale=7.5, strength=0.75, seed=77, init_image=image, mask_image=m,
                sampler="euler_a", inpainting_mask_weight=weight)
    assert_close(ours.latents, ref_latents, LATENT_TOL)
    full = pipe("a red hat", steps=8, cfg_scale=7.5, strength=0.75, seed=77, init_image=image, mask_image=m,
                sampler="euler_a")
    assert (full.latents - ours.latents).abs().max() > 1e-2  # the weight is not ignored


def test_inpainting_checkpoint_conditioning_with_a1111_samplers_and_hires(inpaint_models, monkeypatch):
    """What the U-Net's 5 extra channels hold: A1111's samplers take the encodings' means (inpainting too); the
    hires pass's are made at its size, from a black image with a latent upscale at weight 1, else from the
    decoded upscaled latents faded to gray."""
    pipe, ref = inpaint_models
    seen = []
    unet_forward = type(pipe.unet).forward

    def spy(self, x, *args, **kwargs):
        seen.append(x[:, 4:].clone())
        return unet_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(type(pipe.unet), "forward", spy)
    image, m = picture(64, 64, 4), mask(64, 64)
    pipe("x", steps=3, seed=1, init_image=image, mask_image=m, sampler="Euler", inpainting_mask_weight=0.3,
         batch_size=2)
    keep = (torch.from_numpy(np.array(m)) < 128).float()[None, None]  # (Euler: no blur, the same binary mask)
    want = mean_latents(ref, faded(ref, image, keep, 0.3))
    n = 64 // pipe.downscale  # latents per side
    for extra in seen:
        assert extra.shape == (4, 5, n, n)  # the guided batch of 2 images
        assert torch.equal(extra[:, :1], torch.nn.functional.interpolate(1 - keep, size=(n, n)).expand(4, 1, n, n))
        assert_close(extra[:, 1:], want.expand(4, -1, -1, -1), 1e-5)
    seen.clear()
    hires = GenerationParams(prompt="x", steps=2, seed=1, width=64, height=64, enable_hr=True, hr_scale=1.5,
                             strength=0.5)
    out = pipe.generate(hires)
    first, second = seen[0], seen[-1]
    assert first.shape[-2:] == (n, n) and second.shape[-2:] == (96 // pipe.downscale,) * 2
    assert out.images[0].size == (96, 96)
    assert bool((second[:, :1] == 1).all())
    assert_close(second[:1, 1:], mean_latents(ref, -torch.ones(1, 3, 96, 96)), 1e-5)
    seen.clear()
    pipe.generate(hires.replace(inpainting_mask_weight=0.5))
    assert (seen[-1][:1, 1:] - second[:1, 1:]).abs().max() > 1e-2  # from the decoded image, not the black one


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

    source = img2img.Source(posterior=Posterior(), masked=Posterior(), mask=torch.ones(1, 1, 8, 8))
    x, _, _ = img2img.start(pipe, plan, rng.ImageRNG((4, 8, 8), [3]), source, 1.0, pipe.eps)
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


def test_cli_takes_a_batch_of_init_images(pipe, tiny_model_dir, tmp_path):
    """--init-image repeated: one image from each, as the Python API's list makes them (the batch has as many;
    --batch-size, where given, at least that); too small a --batch-size and --pad with several are one line, exit
    code 2, before the model loads."""
    a, b = picture(64, 64, seed=1), picture(80, 64, seed=2)
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    out = tmp_path / "out"
    r = run_cli("img2img", "a cat", "--init-image", tmp_path / "a.png", "--init-image", tmp_path / "b.png", "--model",
                tiny_model_dir, "--steps", "3", "--seed", "8", "--output-dir", out, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = pipe("a cat", init_image=[a, b], batch_size=2, steps=3, seed=8, strength=0.75)
    got = {int(p.stem.split("-")[1]): np.asarray(Image.open(p).convert("RGB")) for p in out.glob("*.png")}
    assert sorted(got) == [8, 9]
    for k, seed in enumerate((8, 9)):  # (another process: its thread count may round the products differently)
        assert np.abs(got[seed].astype(int) - np.asarray(want.images[k])).max() <= 2
    base = ["img2img", "x", "--init-image", tmp_path / "a.png", "--init-image", tmp_path / "a.png", "--init-image",
            tmp_path / "b.png", "--model", tmp_path / "missing"]
    for args, bad in [(["--batch-size", "2"], "3 --init-image for --batch-size 2"),
                      (["--init-image", tmp_path / "nope.png"], "--init-image"),
                      ]:
        r = run_cli(*base, *args, cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and bad in r.stderr, r.stderr
    r = run_cli("inpaint", "x", "--init-image", tmp_path / "a.png", "--init-image", tmp_path / "a.png", "--pad", "8",
                "--model", tmp_path / "missing", cwd=tmp_path)
    assert r.returncode == 2 and "--pad outpaints one --init-image, not 2" in r.stderr, r.stderr


def test_api_with_an_inpainting_checkpoint(inpaint_dir, inpaint_models, tmp_path):
    """A server whose model is an inpainting checkpoint answers txt2img and img2img as A1111 does (it had refused
    both): info.is_using_inpainting_conditioning, "Conditional mask weight" from the inpainting_mask_weight option
    (override_settings), the same latents as the Python API; the option outside 0..1 is a 422."""
    pytest.importorskip("fastapi")
    import base64
    import io
    import json

    import httpx
    from test_server import _uvicorn
    from stablediff.serve.server import ServeConfig, create_app

    pipe, _ = inpaint_models
    app = create_app(ServeConfig(model=str(inpaint_dir), device="cpu", output_dir=tmp_path))
    init = io.BytesIO()
    picture(64, 64, 6).save(init, format="PNG")
    small = {"prompt": "a kite", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 9}
    with _uvicorn(app) as port:
        post = lambda path, body: httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/{path}", json=body, timeout=120)
        r = post("txt2img", small)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["is_using_inpainting_conditioning"] and "Conditional mask weight: 1.0" in info["infotexts"][0]
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        want = pipe("a kite", steps=2, width=64, height=64, sampler="Euler", seed=9, rng="gpu")
        assert np.abs(got.astype(int) - np.asarray(want.images[0])).max() <= 1
        body = {**small, "init_images": [base64.b64encode(init.getvalue()).decode()], "denoising_strength": 0.6,
                "override_settings": {"inpainting_mask_weight": 0.25}}
        r = post("img2img", body)
        assert r.status_code == 200, r.text
        assert "Conditional mask weight: 0.25" in json.loads(r.json()["info"])["infotexts"][0]
        r = post("img2img", {**body, "override_settings": {"inpainting_mask_weight": 1.5}})
        assert r.status_code == 422 and "inpainting_mask_weight" in r.text
