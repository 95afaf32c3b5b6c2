"""The packaged demo model (`--model demo`, trained by tools/train_demo.py): loads through the normal path,
is fast at its native 64x64, and draws what clearly trained prompts ask for (checked from the pixels with
tools/eval_demo.py's classifier)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stablediff import StableDiffusion, weights
from stablediff.controlnet import load_controlnet
from stablediff.controls import DEMO_CONTROLNET_DIR, Control
from stablediff.pipeline import DEMO_DIR, DEMO_LCM_UNET

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from eval_demo import classify, pick, vae_roundtrip  # noqa: E402
from train_controlnet_demo import iou, reference_picture, shape_mask  # noqa: E402
from train_demo import HELD_OUT, TRAIN_COMBOS, caption, render  # noqa: E402

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "model_index.json").is_file(),
                                reason=f"no demo model at {DEMO_DIR} (make it with tools/train_demo.py)")

STEPS = 20
# 30 trained combinations (none held out), each with its own seed; tools/eval_demo.py measures the same on 100
# prompts and 30 steps, with seeds from 1,000,000 on
PROMPTS = pick(TRAIN_COMBOS, 30, 7)
SEED = 2_000_000
# floors, in %, under what the committed model does here: 100/100/93-100% for the prompts (seeds 2,000,000 and
# 2,000,100), 100/100/100% for the round trip; tools/eval_demo.py (100 prompts, 30 steps): 100/100/90%
BACKGROUND, COLOUR, SHAPE = 90, 90, 80
BACKGROUND_RT, COLOUR_RT, SHAPE_RT = 97, 97, 95


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusion.from_pretrained("demo")


def test_demo_folder_loads_through_the_normal_path():
    ckpt = weights.load_checkpoint(DEMO_DIR)
    assert ckpt.layout == "diffusers" and not ckpt.unused
    assert ckpt.tokenizer_dir is None  # the bundled CLIP vocabulary serves
    assert ckpt.unet_config.sample_size * ckpt.vae_config.downscale == 64
    size = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"demo model is {size / 2**20:.1f} MiB"
    assert all(c not in TRAIN_COMBOS for c in HELD_OUT)


def test_native_size_image_under_ten_seconds(pipe):
    pipe("a red circle on a blue background", seed=0, steps=2)  # warm-up
    t0 = time.perf_counter()
    image = pipe("a red circle on a blue background", seed=1, steps=STEPS).images[0]
    seconds = time.perf_counter() - t0
    assert image.size == (64, 64) and seconds < 10, f"{seconds:.1f} s per 64x64 image"


def test_vae_round_trip_keeps_colours_and_shapes(pipe):
    got = vae_roundtrip(pipe.vae, n=100)
    assert got["background"] >= BACKGROUND_RT and got["colour"] >= COLOUR_RT and got["shape"] >= SHAPE_RT, got


def test_trained_prompts_get_colours_and_shapes_right(pipe):
    assert all(c in TRAIN_COMBOS for c in PROMPTS)
    out = pipe([caption(*combo) for combo in PROMPTS], seed=SEED, steps=STEPS, cfg_scale=7.0)
    got = [classify(im) for im in out.images]
    n = len(PROMPTS)
    backgrounds = 100 * sum(g["background"] == c[2] for g, c in zip(got, PROMPTS)) / n
    colours = 100 * sum(g["colour"] == c[0] for g, c in zip(got, PROMPTS)) / n
    shapes = 100 * sum(g["shape"] == c[1] for g, c in zip(got, PROMPTS)) / n
    # the goal: >= 85% for both colours, >= 70% for the shape (over 100 prompts; here 30, so a little
    # below, for sampling noise)
    assert backgrounds >= BACKGROUND and colours >= COLOUR and shapes >= SHAPE, (backgrounds, colours, shapes)


def test_negative_prompt_keeps_red_away(pipe):
    got = [classify(im) for im in pipe("a circle", "red", seed=SEED, steps=STEPS, batch_size=20).images]
    red_circles = sum(g["colour"] == "red" and g["shape"] == "circle" for g in got)
    assert red_circles <= 1, got


def _picture(combo, seed):
    pixels = ((render([combo], torch.Generator().manual_seed(seed))[0] + 1) * 127.5).round().clamp(0, 255)
    from PIL import Image

    return Image.fromarray(pixels.byte().permute(1, 2, 0).numpy())


def test_img2img_keeps_the_picture_at_low_strength_and_follows_the_prompt_at_high(pipe):
    init = _picture(("red", "circle", "blue"), 0)
    prompt = "a yellow square on a black background"
    got = {strength: [classify(pipe(prompt, init_image=init, strength=strength, seed=s, steps=STEPS).images[0])
                      for s in range(3)] for strength in (0.05, 0.3, 1.0)}
    as_drawn = lambda g, c, s, b: (g["colour"], g["shape"], g["background"]) == (c, s, b)  # noqa: E731
    # this model settles colours late (at low noise): by strength 0.1-0.2 they follow the prompt; the layout (here
    # the circle) survives to strength 0.5; from pure noise the prompt decides everything
    assert sum(as_drawn(g, "red", "circle", "blue") for g in got[0.05]) >= 2, got[0.05]
    assert sum(as_drawn(g, "yellow", "circle", "black") for g in got[0.3]) >= 2, got[0.3]
    assert sum(as_drawn(g, "yellow", "square", "black") for g in got[1.0]) >= 2, got[1.0]


def test_inpainting_repaints_only_the_masked_part(pipe):
    from PIL import Image

    init = _picture(("red", "circle", "blue"), 1)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # repaint the right half
    out = [np.asarray(pipe("a circle on a yellow background", init_image=init, mask_image=Image.fromarray(mask),
                           seed=s, steps=STEPS).images[0], dtype=np.float32) for s in range(2)]
    before = np.asarray(init, dtype=np.float32)
    for a in out:
        kept = np.abs(a[:, :24] - before[:, :24]).mean()  # away from the mask edge
        changed = np.abs(a[:, 40:] - before[:, 40:]).mean()
        assert changed > 1.3 * kept, (kept, changed)


def test_cli_generates_with_the_demo_model(tmp_path):
    run = subprocess.run([sys.executable, "-m", "stablediff", "generate", "a red circle on a blue background",
                          "--model", "demo", "--steps", "10", "--seed", "1", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    files = list(tmp_path.glob("*.png"))
    assert len(files) == 1 and str(files[0]) in run.stdout
    from PIL import Image

    with Image.open(files[0]) as im:
        assert im.size == (64, 64)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_of_a_demo_image_keeps_its_shape_and_colours(pipe, upscaler):
    from PIL import Image

    from stablediff.params import GenerationParams

    base = GenerationParams(prompt="a red circle on a blue background", steps=STEPS, cfg_scale=7.0)
    kept = 0
    for seed in range(3):
        first = pipe.generate(base.replace(seed=SEED + seed)).images[0]
        hires = pipe.generate(base.replace(seed=SEED + seed, enable_hr=True, hr_scale=2.0, hr_upscaler=upscaler,
                                           strength=0.4)).images[0]
        assert hires.size == (128, 128)
        drawn = [classify(im) for im in (first, hires.resize((64, 64), Image.Resampling.BOX))]
        kept += len({(d["background"], d["colour"], d["shape"]) for d in drawn}) == 1
    assert kept >= 2, kept


# --- the demo's canny ControlNet (tools/train_controlnet_demo.py) -------------------------------------------------

# trained combinations, each with its own seed (its control picture's and the generation's); the shapes sit left of
# the centre. Measured: IoU 0.89 / 0.93 with the ControlNet, 0.30 / 0.52 without
CONTROL_PROMPTS = [("red", "circle", "blue"), ("yellow", "square", "black")]
CONTROL_SEED = 4_000_000
needs_demo_controlnet = pytest.mark.skipif(not (DEMO_CONTROLNET_DIR / "config.json").is_file(),
                                           reason=f"no ControlNet at {DEMO_CONTROLNET_DIR} "
                                                  "(make it with tools/train_controlnet_demo.py)")


@needs_demo_controlnet
def test_demo_controlnet_loads_for_the_demo_unet_and_is_small(pipe):
    net = load_controlnet(DEMO_CONTROLNET_DIR, like=pipe.unet.config)
    assert net.config.hint_downscale * pipe.unet.config.sample_size == 64
    assert sum(p.numel() for p in net.parameters()) < 0.7e6
    size = sum(f.stat().st_size for f in DEMO_CONTROLNET_DIR.rglob("*") if f.is_file())
    assert size < 1.5 * 2**20, f"demo ControlNet is {size / 2**20:.2f} MiB"


@needs_demo_controlnet
def test_demo_controlnet_draws_the_shape_where_the_edges_are(pipe):
    with_cn, without = [], []
    for k, combo in enumerate(CONTROL_PROMPTS):
        ref = reference_picture(combo, CONTROL_SEED + k)  # the shape somewhere; its canny edges steer the demo
        want = shape_mask(ref)
        kw = dict(seed=CONTROL_SEED + k, steps=STEPS)
        unit = Control(ref, DEMO_CONTROLNET_DIR, preprocessor="canny")
        with_cn.append(iou(shape_mask(pipe(caption(*combo), controls=[unit], **kw).images[0]), want))
        without.append(iou(shape_mask(pipe(caption(*combo), **kw).images[0]), want))
    assert all(v > 0.5 for v in with_cn), with_cn
    assert sum(with_cn) > sum(without) + 0.5, (with_cn, without)


@needs_demo_controlnet
def test_cli_finds_demo_canny_by_name(tmp_path):
    from stablediff import cli

    args = cli.build_parser().parse_args(["generate", "a circle", "--model", "demo", "--control",
                                          f"demo-canny:{tmp_path / 'none.png'}::canny"])
    with pytest.raises(cli.UsageError, match="none.png: no such control image"):
        cli.parse_controls(args)
    reference_picture(CONTROL_PROMPTS[0], CONTROL_SEED).save(tmp_path / "picture.png")
    args.control = [f"demo-canny:{tmp_path / 'picture.png'}::canny"]
    (unit,) = cli.parse_controls(args)
    assert unit.model == DEMO_CONTROLNET_DIR and unit.preprocessor == "canny" and unit.weight == 1.0
    assert "Model: demo-canny," in unit.infotext()  # named as --control takes it, so --from-png users can read it
# 4 LCM steps: the distilled U-Net (`--model demo-lcm`, tools/distill_lcm_demo.py) against the demo itself
LCM_PROMPTS = pick(TRAIN_COMBOS, 32, 11)


def _all_three_right(out, combos) -> int:
    return sum((g["colour"], g["shape"], g["background"]) == c for g, c in zip(map(classify, out.images), combos))


@pytest.mark.skipif(not (DEMO_LCM_UNET / "config.json").is_file(),
                    reason=f"no LCM U-Net at {DEMO_LCM_UNET} (make it with tools/distill_lcm_demo.py)")
def test_demo_lcm_draws_in_four_lcm_steps_what_the_demo_cannot(pipe):
    size = sum(f.stat().st_size for f in DEMO_LCM_UNET.rglob("*") if f.is_file())
    assert size < 2.5 * 2**20, f"demo-lcm U-Net is {size / 2**20:.1f} MiB"
    lcm = StableDiffusion.from_pretrained("demo-lcm")
    assert lcm.unet.config.time_cond_proj_dim == 32
    prompts = [caption(*combo) for combo in LCM_PROMPTS]
    distilled = lcm(prompts, seed=SEED, steps=4, sampler="lcm", cfg_scale=7.0)
    assert "Model: demo-lcm" in distilled.infotexts[0]
    student = _all_three_right(distilled, LCM_PROMPTS)
    teacher = {cfg: _all_three_right(pipe(prompts, seed=SEED, steps=4, sampler="lcm", cfg_scale=cfg), LCM_PROMPTS)
               for cfg in (1.0, 7.0)}  # cfg 1 is the demo's best at 4 steps: cfg 7 overshoots
    # of 32 with all three right, measured: distilled 31, the demo 25 (cfg 1) and 3 (cfg 7)
    assert student >= 28 and student >= max(teacher.values()) + 4, (student, teacher)


def test_server_finds_the_bundled_models_by_name(tmp_path):
    from stablediff.serve.worker import ModelEntry, startup_model

    for name in ("demo", "demo-lcm"):
        assert startup_model(name, tmp_path) == ModelEntry(name, name)
    with pytest.raises(ValueError, match="demo-xl"):
        startup_model("demo-xl", tmp_path)
