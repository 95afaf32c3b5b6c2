"""The speed paths: reordered-weight convolutions, channels-last bfloat16, the bfloat16 VAE and torch.compile.
Each must give the exact path's numbers (bit-equal where the arithmetic is the same, else within a stated bound)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stablediff import StableDiffusion
from stablediff.nn import Conv2d


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
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(conv(x_cl), F.conv2d(x_cl, conv.weight, conv.bias, padding=1))
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


def test_compile_keeps_the_image(tiny_model_dir):
    pytest.importorskip("torch._inductor")
    exact = StableDiffusion.from_pretrained(tiny_model_dir)
    compiled = StableDiffusion.from_pretrained(tiny_model_dir).compile()
    kw = dict(steps=3, seed=5, width=64, height=64)
    a, b = compiled("a cat", **kw), exact("a cat", **kw)
    assert ((a.latents - b.latents).norm() / b.latents.norm()).item() < 1e-4


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
