"""The speed paths: Winograd and reordered-weight convolutions, channels-last bfloat16, the bfloat16 VAE and
torch.compile.
Each must give the exact path's numbers (bit-equal where the arithmetic is the same, else within a stated bound)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stablediff import StableDiffusion, cpu, winograd
from stablediff.nn import Conv2d, conv3x3_im2col


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("n, c, k, h, w, bias, budget, kernel_budget", [
    (2, 64, 64, 16, 16, True, None, None),  # one piece, sizes divisible by the 4x4 tile
    (1, 65, 70, 13, 7, True, None, None),  # odd sizes: padded to whole tiles, cropped back
    (2, 32, 48, 9, 22, False, None, None),  # no bias
    (3, 16, 8, 33, 17, True, 1 << 16, None),  # rows of tiles in pieces, U whole
    (2, 96, 80, 8, 8, True, None, 1 << 16),  # one row piece: U in pieces of KERNEL_BUDGET (4 channels each)
    (2, 96, 80, 8, 8, True, 1 << 16, 1 << 30),  # row pieces: U in pieces of BUDGET, transformed for each row piece
    (1, 8, 8, 2, 5, False, 1, 1),  # one row of tiles and one output channel at a time
    (1, 4, 4, 1, 1, True, None, None),
])
@pytest.mark.parametrize("tile", [4, 2])
@pytest.mark.parametrize("onednn", [False, True])
def test_winograd_convolution_equals_the_direct_one(n, c, k, h, w, bias, budget, kernel_budget, tile, onednn,
                                                    monkeypatch):
    """Either product (the BLAS's batched one, or oneDNN's per position) gives the convolution."""
    if onednn and not cpu.onednn_matmul():
        pytest.skip("oneDNN's float32 product does not run here")
    if budget:
        monkeypatch.setattr(winograd, "BUDGET", budget)
    if kernel_budget:
        monkeypatch.setattr(winograd, "KERNEL_BUDGET", kernel_budget)
    g = torch.Generator().manual_seed(n * c + h)
    x, weight = torch.randn(n, c, h, w, generator=g), torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)
    b = torch.randn(k, generator=g) if bias else None
    exact = F.conv2d(x.double(), weight.double(), b.double() if bias else None, padding=1)
    y = winograd.conv3x3(x, weight, b, tile=tile, onednn=onednn)
    assert y.shape == exact.shape and y.is_contiguous()
    # F(4x4, 3x3) in float32: about 10x the direct convolution's rounding error (which this CPU's kernels set);
    # F(2x2, 3x3) about the same as the direct one's
    direct = rel(F.conv2d(x, weight, b, padding=1), exact)
    assert rel(y, exact) < (max(5e-6, 20 * direct) if tile == 4 else max(1e-6, 4 * direct))


def test_winograd_runs_only_where_it_gains():
    def used(conv, shape, dtype=torch.float32):
        return winograd.applies(conv.to(dtype), torch.empty(shape, dtype=dtype))
    wide = Conv2d(320, 320, 3, padding=1)
    assert used(wide, (2, 320, 16, 16)) and used(wide, (1, 320, 64, 64))  # SD U-Net top level, VAE
    assert not used(wide, (2, 320, 8, 8))  # 128 pixels: the kernel transform would cost more than it saves
    assert used(Conv2d(128, 128, 3, padding=1), (1, 128, 128, 128))  # VAE's last level
    assert not used(Conv2d(128, 128, 3, padding=1), (2, 128, 32, 32))
    assert not used(Conv2d(64, 64, 3, padding=1), (2, 64, 256, 256))  # too few channels at any size
    assert not used(Conv2d(320, 320, 3, padding=1, stride=2), (2, 320, 64, 64))  # the downsamplers
    assert not used(Conv2d(320, 320, 1), (2, 320, 64, 64))
    assert not used(wide, (2, 320, 64, 64), torch.bfloat16)  # bfloat16 has AMX: oneDNN's direct kernel


@pytest.mark.parametrize("n, c, k, h, w, stride, bias", [
    (2, 24, 16, 8, 8, 1, True),  # the guided batch at SD 1.5's 8x8 level, in miniature
    (1, 16, 24, 4, 4, 1, False),  # one image: the unfolded input is used in place
    (3, 8, 8, 5, 7, 1, True),  # odd sizes
    (2, 16, 16, 16, 16, 2, True),  # a downsampler: stride 2
    (1, 8, 12, 7, 9, 2, False),  # stride 2, odd sizes: the output rounds up
    (2, 8, 8, 1, 1, 1, True),
])
def test_im2col_convolution_equals_the_direct_one(n, c, k, h, w, stride, bias):
    g = torch.Generator().manual_seed(n * c + h + stride)
    x, weight = torch.randn(n, c, h, w, generator=g), torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)
    b = torch.randn(k, generator=g) if bias else None
    exact = F.conv2d(x.double(), weight.double(), b.double() if bias else None, stride=stride, padding=1)
    direct = rel(F.conv2d(x, weight, b, stride=stride, padding=1), exact)
    for x_last, w_last in ((False, False), (True, False), (False, True), (True, True)):
        xs = x.contiguous(memory_format=torch.channels_last) if x_last else x
        ws = weight.contiguous(memory_format=torch.channels_last) if w_last else weight
        y = conv3x3_im2col(xs, ws, b, stride)
        # the output keeps x's layout (channels-last where x is, except where both layouts are one: 1x1 images)
        assert y.shape == exact.shape and (y.is_contiguous(memory_format=torch.channels_last) if x_last
                                           else y.is_contiguous())
        # the direct algorithm's sums, in another order: the same size of rounding error as this CPU's direct kernel
        assert rel(y, exact) < max(5e-7, 4 * direct)


@pytest.mark.parametrize("stride", [1, 2])
def test_im2col_convolution_in_bfloat16_equals_the_direct_one(stride):
    """bfloat16, channels-last as the pipeline runs it: within the direct bfloat16 convolution's own error."""
    g = torch.Generator().manual_seed(stride)
    x, weight, b = torch.randn(2, 32, 6, 6, generator=g), torch.randn(48, 32, 3, 3, generator=g) / 17, torch.randn(48)
    exact = F.conv2d(x.double(), weight.double(), b.double(), stride=stride, padding=1)
    xs, ws = (t.bfloat16().contiguous(memory_format=torch.channels_last) for t in (x, weight))
    y = conv3x3_im2col(xs, ws, b.bfloat16(), stride)
    direct = F.conv2d(xs, ws, b.bfloat16(), stride=stride, padding=1)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert rel(y.double(), exact) < 2 * rel(direct.double(), exact) + 1e-3


