"""Layers shared by the U-Net, the VAE and the CLIP towers.

Attribute names follow diffusers' checkpoint keys (`to_q`, `to_out.0`, `conv_shortcut`, ...) so that a diffusers
state dict loads with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu, tuning, winograd


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps t (B,) -> (B, dim), as in DDPM / diffusers."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# float32 linear layers of at least this many multiply-adds (rows x in x out) may run by oneDNN (cpu.py,
# `onednn_linear`) where tuning.py times that faster; below it either takes microseconds
TUNED_LINEAR_MACS = 1 << 22


def _onednn_float32_product() -> bool:
    """Whether a float32 matrix product may go to oneDNN (Linear, im2col): not turned off, and its trial ran."""
    return cpu.enabled("onednn_linear") and cpu.onednn_matmul()


def _tuned_cpu(x: torch.Tensor, weight: torch.Tensor, dtypes: tuple = (torch.float32,)) -> bool:
    """Whether a layer with `weight` on `x` is a CPU call in one of `dtypes` (float32 unless given) that may take a
    tuned way (tuning.py)."""
    return (x.dtype in dtypes and x.device.type == "cpu" and weight.dtype == x.dtype
            and not torch.compiler.is_compiling() and tuning.active())


def _shape(x: torch.Tensor) -> str:
    """x's shape and layout as a tuned layer's key names them: "NxCxHxW", " channels-last" added where it is."""
    layout = " channels-last" if x.is_contiguous(memory_format=torch.channels_last) else ""
    return "x".join(map(str, x.shape)) + layout


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict); in float32 on the CPU, a large enough layer runs by oneDNN's
    matrix product or torch's BLAS one, whichever tuning.py timed faster for its shape on this machine (equal to
    1e-6 relative). Not under torch.compile, whose own kernels replace both."""

    def forward(self, x):
        if (_tuned_cpu(x, self.weight) and x.numel() * self.out_features >= TUNED_LINEAR_MACS
                and _onednn_float32_product()):
            rows = x.numel() // self.in_features
            key = f"linear {rows}x{self.in_features}->{self.out_features}{'' if self.bias is None else ' +bias'}"
            return tuning.pick(key, {"blas": lambda: super(Linear, self).forward(x),
                                     "onednn": lambda: cpu.onednn_linear(x, self.weight, self.bias)})
        return super().forward(x)


