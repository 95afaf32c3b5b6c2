"""txt2img end to end against diffusers' StableDiffusionPipeline on a random tiny model."""

import numpy as np
import pytest
import torch

from conftest import SD15, assert_close
from stablediff import StableDiffusion, samplers

LATENT_TOL = 5e-4
PIXEL_TOL = 2  # out of 255

DIFFUSERS = [name for name, s in samplers.SAMPLERS.items()  # each names its class; LCM, TCD: tests/test_lcm.py
             if s.family == "diffusers" and not s.plan_args]
KARRAS = ["euler", "heun", "lms", "dpm2", "dpmpp_2m", "unipc"]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


def reference(ref_pipe, sampler, schedule, prompt, negative, seed, steps, cfg, width, height):
    import diffusers

    spec = samplers.SAMPLERS[sampler]
    cls_name, kwargs = spec.diffusers_class, dict(spec.diffusers_kwargs)
    if schedule == "karras":
        kwargs = dict(kwargs, use_karras_sigmas=True)
    cls = getattr(diffusers, cls_name)
    ref_pipe.scheduler = cls.from_config(cls.load_config(str(SD15), subfolder="scheduler"), **kwargs)
    out = ref_pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg, width=width,
                   height=height, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
    latents = out.images
    pixels = ref_pipe.vae.decode(latents / ref_pipe.vae.config.scaling_factor).sample
    image = ref_pipe.image_processor.postprocess(pixels, output_type="np")
    return latents, (image * 255).round().astype(np.uint8)


def check(pipe, ref_pipe, sampler, schedule=None, prompt="a photo of an astronaut riding a horse", negative="",
          seed=1055747, steps=8, cfg=7.0, width=64, height=64):
    with torch.no_grad():
        ref_latents, ref_image = reference(ref_pipe, sampler, schedule, prompt, negative, seed, steps, cfg,
                                           width, height)
    result = pipe(prompt, negative_prompt=negative, steps=steps, cfg_scale=cfg, seed=seed, width=width,
                  height=height, sampler=sampler, schedule=schedule)
    err = assert_close(result.latents, ref_latents, LATENT_TOL)
    ours = np.asarray(result.images[0]).astype(int)
    assert ours.shape == ref_image[0].shape
    assert np.abs(ours - ref_image[0]).max() <= PIXEL_TOL
    return err


@pytest.mark.parametrize("sampler", DIFFUSERS)
def test_every_sampler_matches_diffusers(pipe, tiny_reference, sampler):
    check(pipe, tiny_reference, sampler)


@pytest.mark.parametrize("sampler", KARRAS)
def test_karras_variants_match_diffusers(pipe, tiny_reference, sampler):
    check(pipe, tiny_reference, sampler, schedule="karras")


@pytest.mark.parametrize("prompt,negative,seed,width,height,cfg", [
    ("silly dog wearing a batman costume, funny, realistic, canon, award winning photography", "", 7, 96, 64, 7.0),
    ("a red circle on a blue background", "blurry, low quality", 123456789, 64, 112, 4.5),
    ("Ünïcödé, emoji 🐶 and CJK 狗", "ugly", 0, 72, 72, 12.0),
    ("no guidance", "ignored", 42, 64, 64, 1.0),
])
def test_prompts_seeds_and_sizes_match_diffusers(pipe, tiny_reference, prompt, negative, seed, width, height, cfg):
    check(pipe, tiny_reference, "euler", prompt=prompt, negative=negative, seed=seed, width=width, height=height,
          cfg=cfg)


def test_winograd_convolutions_keep_diffusers_results(pipe, tiny_reference, monkeypatch, winograd_inputs):
    """Every 3x3 layer of the U-Net and the VAE by Winograd's algorithm (its thresholds lowered to the tiny model's
    sizes; odd latent sizes): the image stays within the tolerances against diffusers."""
    from stablediff import winograd

    monkeypatch.setattr(winograd, "THRESHOLDS", ((1, 1),))
    check(pipe, tiny_reference, "dpmpp_2m", width=72, height=88)
    assert len(winograd_inputs) > 8 * 6  # at least the U-Net's per step (its VAE decode's too)


def test_same_seed_is_byte_identical_and_batches_equal_single_runs(pipe):
    kw = dict(steps=4, width=64, height=64, sampler="euler_a")
    a = pipe("a cat", seed=10, **kw)
    b = pipe("a cat", seed=10, **kw)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    batch = pipe(["a cat", "a dog"], seed=10, batch_size=2, **kw)
    assert batch.seeds == [10, 11, 12, 13]
    assert batch.prompts == ["a cat", "a cat", "a dog", "a dog"]
    for k, (p, s) in enumerate(zip(batch.prompts, batch.seeds)):
        single = pipe(p, seed=s, **kw)
        assert_close(batch.latents[k:k + 1], single.latents, 1e-5)
        diff = np.abs(np.asarray(batch.images[k]).astype(int) - np.asarray(single.images[0]).astype(int)).max()
        assert diff <= 1