def test_im2col_runs_on_the_wide_layers_with_few_output_pixels():
    def unfolds(conv, shape, dtype=torch.float32):
        return conv.to(dtype)._unfolds(torch.empty(shape, dtype=dtype))
    wide = Conv2d(1280, 1280, 3, padding=1)
    assert unfolds(wide, (2, 1280, 8, 8)) and unfolds(wide, (2, 1280, 4, 4)) and unfolds(wide, (1, 1280, 8, 8))
    assert unfolds(Conv2d(2560, 1280, 3, padding=1), (2, 2560, 8, 8))  # an up level's first layer
    assert not unfolds(wide, (2, 1280, 16, 16)) and winograd.applies(wide, torch.empty(2, 1280, 16, 16))
    assert not unfolds(wide, (4, 1280, 8, 8))  # 256 output pixels: oneDNN
    assert not unfolds(Conv2d(640, 1280, 3, padding=1), (2, 640, 8, 8))  # too few channels to gain
    assert not unfolds(Conv2d(1280, 640, 3, padding=1), (2, 1280, 8, 8))
    down = Conv2d(1280, 1280, 3, stride=2, padding=1)
    assert unfolds(down, (2, 1280, 16, 16)) and not unfolds(down, (2, 1280, 32, 32))  # by output pixels
    assert not unfolds(Conv2d(1280, 1280, 1), (2, 1280, 8, 8))
    # bfloat16 too, where the CPU has bfloat16 units (elsewhere its matrix product is emulated)
    assert unfolds(wide, (2, 1280, 8, 8), torch.bfloat16) == cpu.native_bf16()
    assert not unfolds(Conv2d(1280, 1280, 3, stride=2, padding=0), (2, 1280, 9, 9))  # the VAE's padded downsampler


def test_winograd_unet_matches_the_direct_one(monkeypatch, winograd_inputs):
    """Every 3x3 layer of a tiny U-Net by Winograd (thresholds lowered) against the same U-Net without it."""
    from conftest import TINY_UNET
    from stablediff.config import UNetConfig
    from stablediff.unet import UNet

    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_dict(TINY_UNET)).eval()
    for p in unet.parameters():  # random weights large enough that every layer matters
        p.data.normal_(0, 0.05)
    x, ctx = torch.randn(2, 4, 16, 12), torch.randn(2, 77, TINY_UNET["cross_attention_dim"])
    with torch.no_grad():
        monkeypatch.setattr(winograd, "THRESHOLDS", ())
        direct = unet(x, 500.0, ctx)
        assert not winograd_inputs
        monkeypatch.setattr(winograd, "THRESHOLDS", ((1, 1),))
        fast = unet(x, 500.0, ctx)
    # the resnets' and upsamplers' 3x3 convolutions (conv_in, conv_out are plain nn.Conv2d; downsamplers stride 2)
    assert len(winograd_inputs) == sum(isinstance(m, Conv2d) and m.stride == (1, 1) for m in unet.modules())
    assert 0 < rel(fast, direct) < 5e-6


