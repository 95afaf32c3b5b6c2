"""Seamless tiling (circular padding in the U-Net and VAE, A1111's `tiling`) and outpainting (inpainting an image
extended by --pad)."""

import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import assert_close
from stablediff import StableDiffusion, cpu, winograd
from stablediff.images import OUTPAINT_OVERLAP, check_pad, outpaint_images, parse_infotext
from stablediff.nn import Conv2d, circular_padding
from stablediff.params import GenerationParams


# --- the circular convolution on every path -----------------------------------------------------------------------

def circular_reference(conv, x):
    """F.conv2d of x padded circularly by the layer's padding, computed in float64."""
    p = conv.padding
    xp = F.pad(x.double(), (p[1], p[1], p[0], p[0]), mode="circular")
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(xp, conv.weight.double(), bias, conv.stride)


def layer(channels, stride=1, dtype=torch.float32):
    torch.manual_seed(0)
    conv = Conv2d(channels, channels, 3, stride=stride, padding=1).to(dtype).requires_grad_(False)
    with torch.no_grad():
        conv.weight.normal_(0, channels ** -0.5 / 3)
    return conv


# (layer, input shape, the fast path that takes it with zero padding)
PATHS = {
    "winograd": (lambda: layer(256), (1, 256, 32, 32), winograd.applies),
    "im2col": (lambda: layer(1280), (1, 1280, 8, 8), Conv2d._unfolds),
    "im2col-stride2": (lambda: layer(1280, stride=2), (1, 1280, 8, 8), Conv2d._unfolds),
    "packed": (lambda: layer(1280, dtype=torch.bfloat16), (1, 1280, 4, 4), Conv2d._packs),
    "plain": (lambda: layer(32), (2, 32, 8, 8), None),
}


@pytest.mark.parametrize("disable", ["", "all"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_circular_conv_equals_circular_pad_then_conv_on_every_path(path, disable, monkeypatch):
    monkeypatch.setenv(cpu.ENV, disable)
    make, shape, takes = PATHS[path]
    conv = make()
    if path == "packed" and not cpu.onednn_bf16_convolution():
        pytest.skip("oneDNN has no bfloat16 convolution on this CPU")
    x = torch.randn(shape).to(conv.weight.dtype)
    with torch.no_grad():
        if takes is not None:  # the fast path runs this layer exactly when it is enabled
            assert takes(conv, x) == (disable == "")
        zeros = conv(x)
        with circular_padding([conv]):
            assert conv.padding_mode == "circular" and (takes is None or not takes(conv, x))
            out = conv(x)
        assert conv.padding_mode == "zeros"
    ref = circular_reference(conv, x)
    tol = 2e-2 if conv.weight.dtype == torch.bfloat16 else 1e-5
    assert_close(out, ref, tol)
    # the border differs from zero padding by far more than the tolerance: the test sees the mode
    assert (zeros.double() - ref).abs().max() > 10 * tol * ref.abs().max()


def test_circular_padding_leaves_unpadded_layers_and_restores_on_error():
    model = torch.nn.Sequential(Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1),
                                torch.nn.Conv2d(4, 4, 1), Conv2d(4, 4, 3, stride=2, padding=0))
    with pytest.raises(RuntimeError, match="boom"):
        with circular_padding([model]):
            assert [m.padding_mode for m in model] == ["circular", "circular", "zeros", "zeros"]
            raise RuntimeError("boom")
    assert [m.padding_mode for m in model] == ["zeros"] * 4
    with circular_padding([model], on=False):
        assert [m.padding_mode for m in model] == ["zeros"] * 4


# --- the models and the pipeline ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


def padding_modes(pipe) -> set[str]:
    return {m.padding_mode for model in (pipe.unet, pipe.vae) for m in model.modules()
            if isinstance(m, torch.nn.Conv2d) and any(m.padding)}


def roll(x, h, w):
    return torch.roll(x, (h, w), dims=(2, 3))


@torch.no_grad()
def test_with_circular_padding_a_rolled_input_gives_the_rolled_output(pipe):
    """The exact property behind seamless tiles: with circular padding everywhere the U-Net commutes with rolls
    by multiples of its downsampling factor, and the decoder with any latent roll (times its downscale)."""
    torch.manual_seed(0)
    factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    x = torch.randn(1, 4, 16, 24)
    t = torch.tensor([500.0])
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    z = torch.randn(1, 4, 8, 12)
    f = pipe.downscale
    plain = pipe.unet(roll(x, factor, 3 * factor), t, context)
    with circular_padding((pipe.unet, pipe.vae)):
        out = pipe.unet(x, t, context)
        assert_close(pipe.unet(roll(x, factor, 3 * factor), t, context), roll(out, factor, 3 * factor), 1e-5)
        image = pipe.vae.decode(z, tiled=False)
        assert_close(pipe.vae.decode(roll(z, 1, 5), tiled=False), roll(image, f, 5 * f), 1e-5)
    # zero padding has no such property (so the check above can fail)
    assert (plain - roll(pipe.unet(x, t, context), factor, 3 * factor)).abs().max() > 1e-3


def test_a_tiling_run_pads_circularly_and_leaves_the_model_as_it_was(pipe):
    before = pipe("a brick wall", steps=2, seed=7, width=64, height=64)
    seen = []
    tiled = pipe.generate(GenerationParams(prompt="a brick wall", steps=2, seed=7, width=64, height=64,
                                           tiling=True), callback=lambda info: seen.append(padding_modes(pipe)))
    assert seen == [{"circular"}] * 2 and padding_modes(pipe) == {"zeros"}
    assert "Tiling: True" in tiled.infotexts[0] and "Tiling" not in before.infotexts[0]
    assert not torch.equal(tiled.latents, before.latents)
    after = pipe("a brick wall", steps=2, seed=7, width=64, height=64)
    assert torch.equal(after.latents, before.latents)
    assert np.array_equal(np.array(after.images[0]), np.array(before.images[0]))


def test_an_interrupted_tiling_run_restores_the_padding(pipe):
    class Stop(Exception):
        pass

    def stop(info):
        raise Stop

    with pytest.raises(Stop):
        pipe.generate(GenerationParams(prompt="x", steps=2, seed=1, width=64, height=64, tiling=True),
                      callback=stop)
    assert padding_modes(pipe) == {"zeros"}


def test_tiling_round_trips_as_a1111_writes_and_reads_it():
    p = GenerationParams(prompt="x", seed=1, width=64, height=64, tiling=True).validate()
    back, _ = GenerationParams.from_infotext(p.to_infotext())
    assert back.tiling is True
    assert GenerationParams.from_a1111({"prompt": "x", "tiling": True}).tiling is True
    assert GenerationParams.from_a1111({"prompt": "x", "tiling": None}).tiling is False
    assert GenerationParams.from_row({"prompt": "x", "tiling": True}).tiling is True
    assert p.to_argv()[-3:] == ["--tiling", "--", "x"]
    with pytest.raises(ValueError, match="tiling 'yes' is not true or false"):
        GenerationParams(tiling="yes").validate()
    with pytest.raises(ValueError, match="infotext Tiling: 'maybe' is not True or False"):
        GenerationParams.from_infotext("x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Tiling: maybe")


# --- outpainting ----------------------------------------------------------------------------------------------------

def gradient(width, height):
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 7 % 256, yy * 11 % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)