def test_defaults_native_size_random_seed_and_infotext(pipe):
    result = pipe("a cat", steps=2)
    assert result.images[0].size == (pipe.native_size, pipe.native_size) == (64, 64)
    assert 0 <= result.seeds[0] < 2**32
    text = result.infotexts[0]
    assert text.startswith("a cat\nSteps: 2, Sampler: euler, Schedule type: Automatic, CFG scale: 7.0, Seed: ")
    assert f"Model hash: {pipe.model_hash}, Model: tiny-sd, RNG: CPU, Version: stablediff " in text
    assert len(pipe.model_hash) == 10


def test_from_infotext_remakes_the_image_with_changes_on_top(pipe):
    kw = dict(negative_prompt="blurry", steps=3, seed=12, width=72, height=64, sampler="heun", schedule="karras",
              cfg_scale=4.5, clip_skip=2, batch_size=2)
    first = pipe("a red cat", **kw)
    again = pipe.from_infotext(first.infotexts[1])  # image 1 of the batch: seed 13
    assert again.seeds == [13] and again.infotexts[0] == first.infotexts[1]
    assert_close(again.latents, first.latents[1:], 1e-5)  # a batch of one, not two: rounding apart
    fewer = pipe.from_infotext(first.infotexts[0], steps=2, batch_size=1)
    assert torch.equal(fewer.latents, pipe("a red cat", **{**kw, "steps": 2, "batch_size": 1}).latents)
    with pytest.warns(UserWarning, match=r"Face restoration: CodeFormer; Denoising strength: 0\.5 \(an img2img"):
        pipe.from_infotext("a cat\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, "
                           "Face restoration: CodeFormer, Denoising strength: 0.5, Version: v1.10.1")


def test_callback_and_cancel(pipe):
    import threading

    seen = []
    pipe("a cat", steps=5, seed=1, callback=lambda info: seen.append((info.step, info.total)))
    assert seen == [(i, 5) for i in range(1, 6)]
    cancel = threading.Event()
    from stablediff.pipeline import Cancelled

    def stop_after_two(info):
        if info.step == 2:
            cancel.set()
        seen.append(info.step)

    seen.clear()
    with pytest.raises(Cancelled):
        pipe("a cat", steps=20, seed=1, callback=stop_after_two, cancel=cancel)
    assert seen == [1, 2]


def test_cancel_takes_effect_inside_a_unet_call_and_leaves_no_hooks(pipe):
    import threading

    from stablediff.pipeline import Cancelled

    cancel, ran = threading.Event(), []
    mid = pipe.unet.mid_block.register_forward_hook(lambda *a: cancel.set())  # set halfway through the first call
    ups = [b.register_forward_hook(lambda *a: ran.append("up")) for b in pipe.unet.up_blocks]
    try:
        with pytest.raises(Cancelled):
            pipe("a cat", steps=3, seed=1, cancel=cancel)
    finally:
        for h in [mid, *ups]:
            h.remove()
    assert ran == []  # stopped before the first up block of the first step
    assert all(not m._forward_pre_hooks for m in pipe.unet.modules())
    cancel.clear()
    assert pipe("a cat", steps=1, seed=1, cancel=cancel).images  # the pipeline runs again after a cancel


def test_seed_plus_images_must_stay_within_32_bits(pipe):
    with pytest.raises(ValueError, match="seed 4294967295 \\+ 2 images runs past 4294967295"):
        pipe("a cat", steps=1, seed=2**32 - 1, batch_size=2)
    with pytest.raises(ValueError, match="seed 4294967294 \\+ 4 images"):
        pipe(["a", "b"], steps=1, seed=2**32 - 2, batch_size=2)
    assert pipe("a cat", steps=1, seed=2**32 - 2, batch_size=2).seeds == [2**32 - 2, 2**32 - 1]


