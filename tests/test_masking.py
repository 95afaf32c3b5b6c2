"""AUTOMATIC1111's inpainting (masking.py and the pipeline's A1111 latent blending): the mask blur against OpenCV,
the crop box, fill and overlay by hand-computed pixels, the latent blend against k-diffusion's sampler with
A1111's blend written out here, the settings' text forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from stablediff import StableDiffusion, masking, samplers
from stablediff.params import GenerationParams


def picture(width, height, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 5.0)], axis=-1) * 255
    return Image.fromarray((base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8))


def box_mask(width, height, box):
    m = Image.new("L", (width, height), 0)
    m.paste(255, box)
    return m


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


# -- the mask blur --------------------------------------------------------------------------------------------

def test_blur_is_opencvs_gaussian_to_the_bit():
    """A1111 blurs with cv2.GaussianBlur on the 8-bit mask, across then down: every pixel equal, including
    kernels wider than the image (OpenCV's reflect-101 border repeated)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    for _ in range(120):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        sx, sy = (int(v) for v in rng.integers(0, 30, 2))
        m = (rng.random((h, w)) > rng.random()).astype(np.uint8) * 255
        if rng.random() < 0.3:
            m = rng.integers(0, 256, (h, w)).astype(np.uint8)
        ref = m
        if sx:
            ref = cv2.GaussianBlur(ref, (2 * int(2.5 * sx + 0.5) + 1, 1), sx)
        if sy:
            ref = cv2.GaussianBlur(ref, (1, 2 * int(2.5 * sy + 0.5) + 1), sy)
        assert np.array_equal(np.asarray(masking.blur(Image.fromarray(m), sx, sy)), ref), (h, w, sx, sy)
    # taller and wider than the rows blurred at once (BLUR_ROWS), both ways
    m = (rng.random((masking.BLUR_ROWS * 2 + 37, masking.BLUR_ROWS + 5)) > 0.7).astype(np.uint8) * 255
    ref = cv2.GaussianBlur(cv2.GaussianBlur(m, (2 * int(2.5 * 6 + 0.5) + 1, 1), 6), (1, 2 * int(2.5 * 9 + 0.5) + 1), 9)
    assert np.array_equal(np.asarray(masking.blur(Image.fromarray(m), 6, 9)), ref)


def test_blur_kernel_by_hand():
    """sigma 1: 7 taps (2 * int(3.0) + 1) of exp(-d^2/2) normalised, in 1/256ths: 1.13, 13.82, 61.95, 102.2 ...
    quantised with the error carried outward-in (1, 14, 62; the centre takes 256 - 2 * 77 = 102)."""
    assert masking.blur_kernel(1).tolist() == [1, 14, 62, 102, 62, 14, 1]
    k = masking.blur_kernel(4)
    assert len(k) == 21 and k.sum() == 256 and k.tolist() == k[::-1].tolist()
    # one white pixel in a black row spreads as the kernel itself (255 * tap / 256, rounded)
    row = np.zeros((1, 41), np.uint8)
    row[0, 20] = 255
    got = np.asarray(masking.blur(Image.fromarray(row), 4, 0))[0, 10:31]
    assert got.tolist() == [(255 * int(t) + 128) >> 8 for t in k]


# -- the crop box of "Only masked" ----------------------------------------------------------------------------

def test_crop_region_grows_to_the_outputs_aspect_ratio():
    m = box_mask(100, 100, (10, 20, 30, 30))  # 20 x 10
    assert masking.crop_region(m, 0, 64, 64) == (10, 15, 30, 35)  # 10 more rows, 5 above and 5 below
    assert masking.crop_region(m, 5, 64, 64) == (5, 10, 35, 40)  # padded to 30 x 20, then 30 x 30
    assert masking.crop_region(m, 0, 128, 64) == (10, 20, 30, 30)  # 2:1 already
    assert masking.crop_region(m, 0, 64, 128) == (10, 5, 30, 45)  # 20 x 40: 15 rows above and below
    # near the top edge: the 15 rows above would leave the image, so the box moves down
    assert masking.crop_region(box_mask(100, 100, (10, 5, 30, 15)), 0, 64, 128) == (10, 0, 30, 40)
    # at the bottom edge the box moves up instead of running over; the odd extra pixel goes after the box
    assert masking.crop_region(box_mask(100, 100, (40, 90, 60, 100)), 0, 64, 64) == (40, 80, 60, 100)
    assert masking.crop_region(box_mask(100, 100, (40, 90, 61, 100)), 0, 64, 64) == (40, 79, 61, 100)
    # longer than the image along the grown axis: cut at the edge
    assert masking.crop_region(box_mask(100, 20, (0, 5, 100, 15)), 0, 64, 64) == (0, 0, 100, 20)
    assert masking.crop_region(Image.new("L", (50, 50)), 8, 64, 64) is None


# -- fill and overlay ---------------------------------------------------------------------------------------------

def test_fill_paints_the_masked_area_from_around_it_and_keeps_the_rest():
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 64))
    mask = box_mask(64, 64, (16, 16, 48, 48))
    filled = np.asarray(masking.fill(image, mask)).astype(int)
    outside = np.asarray(mask) == 0
    assert np.array_equal(filled[outside], np.asarray(image).astype(int)[outside])
    inside = filled[16:48, 16:48]
    assert (inside.sum(-1) > 200).all()  # painted, nowhere left black
    assert inside[:, 0, 0].mean() > inside[:, 0, 2].mean() + 100  # the red side's edge is red
    assert inside[:, -1, 2].mean() > inside[:, -1, 0].mean() + 100  # the blue side's blue


