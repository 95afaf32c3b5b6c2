"""TAESD against diffusers' AutoencoderTiny with the same random weights, loaded from a diffusers folder (written by
diffusers' save_pretrained) and from the original madebyollin files (written through our key table, and checked
against the original nn.Sequential layout); the cheap preview against hand-computed numbers."""

import collections
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import assert_close
from stablediff import cpu
from stablediff.taesd import (CHEAP_RGB, TinyAutoencoderConfig, cheap_preview, cheap_rgb, load_taesd,
                              original_table, to_original)
from stablediff.weights import CheckpointError

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
# three levels (downscale 4), unequal block counts so that a shifted index would land on the wrong layer
TINY = dict(encoder_block_out_channels=[8, 8, 8], decoder_block_out_channels=[8, 8, 8],
            num_encoder_blocks=[1, 1, 2], num_decoder_blocks=[2, 1, 1])
CONFIGS = {"tiny": TINY, "taesd": {}}


def reference(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.AutoencoderTiny(**cfg).eval()


@pytest.fixture(params=list(CONFIGS))
def saved(request, tmp_path):
    """(diffusers model, its save_pretrained folder, the same weights as original files)."""
    ref = reference(CONFIGS[request.param])
    ref.save_pretrained(tmp_path / "diffusers")
    cfg = TinyAutoencoderConfig.from_json(tmp_path / "diffusers" / "config.json")
    halves = to_original(ref.state_dict(), cfg)
    save_file(halves["encoder"], tmp_path / "taesd_encoder.safetensors")
    torch.save(halves["decoder"], tmp_path / "taesd_decoder.pth")
    return ref, tmp_path, cfg


def inputs(f: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 8 * f, 6 * f, generator=g) * 2 - 1
    z = torch.randn(2, 4, 8, 6, generator=g) * 3  # wide enough that the decoder's soft clamp matters
    return x, z


def check_against(model, ref, *, encoder=True, decoder=True):
    x, z = inputs(model.config.downscale)
    with torch.no_grad():
        if encoder:
            assert_close(model.encode(x), ref.encode(x).latents, TOL)
        if decoder:
            assert_close(model.decode(z), ref.decode(z).sample, TOL)


def test_diffusers_folder_matches_diffusers(saved):
    ref, root, _ = saved
    model = load_taesd(root / "diffusers")
    assert model.config.downscale == 2 ** (len(ref.config.encoder_block_out_channels) - 1)
    check_against(model, ref)
    z = torch.linspace(-5, 5, 40).view(1, 4, 2, 5)
    assert_close(model.scale_latents(z), ref.scale_latents(z), TOL)
    assert_close(model.unscale_latents(model.scale_latents(z)), ref.unscale_latents(ref.scale_latents(z)), TOL)


def test_original_files_match_diffusers(saved):
    ref, root, cfg = saved
    check_against(load_taesd(root / "taesd_encoder.safetensors", root / "taesd_decoder.pth", config=cfg), ref)
    check_against(load_taesd(root, config=cfg), ref)  # a folder holding the original files


def test_decoder_file_alone_decodes_and_refuses_to_encode(saved):
    ref, root, cfg = saved
    model = load_taesd(root / "taesd_decoder.pth", config=cfg)
    assert model.encoder is None
    check_against(model, ref, encoder=False)
    with pytest.raises(ValueError, match="without its encoder"):
        model.encode(torch.zeros(1, 3, 64, 64))


def original_sequentials():
    """madebyollin/taesd's own layout (taesd.py: Encoder/Decoder as nn.Sequential, a Clamp module first in the
    decoder), written from its description; weights only matter for keys and shapes here."""
    def conv(n_in, n_out, **kw):
        return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(conv(64, 64), nn.ReLU(), conv(64, 64), nn.ReLU(), conv(64, 64))

    def down():
        return [conv(64, 64, stride=2, bias=False), Block(), Block(), Block()]

    def up():
        return [Block(), Block(), Block(), nn.Upsample(scale_factor=2), conv(64, 64, bias=False)]

    encoder = nn.Sequential(conv(3, 64), Block(), *down(), *down(), *down(), conv(64, 4))
    decoder = nn.Sequential(nn.Identity(), conv(4, 64), nn.ReLU(), *up(), *up(), *up(), Block(), conv(64, 3))
    return {"encoder": encoder, "decoder": decoder}


def test_key_table_is_the_original_layout():
    cfg = TinyAutoencoderConfig()
    table = original_table(cfg)
    assert table["decoder.layers.0.weight"] == ("decoder", "1.weight")
    assert table["decoder.layers.18.bias"] == ("decoder", "19.bias")
    assert table["encoder.layers.14.bias"] == ("encoder", "14.bias")
    ref = reference({})
    halves = to_original(ref.state_dict(), cfg)
    for half, module in original_sequentials().items():
        module.load_state_dict(halves[half], strict=True)  # every key and shape, both ways


def test_bad_files_and_configs_are_refused(tmp_path):
    save_file({"foo.weight": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not a TAESD encoder or decoder"):
        load_taesd(tmp_path / "x.safetensors")
    halves = to_original(reference({}).state_dict(), TinyAutoencoderConfig())
    save_file({**halves["decoder"], "99.weight": torch.zeros(1)}, tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match="unexpected 99.weight"):
        load_taesd(tmp_path / "d.safetensors")
    save_file({k: v for k, v in halves["decoder"].items() if k != "19.bias"}, tmp_path / "d2.safetensors")
    with pytest.raises(CheckpointError, match="missing decoder.layers.18.bias"):
        load_taesd(tmp_path / "d2.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no TAESD weights"):
        load_taesd(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such file"):
        load_taesd(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="act_fn='silu' is not supported"):
        TinyAutoencoderConfig.from_dict({"act_fn": "silu"})
    with pytest.raises(ValueError, match="differ"):
        TinyAutoencoderConfig.from_dict({"encoder_block_out_channels": [64, 128, 64, 64]})
    with pytest.raises(ValueError, match="3 decoder_block_out_channels but 4"):
        TinyAutoencoderConfig.from_dict({"decoder_block_out_channels": [64, 64, 64]})
    torch.save({"1.weight": collections.Counter()}, tmp_path / "code.pth")  # a global that is not a tensor
    with pytest.raises(CheckpointError, match="refused to load: its pickle asks for collections.Counter"):
        load_taesd(tmp_path / "code.pth")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"scaling_factor": 0.18215}))
    with pytest.raises(ValueError, match="scaling_factor=0.18215 is not supported"):
        load_taesd(tmp_path / "cfg")


def test_decode_refuses_wrong_latents_before_running():
    model = load_taesd_random()
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 4, H, W\), got \(1, 3, 8, 8\)"):
        model.decode(torch.zeros(1, 3, 8, 8))


