"""What the running CPU and torch build can do, probed once per process, and which fast paths may run.

Every special kernel path is taken only where it is known to work here, with the plain PyTorch op as the fallback:
- `packed`: bfloat16 convolutions with the weight reordered once for oneDNN (nn.Conv2d). oneDNN's bfloat16
  convolution needs avx512bw/vl/dq or avx_ne_convert and raises on other CPUs, so a tiny trial convolution decides.
- `winograd`, `im2col`: float32 3x3 convolutions as matrix products (winograd.py, nn.Conv2d). Plain torch ops: they
  run on every CPU torch supports.
- `channels_last`: bfloat16 U-Net and VAE weights in channels-last layout on the CPU (pipeline.from_pretrained).
- `onednn_linear`: float32 matrix products by oneDNN instead of the BLAS torch calls, where a trial call shows it
  runs (`onednn_matmul`): linear layers (nn.Linear), im2col, Winograd's products and attention (nn.py). On an AMD
  EPYC with AVX-512 (Zen 4) MKL's float32 GEMM reaches 120-170 GFLOP/s on 2 cores where oneDNN's reaches 175-200;
  on a Zen 5 170-210 against 430-470 (benchmarks/RESULTS.md); elsewhere it may be the other way round.
- `shared_half`: the guided batch's equal halves run once up to the first cross-attention (unet.py).
- `malloc`: glibc's malloc keeps freed memory for reuse (malloc.py).

Which of the float32 ways a layer of a given shape takes is timed at its first use and remembered per CPU
(tuning.py); with $STABLEDIFF_TUNING=off fixed rules decide instead (nn.py).

`STABLEDIFF_DISABLE=winograd,im2col` (names from PATHS, or `all`) turns paths off, e.g. to compare results or
work around a kernel bug; tests force each one off this way.

bfloat16 is fast on a CPU only with bfloat16 arithmetic units (avx512_bf16, amx_bf16, avx_ne_convert); elsewhere
it is emulated and slower than float32, so `cpu_dtype` runs float32 there and says so once.

Nothing here imports torch at module level: malloc.py asks `enabled` before torch is imported.
"""

from __future__ import annotations

import functools
import os
import warnings

PATHS = ("packed", "winograd", "im2col", "onednn_linear", "channels_last", "shared_half", "malloc")
ENV = "STABLEDIFF_DISABLE"
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert")  # /proc/cpuinfo flags of bfloat16 arithmetic


def enabled(path: str) -> bool:
    """Whether the fast path `path` (one of PATHS) may run: not named in $STABLEDIFF_DISABLE."""
    return path not in _disabled(os.environ.get(ENV, ""))


@functools.cache
def _disabled(value: str) -> frozenset[str]:
    names = frozenset(n.strip().lower() for n in value.split(",") if n.strip())
    unknown = names - set(PATHS) - {"all"}
    if unknown:  # a warning, not an error: this is asked from inside layers, mid-generation
        _warn_once(f"{ENV}={value!r}: unknown path {sorted(unknown)[0]!r} ignored; known: {', '.join(PATHS)}, all")
    return frozenset(PATHS) if "all" in names else names


@functools.cache
def onednn_bf16_convolution() -> bool:
    """Whether oneDNN's bfloat16 convolution with a reordered weight runs here: one 1-channel trial call."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.ones(1, 1, 3, 3, dtype=torch.bfloat16)
        w = torch.ones(1, 1, 3, 3, dtype=torch.bfloat16)
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape))
        y = torch.mkldnn_convolution(x, packed, None, [1, 1], [1, 1], [1, 1], 1)
        return float(y[0, 0, 1, 1]) == 9.0
    except (RuntimeError, AttributeError):
        return False


@functools.cache
def onednn_matmul() -> bool:
    """Whether oneDNN's float32 matrix product (torch.ops.mkldnn._linear_pointwise, what torch.compile's CPU backend
    calls for linear layers) runs here and equals F.linear: one small trial call."""
    import torch
    import torch.nn.functional as F

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(5, 7, generator=gen), torch.randn(3, 7, generator=gen), torch.randn(3, generator=gen)
        with torch.inference_mode():
            return bool(torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except (RuntimeError, AttributeError):
        return False


def onednn_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) by oneDNN (float32 on the CPU)."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module says."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is none to read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def native_bf16() -> bool:
    """Whether the CPU has bfloat16 arithmetic units: by its flags where it lists them (Linux), else whether
    oneDNN runs bfloat16 convolutions at all (it does only with AVX-512 or newer)."""
    flags = cpu_flags()
    if flags:
        return any(f in flags for f in BF16_FLAGS)
    return onednn_bf16_convolution()


def cpu_dtype(dtype, what: str = "dtype"):
    """The dtype to run `dtype` in on this CPU: bfloat16 becomes float32 (with one warning) where the CPU has no
    bfloat16 units, since emulated bfloat16 is slower than float32 there."""
    import torch

    if dtype != torch.bfloat16 or native_bf16():
        return dtype
    _warn_once(f"{what} bfloat16: this CPU has no bfloat16 units ({', '.join(BF16_FLAGS)}), where bfloat16 runs "
               "slower than float32; running float32")
    return torch.float32


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