def test_prepare_whole_picture_keeps_the_init_image_outside_the_doubled_mask():
    init, mask = picture(64, 64), box_mask(64, 64, (20, 20, 44, 44))
    prep = masking.prepare(init, mask, 64, 64, blur_x=4, blur_y=4)
    blurred = np.asarray(masking.blur(mask, 4, 4)).astype(np.float32)
    assert np.array_equal(np.asarray(prep.mask), blurred.astype(np.uint8)) and prep.paste_to is None
    assert np.array_equal(np.asarray(prep.image), np.asarray(init))  # masked content "original"
    doubled = np.clip(blurred * 2, 0, 255)
    alpha = np.asarray(prep.overlay)[..., 3]
    assert np.array_equal(alpha, (255 - doubled).astype(np.uint8))
    generated = Image.new("RGB", (64, 64), (7, 200, 90))
    out = np.asarray(masking.apply_overlay(generated, prep))
    assert np.array_equal(out[doubled == 0], np.asarray(init)[doubled == 0])
    assert (out[doubled == 255] == (7, 200, 90)).all()


def test_prepare_only_masked_crops_and_pastes_back():
    init, mask = picture(160, 120), box_mask(160, 120, (100, 40, 120, 60))
    prep = masking.prepare(init, mask, 64, 64, only_masked=True, padding=6)
    assert prep.paste_to == (94, 34, 32, 32)
    assert prep.image.size == (64, 64) and prep.overlay.size == (160, 120)
    # the crop of the init image, scaled 2x by resize mode 2 (the same aspect ratio: a plain resize)
    crop = init.crop((94, 34, 126, 66)).resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(prep.image), np.asarray(crop))
    out = masking.apply_overlay(Image.new("RGB", (64, 64), (0, 255, 0)), prep)
    assert out.size == (160, 120)
    o, i, m = np.asarray(out), np.asarray(init), np.asarray(mask)
    assert np.array_equal(o[m == 0], i[m == 0])  # no blur: everything but the mask is the init image
    assert (o[m == 255] == (0, 255, 0)).all()
    with pytest.warns(UserWarning, match="the mask is empty"):
        assert masking.prepare(init, Image.new("L", (160, 120)), 64, 64, only_masked=True) is None