def load_taesd_random():
    from stablediff.taesd import TinyAutoencoder

    return TinyAutoencoder(TinyAutoencoderConfig(**{k: tuple(v) for k, v in TINY.items()})).eval()


def test_cheap_rgb_is_the_a1111_matrix_product():
    # one latent pixel by hand: (1, 0.5, -1, 0.25) @ CHEAP_RGB
    latent = torch.tensor([1.0, 0.5, -1.0, 0.25]).view(1, 4, 1, 1)
    r = 0.298 * 1 + 0.187 * 0.5 + -0.158 * -1 + -0.184 * 0.25
    g = 0.207 * 1 + 0.286 * 0.5 + 0.189 * -1 + -0.271 * 0.25
    b = 0.208 * 1 + 0.173 * 0.5 + 0.264 * -1 + -0.473 * 0.25
    assert (r, g, b) == pytest.approx((0.5035, 0.09325, -0.08775))
    assert cheap_rgb(latent).flatten().tolist() == pytest.approx([r, g, b], abs=1e-6)
    assert len(CHEAP_RGB) == 4 and all(len(row) == 3 for row in CHEAP_RGB)


def test_cheap_preview_image():
    latent = torch.zeros(4, 2, 3)
    latent[:, 0, 0] = torch.tensor([1.0, 0.5, -1.0, 0.25])  # -> (0.5035, 0.09325, -0.08775)
    latent[0, 1, 2] = 10.0  # -> (2.98, 2.07, 2.08): white after the clamp
    latent[3, 0, 1] = 10.0  # -> (-1.84, -2.71, -4.73): black
    image = cheap_preview(latent)
    assert image.size == (3, 2) and image.mode == "RGB"
    # (v / 2 + 0.5) * 255, rounded: 191.7, 139.4, 116.3; zero latents are grey 127.5 -> 128
    assert image.getpixel((0, 0)) == (192, 139, 116)
    assert image.getpixel((2, 1)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 0, 0)
    assert image.getpixel((2, 0)) == (128, 128, 128)
    big = cheap_preview(latent, upscale=8)
    assert big.size == (24, 16)
    assert big.getpixel((7, 7)) == (192, 139, 116) and big.getpixel((8, 7)) == (0, 0, 0)
    assert big.getpixel((23, 15)) == (255, 255, 255)