# float32 3x3 layers done as one matrix product (im2col, see Conv2d) by the fixed rule: at least this many input and
# output channels, at most this many output pixels (N * H * W)
UNFOLD_CHANNELS, UNFOLD_PIXELS = 1280, 128
# the 3x3 layers whose ways tuning.py times (the direct convolution and): Winograd from this many channels, F(4x4)
# from this many output pixels, F(2x2) between these two (over that F(4x4), with fewer multiplications and its
# larger U spread over more pixels, beats it); im2col from this many channels up to this many output pixels (its
# unfolded input holds 9 x channels x pixels floats). Wider than any machine's winners seen so far; smaller
# layers take the direct one.
TUNED_WINOGRAD, TUNED_IM2COL = (64, 256, 64, 8192), (256, 1024)
# the dtypes whose 3x3 layers are timed: bfloat16 has the direct convolution and im2col
TUNED_DTYPES = (torch.float32, torch.bfloat16)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and state dict), faster on the CPU.

    float32: a 3x3 layer (padding 1, zeros) can run as oneDNN's direct convolution, by Winograd's algorithm in 4x4
    or 2x2 output tiles (winograd.py, stride 1) or as one matrix product over the unfolded input (im2col), which
    reads the weight where it lies: oneDNN copies it into its blocked layout on every call first, which at few
    pixels costs more than the arithmetic. Which is fastest depends on the machine and the shape: tuning.py times
    the ways a shape is offered (TUNED_WINOGRAD, TUNED_IM2COL) at its first use and remembers the winner. With
    tuning off the fixed rules of before decide: Winograd for layers with enough channels and pixels
    (winograd.THRESHOLDS), im2col for >= 1280 channels and at most 128 output pixels (N*H*W: SD 1.5's 4x4 and 8x8
    levels).
    bfloat16 (on a CPU with bfloat16 units): a 3x3 layer can run as oneDNN's direct convolution or as im2col, timed
    the same way (with tuning off: im2col by the same fixed rule). At SD 1.5's 4x4 and 8x8 levels im2col took
    0.4-0.7x of the direct convolution's time on an AMD EPYC with AVX-512. The direct convolution of the U-Net's
    widest low-resolution layers keeps its weights reordered, for the same reason: for layers with >= 2560 input
    channels, or >= 1280 at <= 8x8 pixels, oneDNN's per-call reorder costs more than the arithmetic. Such a layer
    keeps its weight reordered for the last input shape it saw (rebuilt when the shape or the weight changes, e.g.
    a LoRA merge: one extra copy of those weights) and gives oneDNN's own results. Each path runs only where
    cpu.py's probe allows it. Everything else is nn.Conv2d. Measured figures: RESULTS.md.
    The fast paths pad with zeros: a layer set to circular padding (`circular_padding`) runs as nn.Conv2d runs it,
    F.pad(mode="circular") and then the convolution unpadded."""

    packed: tuple | None = None  # (input shape, weight version, weight address) -> the reordered weight

    def _packs(self, x: torch.Tensor) -> bool:
        return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 4 and not torch.is_grad_enabled()
                and self.groups == 1 and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and not self.weight.is_inference()  # (made under inference_mode: no version counter to watch)
                and (self.in_channels >= 2560 or (self.in_channels >= 1280 and x.shape[2] * x.shape[3] <= 64))
                and cpu.enabled("packed") and cpu.onednn_bf16_convolution())

    def _out_pixels(self, x: torch.Tensor) -> int:
        return x.shape[0] * -(-x.shape[2] // self.stride[0]) * -(-x.shape[3] // self.stride[1])

    def _unfoldable(self, x: torch.Tensor) -> bool:
        """Whether this layer on x can run as im2col: a padded 3x3 layer (stride 1 or 2) on the CPU in float32, or
        in bfloat16 where the CPU has bfloat16 units (elsewhere a bfloat16 matrix product is emulated)."""
        return (x.device.type == "cpu" and x.dim() == 4 and self.kernel_size == (3, 3)
                and self.stride in ((1, 1), (2, 2)) and self.padding == (1, 1) and self.dilation == (1, 1)
                and self.groups == 1 and self.padding_mode == "zeros" and self.weight.dtype == x.dtype
                and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu.native_bf16()))
                and cpu.enabled("im2col"))

    def _unfolds(self, x: torch.Tensor) -> bool:
        return (self._unfoldable(x) and min(self.in_channels, self.out_channels) >= UNFOLD_CHANNELS
                and self._out_pixels(x) <= UNFOLD_PIXELS)

    def _ways(self, x: torch.Tensor, on: torch.Tensor | None = None) -> dict:
        """The ways to compute this layer on x offered to tuning.py, the direct convolution first; computing it on
        `on` instead (a slab of x to time them on) where given. Winograd is float32 only."""
        on = x if on is None else on
        ways = {"direct": lambda: self._direct(on)}
        channels, pixels = min(self.in_channels, self.out_channels), self._out_pixels(x)
        if winograd.fits(self, x) and channels >= TUNED_WINOGRAD[0]:
            if pixels >= TUNED_WINOGRAD[1]:
                ways["winograd"] = lambda: winograd.conv3x3(on, self.weight, self.bias)
            if TUNED_WINOGRAD[2] <= pixels <= TUNED_WINOGRAD[3]:
                ways["winograd2x2"] = lambda: winograd.conv3x3(on, self.weight, self.bias, tile=2)
            if _onednn_float32_product():  # the same with oneDNN's products (AMD Zen 5: 1.7-2.4x MKL's bmm)
                for name in [n for n in ways if n.startswith("winograd")]:
                    tile = 2 if name == "winograd2x2" else 4
                    ways[f"{name} onednn"] = lambda tile=tile: winograd.conv3x3(on, self.weight, self.bias, tile, True)
        if self._unfoldable(x) and channels >= TUNED_IM2COL[0] and pixels <= TUNED_IM2COL[1]:
            ways["im2col"] = lambda: conv3x3_im2col(on, self.weight, self.bias, self.stride[0])
        return ways

    def forward(self, x):
        if torch.compiler.is_compiling():  # inductor's own convolution (it traces none of the ways below)
            return super().forward(x)
        if _tuned_cpu(x, self.weight, TUNED_DTYPES) and x.dim() == 4 and self.kernel_size == (3, 3):
            ways = self._ways(x)
            if len(ways) == 1:
                return self._direct(x)
            slab = tuning.trial_slab(x, self._out_pixels(x))
            dtype = "" if x.dtype == torch.float32 else f" {str(x.dtype).removeprefix('torch.')}"
            return tuning.pick(f"conv3x3 {_shape(x)}->{self.out_channels} stride {self.stride[0]}{dtype}", ways,
                               None if slab is None else self._ways(x, on=slab))
        if winograd.applies(self, x):
            return winograd.conv3x3(x, self.weight, self.bias)
        if self._unfolds(x):
            return conv3x3_im2col(x, self.weight, self.bias, self.stride[0])
        return self._direct(x)

    def _direct(self, x):
        """oneDNN's direct convolution: nn.Conv2d's, or with the weight kept reordered (bfloat16, `_packs`)."""
        if not self._packs(x):
            return super().forward(x)
        w = self.weight
        key = (tuple(x.shape), w._version, w.data_ptr())
        if self.packed is None or self.packed[0] != key:
            self.packed = (key, torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape)))
        return torch.mkldnn_convolution(x, self.packed[1], self.bias, list(self.padding), list(self.stride),
                                        list(self.dilation), self.groups)


@contextlib.contextmanager
def circular_padding(models, on: bool = True):
    """While inside (and `on`), every Conv2d of `models` that pads (padding > 0; ours and torch's) pads circularly,
    as AUTOMATIC1111's tiling sets padding_mode="circular" on all Conv2d layers: the image then continues across
    its edges onto the opposite ones, so that it tiles seamlessly. Each layer's own mode is put back on leaving,
    on an error too. Padding that a model does itself (the VAE encoder's asymmetric F.pad) stays zeros, as there."""
    convs = [m for model in (models if on else ()) for m in model.modules()
             if isinstance(m, nn.Conv2d) and isinstance(m.padding, tuple) and any(m.padding)]
    modes = [c.padding_mode for c in convs]
    try:
        for c in convs:
            c.padding_mode = "circular"
        yield
    finally:
        for c, mode in zip(convs, modes):
            c.padding_mode = mode


def conv3x3_im2col(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding=1) as one matrix product: the 9 shifted taps of the padded input,
    each pixel's row of 9 x C values, (N*Ho*Wo, 9C) @ the weight as (9C, K). The rows' order of taps and channels
    follows the weight's memory layout, so the weight is read where it lies: (c, i, j) for a contiguous one, (i, j,
    c) for a channels-last one. The output is channels-last where x is (the product's own layout), else contiguous.
    The product is oneDNN's in float32 where it runs (on an AMD EPYC with AVX-512 1.1-1.4x MKL's at these shapes:
    benchmarks/RESULTS.md), else torch's."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    ho, wo = -(-h // stride), -(-w // stride)
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).contiguous()  # (N, H+2, W+2, C): a view if channels-last
    taps = [padded[:, i:i + stride * ho:stride, j:j + stride * wo:stride] for i in range(3) for j in range(3)]
    if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
        rows, matrix = torch.stack(taps, dim=3), weight.permute(0, 2, 3, 1).reshape(k, 9 * c)
    else:
        rows, matrix = torch.stack(taps, dim=4), weight.reshape(k, 9 * c)
    rows = rows.view(n * ho * wo, 9 * c)
    if x.dtype == torch.float32 and _onednn_float32_product():
        y = cpu.onednn_linear(rows, matrix, bias)
    else:
        y = F.linear(rows, matrix, bias)
    y = y.view(n, ho, wo, k).permute(0, 3, 1, 2)
    return y if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else y.contiguous()


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with an optional timestep embedding added in between and a 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None, groups: int, eps: float,
                 output_scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch) if temb_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale = output_scale

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale == 1 else out / self.output_scale


