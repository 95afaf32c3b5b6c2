"""ControlNet in a generation: txt2img with one and two ControlNets against diffusers' StableDiffusionControlNetPipeline
on the random tiny model (ControlNets made with ControlNetModel.from_unet, zero convs randomised), guidance start /
end, the control modes' residual scaling, and the errors for bad units."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SD15, assert_close
from stablediff import StableDiffusion, samplers
from stablediff.controls import ActiveControl, Control, ControlledEps

LATENT_TOL = 5e-4
STEPS = 4
SEED = 1234
PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


def random_controlnet(unet, seed: int, hint_channels=(16, 32)):
    """diffusers' ControlNetModel.from_unet with the zero convs randomised (else every residual is 0); the tiny
    models' hint is at 2x the latent size (two hint channel widths), SD 1.5's at 8x (16, 32, 96, 256)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint_channels).eval()
    for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block, model.controlnet_cond_embedding.conv_out]:
        conv.reset_parameters()
    return model


@pytest.fixture(scope="module")
def controlnets(tiny_reference, tmp_path_factory):
    """Two random ControlNets of the tiny U-Net: (diffusers model, saved folder) each."""
    made = []
    for seed in (5, 6):
        model = random_controlnet(tiny_reference.unet, seed)
        path = tmp_path_factory.mktemp("controlnet") / f"cn{seed}"
        model.save_pretrained(path)
        made.append((model, path))
    return made


def control_image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def oracle(cls_name, tiny_reference, nets=()):
    """diffusers' pipeline `cls_name` on the tiny model with Euler (and the ControlNets `nets`, where it takes them)."""
    import diffusers

    spec = samplers.SAMPLERS["euler"]
    cls = getattr(diffusers, spec.diffusers_class)
    scheduler = cls.from_config(cls.load_config(str(SD15), subfolder="scheduler"), **dict(spec.diffusers_kwargs))
    extra = {"controlnet": list(nets) if len(nets) > 1 else nets[0]} if nets else {}
    return getattr(diffusers, cls_name)(
        vae=tiny_reference.vae, text_encoder=tiny_reference.text_encoder, tokenizer=tiny_reference.tokenizer,
        unet=tiny_reference.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **extra)


def reference(tiny_reference, nets, images, scales, guess_mode=False):
    ref = oracle("StableDiffusionControlNetPipeline", tiny_reference, nets)
    one = len(nets) == 1
    with torch.no_grad():
        return ref(PROMPT, image=images[0] if one else images, num_inference_steps=STEPS, guidance_scale=7.0,
                   width=64, height=64, controlnet_conditioning_scale=scales[0] if one else scales,
                   guess_mode=guess_mode, generator=torch.Generator("cpu").manual_seed(SEED),
                   output_type="latent").images


def ours(pipe, controls=()):
    return pipe(PROMPT, steps=STEPS, cfg_scale=7.0, seed=SEED, width=64, height=64, sampler="euler",
                controls=controls).latents


@pytest.mark.parametrize("guess_mode", [False, True])
def test_one_controlnet_matches_diffusers(pipe, tiny_reference, controlnets, guess_mode):
    (net, path), image = controlnets[0], control_image(1)
    want = reference(tiny_reference, [net], [image], [0.8], guess_mode)
    got = ours(pipe, [Control(image, path, weight=0.8, guess_mode=guess_mode)])
    assert_close(got, want, LATENT_TOL)
    assert (got - ours(pipe)).abs().max() > 1e-2  # the control changed the image


def test_two_controlnets_match_multicontrolnet(pipe, tiny_reference, controlnets):
    images = [control_image(1), control_image(2)]
    want = reference(tiny_reference, [net for net, _ in controlnets], images, [0.7, 1.2])
    got = ours(pipe, [Control(images[0], controlnets[0][1], weight=0.7), Control(images[1], controlnets[1][1],
                                                                               weight=1.2)])
    assert_close(got, want, LATENT_TOL)


