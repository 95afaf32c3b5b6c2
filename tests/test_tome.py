"""Token merging (tome.py) against the tomesd package, A1111's implementation (test-only oracle), and by hand."""

import pytest
import torch

from conftest import TINY_UNET, assert_close, diffusers_unet
from stablediff import tome
from stablediff.config import UNetConfig
from stablediff.unet import UNet

ALL_LEVELS = dict(TINY_UNET, down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2)


def ours_like(ref) -> UNet:
    with torch.device("meta"):
        model = UNet(UNetConfig.from_dict(ref.config))
    model.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return model.eval()


@pytest.mark.parametrize("cfg,ratio,max_downsample", [(TINY_UNET, 0.5, 1), (ALL_LEVELS, 0.3, 1), (ALL_LEVELS, 0.5, 2)])
def test_unet_with_token_merging_matches_tomesd(cfg, ratio, max_downsample):
    tomesd = pytest.importorskip("tomesd")
    ref = diffusers_unet(cfg, seed=4)
    model = ours_like(ref)
    tomesd.apply_patch(ref, ratio=ratio, max_downsample=max_downsample, sx=2, sy=2, use_rand=False,
                       merge_attn=True, merge_crossattn=False, merge_mlp=False)  # A1111's call
    g = torch.Generator().manual_seed(5)
    # a batch of two, a grid no 2x2 cell fits exactly (13x9), and guidance's [x; x] (our first half runs alone)
    for x in (torch.randn(2, 4, 16, 16, generator=g), torch.randn(1, 4, 13, 9, generator=g),
              torch.randn(1, 4, 16, 8, generator=g).repeat(2, 1, 1, 1)):
        ctx = torch.randn(len(x), 77, 32, generator=g)
        with torch.no_grad():
            plain = model(x, 500.0, ctx)
            with tome.token_merging(model, ratio, max_downsample):
                merged = model(x, 500.0, ctx)
            expected = ref(x, 500.0, ctx).sample
        assert_close(merged, expected, 1e-5)
        assert (merged - plain).abs().max() > 1e-3  # merging changed something the oracle agrees with
        assert torch.equal(model(x, 500.0, ctx), plain)  # the hooks are gone after the block


def test_ratio_zero_is_bit_identical():
    model = ours_like(diffusers_unet(TINY_UNET, seed=6))
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        plain = model(x, 10.0, ctx)
        with tome.token_merging(model, 0.0):
            assert all(b.merging is None for b in tome.merged_blocks(model))
            assert torch.equal(model(x, 10.0, ctx), plain)


def test_matching_by_hand():
    # a 2x4 grid: destinations are the top-left tokens of its two 2x2 cells, positions 0 and 2
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.1],
                       [2.0, 0.2], [0.1, 1.0], [1.0, 1.0], [0.0, 3.0]]])
    m = tome.bipartite_soft_matching(x, 2, 4, r=2)
    assert m.dst.tolist() == [0, 2] and m.src.tolist() == [1, 3, 4, 5, 6, 7]
    # sources 1 and 7 point exactly along destination 2 ([0, 1]); they merge into it
    assert sorted(m.src[m.merged[0]].tolist()) == [1, 7] and m.into.tolist() == [[1, 1]]
    merged = m.merge(x)
    # kept: 3, 4, 5, 6 (in order of similarity), then destination 0 alone, destination 2 averaged with 1 and 7
    assert merged.shape == (1, 6, 2)
    assert torch.allclose(merged[0, -2:], torch.tensor([[1.0, 0.0], [0.0, 5.0 / 3]]))
    back = m.unmerge(merged)
    assert torch.equal(back[0, [1, 2, 7]], merged[0, -1].expand(3, 2))
    assert torch.equal(back[0, [0, 3, 4, 5, 6]], x[0, [0, 3, 4, 5, 6]])