class Attention(nn.Module):
    """Multi-head attention over token sequences (B, N, C); context=None makes it self-attention."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = Linear(dim, inner, bias=bias)
        self.to_k = Linear(context_dim, inner, bias=bias)
        self.to_v = Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([Linear(inner, dim)])

    def forward(self, x, context=None):
        context = x if context is None else context
        b = x.shape[0]
        q, k, v = (p(s).view(b, -1, self.heads, p.out_features // self.heads).transpose(1, 2)
                   for p, s in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3])
        if (_tuned_cpu(q, k) and q.shape[2] * k.shape[2] * q.shape[1] * q.shape[0] >= TUNED_ATTENTION_SCORES
                and _onednn_float32_product()):
            key = f"attention {q.shape[0]}x{q.shape[2]}x{k.shape[2]} heads {q.shape[1]}x{q.shape[3]}"
            out = tuning.pick(key, {"sdpa": sdpa, "onednn": lambda: onednn_attention(q, k, v)})
        else:
            out = sdpa()
        return self.to_out[0](out)


# float32 attention with at least this many scores (batch x heads x queries x keys) may run by oneDNN's products
# (onednn_attention) where tuning.py times that faster than torch's flash attention, whose products are the BLAS's
TUNED_ATTENTION_SCORES = 1 << 20
# bytes of one head's scores made at once (onednn_attention): pieces of 512 queries at 4096 keys took 157-158 ms for
# 2 x 8 heads against 176 ms whole (64 MB; AMD Zen 5), 4 MB no faster; at 1024 keys every size took the same
ATTENTION_BUDGET = 8 << 20


def onednn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v) for float32 (B, H, N, d) q and (B, H, M, d) k, v on the CPU, by
    oneDNN's matrix products (cpu.onednn_linear), as (B, N, H * d): per batch item and head, the scores of a piece
    of queries (within ATTENTION_BUDGET), their softmax, and its product with the values. The scores are made
    whole where flash attention makes them in blocks, so this gains only where oneDNN's products are much faster
    than the BLAS's (AMD Zen 5: flash attention's at 150 GFLOP/s, oneDNN's at 400)."""
    b, h, n, d = q.shape
    m = k.shape[2]
    q = (q * d ** -0.5).contiguous()  # (not in place: q may be the caller's own tensor)
    k, vt = k.contiguous(), v.transpose(2, 3).contiguous()  # (B, H, M, d), (B, H, d, M)
    out = q.new_empty(b, n, h, d)
    rows = max(1, min(n, ATTENTION_BUDGET // (4 * m)))
    for i in range(b):
        for j in range(h):
            for r in range(0, n, rows):
                scores = torch.softmax(cpu.onednn_linear(q[i, j, r:r + rows], k[i, j]), dim=-1)
                out[i, r:r + rows, j] = cpu.onednn_linear(scores, vt[i, j])
    return out.view(b, n, h * d)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. padding=0 means the VAE's asymmetric (0, 1, 0, 1) pad first."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=padding)
        self.asymmetric = padding == 0

    def forward(self, x):
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


def _fold_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 kernel taps along `dim` -> the 2 taps of each output parity after nearest 2x upsampling: an even output
    row reads tap 0 from the source row above and taps 1, 2 from its own; an odd one taps 0, 1 from its own row and
    tap 2 from the row below."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


def phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 weight (K, C, 3, 3) -> the four 2x2 phase kernels (4K, C, 2, 2), phase (a, b) in rows (2a + b)K on,
    summed in float32 (a bfloat16 weight is rounded once, after the sums)."""
    phases = [p for rows in _fold_taps(weight.float(), 2) for p in _fold_taps(rows, 3)]
    return torch.cat(phases).to(weight.dtype)


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     phases: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) without making the
    upsampled input: each output pixel parity (a, b) is a 2x2 convolution of x (16 instead of 36 multiply-adds per
    channel pair and 4 output pixels). One convolution of x padded by 1 computes all four phases at (H+1) x (W+1)
    positions; phase (a, b) is read at offset (a, b) and interleaved into the output, which keeps x's memory format
    (channels-last: contiguous rows of K channels are copied). `phases`: phase_weight(weight), where the caller
    keeps it (folding a wide layer's weight costs a fair part of the convolution)."""
    n, _, h, w = x.shape
    k = weight.shape[0]
    kernels = phase_weight(weight) if phases is None else phases
    phases = F.conv2d(x, kernels, None if bias is None else bias.repeat(4), padding=1)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = torch.empty(n, h, 2, w, 2, k, dtype=phases.dtype, device=x.device)
        src = phases.permute(0, 2, 3, 1).unflatten(3, (2, 2, k))  # (N, H+1, W+1, a, b, K), a view if NHWC
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, a, :, b] = src[:, a:a + h, b:b + w, a, b]
        return out.view(n, 2 * h, 2 * w, k).permute(0, 3, 1, 2)
    out = torch.empty(n, k, h, 2, w, 2, dtype=phases.dtype, device=x.device)
    src = phases.unflatten(1, (2, 2, k))  # (N, a, b, K, H+1, W+1)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, :, a, :, b] = src[:, a, b, :, a:a + h, b:b + w]
    return out.view(n, k, 2 * h, 2 * w)


class Upsample(nn.Module):
    """Nearest-neighbour 2x (or to an explicit size, for odd skip connections), then a 3x3 conv.

    A 2x upsampling can instead run as four 2x2 convolutions of the input (upsample_conv3x3, equal to rounding),
    which does 16 instead of 36 multiply-adds per output pixel and channel pair but pays a weight fold and an
    interleave: in float32 on the CPU tuning.py times both ways per shape (with tuning off, the plain way). Where
    the phase way won, the folded weight is kept for the weight it was made from (rebuilt when that changes, e.g. a
    LoRA merge); where the plain way won it is dropped (SD 1.5 float32: up to 240 MB for all upsamplers). Circular
    padding (`circular_padding`) takes the plain way, as the phase convolutions pad with zeros."""

    phases: tuple | None = None  # (weight version, address, dtype) -> phase_weight of the conv's weight

    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        if size is None and x.dim() == 4 and self.conv.padding_mode == "zeros" and _tuned_cpu(x, self.conv.weight):
            slab = tuning.trial_slab(x, 4 * x.shape[0] * x.shape[2] * x.shape[3])
            key = f"upsample conv3x3 {_shape(x)}->{self.conv.out_channels}"
            y = tuning.pick(key, self._ways(x), None if slab is None else self._ways(slab))
            if self.phases is not None and tuning.chosen(key) != "subpixel":
                self.phases = None  # the plain way won: the folded weight made for the timing is not kept
            return y
        return self._upsampled(x, size)

    def _ways(self, x) -> dict:
        return {"upsample": lambda: self._upsampled(x), "subpixel": lambda: self._subpixel(x)}

    def _upsampled(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)

    def _subpixel(self, x):
        w = self.conv.weight
        if w.is_inference():  # (made under inference_mode: no version counter to watch)
            return upsample_conv3x3(x, w, self.conv.bias)
        key = (w._version, w.data_ptr(), w.dtype)
        if self.phases is None or self.phases[0] != key:
            self.phases = (key, phase_weight(w.detach()))
        return upsample_conv3x3(x, w, self.conv.bias, self.phases[1])


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}
