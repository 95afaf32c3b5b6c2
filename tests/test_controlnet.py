"""ControlNet: our residuals against diffusers' ControlNetModel, our U-Net taking them against UNet2DConditionModel,
and loading the diffusers folder and the original lllyasviel layout (same random weights, float32)."""

import inspect

import pytest
import torch

from conftest import TINY_UNET, assert_close, diffusers_unet, sd15_config
from stablediff.config import UNetConfig
from stablediff.controlnet import (ControlNet, ControlNetConfig, ORIGINAL_PREFIX, config_table, load_controlnet,
                                   to_original)
from stablediff.keymap import CheckpointError
from stablediff.unet import DeepCache, UNet

TOL = 1e-4
TINY_HINT = dict(conditioning_embedding_out_channels=[16, 32])  # hints at 2x the latent size
# the tiny U-Net with SD 1.x's 8 heads: original files carry no head counts, loading them assumes SD 1.x's
TINY_8_HEADS = dict(TINY_UNET, attention_head_dim=8)


def from_unet(unet_cfg: dict, **hint) -> dict:
    """The ControlNetModel config diffusers' ControlNetModel.from_unet makes of a U-Net's config.json."""
    from diffusers import ControlNetModel

    accepted = inspect.signature(ControlNetModel.__init__).parameters
    return {k: v for k, v in {**unet_cfg, **hint}.items() if k in accepted and k != "self"}