def test_im2col_unet_matches_the_direct_one(monkeypatch):
    """Every padded 3x3 layer of a tiny U-Net (stride 1 and 2) as one matrix product, thresholds lowered."""
    from conftest import TINY_UNET
    from stablediff import nn as snn
    from stablediff.config import UNetConfig
    from stablediff.unet import UNet

    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_dict(TINY_UNET)).eval()
    for p in unet.parameters():
        p.data.normal_(0, 0.05)
    x, ctx = torch.randn(2, 4, 16, 12), torch.randn(2, 77, TINY_UNET["cross_attention_dim"])
    calls, im2col = [], snn.conv3x3_im2col
    monkeypatch.setattr(winograd, "THRESHOLDS", ())
    with torch.no_grad():
        direct = unet(x, 500.0, ctx)
        assert not calls
        monkeypatch.setattr(snn, "conv3x3_im2col", lambda x, *a: calls.append(a[-1]) or im2col(x, *a))
        monkeypatch.setattr(snn, "UNFOLD_CHANNELS", 1)
        monkeypatch.setattr(snn, "UNFOLD_PIXELS", 1 << 30)
        fast = unet(x, 500.0, ctx)
    assert sorted(set(calls)) == [1, 2] and len(calls) == sum(isinstance(m, Conv2d) for m in unet.modules())
    assert 0 < rel(fast, direct) < 1e-6


def test_wide_low_resolution_bf16_convs_reuse_a_reordered_weight_and_stay_exact():
    torch.manual_seed(0)
    conv = Conv2d(2560, 16, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(2, 2560, 4, 4).to(torch.bfloat16)
    with torch.no_grad():
        y = conv(x)
        key, packed = conv.packed
        assert key[0] == (2, 2560, 4, 4) and packed.is_mkldnn
        assert torch.equal(y, F.conv2d(x, conv.weight, conv.bias, padding=1))
        assert conv(x).equal(y) and conv.packed[1] is packed  # reused, not rebuilt
        conv.weight.mul_(2)  # e.g. a LoRA merged in place: the reordered copy is rebuilt
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
        assert conv.packed[1] is not packed
        x2 = torch.randn(1, 2560, 6, 6).to(torch.bfloat16)  # another shape: rebuilt for it
        assert torch.equal(conv(x2), F.conv2d(x2, conv.weight, conv.bias, padding=1))
        assert conv.packed[0][0] == (1, 2560, 6, 6)
        # channels-last input: oneDNN's own kernels for the two layouts may round differently (they do on some
        # CPUs); the packed result is bit-equal to one of them, or no further from either than they are apart
        x_cl = x.contiguous(memory_format=torch.channels_last)
        refs = [F.conv2d(v, conv.weight, conv.bias, padding=1) for v in (x, x_cl)]
        y_cl = conv(x_cl)
        apart = (refs[0] - refs[1]).abs().max()
        assert any(torch.equal(y_cl, r) for r in refs) or all((y_cl - r).abs().max() <= apart for r in refs)
    # not packed: float32, training (gradients), narrow layers at any size
    for layer, inp, grad in ((Conv2d(2560, 4, 3, padding=1), torch.randn(1, 2560, 4, 4), False),
                             (Conv2d(2560, 4, 3, padding=1).bfloat16(), x, True),
                             (Conv2d(320, 4, 3, padding=1).bfloat16(), torch.randn(1, 320, 4, 4).bfloat16(), False)):
        with torch.set_grad_enabled(grad):
            layer(inp)
        assert layer.packed is None


def test_bf16_unet_is_channels_last_on_cpu_and_matches_float32(tiny_model_dir):
    exact = StableDiffusion.from_pretrained(tiny_model_dir)
    fast = StableDiffusion.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, vae_dtype=torch.bfloat16)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert exact.unet.conv_in.weight.is_contiguous()  # float32 stays channels-first (faster there)
    assert fast.vae.post_quant_conv.weight.dtype == torch.bfloat16
    a, b = fast("a cat", steps=4, seed=2), exact("a cat", steps=4, seed=2)
    assert ((a.latents - b.latents).norm() / b.latents.norm()).item() < 0.05
    # the bfloat16 VAE's decode of the same latents: within a few levels of 255 of the float32 decode
    pa, pb = fast.decode(b.latents), exact.decode(b.latents)
    assert pa.dtype == torch.float32
    assert 0 < (pa - pb).abs().mean().item() * 127.5 < 3
    with pytest.raises(ValueError, match="vae_dtype torch.float16"):
        StableDiffusion.from_pretrained(tiny_model_dir, vae_dtype=torch.float16)


