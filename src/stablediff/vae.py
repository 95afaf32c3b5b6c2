"""AutoencoderKL: pixels in [-1, 1] <-> latents, downscaled 2**(levels-1) times (8 for SD 1.x).

encode(x) gives the posterior N(mean, exp(logvar)) over latents; decode(z) maps a latent back to pixels.
The pipeline multiplies latents by `config.scaling_factor` (0.18215 for SD 1.x) after encoding and divides
before decoding. Module names equal diffusers' AutoencoderKL keys.

Tiled decode and encode are diffusers' `AutoencoderKL.enable_tiling()`, number for number: the input is cut into
square tiles of `config.sample_size` pixels (sample_size / downscale latents) that overlap by a quarter, each tile
goes through the decoder (encoder) alone, and each output tile is blended linearly into the one above and the one
to its left over a quarter of a tile, then cropped to three quarters. The activations then stay tile-sized whatever
the image's size; the result differs slightly from an untiled pass (each tile sees only its own context).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import rng
from .config import VAEConfig
from .nn import Attention, Downsample, ResnetBlock, Upsample

EPS = 1e-6
TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor
# `tiled=None` tiles when the estimated peak activation memory of one untiled pass exceeds this (see peak_bytes)
AUTO_TILING_BYTES = 8 * 2**30


class AttentionBlock(Attention):
    """Single-head self-attention over all pixels, with GroupNorm in front and a residual around it."""

    def __init__(self, ch: int, groups: int):
        super().__init__(ch, 1, ch, bias=True)
        self.group_norm = nn.GroupNorm(groups, ch, eps=EPS)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        return x + super().forward(tokens).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, None, groups, EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(ch, groups)]) if attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Level(nn.Module):
    """One resolution level of the encoder or decoder: resnets, then an optional down/up sampler."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, EPS)
                                      for i in range(layers)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Level(chs[max(i - 1, 0)], ch, cfg.layers_per_block, g, None if i == len(chs) - 1 else "down")
            for i, ch in enumerate(chs)])
        self.mid_block = MidBlock(chs[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            Level(rev[max(i - 1, 0)], ch, cfg.layers_per_block + 1, g, None if i == len(rev) - 1 else "up")
            for i, ch in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior over latents."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None) -> torch.Tensor:
        """mean + std * eps, eps drawn as diffusers draws it: from one generator (None: torch's default CPU one), or
        from one per batch element (a list; any of rng.draw's generators)."""
        if isinstance(generator, (list, tuple)):
            eps = torch.cat([rng.draw(g, (1, *self.mean.shape[1:])) for g in generator])
        else:
            eps = torch.randn(self.mean.shape, generator=generator)
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def tile_sizes(self) -> tuple[int, int]:
        """(pixels, latents) along a tile's side, as diffusers sets tile_sample_min_size / tile_latent_min_size."""
        pixels = self.config.sample_size
        return pixels, int(pixels / self.config.downscale)

    def encode(self, x: torch.Tensor, *, tiled: bool | None = False) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] -> posterior over (B, latent_channels, H/f, W/f), unscaled. `tiled`: True
        tiles an image larger than one tile, None does so only when `needs_tiling` says so."""
        pixels, latents = self.tile_sizes
        if self._tiles(x, pixels, tiled, "encoder"):
            moments = _tiled(x, lambda t: self.quant_conv(self.encoder(t)), pixels, latents)
        else:
            moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor, *, tiled: bool | None = False) -> torch.Tensor:
        """z (B, latent_channels, h, w), unscaled -> pixels (B, 3, h*f, w*f), roughly in [-1, 1]. `tiled` as in
        `encode`."""
        pixels, latents = self.tile_sizes
        if self._tiles(z, latents, tiled, "decoder"):
            return _tiled(z, lambda t: self.decoder(self.post_quant_conv(t)), latents, pixels)
        return self.decoder(self.post_quant_conv(z))

    def _tiles(self, x: torch.Tensor, tile: int, tiled: bool | None, part: str) -> bool:
        """Whether this pass is tiled: asked for (or, with None, needed), and the input larger than one tile."""
        if tiled is None:
            f = self.config.downscale if part == "decoder" else 1
            tiled = needs_tiling(self.config, x.shape[-2] * f, x.shape[-1] * f, x.dtype, part)
        return bool(tiled) and max(x.shape[-2:]) > tile


def peak_bytes(cfg: VAEConfig, height: int, width: int, dtype: torch.dtype, part: str) -> int:
    """Estimated peak activation memory of one image's untiled pass through the "encoder" or "decoder" for a
    height x width image: five times its largest activation (a resnet holds its input, the normalised copy, the
    activation and the convolution's output at once, and the convolution its own buffers; measured on a CPU, SD 1.x
    decodes peak at about 4.5 times). The encoder's level i runs block_out_channels[i] channels at 1/2**i of the image
    side; the decoder's level i runs the reversed channels, upsampled at its end, so a level's width also meets the
    next level's resolution (SD 1.x: 256 channels at full size)."""
    chs, levels = cfg.block_out_channels, len(cfg.block_out_channels)
    if part == "encoder":
        sizes = [(ch, 2.0 ** -i) for i, ch in enumerate(chs)]
    else:
        rev = list(reversed(chs))
        sizes = [(ch, 2.0 ** (min(i + 1, levels - 1) - (levels - 1))) for i, ch in enumerate(rev)]
    largest = max(ch * int(height * s) * int(width * s) for ch, s in sizes)
    return 5 * largest * torch.empty((), dtype=dtype).element_size()


def needs_tiling(cfg: VAEConfig, height: int, width: int, dtype: torch.dtype, part: str) -> bool:
    """The automatic rule: tile when `peak_bytes` exceeds AUTO_TILING_BYTES (SD 1.x decodes in float32 tile from
    about 1300x1300 pixels, in bfloat16 from about 1830x1830). A fixed budget, not the memory free at the time,
    so that the same settings always make the same image.."""
    return peak_bytes(cfg, height, width, dtype, part) > AUTO_TILING_BYTES


def _tiled(x: torch.Tensor, fn, tile: int, out_tile: int) -> torch.Tensor:
    """fn over overlapping tile x tile squares of x (stride 3/4 tile), each output blended into its upper and left
    neighbours over a quarter of out_tile and cropped to out_tile minus that: diffusers' tiled_decode/_tiled_encode.
    The blends write into the output tiles in place, row by row, so a tile's neighbours are already blended when
    it is, as in diffusers."""
    stride = int(tile * (1 - TILE_OVERLAP))
    if stride < 1:
        raise ValueError(f"tiles of {tile} are too small to overlap (VAE sample_size too small to tile)")
    blend = int(out_tile * TILE_OVERLAP)
    keep = out_tile - blend
    rows = [[fn(x[:, :, i:i + tile, j:j + tile]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], t, blend, dim=2)
            if j > 0:
                _blend(row[j - 1], t, blend, dim=3)
    return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in rows], dim=2)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Write into b's first `extent` rows (dim 2) or columns (dim 3) a linear ramp from a's last ones to b's own:
    weight y/extent on b at offset y (diffusers' blend_v / blend_h)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return
    shape = (-1, 1) if dim == 2 else (-1,)
    ramp = torch.arange(extent, dtype=torch.float64) / extent  # y / extent and 1 - y / extent in double, as
    kind = torch.promote_types(b.dtype, torch.float32)  # diffusers computes them in Python
    mine, theirs = (r.to(kind).view(shape) for r in (ramp, 1 - ramp))
    head, tail = b.narrow(dim, 0, extent), a.narrow(dim, a.shape[dim] - extent, extent)
    head.copy_(tail * theirs + head * mine)
