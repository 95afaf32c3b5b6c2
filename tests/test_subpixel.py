"""Nearest 2x upsampling + 3x3 convolution as four 2x2 phase convolutions (nn.upsample_conv3x3): equal to the
reference F.conv2d(F.interpolate(x)); nn.Upsample offers it to tuning.py; TAESD's decoder uses it; previews decode
in bfloat16 only where the CPU has bfloat16 units."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stablediff import cpu, images, tuning
from stablediff import nn as snn
from stablediff.taesd import TinyAutoencoder, TinyAutoencoderConfig, to_original

LAYOUTS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}


def reference(x, weight, bias):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def random_layer(n, c, k, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=gen), torch.randn(k, c, 3, 3, generator=gen) / (3 * c ** 0.5),
            torch.randn(k, generator=gen))


def test_phase_weight_sums_the_taps_that_read_one_source_pixel():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # w[i, j] = 3i + j
    # phase (a, b): rows of parity a take taps (0 | 1, 2) for a = 0 and (0, 1 | 2) for a = 1; columns alike
    want = torch.tensor([[[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]],
                         [[0 + 1, 2], [3 + 4 + 6 + 7, 5 + 8]],
                         [[0 + 3, 1 + 2 + 4 + 5], [6, 7 + 8]],
                         [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]], dtype=torch.float32)
    assert torch.equal(snn.phase_weight(w), want[:, None])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,c,k,h,w", [(1, 8, 16, 6, 6), (2, 5, 3, 7, 5), (1, 4, 4, 1, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_upsample_conv3x3_is_the_reference(layout, n, c, k, h, w, with_bias):
    x, weight, bias = random_layer(n, c, k, h, w)
    x = x.contiguous(memory_format=LAYOUTS[layout])
    bias = bias if with_bias else None
    want = reference(x, weight, bias)
    got = snn.upsample_conv3x3(x, weight, bias)
    assert got.shape == (n, k, 2 * h, 2 * w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if h * w > 1:
        assert got.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_upsample_conv3x3_in_bfloat16_is_near_the_float32_reference(layout):
    x, weight, bias = random_layer(2, 32, 24, 9, 8, seed=1)
    want = reference(x, weight, bias)
    got = snn.upsample_conv3x3(x.bfloat16().contiguous(memory_format=LAYOUTS[layout]), weight.bfloat16(),
                               bias.bfloat16())
    assert got.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits: inputs, weights and the result each rounded by at most 2^-9 relative
    assert (got.float() - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.fixture
def memory_tuning(tuned, monkeypatch):
    monkeypatch.setenv(tuning.ENV, "memory")


@pytest.mark.parametrize("way", ["upsample", "subpixel"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_upsample_offers_both_ways_and_each_is_the_reference(memory_tuning, monkeypatch, way, layout):
    up = snn.Upsample(8)
    x = random_layer(2, 8, 8, 5, 6)[0].contiguous(memory_format=LAYOUTS[layout])
    offered = []
    monkeypatch.setattr(tuning, "decide", lambda times: offered.append(list(times)) or way)
    with torch.no_grad():
        want = reference(x, up.conv.weight, up.conv.bias)
        torch.testing.assert_close(up(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(up(x), want, rtol=1e-5, atol=1e-5)  # the remembered way, no second timing
    assert offered == [["upsample", "subpixel"]]
    # the folded weight made for the timing is kept only where the phase way won
    assert (up.phases is not None) == (way == "subpixel")


def test_upsample_follows_a_changed_weight(memory_tuning, monkeypatch):
    """The folded weight is remade when the conv's weight changes in place (a LoRA merge)."""
    monkeypatch.setattr(tuning, "decide", lambda times: "subpixel")
    up = snn.Upsample(4)
    x = random_layer(1, 4, 4, 4, 4)[0]
    with torch.no_grad():
        up(x)
        up.conv.weight.mul_(-2)
        torch.testing.assert_close(up(x), reference(x, up.conv.weight, up.conv.bias), rtol=1e-5, atol=1e-5)


def test_upsample_without_tuning_an_explicit_size_or_circular_padding_is_not_timed(monkeypatch, memory_tuning):
    monkeypatch.setattr(tuning, "pick", lambda *a: pytest.fail("timed"))
    up = snn.Upsample(4)
    x = random_layer(1, 4, 4, 5, 5)[0]
    with torch.no_grad():
        torch.testing.assert_close(up(x, size=(11, 9)), F.conv2d(F.interpolate(x, size=(11, 9)), up.conv.weight,
                                                                   up.conv.bias, padding=1))
        with snn.circular_padding([up]):
            up2x = F.interpolate(x, scale_factor=2.0)
            want = F.conv2d(F.pad(up2x, (1, 1, 1, 1), mode="circular"), up.conv.weight, up.conv.bias)
            torch.testing.assert_close(up(x), want)
        monkeypatch.setenv(tuning.ENV, "off")
        torch.testing.assert_close(up(x), reference(x, up.conv.weight, up.conv.bias))