def diffusers_controlnet(cfg: dict, seed: int = 0):
    """A random ControlNetModel whose zero convs are not zero (with them zero, every residual is 0 and no test could
    fail)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    model = ControlNetModel(**cfg).eval()
    for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block, model.controlnet_cond_embedding.conv_out]:
        conv.reset_parameters()
    return model


def ours(ref) -> ControlNet:
    with torch.device("meta"):
        model = ControlNet(ControlNetConfig.from_dict(dict(ref.config)))
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return model.eval()


def inputs(cfg: ControlNetConfig, h=8, w=8, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    f = cfg.hint_downscale
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([999.0, 1.5][:batch]),
            torch.randn(batch, 77, cfg.cross_attention_dim, generator=g), torch.rand(batch, 3, h * f, w * f, generator=g))


def assert_residuals(got, want, tol=TOL):
    (down, mid), (ref_down, ref_mid) = got, want
    assert len(down) == len(ref_down)
    for a, b in zip(down, ref_down):
        assert_close(a, b, tol)
    assert_close(mid, ref_mid, tol)


@pytest.fixture(scope="module")
def tiny():
    return diffusers_controlnet(from_unet(TINY_8_HEADS, **TINY_HINT))


@pytest.mark.parametrize("scale, guess_mode", [(1.0, False), (0.55, False), (0.8, True)])
def test_tiny_matches_diffusers(tiny, scale, guess_mode):
    model = ours(tiny)
    assert model.config == ControlNetConfig.from_unet(UNetConfig.from_dict(TINY_8_HEADS), **TINY_HINT)
    for h, w in [(8, 8), (6, 10)]:
        x, t, ctx, hint = inputs(model.config, h, w)
        with torch.no_grad():
            got = model(x, t, ctx, hint, conditioning_scale=scale, guess_mode=guess_mode)
            want = tiny(x, t, ctx, hint, conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
        assert_residuals(got, want)
    with torch.no_grad():  # one hint for the whole batch: the same up to the rounding that the other batch layout
        # changes (the kernels differ by CPU), bounded by what diffusers itself shows for the same
        one = model(x, t, ctx, hint[:1], scale, guess_mode)
        kw = dict(conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
        ref_one, ref_all = (tiny(x, t, ctx, h, **kw) for h in (hint[:1], hint[:1].expand_as(hint)))
        noise = max((a - b).abs().max().item() for a, b in zip([*ref_one[0], ref_one[1]], [*ref_all[0], ref_all[1]]))
        assert_residuals(one, model(x, t, ctx, hint[:1].expand_as(hint), scale, guess_mode), max(1e-6, 4 * noise))
    # guess mode: 13 residuals for SD 1.5 at 10 ** linspace(-1, 0); here 7, the mid block's at 1 x scale
    assert torch.logspace(-1, 0, 7)[0].item() == pytest.approx(0.1)


@pytest.mark.parametrize("extra", [{"controlnet_conditioning_channel_order": "bgr"},
                                   {"global_pool_conditions": True}])
def test_tiny_config_switches_match_diffusers(extra):
    ref = diffusers_controlnet(from_unet(TINY_UNET, **TINY_HINT, **extra), seed=4)
    model = ours(ref)
    x, t, ctx, hint = inputs(model.config)
    with torch.no_grad():
        for guess_mode in (False, True):
            assert_residuals(model(x, t, ctx, hint, 0.7, guess_mode),
                             ref(x, t, ctx, hint, 0.7, guess_mode=guess_mode, return_dict=False))


def test_sd15_matches_diffusers(all_cores):
    """The real SD 1.5 ControlNet config (from_unet of SD 1.5's U-Net), one forward at a 8x8 latent."""
    cfg = from_unet(sd15_config("unet"))
    ref = diffusers_controlnet(cfg)
    model = ours(ref)
    assert model.config == ControlNetConfig()  # our defaults are SD 1.5's
    x, t, ctx, hint = inputs(model.config, batch=1)
    assert hint.shape[-1] == 64
    with torch.no_grad():
        got, want = model(x, t, ctx, hint), ref(x, t, ctx, hint, return_dict=False)
    assert len(got[0]) == 12
    assert_residuals(got, want)
    assert {k for k in model.state_dict()} == set(ref.state_dict())


def residuals_for(x: torch.Tensor, seed: int = 5):
    """Random residuals of the shapes a ControlNet gives (from our tiny ControlNet's own outputs)."""
    cn = ours(diffusers_controlnet(from_unet(TINY_UNET, **TINY_HINT), seed=seed))
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(x.shape[0], 77, 32, generator=g)
    hint = torch.rand(x.shape[0], 3, x.shape[-2] * 2, x.shape[-1] * 2, generator=g)
    with torch.no_grad():
        return cn(x, 500.0, ctx, hint)


def test_unet_with_residuals_matches_diffusers():
    ref = diffusers_unet(TINY_UNET, seed=2)
    with torch.device("meta"):
        model = UNet(UNetConfig.from_dict(dict(ref.config)))
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(2, 4, 8, 8, generator=g), torch.randn(1, 4, 16, 8, generator=g).repeat(2, 1, 1, 1)):
        ctx = torch.randn(2, 77, 32, generator=g)
        down, mid = residuals_for(x)
        with torch.no_grad():
            got = model(x, 321.0, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
            want = ref(x, 321.0, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
            plain = model(x, 321.0, ctx)
        assert_close(got, want, 1e-5)
        assert (got - plain).abs().max() > 1e-2  # the residuals do change the result


def test_deep_cache_adds_the_residuals_of_the_shallow_branch():
    """Same inputs, same residuals: DeepCache's reuse calls (the shallow branch, skips 0 and 1) reproduce the full
    pass exactly, so those skips got their residuals too."""
    with torch.device("meta"):
        model = UNet(UNetConfig.from_dict(TINY_UNET))
    model.load_state_dict(diffusers_unet(TINY_UNET, seed=2).state_dict(), strict=True, assign=True)
    g = torch.Generator().manual_seed(6)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    down, mid = residuals_for(x)
    kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    cache = DeepCache(3)
    with torch.no_grad():
        full = model(x, 500.0, ctx, **kw)
        assert all(torch.equal(model(x, 500.0, ctx, cache=cache, **kw), full) for _ in range(3))
        assert cache.calls == {(2, 77): 3} and not torch.equal(model(x, 500.0, ctx), full)


def test_residual_errors():
    with torch.device("meta"):
        unet = UNet(UNetConfig.from_dict(TINY_UNET))
        x, ctx = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32)
        with pytest.raises(ValueError, match="mid_block_additional_residual given alone"):
            unet(x, 1.0, ctx, mid_block_additional_residual=torch.zeros(1, 64, 4, 4))
        with pytest.raises(ValueError, match="5 down_block_additional_residuals for the 6 skip connections"):
            unet(x, 1.0, ctx, down_block_additional_residuals=[x] * 5, mid_block_additional_residual=x)
        cn = ControlNet(ControlNetConfig.from_unet(UNetConfig.from_dict(TINY_UNET), **TINY_HINT))
        with pytest.raises(ValueError, match=r"hint of shape \(1, 3, 8, 8\).*expected \(1, 3, 16, 16\)"):
            cn(x, 1.0, ctx, torch.zeros(1, 3, 8, 8))


# ----------------------------------------------------------------------------------------------------------------
# Loading

def test_key_table_names_the_original_sd15_keys():
    """Our SD 1.5 ControlNet's keys written in the original layout: the names lllyasviel's files use."""
    cfg = ControlNetConfig()
    with torch.device("meta"):
        sd = ControlNet(cfg).state_dict()
    original = to_original(sd, cfg)
    assert len(original) == len(sd)
    keys = {k.removeprefix(ORIGINAL_PREFIX) for k in original}
    assert {f"input_hint_block.{i}.weight" for i in range(0, 16, 2)} <= keys
    assert {f"zero_convs.{n}.0.weight" for n in range(12)} <= keys and "zero_convs.12.0.weight" not in keys
    assert {"middle_block_out.0.bias", "time_embed.2.weight", "input_blocks.0.0.weight",
            "input_blocks.11.0.out_layers.3.weight", "input_blocks.9.0.op.weight", "middle_block.1.proj_in.weight",
            "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.4.0.skip_connection.weight",
            "middle_block.2.emb_layers.1.bias"} <= keys
    assert not any(k.startswith(("output_blocks", "out.")) for k in keys)
    rows = {ours: theirs for ours, theirs, *_ in config_table(cfg)}
    assert rows["controlnet_cond_embedding.blocks.5"] == "input_hint_block.12"


def check_loaded(model: ControlNet, ref):
    x, t, ctx, hint = inputs(model.config)
    with torch.no_grad():
        assert_residuals(model(x, t, ctx, hint, 0.9), ref(x, t, ctx, hint, 0.9, return_dict=False))


@pytest.mark.parametrize("form", ["pth", "safetensors", "no-prefix", "whole-model"])
def test_load_original_layout(tiny, tmp_path, form):
    from safetensors.torch import save_file

    sd = to_original(tiny.state_dict(), ours(tiny).config)
    if form == "no-prefix":
        sd = {k.removeprefix(ORIGINAL_PREFIX): v for k, v in sd.items()}
    if form == "whole-model":  # the first control_sd15_*.pth: a whole SD model besides
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
    path = tmp_path / f"control_v11p_sd15_tiny.{'safetensors' if form == 'safetensors' else 'pth'}"
    if form == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save({"state_dict": sd}, path)
    model = load_controlnet(path, like=UNetConfig.from_dict(TINY_UNET))
    assert model.config == ours(tiny).config
    check_loaded(model, tiny)


def test_load_diffusers_folder(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "cn")
    check_loaded(load_controlnet(tmp_path / "cn"), tiny)
    tiny.save_pretrained(tmp_path / "bin", safe_serialization=False)
    check_loaded(load_controlnet(tmp_path / "bin", dtype=torch.float32), tiny)
    # a ControlNet made for another U-Net: refused, naming what differs
    with pytest.raises(CheckpointError, match=r"does not fit the model's U-Net: block_out_channels \(32, 64\) "
                                              r"\(the U-Net's \(320, 640, 1280, 1280\)\)"):
        load_controlnet(tmp_path / "cn", like=UNetConfig())


def test_sd2_and_sdxl_controlnets_refused(tmp_path):
    from safetensors.torch import save_file

    cfg = from_unet(dict(TINY_UNET, cross_attention_dim=1024), **TINY_HINT)
    sd2 = diffusers_controlnet(cfg)
    sd2.save_pretrained(tmp_path / "sd2")
    with pytest.raises(CheckpointError, match=r"sd2: looks like an SD 2.x checkpoint \(1024-wide cross-attention"):
        load_controlnet(tmp_path / "sd2")
    path = tmp_path / "control_v11p_sd21_canny.safetensors"
    save_file({k: v.contiguous() for k, v in to_original(sd2.state_dict(), ours(sd2).config).items()}, path)
    with pytest.raises(CheckpointError, match=r"control_v11p_sd21_canny.safetensors: looks like an SD 2.x"):
        load_controlnet(path)
    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "config.json").write_text('{"_class_name": "ControlNetModel", "cross_attention_dim": 2048, '
                                                 '"addition_embed_type": "text_time"}')
    with pytest.raises(CheckpointError, match=r"xl: looks like an SDXL checkpoint \(2048-wide"):
        load_controlnet(tmp_path / "xl")


def test_not_a_controlnet(tiny, tmp_path):
    from safetensors.torch import save_file

    sd = to_original(tiny.state_dict(), ours(tiny).config)
    torch.save({**sd, "control_model.input_blocks.1.7.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd.pth: ControlNet weights with no place in the model: "
                                              r"input_blocks.1.7.weight"):
        load_controlnet(tmp_path / "odd.pth")

    path = tmp_path / "unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="unet.safetensors: not a ControlNet"):
        load_controlnet(path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(CheckpointError, match="_class_name .*, expected ControlNetModel"):
        load_controlnet(tmp_path / "folder")