@pytest.mark.parametrize("ratio", [-0.1, 0.95, float("nan"), True, "0.5"])
def test_bad_ratio_is_refused(ratio):
    model = ours_like(diffusers_unet(TINY_UNET))
    with pytest.raises(ValueError, match="token merging ratio"):
        with tome.token_merging(model, ratio):
            pass


def test_the_setting_round_trips_and_is_written_as_a1111_writes_it():
    from stablediff.cli import build_parser
    from stablediff.params import GenerationParams

    p = GenerationParams(prompt="a", seed=3, width=512, height=512, token_merging_ratio=0.3).validate()
    text = p.to_infotext(version="0.1.0")
    assert ", Token merging ratio: 0.3, " in text
    assert GenerationParams.from_infotext(text)[0].validate() == p
    assert "Token merging ratio" not in p.replace(token_merging_ratio=0.0).to_infotext()
    assert GenerationParams.from_a1111(p.to_a1111()).validate() == p
    assert GenerationParams.from_row(p.to_row()) == p
    assert GenerationParams.from_args(build_parser().parse_args(["generate", *p.to_argv()])).validate() == p
    # A1111's option, sent in override_settings; its request field wins over it
    body = {"prompt": "a", "override_settings": {"token_merging_ratio": 0.5}}
    assert GenerationParams.from_a1111(body).token_merging_ratio == 0.5
    assert GenerationParams.from_a1111({**body, "token_merging_ratio": 0.2}).token_merging_ratio == 0.2
    # with hires fix A1111 writes the hires pass's ratio too (the same one here): read back, not reported unused
    hr = p.replace(enable_hr=True, strength=0.5).validate()
    text = hr.to_infotext(version="0.1.0")
    assert "Token merging ratio: 0.3, Token merging ratio hr: 0.3" in text
    back, unknown = GenerationParams.from_infotext(text)
    assert back.validate() == hr and "Token merging ratio hr" not in unknown
    _, unknown = GenerationParams.from_infotext(text.replace("ratio hr: 0.3", "ratio hr: 0.5"))
    assert unknown["Token merging ratio hr"] == "0.5"


@pytest.mark.parametrize("ratio", [-0.5, 0.91, float("inf"), "x"])
def test_the_setting_is_range_checked(ratio):
    from stablediff.params import GenerationParams

    with pytest.raises(ValueError, match=r"token merging ratio .* is outside 0\.\.0\.9"):
        GenerationParams(token_merging_ratio=ratio).validate()


def test_pipeline_applies_it_and_leaves_the_unet_as_it_was(tiny_model_dir):
    from stablediff.pipeline import StableDiffusion

    pipe = StableDiffusion.from_pretrained(tiny_model_dir)
    run = dict(prompt="a red circle", steps=2, seed=1, width=64, height=64)
    plain = pipe(**run).latents
    merged = pipe(**run, token_merging_ratio=0.5)
    assert (merged.latents - plain).abs().max() > 1e-4
    assert "Token merging ratio: 0.5" in merged.infotexts[0]
    assert all(b.merging is None for b in tome.merged_blocks(pipe.unet, 8))
    assert torch.equal(pipe(**run).latents, plain)


def test_the_server_takes_a1111s_option_override_and_request_field():
    from pydantic import ValidationError

    from stablediff.limits import Limits
    from stablediff.serve.sdapi import OverrideSettings, Txt2ImgRequest, check_request

    def ratio(settings=None, **body):
        return check_request(Txt2ImgRequest(prompt="a", steps=2, **body), Limits(), 512,
                             settings=settings).params.token_merging_ratio

    assert ratio() == 0.0
    assert ratio({"token_merging_ratio": 0.3}) == 0.3  # POST /options
    assert ratio({"token_merging_ratio": 0.3}, override_settings={"token_merging_ratio": 0.5}) == 0.5
    assert ratio({"token_merging_ratio": 0.3}, token_merging_ratio=0.2) == 0.2
    with pytest.raises(ValidationError, match="token_merging_ratio"):
        OverrideSettings(token_merging_ratio=0.95)