def test_nan_latents_name_the_dtype_that_ran(pipe):
    with pytest.raises(FloatingPointError, match="in float32: the model's weights hold NaN/inf") as e:
        pipe.decode(torch.full((1, 4, 8, 8), float("nan")))
    assert "float16" not in str(e.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(width=36), "width 36 is not a multiple of 8"),
    (dict(height=8), "height 8 is outside 64..4096"),
    (dict(steps=0), "steps 0"),
    (dict(steps=1001), "steps 1001"),
    (dict(batch_size=0), "batch size 0"),
    (dict(cfg_scale=float("nan")), "cfg scale nan"),
    (dict(sampler="nope"), "unknown sampler 'nope'"),
])
def test_bad_settings_fail_before_any_work(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("a cat", **kwargs)


def test_safety_checker_blurs_flagged_images_and_says_so(tiny_model_dir, tmp_path):
    import shutil

    from test_safety import TINY_CHECKER, diffusers_checker

    from conftest import SD15

    model = tmp_path / "with-checker"
    shutil.copytree(tiny_model_dir, model)
    ref = diffusers_checker(TINY_CHECKER, seed=2)
    with torch.no_grad():  # every concept's threshold far below any cosine: everything is flagged
        ref.concept_embeds_weights.fill_(-2.0)
    ref.save_pretrained(model / "safety_checker")
    shutil.copytree(SD15 / "feature_extractor", model / "feature_extractor")

    plain = StableDiffusion.from_pretrained(model)
    checked = StableDiffusion.from_pretrained(model, safety_checker=True)
    kw = dict(steps=3, seed=4, batch_size=2)
    a, b = plain("a cat", **kw), checked("a cat", **kw)
    assert a.nsfw == [False, False] and b.nsfw == [True, True]
    assert torch.equal(a.latents, b.latents)
    for before, after, text in zip(a.images, b.images, b.infotexts):
        x, y = np.asarray(before).astype(float), np.asarray(after).astype(float)
        assert not np.array_equal(x, y) and abs(x.mean() - y.mean()) < 0.1 * x.mean() + 5  # blurred, not black
        assert "NSFW: true" in text
    assert "NSFW" not in a.infotexts[0]
    with pytest.raises(ValueError, match="has no safety_checker"):
        StableDiffusion.from_pretrained(tiny_model_dir, safety_checker=True)


def test_cache_interval_is_close_to_the_uncached_run(pipe):
    kw = dict(steps=9, seed=3, sampler="dpmpp_2m")
    exact = pipe("a cat", **kw)
    cached = pipe("a cat", cache_interval=3, **kw)
    assert pipe("a cat", cache_interval=1, **kw).latents.equal(exact.latents)
    rel = ((cached.latents - exact.latents).norm() / exact.latents.norm()).item()
    assert 0 < rel < 0.5
    with pytest.raises(ValueError, match="cache interval 0"):
        pipe("a cat", cache_interval=0, steps=2)


def test_half_precision_never_gives_a_silent_black_image(tiny_model_dir):
    half = StableDiffusion.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert half.unet.conv_in.weight.dtype == torch.bfloat16
    assert half.vae.post_quant_conv.weight.dtype == torch.float32  # the VAE always decodes in float32
    exact = StableDiffusion.from_pretrained(tiny_model_dir)
    a, b = half("a cat", steps=4, seed=2), exact("a cat", steps=4, seed=2)
    rel = ((a.latents - b.latents).norm() / b.latents.norm()).item()
    assert rel < 0.05
    # a U-Net that overflows (NaN) is an error that says what to do, not a black PNG
    half.unet.forward = lambda x, t, context, cache=None: torch.full_like(x, float("nan"))
    with pytest.raises(FloatingPointError, match="in bfloat16: .* retry with dtype float32$"):
        half("a cat", steps=2, seed=2)


def test_long_prompts_use_every_token_and_weights_of_one_change_nothing(pipe):
    words = ["red", "green", "blue", "small", "large", "round", "square", "bright"] * 19
    base = " ".join(words[:150])
    assert len(pipe.tokenizer.encode(base)) - 2 >= 150
    kw = dict(steps=3, seed=8)
    a, b = pipe(base + " cat", **kw), pipe(base + " dog", **kw)
    assert not torch.equal(a.latents, b.latents)  # the last word, in the second chunk, matters
    assert torch.equal(pipe("a (cat:1.0)", **kw).latents, pipe("a cat", **kw).latents)
    assert not torch.equal(pipe("a (cat:1.3)", **kw).latents, pipe("a cat", **kw).latents)
    assert pipe("a ((cat) [dog", **kw).images  # unbalanced brackets still generate


def test_the_loop_written_by_hand_as_in_readme_equals_the_pipeline(pipe):
    from stablediff import samplers

    plan = samplers.prepare("euler", pipe.noise_schedule, steps=5)
    cond, uncond = pipe.encode_prompt("a cat"), pipe.encode_prompt("")
    ref = pipe("a cat", steps=5, seed=1, cfg_scale=7.0)
    x = torch.randn(ref.latents.shape, generator=torch.Generator().manual_seed(1)) * plan.init_noise_scale
    latents = plan.finish(plan.sampler.fn(pipe.denoiser(plan, cond, uncond, cfg_scale=7.0), x, plan.sigmas))
    torch.testing.assert_close(latents, ref.latents, rtol=0, atol=0)


def test_variation_seeds_blend_the_start_noise_as_a1111(pipe):
    kw = dict(steps=3, width=64, height=64, sampler="Euler")  # deterministic: only the start noise matters
    plain = pipe("a cat", seed=21, **kw)
    assert torch.equal(pipe("a cat", seed=21, subseed=99, subseed_strength=0.0, **kw).latents, plain.latents)
    # strength 1: the start noise is the variation seed's own
    full = pipe("a cat", seed=5, subseed=21, subseed_strength=1.0, **kw)
    assert_close(full.latents, plain.latents, 1e-6)
    half = pipe("a cat", seed=5, subseed=21, subseed_strength=0.5, batch_size=2, **kw)
    assert half.seeds == [5, 5] and half.subseeds == [21, 22]
    assert "Seed: 5, Size: 64x64" in half.infotexts[1] and "Variation seed: 22, Variation seed strength: 0.5" in \
        half.infotexts[1]
    # seed resize from the run's own size changes nothing; from another size it keeps the centre of that noise
    assert torch.equal(pipe("a cat", seed=21, seed_resize_from=(64, 64), **kw).latents, plain.latents)
    moved = pipe("a cat", seed=21, seed_resize_from=(128, 128), **kw)
    assert "Seed resize from: 128x128" in moved.infotexts[0] and not torch.equal(moved.latents, plain.latents)


def test_prompt_editing_switches_the_conditioning_at_its_step_and_and_composes(pipe):
    """[a:b:5] over 10 Euler steps (memoryless, so a run can be split): `a` for A1111's calls 0-5, `b` after; and
    `a AND b :0.5` is D_u + scale * (D_a - D_u) + 0.5 * scale * (D_b - D_u)."""
    from stablediff import samplers as smp

    kw = dict(steps=10, seed=3, width=64, height=64, sampler="Euler", cfg_scale=6.0)
    edited = pipe("[a red cat:a blue dog:5]", "blurry", **kw)
    plan = smp.prepare("Euler", pipe.noise_schedule, 10)
    first, second = pipe.prompts.encode_pair("a red cat", "blurry"), pipe.prompts.encode_pair("a blue dog", "blurry")
    x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(3)) * plan.init_noise_scale
    with torch.no_grad():
        x = plan.sampler.fn(pipe.denoiser(plan, *first, 6.0), x, plan.sigmas[:7])
        x = plan.sampler.fn(pipe.denoiser(plan, *second, 6.0), x, plan.sigmas[6:])
    assert_close(edited.latents, plan.finish(x), 1e-5)
    assert not torch.allclose(edited.latents, pipe("a red cat", "blurry", **kw).latents)

    composed = pipe("a red cat AND a blue dog :0.5", "blurry", **kw)
    cat, dog = first[0], second[0]
    uncond = first[1]

    def combined(x, sigma):
        d_u, d_a, d_b = (pipe.denoiser(plan, c, None, 1.0)(x, sigma) for c in (uncond, cat, dog))
        return d_u + 6.0 * (d_a - d_u) + 0.5 * 6.0 * (d_b - d_u)

    x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(3)) * plan.init_noise_scale
    with torch.no_grad():
        x = plan.sampler.fn(combined, x, plan.sigmas)
    assert_close(composed.latents, plan.finish(x), 1e-4)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun", "Euler a", "DPM++ 2M", "UniPC", "lcm"])
