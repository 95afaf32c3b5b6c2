"""The probed CPU fast paths: each can be forced off ($STABLEDIFF_DISABLE), none raises where its kernel is missing,
and the pipeline's results stay within the exact path's bounds with every path off. bfloat16 runs end to end on
whatever CPU runs the tests."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from stablediff import StableDiffusion, cpu, malloc, winograd
from stablediff.nn import Conv2d

NATIVE_BF16 = cpu.native_bf16  # the probe itself (conftest's autouse fixture stands in for it)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def no_onednn_bf16(monkeypatch):
    """A CPU without oneDNN's bfloat16 convolution (AVX2 only): the reorder raises as it does there."""
    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_conv2d_weight: bf16 path needs the cpu support avx_ne_convert or "
                           "avx512bw, avx512vl and avx512dq")

    cpu.onednn_bf16_convolution.cache_clear()
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", refuse)
    yield
    cpu.onednn_bf16_convolution.cache_clear()


def test_disable_names_paths_and_refuses_unknown_ones(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "")
    assert all(cpu.enabled(p) for p in cpu.PATHS)
    monkeypatch.setenv(cpu.ENV, " Winograd , im2col")
    assert [p for p in cpu.PATHS if not cpu.enabled(p)] == ["winograd", "im2col"]
    monkeypatch.setenv(cpu.ENV, "all")
    assert not any(cpu.enabled(p) for p in cpu.PATHS)
    monkeypatch.setenv(cpu.ENV, "winograd,avx9000")
    with pytest.warns(RuntimeWarning, match="STABLEDIFF_DISABLE='winograd,avx9000': unknown path 'avx9000' ignored"):
        assert not cpu.enabled("winograd") and cpu.enabled("im2col")


def test_each_convolution_path_can_be_forced_off(monkeypatch):
    wide = Conv2d(320, 320, 3, padding=1)
    deep = Conv2d(1280, 1280, 3, padding=1)
    packed = Conv2d(2560, 8, 3, padding=1).bfloat16()
    x320, x1280, x2560 = torch.empty(2, 320, 16, 16), torch.empty(2, 1280, 4, 4), torch.empty(1, 2560, 4, 4)
    with torch.no_grad():
        assert winograd.applies(wide, x320) and deep._unfolds(x1280)
        assert packed._packs(x2560.bfloat16()) == cpu.onednn_bf16_convolution()
        monkeypatch.setenv(cpu.ENV, "winograd,im2col,packed")
        assert not winograd.applies(wide, x320) and not deep._unfolds(x1280) and not packed._packs(x2560.bfloat16())


def test_bf16_convolution_falls_back_where_onednn_lacks_it(no_onednn_bf16):
    assert not cpu.onednn_bf16_convolution()
    torch.manual_seed(0)
    conv = Conv2d(2560, 8, 3, padding=1).bfloat16()
    x = torch.randn(2, 2560, 4, 4).bfloat16()
    with torch.no_grad():
        y = conv(x)  # raised RuntimeError on AVX2 CPUs before the probe
        assert conv.packed is None and torch.equal(y, F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_bf16_without_cpu_units_runs_float32_and_says_so_once(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    cpu._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="dtype bfloat16: this CPU has no bfloat16 units .* running float32"):
        pipe = StableDiffusion.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert pipe.dtype == torch.float32 and pipe.vae.post_quant_conv.weight.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second load says nothing more
        StableDiffusion.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    assert cpu.cpu_dtype(torch.bfloat16) == torch.bfloat16 and cpu.cpu_dtype(torch.float16) == torch.float16


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    for flags, native in ((frozenset({"avx2", "fma"}), False), (frozenset({"avx512f", "avx512_bf16"}), True),
                          (frozenset({"avx2", "avx_ne_convert"}), True), (frozenset({"amx_bf16"}), True)):
        NATIVE_BF16.cache_clear()
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        assert NATIVE_BF16() == native
    NATIVE_BF16.cache_clear()


def test_malloc_tuning_can_be_forced_off(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "malloc")
    assert malloc.keep_freed_memory() is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pipeline_with_every_path_off_stays_within_the_exact_bounds(monkeypatch, tiny_model_dir, dtype):
    """Every fast path forced off, against the default paths: float32 within the parity bound the pipeline tests
    use against diffusers (5e-4), bfloat16 within its own bound against float32 (5%). CI runs this in bfloat16
    on whatever CPU it has (the probe picks oneDNN's packed path or F.conv2d)."""
    exact = StableDiffusion.from_pretrained(tiny_model_dir)("a cat", steps=4, seed=2, width=64, height=80)
    fast = StableDiffusion.from_pretrained(tiny_model_dir, dtype=dtype, vae_dtype=dtype)
    a = fast("a cat", steps=4, seed=2, width=64, height=80)
    monkeypatch.setenv(cpu.ENV, "all")
    plain = StableDiffusion.from_pretrained(tiny_model_dir, dtype=dtype, vae_dtype=dtype)
    assert plain.unet.conv_in.weight.is_contiguous()  # channels_last off too
    b = plain("a cat", steps=4, seed=2, width=64, height=80)
    bound = 5e-4 if dtype == torch.float32 else 0.05
    assert rel(a.latents, exact.latents) < bound and rel(b.latents, exact.latents) < bound
    assert torch.isfinite(a.latents).all() and a.images[0].size == (64, 80)


@pytest.mark.parametrize("shape,bias", [((2, 1100, 40), True), ((2100, 24), False), ((1, 2, 1030, 16), True)])
def test_linear_by_onednn_equals_the_blas_product(monkeypatch, shape, bias):
    """A float32 nn.Linear large enough to be tuned runs by oneDNN's matrix product where tuning chose it (forced
    here) and gives F.linear's numbers; with the path off, tuning off or too little work it is F.linear itself."""
    from stablediff import nn as snn
    from stablediff import tuning

    gen = torch.Generator().manual_seed(0)
    layer = snn.Linear(shape[-1], 56, bias=bias)
    x = torch.randn(shape, generator=gen)
    calls = []
    real = cpu.onednn_linear
    monkeypatch.setattr(cpu, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(snn, "TUNED_LINEAR_MACS", 1000)
    monkeypatch.setattr(tuning, "decide", lambda times: list(times)[-1])  # the last way offered wins
    monkeypatch.setenv(tuning.ENV, "memory")
    monkeypatch.setenv(cpu.ENV, "")
    tuning.forget()
    with torch.no_grad():
        exact = F.linear(x, layer.weight, layer.bias)
        fast = layer(x)
        assert calls and fast.shape == exact.shape and cpu.onednn_matmul()
        torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5)
        for off in (lambda: monkeypatch.setenv(cpu.ENV, "onednn_linear"), lambda: monkeypatch.setenv(tuning.ENV, "off"),
                    lambda: monkeypatch.setattr(snn, "TUNED_LINEAR_MACS", x.numel() * 56 + 1)):
            off()
            calls.clear()
            assert torch.equal(layer(x), exact) and not calls
            monkeypatch.setenv(cpu.ENV, "")
            monkeypatch.setenv(tuning.ENV, "memory")
            monkeypatch.setattr(snn, "TUNED_LINEAR_MACS", 1000)
    tuning.forget()
