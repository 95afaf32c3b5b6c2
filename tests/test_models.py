"""Our U-Net, VAE and CLIP text tower against diffusers/transformers with the same random weights (float32)."""

import pytest
import torch

from conftest import (TINY_TEXT, TINY_UNET, TINY_VAE, assert_close, diffusers_unet, diffusers_vae, sd15_config,
                      text_state_dict, transformers_text)
from stablediff import cpu
from stablediff import nn as snn
from stablediff.clip import CLIPTextModel
from stablediff.config import CLIPTextConfig, UNetConfig, VAEConfig
from stablediff.unet import UNet
from stablediff.vae import AutoencoderKL

TOL = 1e-4
NATIVE_BF16 = cpu.native_bf16  # the probe itself (conftest's autouse fixture stands in for it)


def ours(cls, cfg_cls, ref, state_dict):
    """Our module built from the oracle's full config (as its saved config.json would hold it)."""
    cfg = dict(ref.config) if isinstance(ref.config, dict) else ref.config.to_dict()
    with torch.device("meta"):
        model = cls(cfg_cls.from_dict(cfg))
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("size", ["tiny", pytest.param("sd15", marks=pytest.mark.slow)])
def test_unet_matches_diffusers(size, all_cores, winograd_inputs):
    cfg = TINY_UNET if size == "tiny" else sd15_config("unet")
    ref = diffusers_unet(cfg)
    model = ours(UNet, UNetConfig, ref, ref.state_dict())
    g = torch.Generator().manual_seed(1)
    # square, non-square and sizes that do not divide by the U-Net's total downscale (odd skips)
    shapes = [(16, 16), (8, 24), (13, 9)] if size == "tiny" else [(16, 16), (9, 11)]
    for h, w in shapes:
        x = torch.randn(2, 4, h, w, generator=g)
        ctx = torch.randn(2, 77, cfg["cross_attention_dim"], generator=g)
        t = torch.tensor([999.0, 1.5])
        with torch.no_grad():
            assert_close(model(x, t, ctx), ref(x, t, ctx).sample, TOL)
    # SD 1.5 at 16x16, batch 2: the top level's 3x3 layers (4 down, 6 up, the upsampler into it)
    assert len(winograd_inputs) == (11 if size == "sd15" else 0)
    # a scalar timestep and a 154-token (two-chunk) context
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 154, cfg["cross_attention_dim"], generator=g)
    with torch.no_grad():
        assert_close(model(x, 500, ctx), ref(x, 500, ctx).sample, TOL)
    # guidance's batch [x; x] under [uncond; cond]: the part before the first cross-attention runs on one half
    conv_in_batch = []
    model.conv_in.register_forward_hook(lambda m, inp, out: conv_in_batch.append(len(inp[0])))
    x = torch.randn(2, 4, 16, 8, generator=g).repeat(2, 1, 1, 1)
    ctx = torch.randn(4, 77, cfg["cross_attention_dim"], generator=g)
    with torch.no_grad():
        assert_close(model(x, 321.0, ctx), ref(x, 321.0, ctx).sample, TOL)
        assert conv_in_batch == [2]
        model(x, torch.tensor([321.0, 321.0, 321.0, 20.0]), ctx)  # timesteps differ: no sharing
        assert conv_in_batch == [2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("way", ["plain", "fast"])
def test_sd15_unet_with_tuned_ways_matches_diffusers(all_cores, monkeypatch, way):
    """SD 1.5 at a 32x32 latent, batch 2, with tuning on (tuning.py) and every layer that is offered a choice taking
    the plain op ("plain") or the last other way offered ("fast": oneDNN linears and attention, Winograd F(2x2) or
    im2col convolutions): both equal diffusers' (F(4x4) Winograd: tests/test_fast.py)."""
    from stablediff import tuning

    ref = diffusers_unet(sd15_config("unet"))
    model = ours(UNet, UNetConfig, ref, ref.state_dict())
    monkeypatch.setenv(cpu.ENV, "")
    monkeypatch.setenv(tuning.ENV, "memory")
    chosen = []
    monkeypatch.setattr(tuning, "decide", lambda times: chosen.append(list(times)[0 if way == "plain" else -1])
                        or chosen[-1])
    tuning.forget()
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g)
    try:
        with torch.no_grad():
            assert_close(model(x, torch.tensor([999.0, 1.5]), ctx), ref(x, torch.tensor([999.0, 1.5]), ctx).sample,
                         TOL)
    finally:
        tuning.forget()
    onednn = snn._onednn_float32_product()  # also offers attention "sdpa" or "onednn" at 1024 tokens
    winograd2x2 = "winograd2x2 onednn" if onednn else "winograd2x2"
    expected = ({"blas", "direct"} | ({"sdpa"} if onednn else set()) if way == "plain"
                else {"onednn", winograd2x2, "im2col"})
    assert set(chosen) == expected and len(chosen) > 30