@pytest.mark.slow
def test_compile_keeps_the_image(tiny_model_dir):
    pytest.importorskip("torch._inductor")
    exact = StableDiffusion.from_pretrained(tiny_model_dir)
    compiled = StableDiffusion.from_pretrained(tiny_model_dir).compile()
    kw = dict(steps=3, seed=5, width=64, height=64)
    a, b = compiled("a cat", **kw), exact("a cat", **kw)
    assert ((a.latents - b.latents).norm() / b.latents.norm()).item() < 1e-4


@pytest.mark.slow
def test_compile_runs_a_convolution_that_eager_runs_by_winograd():
    """SD 1.5's wide layers take Winograd (or another way of ours) in eager mode; inductor cannot trace those into
    its graph (it raised on Winograd's out= add), so a compiled model runs torch's own convolution."""
    pytest.importorskip("torch._inductor")
    conv = Conv2d(128, 128, 3, padding=1)
    x = torch.randn(1, 128, 96, 96, generator=torch.Generator().manual_seed(0))
    assert winograd.applies(conv, x)  # eager's fixed rule takes Winograd here
    with torch.no_grad():
        want = F.conv2d(x, conv.weight, conv.bias, padding=1)
        got = torch.compile(conv, dynamic=False)(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_release_drops_mapped_weights_from_memory_but_never_a_change_written_to_them(tiny_model_dir):
    from stablediff import weights

    pipe = StableDiffusion.from_pretrained(tiny_model_dir)
    kw = dict(steps=2, seed=1)
    first = pipe("a cat", **kw)  # releases the text encoder after encoding and the U-Net before decoding
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert weights.release(pipe.unet) > 0
    assert all(v.equal(before[k]) for k, v in pipe.unet.state_dict().items())  # paged back in from the file
    assert pipe("a cat", **kw).latents.equal(first.latents)
    # a weight written in place (as a merged LoRA is) keeps its change: it is never released
    big = max(pipe.unet.parameters(), key=lambda p: p.numel())
    with torch.no_grad():
        big.add_(1.0)
    changed = big.clone()
    weights.release(pipe.unet)
    assert big.equal(changed)
    assert not weights.release(StableDiffusion.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).unet)  # a copy


_CYCLE = r"""
import resource, sys, threading
from stablediff import malloc
if sys.argv[1] == "keep" and not malloc.keep_freed_memory():  # (before torch's import, as the CLI does)
    sys.exit("not glibc")
import torch
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def cycle(n):  # what a U-Net step does: allocate, write and free large buffers, again and again
    for _ in range(n):
        x = torch.empty(64 << 20, dtype=torch.uint8)
        x.fill_(1)
        del x
def steady():  # the faults of 10 cycles once the heap has settled (it grows for the first few)
    cycle(30)
    f0 = faults()
    cycle(10)
    out.append(faults() - f0)
out = []
steady()
t = threading.Thread(target=steady)  # (the server runs its jobs on a thread)
t.start()
t.join()
before = rss()
malloc.return_freed_memory()
print(*out, (before - rss()) >> 20)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="Linux only")
def test_keep_freed_memory_reuses_large_buffers_without_page_faults_and_gives_them_back():
    import subprocess
    import sys

    def run(mode):
        out = subprocess.run([sys.executable, "-c", _CYCLE, mode], capture_output=True, text=True)
        if "not glibc" in out.stderr:
            pytest.skip("not glibc")
        assert out.returncode == 0, out.stderr[-2000:]
        return [int(v) for v in out.stdout.split()]

    pages = 10 * (64 << 20) // 4096  # pages written by 10 cycles
    main, thread, returned = run("keep")
    assert main < pages // 100 and thread < pages // 100, (main, thread, pages)
    assert returned >= 60  # MiB of freed buffers the heap had kept
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" not in thp.read_text():  # (with huge pages a fault maps 2 MB)
        main, thread, _ = run("default")
        assert main > pages * 0.9 and thread > pages * 0.9, (main, thread, pages)  # a fresh mmap every time