@pytest.mark.parametrize("bad, message", [
    (dict(latent=torch.zeros(1, 4, 2, 2)), "one latent of shape"),
    (dict(latent=torch.zeros(3, 2, 2)), r"\(B, 4, h, w\), got \(1, 3, 2, 2\)"),
    (dict(latent=torch.zeros(4, 2, 2), upscale=0), "upscale 0"),
    (dict(latent=torch.zeros(4, 2, 2), upscale=2.0), "upscale 2.0"),
])
def test_cheap_preview_refuses_bad_input(bad, message):
    with pytest.raises(ValueError, match=message):
        cheap_preview(**bad)


def test_taesd_as_the_vae_and_for_previews_matches_diffusers_autoencoder_tiny(tiny_model_dir, tmp_path):
    """pipe.load_vae(a TAESD folder): the image is TAESD's decode of the same latents, as diffusers'
    StableDiffusionPipeline with vae=AutoencoderTiny gives it; previews use it; img2img encodes with it."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion, pipeline

    cfg = dict(encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8], num_encoder_blocks=[1, 2],
               num_decoder_blocks=[2, 1])  # downscale 2, as the tiny model's VAE
    tiny = reference(cfg, seed=4)
    tiny.save_pretrained(tmp_path / "taesd")
    ref = StableDiffusionPipeline.from_pretrained(tiny_model_dir, vae=tiny, safety_checker=None)
    pipe = StableDiffusion.from_pretrained(tiny_model_dir)
    plain = pipe("a cat", steps=3, seed=2, sampler="euler")
    pipe.load_vae(tmp_path / "taesd")
    got = pipe("a cat", steps=3, seed=2, sampler="euler")
    assert torch.equal(got.latents, plain.latents)  # the U-Net's part does not change
    with torch.no_grad():  # diffusers' pipeline decodes as vae.decode(latents / scaling_factor (1.0)), postprocess
        want = ref.image_processor.postprocess(ref.vae.decode(got.latents / ref.vae.config.scaling_factor).sample,
                                               output_type="np")[0]
    assert np.abs(np.asarray(got.images[0]).astype(int) - np.round(want * 255).astype(int)).max() <= 1
    assert "VAE: taesd" in got.infotexts[0] and "VAE hash: " in got.infotexts[0]
    # previews: TAESD's decode of what they are given, here under PREVIEW_POOL_FROM latents per side (from there
    # of their 2x2 averages), in bfloat16 where the CPU has its units (both: test_subpixel.py)
    side = pipeline.PREVIEW_POOL_FROM - 1
    crop = got.latents[..., :side, :side]
    with torch.no_grad():
        want = ref.image_processor.postprocess(ref.vae.decode(crop / ref.vae.config.scaling_factor).sample,
                                               output_type="np")[0]
    preview = np.asarray(pipe.preview(crop)[0]).astype(int)
    assert preview.shape == (side * 2, side * 2, 3)
    assert np.abs(preview - np.round(want * 255).astype(int)).max() <= (4 if cpu.native_bf16() else 1)
    pipe.taesd = None
    cheap = pipe.preview(got.latents)[0]
    assert cheap.size == (64, 64)  # "Approx cheap" at the latents' size x the downscale
    pipe.load_vae(tmp_path / "taesd")
    redone = pipe("a cat", steps=3, seed=2, sampler="euler", init_image=got.images[0], strength=0.5)
    assert redone.images[0].size == (64, 64) and torch.isfinite(redone.latents).all()