def test_cfg_scale_at_most_one_runs_one_unet_batch_without_the_unconditional_half(pipe, sampler):
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        pipe("a cat", "blurry", steps=4, seed=1, width=64, height=64, sampler=sampler, cfg_scale=1.0, batch_size=2)
        assert calls and set(calls) == {2}  # batch 2, not 4
        calls.clear()
        pipe("a cat", "blurry", steps=4, seed=1, width=64, height=64, sampler=sampler, cfg_scale=1.5, batch_size=2)
        assert set(calls) == {4}
    finally:
        hook.remove()


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_eta_matches_diffusers(pipe, tiny_reference, eta):
    """The pipeline's `eta` (DDIMScheduler's): the step's variance times eta**2, drawn from the generator at every
    step, as diffusers' pipeline takes it."""
    import diffusers

    cls = diffusers.DDIMScheduler
    tiny_reference.scheduler = cls.from_config(cls.load_config(str(SD15), subfolder="scheduler"))
    with torch.no_grad():
        ref = tiny_reference("a boat", num_inference_steps=6, guidance_scale=7.0, width=64, height=64, eta=eta,
                             generator=torch.Generator("cpu").manual_seed(4), output_type="latent").images
    ours = pipe("a boat", steps=6, cfg_scale=7.0, width=64, height=64, seed=4, sampler="ddim", eta=eta)
    assert_close(ours.latents, ref, LATENT_TOL)
    assert f"Eta DDIM: {eta}" in ours.infotexts[0]
    plain = pipe("a boat", steps=6, cfg_scale=7.0, width=64, height=64, seed=4, sampler="ddim")
    assert (plain.latents - ours.latents).abs().max() > 1e-3 and "Eta" not in plain.infotexts[0]