def test_outpaint_images_stretch_the_edges_and_mask_the_border_and_an_overlap():
    pixels = gradient(24, 16)
    image, mask = outpaint_images(Image.fromarray(pixels), (8, 16, 0, 8))
    assert image.size == mask.size == (48, 24) and image.mode == "RGB" and mask.mode == "L"
    out, m = np.array(image), np.array(mask)
    assert np.array_equal(out[:16, 8:32], pixels)
    assert np.array_equal(out[:16, :8], np.repeat(pixels[:, :1], 8, axis=1))  # left: the first column repeated
    assert np.array_equal(out[:16, 32:], np.repeat(pixels[:, -1:], 16, axis=1))
    assert np.array_equal(out[16:, 8:32], np.repeat(pixels[-1:], 8, axis=0))
    assert (out[16:, 32:] == pixels[-1, -1]).all()  # a corner: the corner pixel
    o = OUTPAINT_OVERLAP
    expected = np.full((24, 48), 255, np.uint8)
    expected[:16 - o, 8 + o:32 - o] = 0  # black inside, except o pixels along the padded sides (left, right, bottom)
    assert np.array_equal(m, expected)


def test_outpaint_images_pad_a_given_mask_with_white():
    given = np.zeros((16, 24), np.uint8)
    given[4:8, 4:12] = 255
    image, mask = outpaint_images(Image.fromarray(gradient(24, 16)), (8, 8, 8, 8), Image.fromarray(given))
    m = np.array(mask)
    assert image.size == mask.size == (40, 32)
    assert np.array_equal(m[8:24, 8:32], given)
    m[8:24, 8:32] = 255
    assert (m == 255).all()


@pytest.mark.parametrize("pad,message", [((4, 0, 0, 0), "multiples of 8"), ((0, 0, 0, 0), "not all 0"),
                                         ((-8, 0, 0, 0), "whole numbers >= 0"), ((8, 8), "4 whole numbers")])
def test_bad_pads_are_named(pad, message):
    with pytest.raises(ValueError, match=message):
        check_pad(pad)


def test_pad_arg_takes_one_number_or_four():
    from stablediff.cli_options import UsageError, pad_arg

    assert pad_arg("64") == (64, 64, 64, 64)
    assert pad_arg("64, 0,8,0") == (64, 0, 8, 0)
    for bad, message in [("8,8", "LEFT,RIGHT,TOP,BOTTOM"), ("x", "LEFT,RIGHT"), ("12", "--pad 12: pad"),
                         ("0", "not all 0")]:
        with pytest.raises(UsageError, match=message):
            pad_arg(bad)


def run_cli(*args, cwd):
    import sys

    return subprocess.run([sys.executable, "-m", "stablediff", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_outpaint_and_tiling_cli(tiny_model_dir, tmp_path):
    Image.fromarray(gradient(64, 64)).save(tmp_path / "in.png")
    out = tmp_path / "out"
    common = ["--model", tiny_model_dir, "--steps", "2", "--seed", "3", "--output-dir", out, "--quiet"]
    r = run_cli("inpaint", "a wall", "--init-image", tmp_path / "in.png", "--pad", "8,16,0,8", "--tiling", *common,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (path,) = out.glob("*.png")
    image = Image.open(path)
    assert image.size == (88, 72)
    info = parse_infotext(image.text["parameters"])
    assert info["Tiling"] == "True" and info["Size-1"] == "88" and info["Size-2"] == "72"
    for args, bad in [([], "inpaint needs --mask MASK.png, or --pad"),
                      (["--pad", "4"], "--pad 4: pad (4, 4, 4, 4) must be multiples of 8"),
                      (["--pad", "4096"], "padded size 8256x8256: width 8256 is outside 64..4096"),
                      (["--pad", "512", "--max-pixels", "262144"], "--max-pixels")]:
        r = run_cli("inpaint", "x", "--init-image", tmp_path / "in.png", *args, *common, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and bad in r.stderr, r.stderr