def random_taesd(seed=0):
    torch.manual_seed(seed)
    return TinyAutoencoder(TinyAutoencoderConfig(), encoder=False).eval()


def test_taesd_decoder_fuses_upsampling_into_its_convolutions():
    model = random_taesd()
    z = torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.decode(z)
        x = (torch.tanh(z / 3) * 3).contiguous(memory_format=torch.channels_last)
        want = model.decoder.layers(x) * 2 - 1  # the Sequential as it stands, upsampled tensors and all
    assert got.shape == (1, 3, 40, 48)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_previews_decode_in_bfloat16_only_where_the_cpu_has_it(tiny_model_dir, tmp_path, monkeypatch, native):
    from stablediff import StableDiffusion

    model = random_taesd(seed=2)
    save_file(to_original(model.state_dict(), model.config)["decoder"], tmp_path / "taesd_decoder.safetensors")
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    pipe = StableDiffusion.from_pretrained(tiny_model_dir)
    pipe.load_preview_decoder(tmp_path / "taesd_decoder.safetensors")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = np.asarray(images.to_pil(model.decode(z))[0]).astype(int)
    preview = np.asarray(pipe.preview(z)[0]).astype(int)
    assert next(pipe.taesd.parameters()).dtype == torch.float32  # the model itself (taesd_output decodes) stays
    assert (pipe._preview_taesd is not None) == native
    if native:
        assert next(pipe._preview_taesd[1].parameters()).dtype == torch.bfloat16
        assert 0 < np.abs(preview - full).max() <= 4
    else:
        assert np.array_equal(preview, full)


@pytest.mark.parametrize("native", [True, False])
def test_previews_on_the_cpu_decode_pooled_latents_at_the_image_size(tiny_model_dir, tmp_path, monkeypatch, native):
    """From PREVIEW_POOL_FROM latents per side a CPU preview decodes the 2x2 means (odd sides: the last row and
    column alone) and scales the decode back up: in bfloat16 with bfloat16 units, else in float32; under that side
    the whole latents decode."""
    from stablediff import StableDiffusion, pipeline

    model = random_taesd(seed=5)
    save_file(to_original(model.state_dict(), model.config)["decoder"], tmp_path / "taesd_decoder.safetensors")
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    pipe = StableDiffusion.from_pretrained(tiny_model_dir)
    pipe.load_preview_decoder(tmp_path / "taesd_decoder.safetensors")
    assert (pipe._preview_taesd is not None) == native
    decoder, dtype = (pipe._preview_taesd[1], torch.bfloat16) if native else (model, torch.float32)
    z = torch.randn(1, 4, pipeline.PREVIEW_POOL_FROM + 1, 18, generator=torch.Generator().manual_seed(6))
    preview = pipe.preview(z)[0]
    assert preview.size == (18 * 8, (pipeline.PREVIEW_POOL_FROM + 1) * 8)
    pooled = torch.cat([torch.cat([z[..., i:i + 2, j:j + 2].mean((-2, -1), keepdim=True)
                                   for j in range(0, 18, 2)], -1) for i in range(0, z.shape[-2], 2)], -2)
    assert pooled.shape[-2:] == (9, 9) and torch.equal(pooled[..., -1, :], (z[..., -1, ::2] + z[..., -1, 1::2]) / 2)
    with torch.no_grad():
        decoded = decoder.decode(pooled.to(dtype)).float()
    want = F.interpolate(decoded, size=preview.size[::-1], mode="bilinear", align_corners=False)
    got = np.asarray(preview).astype(int)
    assert np.abs(got - np.asarray(images.to_pil(want)[0]).astype(int)).max() <= 1
    small = torch.randn(1, 4, pipeline.PREVIEW_POOL_FROM - 1, 8)  # under the threshold: decoded whole
    with torch.no_grad():
        whole = decoder.decode(small.to(dtype)).float()
    got = np.asarray(pipe.preview(small)[0]).astype(int)
    assert got.shape == (whole.shape[-2], 64, 3) and np.abs(got - np.asarray(images.to_pil(whole)[0])).max() <= 1
