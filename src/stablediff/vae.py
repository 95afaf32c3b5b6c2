"""AutoencoderKL: pixels in [-1, 1] <-> latents, downscaled 2**(levels-1) times (8 for SD 1.x).

encode(x) gives the posterior N(mean, exp(logvar)) over latents; decode(z) maps a latent back to pixels.
The pipeline multiplies latents by `config.scaling_factor` (0.18215 for SD 1.x) after encoding and divides
before decoding. Module names equal diffusers' AutoencoderKL keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import rng
from .config import VAEConfig
from .nn import Attention, Downsample, ResnetBlock, Upsample

EPS = 1e-6


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

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, 3, H, W) in [-1, 1] -> posterior over (B, latent_channels, H/f, W/f), unscaled."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w), unscaled -> pixels (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
