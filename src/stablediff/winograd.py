"""Stride-1 3x3 convolutions in float32 on the CPU by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016,
arXiv:1509.09308): 36 multiplications per 4x4 output tile and channel pair instead of 144.

    V = B^T d B   each 6x6 input tile d (overlapping by 2), per input channel: 36 values
    U = G g G^T   each 3x3 kernel g, per (output, input) channel pair: 36 values
    M = U V       for each of the 36 positions, one (out x in) @ (in x tiles) matrix product: the arithmetic
    Y = A^T M A   each 4x4 output tile

In the 2-D form the transforms are the Kronecker products B2, G2, A2 of the 1-D matrices. oneDNN has no Winograd
for float32 on these CPUs; done in PyTorch ops, the input transform is one convolution of every channel with the
36 basis patches, the rest are matrix products. Where it gains over the direct convolution depends on the CPU:
nn.Conv2d times both at a shape's first use (tuning.py). On the Intel AVX2 machine it was first measured on it gained
for layers with at least 256 channels and 512 output pixels (N*H*W), or 128 channels and 8192 pixels (THRESHOLDS,
the fixed rule with tuning off); on an AMD EPYC with AVX-512 only from about 2048 pixels. Its relative error against float64 is about 10x the direct convolution's. The kernels are
transformed on every call (nothing cached, so weights merged later, e.g. LoRA, are always used). Large inputs go
in pieces of rows of tiles, each piece's transformed input and products within BUDGET bytes, and large kernels in
pieces of output channels: within KERNEL_BUDGET bytes where the input is one piece (each piece of U is used once,
so smaller pieces cost no extra work and the heap's high-water mark is lower), within BUDGET where several row
pieces reuse U (held whole when it fits, else transformed again for each row piece). Measured figures: RESULTS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu

_BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                    [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                   [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
_AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                   dtype=torch.float64)
BASIS = torch.kron(_BT, _BT).float().view(36, 1, 6, 6)  # input transform, as a convolution kernel
G2 = torch.kron(_G, _G).float()  # (36, 9) kernel transform
A2 = torch.kron(_AT, _AT).float()  # (16, 36) output transform

BUDGET = 64 << 20  # bytes of transformed inputs and products held at once
KERNEL_BUDGET = 32 << 20  # bytes of transformed kernels held at once, where one row piece uses them
# (channels, N * H * W): use it when both the input and output channels and the output pixels reach one of these
THRESHOLDS = ((256, 512), (128, 8192))


def fits(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether `conv(x)` is a stride-1, padding-1 3x3 float32 CPU convolution that this module computes."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 4
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.weight.dtype == torch.float32 and cpu.enabled("winograd"))


def applies(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """The fixed rule (tuning off, nn.Conv2d): whether `conv(x)` fits and is big enough to gain (THRESHOLDS)."""
    return fits(conv, x) and any(min(conv.in_channels, conv.out_channels) >= c
                                 and x.shape[0] * x.shape[2] * x.shape[3] >= p for c, p in THRESHOLDS)


def _kernels(w: torch.Tensor) -> torch.Tensor:
    """U for kernels w (K, C, 3, 3): (36, K, C)."""
    k, c = w.shape[:2]
    return (G2 @ w.reshape(k * c, 9).T).view(36, k, c)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for float32 x (N, C, H, W) and weight (K, C, 3, 3)."""
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = -(-h // 4), -(-w // 4)  # 4x4 output tiles
    per_row = 4 * n * tw * (72 * c + 52 * k)  # bytes of V (twice: as convolved, then reordered), M and Y per tile row
    rows = max(1, min(th, BUDGET // per_row))
    per_out = 36 * c * 4  # bytes of U per output channel
    # output channels per piece of U: every row piece uses U, so with several it is held whole where it fits
    outs = max(1, min(k, (BUDGET if rows < th else KERNEL_BUDGET) // per_out))
    u = _kernels(weight) if outs == k else None

    out = x.new_empty(n, k, 4 * th, 4 * tw)
    for r0 in range(0, th, rows):
        r = min(rows, th - r0)
        if r == th and h % 4 == 0 and w % 4 == 0:  # the whole input: the convolution pads it
            v = F.conv2d(x.reshape(n * c, 1, h, w), BASIS, stride=4, padding=1)
        else:  # input rows 4*r0-1 .. 4*(r0+r)+1, zeros outside the image
            lo, hi = 4 * r0 - 1, 4 * (r0 + r) + 1
            slab = F.pad(x[:, :, max(lo, 0):min(hi, h)], (1, 4 * tw + 1 - w, max(-lo, 0), max(hi - h, 0)))
            v = F.conv2d(slab.reshape(n * c, 1, hi - lo, 4 * tw + 2), BASIS, stride=4)
        v = v.view(n, c, 36, r * tw).permute(2, 1, 0, 3).reshape(36, c, n * r * tw)
        if u is not None:
            m = torch.bmm(u, v)
        else:  # U in pieces of output channels, each transformed from its own kernels
            m = v.new_empty(36, k, n * r * tw)
            for k0 in range(0, k, outs):
                torch.bmm(_kernels(weight[k0:k0 + outs]), v, out=m[:, k0:k0 + outs])
        y = (A2 @ m.view(36, -1)).view(4, 4, k, n, r, tw).permute(3, 2, 4, 0, 5, 1)
        dst = out[:, :, 4 * r0:4 * (r0 + r)].view(n, k, r, 4, tw, 4)
        if bias is None:
            dst.copy_(y)
        else:
            torch.add(y, bias.view(1, k, 1, 1, 1, 1), out=dst)
    return out if h % 4 == 0 and w % 4 == 0 else out[:, :, :h, :w].contiguous()