def test_a_control_active_for_no_step_changes_nothing(pipe, controlnets):
    # steps 0..3 of 4 are at fractions 0, 0.25, 0.5, 0.75: none within [0.8, 1]
    idle = Control(control_image(1), controlnets[0][1], start=0.8, end=1.0)
    assert torch.equal(ours(pipe, [idle]), ours(pipe))


def test_guidance_start_end_picks_the_steps():
    ts = torch.tensor([999.0, 749.0, 499.0, 249.0])
    unit = ActiveControl(Control(control_image(1), "unused", start=0.25, end=0.5), None, None)
    eps = ControlledEps(None, [unit], ts, batch=1)
    # an in-between timestep (a second-order sampler's) counts to the step it leads to
    assert [bool(eps.active(torch.tensor([t]))) for t in (999.0, 749.0, 600.0, 499.0, 249.0)] == \
        [False, True, True, True, False]


class FakeNet:
    """Residuals of ones (13, like SD 1.5's 12 skips and mid block) times the scale, for the rows it is given."""

    def __call__(self, x, t, context, hint, conditioning_scale, guess_mode):
        outs = [torch.ones(x.shape[0], 1, 1, 1) * conditioning_scale for _ in range(13)]
        return outs[:-1], outs[-1]


@pytest.mark.parametrize("mode, soft, uncond", [("Balanced", False, 1.0), ("My prompt is more important", True, 1.0),
                                                ("ControlNet is more important", True, 0.0)])
def test_control_modes_scale_as_the_extension(mode, soft, uncond):
    unit = ActiveControl(Control(control_image(1), "unused", weight=0.5, control_mode=mode), FakeNet(), None)
    x, ctx = torch.zeros(4, 4, 2, 2), torch.zeros(4, 3, 8)
    down, mid = unit.residuals(x, torch.zeros(4), ctx, uncond_rows=2)
    got = torch.stack([d[:, 0, 0, 0] for d in down] + [mid[:, 0, 0, 0]])  # (13 layers, 4 rows)
    layer = torch.tensor([0.825 ** (12 - i) if soft else 1.0 for i in range(13)])
    want = 0.5 * layer[:, None] * torch.tensor([uncond, uncond, 1.0, 1.0])
    assert torch.allclose(got, want)


@pytest.mark.parametrize("change, message", [
    (dict(start=0.6, end=0.4), "start 0.6 and end 0.4"),
    (dict(weight=float("nan")), "weight nan"),
    (dict(control_mode="Loud"), "unknown control mode 'Loud'"),
    (dict(preprocessor="depth_midas"), "unknown preprocessor 'depth_midas'; known: blur_gaussian, canny"),
    (dict(preprocessor="canny", params={"sigma": 2}), "takes no parameter 'sigma'"),
    (dict(resize_mode="Stretch"), "unknown resize mode 'Stretch'"),
    (dict(model="no/such/controlnet.safetensors"), "no/such/controlnet.safetensors: no such ControlNet"),
    (dict(image="no/such/hint.png"), "no/such/hint.png: no such control image"),
])
def test_bad_units_fail_before_any_work(pipe, controlnets, change, message):
    unit = Control(**{**dict(image=control_image(1), model=controlnets[0][1]), **change})
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pipe(PROMPT, steps=STEPS, controls=[unit])


def test_hint_is_preprocessed_and_fit(tmp_path):
    image = control_image(3, size=(80, 40))
    image.save(tmp_path / "hint.png")
    hint = Control(tmp_path / "hint.png", "unused", preprocessor="invert", resize_mode="Just Resize").hint(32, 16)
    assert hint.shape == (1, 3, 16, 32) and hint.dtype == torch.float32
    from stablediff import preprocess
    want = np.asarray(preprocess.fit(preprocess.invert(image), 32, 16, "Just Resize"), dtype=np.float32) / 255
    assert torch.equal(hint[0].permute(1, 2, 0), torch.from_numpy(want))