@pytest.mark.slow
def test_sd15_unet_in_bfloat16_with_im2col_is_as_near_diffusers_as_the_direct_convolution(all_cores, monkeypatch):
    """SD 1.5 in bfloat16, channels-last as the pipeline loads it, with tuning on and every bfloat16 3x3 layer that
    is offered a choice taking the direct convolution, then im2col: the error against diffusers' float32 output is
    bfloat16's either way (bounded by the direct run's own). Only on a CPU with bfloat16 units (elsewhere the
    pipeline runs float32, and a bfloat16 SD 1.5 would take minutes)."""
    from stablediff import tuning

    if not NATIVE_BF16():
        pytest.skip("this CPU has no bfloat16 units")
    ref = diffusers_unet(sd15_config("unet"))
    model = ours(UNet, UNetConfig, ref, ref.state_dict()).to(torch.bfloat16).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g), torch.tensor([999.0, 1.5])
    with torch.no_grad():
        want = ref(x, t, ctx).sample
    monkeypatch.setenv(cpu.ENV, "")
    monkeypatch.setenv(tuning.ENV, "memory")
    errors = {}
    for way in ("direct", "im2col"):
        chosen = []
        monkeypatch.setattr(tuning, "decide", lambda times, way=way: chosen.append(set(times)) or way)
        tuning.forget()
        try:
            with torch.no_grad():
                got = model(x.bfloat16(), t, ctx.bfloat16()).float()
        finally:
            tuning.forget()
        # a choice per layer shape at the 16x16 (512 output pixels), 8x8 and 4x4 levels and the downsamplers
        assert len(chosen) >= 12 and all(c == {"direct", "im2col"} for c in chosen)
        errors[way] = ((got - want).norm() / want.norm()).item()
    assert errors["direct"] < 0.05 and errors["im2col"] < 1.25 * errors["direct"]


def test_inpainting_unet_in_channels_9():
    cfg = dict(TINY_UNET, in_channels=9)
    ref = diffusers_unet(cfg, seed=3)
    model = ours(UNet, UNetConfig, ref, ref.state_dict())
    x, ctx = torch.randn(1, 9, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert_close(model(x, 321.0, ctx), ref(x, 321.0, ctx).sample, TOL)


@pytest.mark.parametrize("size", ["tiny", "sd15"])
def test_vae_matches_diffusers(size, all_cores, winograd_inputs):
    cfg = TINY_VAE if size == "tiny" else sd15_config("vae")
    ref = diffusers_vae(cfg)
    model = ours(AutoencoderKL, VAEConfig, ref, ref.state_dict())
    f = model.config.downscale
    assert f == 2 ** (len(cfg["block_out_channels"]) - 1)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 8 * f, 6 * f, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 6, generator=g)
    with torch.no_grad():
        post, ref_post = model.encode(x), ref.encode(x).latent_dist
        assert_close(post.mean, ref_post.mean, TOL)
        assert_close(post.std, ref_post.std, TOL)
        # posterior sampling draws from the CPU generator exactly as diffusers does
        assert_close(post.sample(torch.Generator().manual_seed(7)),
                     ref_post.sample(torch.Generator().manual_seed(7)), TOL)
        assert_close(model.decode(z), ref.decode(z).sample, TOL)
    # SD 1.5: the encoder's and decoder's levels with >= 256 channels and 512 pixels, or 128 and 8192
    assert (len(winograd_inputs) > 0) == (size == "sd15")


def test_vae_scaling_factor_default_and_from_config():
    assert VAEConfig.from_dict(sd15_config("vae")).scaling_factor == 0.18215
    assert VAEConfig.from_dict(dict(TINY_VAE, scaling_factor=0.13025)).scaling_factor == 0.13025


@pytest.mark.parametrize("size", ["tiny", "sd15"])
def test_text_encoder_matches_transformers(size, all_cores):
    cfg = TINY_TEXT if size == "tiny" else sd15_config("text_encoder")
    ref = transformers_text(cfg)
    model = ours(CLIPTextModel, CLIPTextConfig, ref, text_state_dict(ref))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0], ids[:, 9:] = 49406, 49407
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        assert_close(model(ids), out.last_hidden_state, TOL)
        states = model.hidden_states(ids)
        assert len(states) == len(out.hidden_states) == cfg["num_hidden_layers"] + 1
        for a, b in zip(states, out.hidden_states):
            assert_close(a, b, TOL)
        # clip skip 2 (A1111 counting) = penultimate layer, then the final LayerNorm, as diffusers' clip_skip=1
        final_ln = getattr(ref, "text_model", ref).final_layer_norm  # transformers 5 flattened CLIPTextModel
        penultimate = final_ln(out.hidden_states[-2])
        assert_close(model(ids, clip_skip=2), penultimate, TOL)


def test_unsupported_configs_are_refused_clearly():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_dict(dict(TINY_UNET, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_dict(dict(TINY_UNET, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]))
    with pytest.raises(ValueError, match="clip_skip=0"):
        with torch.device("meta"):
            CLIPTextModel(CLIPTextConfig.from_dict(TINY_TEXT))(torch.zeros(1, 77, dtype=torch.long), clip_skip=0)


def test_deep_cache_reuses_deep_features_on_the_calls_between_full_passes():
    from stablediff.unet import DeepCache

    ref = diffusers_unet(TINY_UNET)
    model = ours(UNet, UNetConfig, ref, ref.state_dict())
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    cache = DeepCache(3)
    calls = []  # the deep levels (here: the mid block) run only on full passes
    deep = model.mid_block.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        full = model(x, 500.0, ctx)
        outs = [model(x, 500.0, ctx, cache=cache) for _ in range(7)]
        # same input: the shallow branch on the kept features reproduces the full pass exactly
        assert all(torch.equal(o, full) for o in outs)
        assert len(calls) == 1 + 3  # calls 0, 3 and 6 of the cached run were full passes
        # a different timestep on a reuse call differs from the full pass, but only through the shallow branch
        c2 = DeepCache(2)
        model(x, 500.0, ctx, cache=c2)
        reused = model(x, 400.0, ctx, cache=c2)
        assert not torch.equal(reused, model(x, 400.0, ctx))
        # a guidance batch [x; x]: the shallow branch shares its first half as the full pass does
        xs, c3 = x[:1].repeat(2, 1, 1, 1), DeepCache(2)
        full = model(xs, 500.0, ctx)
        assert all(torch.equal(model(xs, 500.0, ctx, cache=c3), full) for _ in range(3))
    deep.remove()
