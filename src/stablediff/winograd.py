"""Stride-1 3x3 convolutions in float32 on the CPU by Winograd's minimal filtering F(m x m, 3x3) (Lavin & Gray 2016,
arXiv:1509.09308), with output tiles of m = 4 (36 multiplications per 4x4 tile and channel pair instead of 144) or
m = 2 (16 instead of 36). With a = m + 2:

    V = B^T d B   each a x a input tile d (overlapping by 2), per input channel: a*a values
    U = G g G^T   each 3x3 kernel g, per (output, input) channel pair: a*a values
    M = U V       for each of the a*a positions, one (out x in) @ (in x tiles) matrix product: the arithmetic,
                  as one batched BLAS product or, where tuning.py times that faster, one oneDNN product per
                  position (`onednn`; on an AMD Zen 5, whose MKL runs AVX2 code, 1.7-2.4x faster)
    Y = A^T M A   each m x m output tile

In the 2-D form the transforms are the Kronecker products B2, G2, A2 of the 1-D matrices. oneDNN has no Winograd
for float32 on these CPUs; done in PyTorch ops, the input transform is one convolution of every channel with the
a*a basis patches, the rest are matrix products. F(4x4) does fewer multiplications, but its U is 4x the kernels'
size (F(2x2): 16/9) and is made on every call (nothing cached, so weights merged later, e.g. LoRA, are always
used), which for wide layers at few pixels costs more than it saves; its relative error against float64 is about
10x the direct convolution's, F(2x2)'s about the same as the direct one's. Where either gains over the direct
convolution depends on the CPU: nn.Conv2d times them at a shape's first use (tuning.py). On the Intel AVX2 machine
F(4x4) was first measured on it gained for layers with at least 256 channels and 512 output pixels (N*H*W), or 128
channels and 8192 pixels (THRESHOLDS, the fixed rule with tuning off); on an AMD EPYC with AVX-512 only from about
2048 pixels. Large inputs go in pieces of rows of tiles, each piece's transformed input and products within
BUDGET bytes, and large kernels in pieces of output channels: within KERNEL_BUDGET bytes where the input is one
piece (each piece of U is used once, so smaller pieces cost no extra work and the heap's high-water mark is lower),
within BUDGET where several row pieces reuse U (held whole when it fits, else transformed again for each row
piece). Measured figures: RESULTS.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu


def _transforms(bt: list, g: list, at: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B2 as a convolution kernel (a*a, 1, a, a), G2 (a*a, 9), A2 (m*m, a*a)) from the 1-D matrices."""
    bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in (bt, g, at))
    a = bt.shape[0]
    return torch.kron(bt, bt).float().view(a * a, 1, a, a), torch.kron(g, g).float(), torch.kron(at, at).float()


# tile size m -> its transforms
TRANSFORMS = {
    4: _transforms([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                    [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
                   [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                    [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
                   [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
    2: _transforms([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
                   [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
                   [[1, 1, 1, 0], [0, 1, -1, -1]]),
}

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


def _kernels(w: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """U for kernels w (K, C, 3, 3): (a*a, K, C)."""
    k, c = w.shape[:2]
    return (g2 @ w.reshape(k * c, 9).T).view(g2.shape[0], k, c)


def _products(u: torch.Tensor, v: torch.Tensor, out: torch.Tensor, onednn: bool) -> None:
    """out = u @ v for u (a*a, K, C) and v (a*a, C, T): torch.bmm (the BLAS's batched product), or one oneDNN
    product per position (`onednn`), v's transpose read where it lies."""
    if not onednn:
        torch.bmm(u, v, out=out)
        return
    v = v.contiguous()  # (oneDNN reorders a weight with padded rows at a small fraction of its speed)
    for i in range(u.shape[0]):
        out[i].copy_(cpu.onednn_linear(u[i], v[i].T))


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tile: int = 4,
            onednn: bool = False) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for float32 x (N, C, H, W) and weight (K, C, 3, 3), in m x m output tiles
    (m = `tile`, 4 or 2); the products by oneDNN where `onednn` (cpu.onednn_linear)."""
    basis, g2, a2 = TRANSFORMS[tile]
    m, p = tile, basis.shape[0]  # p = a*a transformed values per tile
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = -(-h // m), -(-w // m)  # output tiles
    # bytes of V (twice: as convolved, then reordered), M and Y per row of tiles
    per_row = 4 * n * tw * (2 * p * c + (p + m * m) * k)
    rows = max(1, min(th, BUDGET // per_row))
    per_out = p * c * 4  # bytes of U per output channel
    # output channels per piece of U: every row piece uses U, so with several it is held whole where it fits
    outs = max(1, min(k, (BUDGET if rows < th else KERNEL_BUDGET) // per_out))
    u = _kernels(weight, g2) if outs == k else None

    out = x.new_empty(n, k, m * th, m * tw)
    for r0 in range(0, th, rows):
        r = min(rows, th - r0)
        if r == th and h % m == 0 and w % m == 0:  # the whole input: the convolution pads it
            v = F.conv2d(x.reshape(n * c, 1, h, w), basis, stride=m, padding=1)
        else:  # input rows m*r0-1 .. m*(r0+r)+1, zeros outside the image
            lo, hi = m * r0 - 1, m * (r0 + r) + 1
            slab = F.pad(x[:, :, max(lo, 0):min(hi, h)], (1, m * tw + 1 - w, max(-lo, 0), max(hi - h, 0)))
            v = F.conv2d(slab.reshape(n * c, 1, hi - lo, m * tw + 2), basis, stride=m)
        v = v.view(n, c, p, r * tw).permute(2, 1, 0, 3).reshape(p, c, n * r * tw)
        prod = v.new_empty(p, k, n * r * tw)
        if u is not None:
            _products(u, v, prod, onednn)
        else:  # U in pieces of output channels, each transformed from its own kernels
            for k0 in range(0, k, outs):
                _products(_kernels(weight[k0:k0 + outs], g2), v, prod[:, k0:k0 + outs], onednn)
        y = (a2 @ prod.view(p, -1)).view(m, m, k, n, r, tw).permute(3, 2, 4, 0, 5, 1)
        dst = out[:, :, m * r0:m * (r0 + r)].view(n, k, r, m, tw, m)
        if bias is None:
            dst.copy_(y)
        else:
            torch.add(y, bias.view(1, k, 1, 1, 1, 1), out=dst)
    return out if h % m == 0 and w % m == 0 else out[:, :, :h, :w].contiguous()