def test_latent_mask_is_bicubic_and_rounded():
    m = Image.fromarray(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1)))
    small = m.resize((8, 8), Image.Resampling.BICUBIC)
    want = np.around(np.asarray(small) / 255)
    got = masking.latent_mask(m, 8, 8)
    assert got.shape == (1, 1, 8, 8) and np.array_equal(got[0, 0].numpy(), want.astype(np.float32))
    assert set(np.unique(want)) == {0.0, 1.0}


# -- the pipeline: A1111's latents -----------------------------------------------------------------------------

class Recorder:
    """Records what the pipeline starts from: the init latents and noise plan.noised gets, the guided denoiser
    before inpainting wraps it, and the sigmas sampled over."""

    def __init__(self, monkeypatch, pipe):
        self.calls = {}
        noised, sample, denoiser = samplers.SamplingPlan.noised, samplers.SamplingPlan.sample, pipe.scheduled_denoiser

        def record_noised(plan, x0, noise, extra=0.0):
            self.calls.update(x0=x0.clone(), noise=noise.clone())
            out = noised(plan, x0, noise, extra)
            self.calls["x"] = out.clone()
            return out

        def record_sample(plan, d, x, **kw):
            self.calls["sigmas"] = plan.sigmas
            return sample(plan, d, x, **kw)

        def record_denoiser(*a, **kw):
            self.calls["denoiser"] = denoiser(*a, **kw)
            return self.calls["denoiser"]

        monkeypatch.setattr(samplers.SamplingPlan, "noised", record_noised)
        monkeypatch.setattr(samplers.SamplingPlan, "sample", record_sample)
        monkeypatch.setattr(pipe, "scheduled_denoiser", record_denoiser)


def test_a1111_inpainting_blends_each_denoised_prediction(pipe, monkeypatch):
    """A1111's CFGDenoiser returns init_latent * mask + nmask * denoised at every call, with nmask the blurred
    mask resized bicubic to the latents and rounded, and blends the result the same way. The reference runs
    Euler (k-diffusion's sample_euler, which A1111's "Euler" is: x += (x - D) / sigma * (sigma_next - sigma)) over
    the pipeline's own guided denoiser with that blend written out here."""
    rec = Recorder(monkeypatch, pipe)
    init, mask = picture(64, 64), box_mask(64, 64, (24, 8, 56, 40))
    result = pipe("a red boat", steps=6, cfg_scale=6.0, seed=5, sampler="Euler", init_image=init, mask_image=mask,
                  strength=0.7, mask_blur=3)
    c = rec.calls
    blurred, side = masking.blur(mask, 3, 3), 64 // pipe.downscale
    nmask = torch.from_numpy(np.around(np.asarray(blurred.resize((side, side), Image.Resampling.BICUBIC),
                                                  dtype=np.float32) / 255))
    keep = 1 - nmask
    blended = lambda x, sigma, **kw: c["x0"] * keep + nmask * c["denoiser"](x, sigma, **kw)
    ref, sigmas = c["x"].clone(), c["sigmas"]
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            d = (ref - blended(ref, sigma * ref.new_ones(len(ref)))) / sigma
            ref = ref + d * (sigma_next - sigma)
    ref = c["x0"] * keep + nmask * ref
    torch.testing.assert_close(result.latents, ref, rtol=0, atol=2e-6)
    assert not torch.allclose(result.latents * nmask, c["x0"] * nmask, atol=1e-3)  # the mask was repainted
    # the start: the init posterior's mean and the seed's first noise (A1111 draws nothing before it)
    noise = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(c["noise"], noise, rtol=0, atol=0)