# --- the command line -------------------------------------------------------------------------------------------

def main(argv, capsys):
    from stablediff import cli

    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("control, needle", [
    ("missing.safetensors:{image}", "no ControlNet 'missing.safetensors' (not a file or folder, nor a name in"),
    ("cn:{image}", "no ControlNet 'cn'"),
    ("{model}:nothing.png", "nothing.png: no such control image"),
    ("{model}:{image}:heavy", "weight 'heavy' is not a number"),
    ("{model}:{image}:1:depth_leres", "unknown preprocessor 'depth_leres'; known: blur_gaussian, canny, inpaint"),
    ("{model}", "give MODEL:IMAGE[:WEIGHT][:PREPROCESSOR]"),
])
def test_cli_bad_controls_fail_in_one_line_before_loading(tmp_path, capsys, control, needle):
    model = tmp_path / "corrupt.safetensors"  # were it loaded, the error would be about this file
    model.write_bytes(b"not a checkpoint")
    (tmp_path / "cn.safetensors").write_bytes(b"not a controlnet")
    control_image(1).save(tmp_path / "hint.png")
    control = control.format(model=tmp_path / "cn.safetensors", image=tmp_path / "hint.png")
    code, err = main(["generate", "a dog", "--model", str(model), "--output-dir", str(tmp_path / "out"),
                      "--controlnet-dir", str(tmp_path / "elsewhere"), "--control", control], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and "corrupt" not in err, err


def test_cli_control_by_name_makes_the_apis_image(pipe, tiny_model_dir, controlnets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "controlnet"
    folder.mkdir()
    (folder / "edges").symlink_to(controlnets[0][1], target_is_directory=True)
    control_image(1).save(tmp_path / "hint.png")
    out = tmp_path / "out"
    code, err = main(["generate", PROMPT, "--model", str(tiny_model_dir), "--steps", "2", "--seed", "9",
                      "--width", "64", "--height", "64", "--sampler", "euler", "--cfg-scale", "7", "--quiet",
                      "--output-dir", str(out), "--controlnet-dir", str(folder),
                      "--control", f"edges:{tmp_path / 'hint.png'}:0.6:invert"], capsys)
    assert code == 0, err
    want = pipe(PROMPT, steps=2, seed=9, width=64, height=64, controls=[
        Control(tmp_path / "hint.png", controlnets[0][1], weight=0.6, preprocessor="invert")]).images[0]
    plain = pipe(PROMPT, steps=2, seed=9, width=64, height=64).images[0]
    with Image.open(out / "00000-9.png") as im:
        got = np.asarray(im.convert("RGB"))
    assert np.array_equal(got, np.asarray(want))
    assert not np.array_equal(got, np.asarray(plain))


def test_the_infotext_records_each_unit_as_the_extension_does(pipe, controlnets):
    path = controlnets[0][1]
    units = [Control(control_image(1), path, weight=0.8, preprocessor="invert", end=0.5),
             Control(control_image(2), path, control_mode="My prompt is more important", resize_mode=0)]
    text = pipe(PROMPT, steps=2, seed=SEED, width=64, height=64, controls=units).infotexts[0]
    name = Path(path).stem
    assert (f'ControlNet 0: "Module: invert, Model: {name}, Weight: 0.8, Resize Mode: Crop and Resize, '
            f'Guidance Start: 0, Guidance End: 0.5, Control Mode: Balanced", ControlNet 1: "Module: none, '
            f'Model: {name}, Weight: 1, Resize Mode: Just Resize, Guidance Start: 0, Guidance End: 1, '
            f'Control Mode: My prompt is more important"') in text, text


# --- hires fix, img2img, inpainting and LoRA with controls ----------------------------------------------------------

@pytest.mark.parametrize("hr_option", ["Both", "Low res only", "High res only"])
def test_hires_fix_makes_a_second_hint_at_the_hires_size(pipe, tiny_reference, controlnets, hr_option):
    """The first pass as diffusers' ControlNet txt2img (hint fit to 64x80), the second as its ControlNet img2img on
    the upscaled latents with a hint fit from the same image to 96x120 (no control where hr_option leaves it out)."""
    from stablediff import preprocess
    from stablediff.params import GenerationParams

    (net, path), image = controlnets[0], control_image(4, size=(50, 70))  # another aspect: each fit crops
    low, high = (preprocess.fit(image, w, h, "Crop and Resize") for w, h in ((64, 80), (96, 120)))
    kw = dict(prompt=PROMPT, guidance_scale=7.0, output_type="latent")
    with torch.no_grad():
        if hr_option == "High res only":
            first = oracle("StableDiffusionPipeline", tiny_reference)(
                num_inference_steps=STEPS, width=64, height=80, generator=torch.Generator().manual_seed(SEED), **kw)
        else:
            first = oracle("StableDiffusionControlNetPipeline", tiny_reference, [net])(
                image=low, num_inference_steps=STEPS, width=64, height=80,
                generator=torch.Generator().manual_seed(SEED), **kw)
        upscaled = torch.nn.functional.interpolate(first.images, size=(60, 48), mode="bilinear")
        second = dict(image=upscaled, num_inference_steps=3, strength=0.6,
                      generator=torch.Generator().manual_seed(SEED), **kw)
        if hr_option == "Low res only":
            want = oracle("StableDiffusionImg2ImgPipeline", tiny_reference)(**second).images
        else:
            want = oracle("StableDiffusionControlNetImg2ImgPipeline", tiny_reference, [net])(
                control_image=high, controlnet_conditioning_scale=1.0, **second).images
    got = pipe.generate(GenerationParams(
        prompt=PROMPT, cfg_scale=7.0, steps=STEPS, width=64, height=80, seed=SEED, sampler="euler", enable_hr=True,
        hr_scale=1.5, hr_second_pass_steps=3, strength=0.6), controls=[Control(image, path, hr_option=hr_option)])
    assert_close(got.latents, want, LATENT_TOL)
    assert ("Hr Option" in got.infotexts[0]) == (hr_option != "Both")


def test_bad_hr_option_fails_before_any_work(pipe, controlnets):
    with pytest.raises(ValueError, match="unknown hr_option 'High'; known: Both, Low res only, High res only"):
        pipe(PROMPT, steps=STEPS, controls=[Control(control_image(1), controlnets[0][1], hr_option="High")])


def test_img2img_with_a_control_matches_diffusers(pipe, tiny_reference, controlnets):
    from test_img2img import picture

    (net, path), init, hint = controlnets[0], picture(80, 64), control_image(5, size=(80, 64))
    with torch.no_grad():
        want = oracle("StableDiffusionControlNetImg2ImgPipeline", tiny_reference, [net])(
            PROMPT, image=init, control_image=hint, strength=0.6, num_inference_steps=6, guidance_scale=7.0,
            controlnet_conditioning_scale=0.9, generator=torch.Generator().manual_seed(SEED),
            output_type="latent").images
    got = pipe(PROMPT, steps=6, cfg_scale=7.0, seed=SEED, sampler="euler", init_image=init, strength=0.6,
               controls=[Control(hint, path, weight=0.9)]).latents
    assert_close(got, want, LATENT_TOL)


def test_inpainting_with_a_control_matches_diffusers(pipe, tiny_reference, controlnets):
    from test_img2img import mask, picture

    (net, path), init, m, hint = controlnets[1], picture(64, 64, 1), mask(64, 64), control_image(6)
    with torch.no_grad():
        want = oracle("StableDiffusionControlNetInpaintPipeline", tiny_reference, [net])(
            PROMPT, image=init, mask_image=m, control_image=hint, controlnet_conditioning_scale=1.0, strength=0.7,
            num_inference_steps=6, guidance_scale=7.0, width=64, height=64,
            generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    got = pipe(PROMPT, steps=6, cfg_scale=7.0, seed=SEED, sampler="euler", init_image=init, mask_image=m,
               strength=0.7, controls=[Control(hint, path)]).latents
    assert_close(got, want, LATENT_TOL)


def test_lora_with_a_control_is_the_control_on_the_merged_weights(tiny_model_dir, controlnets, tmp_path):
    """A kohya LoRA on two U-Net projections: merged for the call, the ControlNet left as it is."""
    from safetensors.torch import save_file

    layers = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
              "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    g, sd, deltas = torch.Generator().manual_seed(3), {}, {}
    for name in layers:
        flat = "lora_unet_" + name.replace(".", "_")
        down, up = torch.randn(4, 32, generator=g) * 0.3, torch.randn(32, 4, generator=g) * 0.3
        sd |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": torch.tensor(2.0)}
        deltas[name] = 0.8 * (2.0 / 4) * up @ down
    save_file(sd, str(tmp_path / "style.safetensors"))
    unit = Control(control_image(7), controlnets[0][1], weight=0.7)
    lora_pipe = StableDiffusion.from_pretrained(tiny_model_dir)
    got = lora_pipe(PROMPT, steps=STEPS, cfg_scale=7.0, seed=SEED, width=64, height=64,
                    loras={str(tmp_path / "style.safetensors"): 0.8}, controls=[unit]).latents
    merged = StableDiffusion.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for name, delta in deltas.items():
            merged.unet.get_submodule(name).weight += delta
    want = ours(merged, [unit])
    assert_close(got, want, 1e-5)
    assert (want - ours(merged)).abs().max() > 1e-2 and (got - ours(lora_pipe, [unit])).abs().max() > 1e-3


# --- batch jobs -------------------------------------------------------------------------------------------------

def test_a_batch_row_with_a_control_makes_generates_image(tiny_model_dir, controlnets, tmp_path, capsys,
                                                          monkeypatch):
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder, jobs = tmp_path / "controlnet", tmp_path / "jobs"
    folder.mkdir()
    jobs.mkdir()
    (folder / "edges").symlink_to(controlnets[0][1], target_is_directory=True)
    control_image(1).save(jobs / "hint.png")
    row = dict(prompt=PROMPT, seed=9, width=64, height=64, sampler="euler", cfg_scale=7,
               controls=[dict(model="edges", image="hint.png", weight=0.6, preprocessor="invert")])
    (jobs / "job.jsonl").write_text(json.dumps(row) + "\n")
    common = ["--model", str(tiny_model_dir), "--steps", "2", "--quiet", "--controlnet-dir", str(folder)]
    code, err = main(["batch", str(jobs / "job.jsonl"), "--output-dir", str(tmp_path / "batch"), *common], capsys)
    assert code == 0, err
    code, err = main(["generate", PROMPT, "--seed", "9", "--width", "64", "--height", "64", "--sampler", "euler",
                      "--cfg-scale", "7", "--output-dir", str(tmp_path / "gen"), *common,
                      "--control", f"edges:{jobs / 'hint.png'}:0.6:invert"], capsys)
    assert code == 0, err
    (made,), (want,) = (tmp_path / "batch").glob("*.png"), (tmp_path / "gen").glob("*.png")
    with Image.open(made) as a, Image.open(want) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.text == b.text
        text = a.text["parameters"]
    assert 'ControlNet 0: "Module: invert, Model: edges, Weight: 0.6' in text, text
    line = json.loads((tmp_path / "batch" / "manifest.jsonl").read_text())
    assert line["params"]["controls"][0]["model"] == str(folder / "edges")


@pytest.mark.parametrize("controls, needle", [
    ([{"model": "edges", "image": "missing.png"}], "line 2: controls[0]: "),
    ([{"model": "nothing", "image": "hint.png"}], "line 2: controls[0]: no ControlNet 'nothing'"),
    ([{"model": "edges", "image": "hint.png", "weight": "x"}], "line 2: controls[0]: control weight 'x'"),
    ([{"model": "edges", "image": "hint.png", "mode": 1}], "line 2: controls[0]: control field 'mode' is unknown"),
    ({"model": "edges"}, "line 2: controls {'model': 'edges'} is not a list"),
])
def test_bad_batch_controls_are_named_by_row_before_loading(tmp_path, controlnets, capsys, controls, needle):
    import json

    folder = tmp_path / "controlnet"
    folder.mkdir()
    (folder / "edges").symlink_to(controlnets[0][1], target_is_directory=True)
    control_image(1).save(tmp_path / "hint.png")
    model = tmp_path / "corrupt.safetensors"  # were it loaded, the error would be about this file
    model.write_bytes(b"not a checkpoint")
    rows = [{"prompt": "fine"}, {"prompt": "a dog", "controls": controls}]
    (tmp_path / "job.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = main(["batch", str(tmp_path / "job.jsonl"), "--model", str(model), "--controlnet-dir", str(folder),
                      "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert needle in err and "corrupt" not in err, err


def test_a_control_image_of_another_size_is_fit_with_a_note(tmp_path):
    from PIL import Image

    from stablediff.controls import Control

    Image.new("RGB", (40, 24), (255, 0, 0)).save(tmp_path / "c.png")
    with pytest.warns(UserWarning, match=r"control image 40x24 fit to 64x48 by 'Just Resize'"):
        hint = Control(tmp_path / "c.png", "unused", resize_mode=0).hint(64, 48)
    assert hint.shape == (1, 3, 48, 64) and float(hint[0, 0].min()) == 1.0 and float(hint[0, 1].max()) == 0.0
    Image.new("RGB", (64, 48)).save(tmp_path / "same.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Control(tmp_path / "same.png", "unused").hint(64, 48)


@pytest.mark.slow
def test_full_size_controlnet_pipeline_matches_diffusers(all_cores):
    """SD 1.5's real architecture (random weights) with a ControlNet of its U-Net, 128x128, 3 Euler steps: our
    latents against StableDiffusionControlNetPipeline's."""
    import diffusers
    from transformers import CLIPTokenizer as HFTokenizer

    from conftest import BUNDLED_TOKENIZER, diffusers_unet, diffusers_vae, sd15_config, text_state_dict, \
        transformers_text
    from stablediff.clip import CLIPTextModel
    from stablediff.config import CLIPTextConfig, UNetConfig, VAEConfig
    from stablediff.controlnet import ControlNet, ControlNetConfig
    from stablediff.schedule import NoiseSchedule
    from stablediff.tokenizer import CLIPTokenizer
    from stablediff.unet import UNet
    from stablediff.vae import AutoencoderKL

    def build(cls, cfg, state_dict):
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    text_cfg = {k: v for k, v in sd15_config("text_encoder").items() if not k.startswith("_")}
    unet, vae, text = diffusers_unet(sd15_config("unet")), diffusers_vae(sd15_config("vae"), 1), \
        transformers_text(text_cfg, 2)
    net = random_controlnet(unet, 7, (16, 32, 96, 256))
    spec = samplers.SAMPLERS["euler"]
    cls = getattr(diffusers, spec.diffusers_class)
    ref = diffusers.StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text, tokenizer=HFTokenizer.from_pretrained(str(BUNDLED_TOKENIZER)), unet=unet,
        controlnet=net, scheduler=cls.from_config(cls.load_config(str(SD15), subfolder="scheduler"),
                                                  **dict(spec.diffusers_kwargs)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = StableDiffusion(
        CLIPTokenizer(), build(CLIPTextModel, CLIPTextConfig.from_dict(text_cfg), text_state_dict(text)),
        build(UNet, UNetConfig.from_dict(dict(unet.config)), unet.state_dict()),
        build(AutoencoderKL, VAEConfig.from_dict(dict(vae.config)), vae.state_dict()),
        NoiseSchedule.from_json(SD15 / "scheduler" / "scheduler_config.json"))
    ours_net = build(ControlNet, ControlNetConfig.from_dict(dict(net.config)), net.state_dict())
    image = control_image(3, (128, 128))
    with torch.no_grad():
        want = ref(PROMPT, image=image, num_inference_steps=3, guidance_scale=7.0, width=128, height=128,
                   controlnet_conditioning_scale=0.9, generator=torch.Generator("cpu").manual_seed(SEED),
                   output_type="latent").images
    got = pipe(PROMPT, steps=3, cfg_scale=7.0, seed=SEED, width=128, height=128, sampler="euler",
               controls=[Control(image, ours_net, weight=0.9)]).latents
    assert_close(got, want, LATENT_TOL)
    assert (got - pipe(PROMPT, steps=3, cfg_scale=7.0, seed=SEED, width=128, height=128,
                       sampler="euler").latents).abs().max() > 1e-2


def test_only_masked_cuts_each_units_image_to_the_box(pipe, controlnets, monkeypatch):
    """Inpainting's only masked works on the mask's box, and sd-webui-controlnet cuts each unit's image to the same
    box (after bringing it to the init image's size by the unit's resize mode; then resize and fill to width x
    height): the map is made from that cut image."""
    from stablediff import controls, masking
    from stablediff.images import resize_init
    from test_img2img import picture

    seen = []
    hint = controls.Control.hint
    monkeypatch.setattr(controls.Control, "hint", lambda self, w, h: seen.append(self.image) or hint(self, w, h))
    (_, path), init = controlnets[0], picture(96, 80, 1)
    m = Image.new("L", (96, 80), 0)
    m.paste(255, (50, 20, 70, 44))
    image = control_image(7, (48, 40))  # half the init image's size: "Just Resize" doubles it first
    common = dict(steps=3, seed=SEED, sampler="Euler", width=64, height=64, init_image=init, mask_image=m,
                  controls=[Control(image, path, resize_mode="Just Resize")])
    got = pipe(PROMPT, inpaint_full_res=True, inpaint_full_res_padding=4, **common)
    x, y, w, h = masking.prepare(init, m, 64, 64, only_masked=True, padding=4).paste_to
    cut = resize_init(resize_init(image, 96, 80, 0).crop((x, y, x + w, y + h)), 64, 64, 2)
    assert seen[0].size == (64, 64) and np.array_equal(np.asarray(seen[0]), np.asarray(cut))
    whole = pipe(PROMPT, **common)
    assert seen[1] is image and got.images[0].size == (96, 80)
    assert not torch.allclose(got.latents, whole.latents, atol=1e-3)


def test_rows_the_guidance_wrapper_runs_apart():
    """Where the negative prompt runs in a U-Net call of its own, the wrapper says so (uncond_rows): a conditional-
    only unit adds nothing to that call and all of the conditional call; a balanced unit adds to both."""
    ts = torch.tensor([999.0, 499.0])
    seen = []
    model = lambda x, t, ctx, **kw: seen.append(kw.get("mid_block_additional_residual")) or x
    for mode, uncond_mid in [("ControlNet is more important", None), ("Balanced", 0.5)]:
        unit = ActiveControl(Control(control_image(1), "unused", weight=0.5, control_mode=mode), FakeNet(), None)
        eps = ControlledEps(model, [unit], ts, batch=2)
        x, ctx = torch.zeros(2, 4, 2, 2), torch.zeros(2, 3, 8)
        seen.clear()
        eps(x, torch.tensor([999.0]), ctx, uncond_rows=2)  # the unconditional rows alone
        eps(x, torch.tensor([999.0]), ctx, uncond_rows=0)  # the conditional ones alone
        assert (seen[0] is None) if uncond_mid is None else torch.allclose(seen[0], torch.full((2, 1, 1, 1), 0.5))
        assert torch.allclose(seen[1], torch.full((2, 1, 1, 1), 0.5))