def test_a1111_inpainting_overlay_and_infotext(pipe):
    init, mask = picture(64, 64), box_mask(64, 64, (24, 8, 56, 40))
    result = pipe("a red boat", steps=3, seed=5, sampler="Euler a", init_image=init, mask_image=mask, mask_blur=4,
                  inpainting_fill=0)
    decoded = np.asarray(Image.fromarray(((pipe.decode(result.latents)[0].permute(1, 2, 0).clamp(-1, 1) + 1)
                                          * 127.5).round().byte().numpy()))
    doubled = np.clip(np.asarray(masking.blur(mask, 4, 4)).astype(np.float32) * 2, 0, 255)
    out = np.asarray(result.images[0])
    assert np.array_equal(out[doubled == 0], np.asarray(init)[doubled == 0])
    assert np.abs(out[doubled == 255].astype(int) - decoded[doubled == 255]).max() <= 1
    text = result.infotexts[0]
    assert "Mask blur: 4" in text and "Masked content: fill" in text and "Inpaint area" not in text


def test_a1111_only_masked_returns_the_whole_image(pipe):
    init, mask = picture(96, 80), box_mask(96, 80, (60, 30, 76, 46))
    result = pipe("a red boat", steps=3, seed=5, sampler="Euler", width=64, height=64, init_image=init,
                  mask_image=mask, inpaint_full_res=True, inpaint_full_res_padding=8)
    assert result.images[0].size == (96, 80) and result.latents.shape[-1] == 64 // pipe.downscale
    out, m = np.asarray(result.images[0]), np.asarray(mask)
    assert np.array_equal(out[m == 0], np.asarray(init)[m == 0]) and not np.array_equal(out[m > 0],
                                                                                        np.asarray(init)[m > 0])
    assert "Inpaint area: Only masked, Masked area padding: 8" in result.infotexts[0]


@pytest.mark.parametrize("fill", [2, 3])
def test_a1111_latent_noise_and_latent_nothing(pipe, monkeypatch, fill):
    """Masked content 2 puts each seed's first noise under the mask before noising, 3 zeros (A1111's init_latent
    * mask + create_random_tensors(seeds) * nmask, or * mask alone)."""
    rec = Recorder(monkeypatch, pipe)
    init, mask = picture(64, 64), box_mask(64, 64, (0, 0, 32, 64))
    pipe("a red boat", steps=4, seed=9, sampler="DPM++ 2M", init_image=init, mask_image=mask, strength=0.8,
         inpainting_fill=fill)
    x0, side = rec.calls["x0"], 64 // pipe.downscale
    seed_noise = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(9))
    under, half = x0[..., :side // 2], side // 2
    torch.testing.assert_close(under, seed_noise[..., :half] if fill == 2 else torch.zeros_like(under), rtol=0, atol=0)
    assert x0[..., half:].abs().min() > 0  # the init latents outside the mask


def test_a1111_timestep_samplers_blend_the_models_input(pipe, monkeypatch):
    """A1111's DDIM, PLMS and UniPC blend the clean init latents into the model's input (mask_before_denoising):
    outside the mask the U-Net sees the init latents themselves at every call."""
    rec = Recorder(monkeypatch, pipe)
    inputs = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    try:
        init, mask = picture(64, 64), box_mask(64, 64, (32, 0, 64, 64))
        pipe("a red boat", steps=5, seed=3, sampler="DDIM", init_image=init, mask_image=mask, strength=0.9)
    finally:
        hook.remove()
    x0, half = rec.calls["x0"], 32 // pipe.downscale
    assert len(inputs) >= 3
    for x_in in inputs:
        for image in x_in.view(-1, *x0.shape):  # the guided batch's halves
            torch.testing.assert_close(image[..., :half], x0[..., :half], rtol=0, atol=0)
            assert not torch.allclose(image[..., half:], x0[..., half:], atol=1e-2)


def test_diffusers_samplers_keep_diffusers_inpainting(pipe):
    """Without A1111's settings a diffusers sampler's inpainting is unchanged (no overlay: the decoded image)."""
    init, mask = picture(64, 64), box_mask(64, 64, (24, 8, 56, 40))
    result = pipe("a red boat", steps=3, seed=5, sampler="euler", init_image=init, mask_image=mask)
    decoded = ((pipe.decode(result.latents)[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    assert np.abs(np.asarray(result.images[0]).astype(int) - decoded).max() <= 1
    assert "Mask blur" not in result.infotexts[0]


# -- the settings --------------------------------------------------------------------------------------------

def test_inpainting_settings_round_trip_and_are_checked():
    p = GenerationParams(prompt="x", mask_blur_x=4, mask_blur_y=4, inpainting_fill=0, inpaint_full_res=True,
                         inpaint_full_res_padding=32, resize_mode=2)
    back, unknown = GenerationParams.from_infotext(
        "x\nSteps: 20, Sampler: Euler, Mask blur: 4, Masked content: fill, Inpaint area: Only masked, "
        "Masked area padding: 32")
    assert (back.mask_blur_x, back.mask_blur_y, back.inpainting_fill, back.inpaint_full_res,
            back.inpaint_full_res_padding) == (4, 4, 0, True, 32) and not unknown
    body = p.to_a1111()
    again = GenerationParams.from_a1111({**body, "init_images": ["..."]})
    assert again.replace(rng="cpu", sampler=p.sampler, steps=p.steps) == p
    # A1111's API defaults for an img2img body; a txt2img body has none of them
    d = GenerationParams.from_a1111({"init_images": ["..."], "mask_blur": 7})
    assert (d.mask_blur_x, d.mask_blur_y, d.inpainting_fill, d.inpaint_full_res) == (7, 7, 0, True)
    assert GenerationParams.from_a1111({}).inpainting_fill == 1
    assert p.inpainting_infotext() == {"Mask mode": None, "Mask blur": 4, "Masked content": "fill",
                                       "Inpaint area": "Only masked", "Masked area padding": 32}
    inverted, _ = GenerationParams.from_infotext("x\nSteps: 2, Sampler: Euler, Mask mode: Inpaint not masked")
    assert inverted.inpainting_mask_invert and inverted.inpainting_infotext()["Mask mode"] == "Inpaint not masked"
    assert GenerationParams.from_a1111({"init_images": ["."], "inpainting_mask_invert": 1}).inpainting_mask_invert
    assert p.replace(mask_blur_y=2).inpainting_infotext(only_masked=False)["Mask blur"] is None
    for bad, message in [(dict(mask_blur_x=65), "mask blur 65 is outside 0..64"),
                         (dict(inpainting_fill=4), "inpainting fill 4 is not 0"),
                         (dict(inpaint_full_res_padding=-1), "padding -1 is outside 0..256"),
                         (dict(resize_mode=3), "resize mode 3 is not 0")]:
        with pytest.raises(ValueError, match=message):
            GenerationParams(**bad).validate()


def test_cli_inpainting_options(tiny_model_dir, tmp_path, pipe):
    """`stablediff inpaint` takes A1111's settings and gives the Python API's image; bad values are one line, exit
    code 2, before the model loads."""
    from test_img2img import run_cli

    init, mask = picture(96, 80), box_mask(96, 80, (60, 30, 76, 46))
    init.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    r = run_cli("inpaint", "a dog", "--init-image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--model",
                tiny_model_dir, "--steps", "3", "--seed", "3", "--sampler", "Euler a", "--width", "64", "--height",
                "64", "--mask-blur", "2", "--masked-content", "latent-nothing", "--only-masked", "--masked-padding",
                "4", "--invert-mask", "--noise-multiplier", "0.95", "--output-dir", out, "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (png,) = out.glob("*.png")
    want = pipe("a dog", steps=3, seed=3, sampler="Euler a", width=64, height=64, init_image=init,
                mask_image=mask, inpainting_mask_invert=True, mask_blur=2, inpainting_fill=3, inpaint_full_res=True,
                inpaint_full_res_padding=4, noise_multiplier=0.95)
    assert want.infotexts[0].count("Mask mode: Inpaint not masked") == 1
    inverted = pipe("a dog", steps=3, seed=3, sampler="Euler a", width=64, height=64, init_image=init,
                    mask_image=ImageOps.invert(mask), mask_blur=2, inpainting_fill=3, inpaint_full_res=True,
                    inpaint_full_res_padding=4, noise_multiplier=0.95)
    assert np.array_equal(np.asarray(inverted.images[0]), np.asarray(want.images[0]))
    got = Image.open(png)
    assert got.size == (96, 80)  # (another process: its thread count may round the products differently)
    assert np.abs(np.asarray(got.convert("RGB")).astype(int) - np.asarray(want.images[0])).max() <= 2
    assert "Mask mode: Inpaint not masked, Mask blur: 2, Masked content: latent nothing, Inpaint area: Only masked, " \
        "Masked area padding: 4, Noise multiplier: 0.95" in got.text["parameters"]
    base = ["inpaint", "x", "--init-image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "--model",
            tiny_model_dir]
    for args, bad in [(["--mask-blur", "65"], "mask blur 65 is outside 0..64"),
                      (["--mask-blur", "a,b"], "--mask-blur: 'a,b' is not N or X,Y"),
                      (["--masked-content", "blank"], "--masked-content: 'blank' is not one of fill, original"),
                      (["--masked-padding", "300"], "padding 300 is outside 0..256")]:
        r = run_cli(*base, *args, cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and bad in r.stderr, r.stderr


def test_api_inpainting_fields_and_the_only_masked_size_limit():
    """A1111's API fields reach the settings with its API defaults; only masked answers at the init image's size,
    so that size is checked against --max-pixels before the job is queued."""
    pytest.importorskip("fastapi")
    from pydantic import ValidationError

    from stablediff.limits import Limits
    from stablediff.serve.sdapi import ClientError, Img2ImgRequest, check_request

    req = Img2ImgRequest(init_images=["x"], mask="m", width=64, height=64)
    plan = check_request(req, Limits(), 512, (96, 80))
    p = plan.params
    assert (p.mask_blur_x, p.mask_blur_y, p.inpainting_fill, p.inpaint_full_res, p.inpaint_full_res_padding) == \
        (4, 4, 0, True, 0)
    req = Img2ImgRequest(init_images=["x"], mask="m", width=64, height=64, mask_blur=2, inpainting_fill=3,
                         inpaint_full_res=0, inpaint_full_res_padding=32, resize_mode=2)
    p = check_request(req, Limits(), 512, (96, 80)).params
    assert (p.mask_blur_x, p.mask_blur_y, p.inpainting_fill, p.inpaint_full_res, p.inpaint_full_res_padding,
            p.resize_mode) == (2, 2, 3, False, 32, 2)
    small = Limits(max_pixels=90 * 80)
    check_request(req, small, 512, (96, 80))  # the whole picture: 64x64 comes back
    with pytest.raises(ClientError, match=r"init image 96x80 \(only masked returns its size\) = 7,680 .*--max-pixels"):
        check_request(Img2ImgRequest(init_images=["x"], mask="m", width=64, height=64), small, 512, (96, 80))
    for field, value in (("mask_blur", 65), ("inpainting_fill", 4), ("inpaint_full_res_padding", 257)):
        with pytest.raises(ValidationError, match=field):
            Img2ImgRequest(init_images=["x"], **{field: value})


def test_a1111_inpainting_checkpoint_in_a_batch(tmp_path_factory):
    """A 9-channel inpainting U-Net with A1111's samplers: its mask and masked-image latents (the posterior's mean,
    one for every image of the batch) beside each image's latents, which outside the mask are the init latents."""
    import shutil

    from conftest import SD15, tiny_diffusers_pipeline

    path = tmp_path_factory.mktemp("tiny-inpaint") / "tiny-inpaint"
    tiny_diffusers_pipeline(seed=4, unet_overrides={"in_channels": 9}).save_pretrained(path)
    shutil.copy(SD15 / "scheduler" / "scheduler_config.json", path / "scheduler" / "scheduler_config.json")
    pipe = StableDiffusion.from_pretrained(path)
    inputs = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    try:
        init, mask = picture(64, 64), box_mask(64, 64, (0, 0, 32, 64))
        result = pipe("a red boat", steps=3, seed=2, batch_size=2, sampler="Euler a", init_image=init,
                      mask_image=mask, mask_blur=2)
    finally:
        hook.remove()
    assert result.latents.shape[0] == 2 and not torch.equal(result.latents[0], result.latents[1])
    side = 64 // pipe.downscale
    for x_in in inputs:
        assert x_in.shape == (4, 9, side, side)  # the guided batch of 2 images
        cond = x_in[:, 4:]
        assert torch.equal(cond[0], cond[1]) and torch.equal(cond[0], cond[3])  # one mask and masked image for all
        assert (cond[:, 0, :, :side // 2] == 1).all() and (cond[:, 0, :, side // 2 + 1:] == 0).all()


def test_blur_of_a_large_mask_stays_in_bounds():
    """The largest mask an upload may be (4096x4096) at the largest blur (64: 321 taps) is blurred row by row by a
    convolution, not by a pixels x taps array (that was 43 GB): it needs a few copies of the mask."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    big = Image.new("L", (4096, 4096))
    big.paste(255, (100, 100, 3000, 2000))
    out = np.asarray(masking.blur(big, 64, 64))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 1024, grown_mb
    assert out[1000, 1000] == 255 and out[4000, 4000] == 0 and 0 < out[2000, 1500] < 255


def test_a_txt2img_remake_names_the_inpainting_settings_it_cannot_use():
    from stablediff.params import txt2img_from_infotext

    params, notes = txt2img_from_infotext("a boat\nSteps: 20, Sampler: Euler, Seed: 3, Size: 64x64, Denoising "
                                          "strength: 0.7, Mask blur: 4, Masked content: fill, Inpaint area: Only "
                                          "masked, Masked area padding: 32")
    assert notes == ["Denoising strength: 0.7 (an img2img or hires fix setting)",
                     "Mask blur: 4 (an inpainting setting)", "Masked content: fill (an inpainting setting)",
                     "Inpaint area: Only masked (an inpainting setting)",
                     "Masked area padding: 32 (an inpainting setting)"]
    assert params == GenerationParams(prompt="a boat", steps=20, sampler="Euler", seed=3, width=64, height=64,
                                      rng="gpu")


@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "euler"])
def test_img2img_noise_multiplier(pipe, monkeypatch, sampler):
    """A1111's initial noise multiplier: img2img's start noise (the seed's first draw) scaled by it, before the
    sampler noises the init latents with it; infotext "Noise multiplier", read back; a txt2img remake names it."""
    from stablediff.params import txt2img_from_infotext

    rec = Recorder(monkeypatch, pipe)
    init = picture(64, 64)
    result = pipe("a red boat", steps=4, seed=6, sampler=sampler, init_image=init, strength=0.6,
                  noise_multiplier=0.9)
    scaled = dict(rec.calls)
    pipe("a red boat", steps=4, seed=6, sampler=sampler, init_image=init, strength=0.6)
    torch.testing.assert_close(scaled["noise"], 0.9 * rec.calls["noise"], rtol=0, atol=0)
    torch.testing.assert_close(scaled["x0"], rec.calls["x0"], rtol=0, atol=0)
    text = result.infotexts[0]
    assert "Noise multiplier: 0.9" in text and GenerationParams.from_infotext(text)[0].noise_multiplier == 0.9
    params, notes = txt2img_from_infotext(text)
    assert params.noise_multiplier == 1.0 and "Noise multiplier: 0.9 (an img2img setting)" in notes
    with pytest.raises(ValueError, match=r"noise multiplier 0 is outside \(0, 2\]"):
        pipe("x", steps=2, init_image=init, noise_multiplier=0)
