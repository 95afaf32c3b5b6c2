"""The SD 1.x noise-prediction U-Net: eps = unet(x_t, t, text_embeddings).

Shape walk for SD 1.5 at 512x512 (latent 64x64, batch B):
  conv_in            (B, 4, 64, 64)   -> (B, 320, 64, 64)
  down_blocks 0..3   320@64 -> 640@32 -> 1280@16 -> 1280@8, each level keeping its outputs as skips
  mid_block          (B, 1280, 8, 8)
  up_blocks 0..3     concatenate the skips back in, upsampling 8 -> 16 -> 32 -> 64
  conv_out           (B, 320, 64, 64) -> (B, 4, 64, 64)
Cross-attention reads the text embeddings (B, 77*k, 768) in every spatial transformer.
Module names equal diffusers' UNet2DConditionModel keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu
from .config import UNetConfig
from .nn import Attention, Downsample, Linear, ResnetBlock, TimestepEmbedding, Upsample, timestep_embedding


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's embedding of the guidance scale w (B,) -> (B, dim) float32, w = guidance_scale - 1: sin then cos of
    1000 w at frequencies 10000 ** (-i / (dim // 2 - 1)). Computed in diffusers' `get_guidance_scale_embedding`
    order: at 1000 w the angles are in the thousands, where another rounding of the frequencies shows."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GuidedTimestepEmbedding(TimestepEmbedding):
    """The timestep embedding of LCM checkpoints: a guidance-scale embedding (`guidance_scale_embedding`), projected
    by `cond_proj`, is added to the sinusoidal timestep embedding before the MLP (diffusers' `time_cond_proj_dim`)."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int):
        super().__init__(in_dim, dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)

    def forward(self, x, cond=None):
        return super().forward(x if cond is None else x + self.cond_proj(cond))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is a dropout in the checkpoint layout: it holds no weights
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), Linear(dim * 4, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention on the text, GEGLU feed-forward.

    `merging` (None: off) is the token-merging hook (tome.token_merging sets it): its plan(x, size) for the block's
    input merges tokens before the self-attention and unmerges its output (tome.Merge)."""

    merging = None

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, size: tuple[int, int] | None = None):
        """x (B, h*w, C) tokens of an h x w grid, size = (h, w)."""
        plan = self.merging.plan(x, size) if self.merging is not None else None
        if plan is None:
            x = x + self.attn1(self.norm1(x))
        else:
            x = x + plan.unmerge(self.attn1(plan.merge(self.norm1(x))))
        if x.shape[0] < context.shape[0]:  # one batch of images under k batches of prompts: from here on k copies
            x = x.repeat(context.shape[0] // x.shape[0], 1, 1)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """(B, C, H, W) -> tokens (B, H*W, C) -> transformer block -> back, with a residual around it all."""

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int, linear_proj: bool):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.linear_proj = linear_proj
        self.proj_in = Linear(ch, ch) if linear_proj else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch, heads, context_dim)])
        self.proj_out = Linear(ch, ch) if linear_proj else nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        res = x
        x = self.norm(x)
        if self.linear_proj:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, c))
        else:
            # (made contiguous: the tokens as a transposed view of the NCHW output slowed every LayerNorm and residual
            # add of the block, 2.8 against 0.4 ms per LayerNorm at 4096 tokens of 320)
            x = self.proj_in(x).permute(0, 2, 3, 1).reshape(b, h * w, c).contiguous()
        for block in self.transformer_blocks:
            x = block(x, context, (h, w))
        kb = x.shape[0]  # > b where the blocks widened a shared batch to the context's
        if self.linear_proj:
            x = self.proj_out(x).reshape(kb, h, w, c).permute(0, 3, 1, 2)
        else:
            x = self.proj_out(x.reshape(kb, h, w, c).permute(0, 3, 1, 2))
        if kb == b:
            return x + res
        # widened: x comes channels-last from the widened tokens; summed into the repeated residual, the output stays
        # channels-first (otherwise every layer after it would run channels-last: slower in float32)
        return res.repeat(kb // b, 1, 1, 1).add_(x)


class UNetBlock(nn.Module):
    """One resolution level: `resnets[i]` each optionally followed by `attentions[i]`, then a resampler.

    Down blocks return every intermediate output as a skip connection; up blocks consume them.
    """

    def __init__(self, in_chs: list[int], out_ch: int, temb_dim: int, cfg: UNetConfig, heads: int, attn: bool,
                 resample: str | None):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock(c, out_ch, temb_dim, g, eps) for c in in_chs])
        if attn:
            self.attentions = nn.ModuleList([
                SpatialTransformer(out_ch, heads, cfg.cross_attention_dim, g, cfg.use_linear_projection)
                for _ in in_chs])
        else:
            self.attentions = None
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=cfg.downsample_padding)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_ch)])

    def _layer(self, i, x, temb, context):
        x = self.resnets[i](x, temb[:x.shape[0]])  # (a shared first half: its timesteps equal the rest's)
        return self.attentions[i](x, context) if self.attentions is not None else x

    def down(self, x, temb, context):
        skips = []
        for i in range(len(self.resnets)):
            x = self._layer(i, x, temb, context)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips

    def up(self, x, skips, temb, context, upsample_size=None, first=0, cache=None):
        """Layers first.. of this level, each taking the last skip; `cache` keeps layer 0's output (DeepCache)."""
        for i in range(first, len(self.resnets)):
            x = self._layer(i, torch.cat([x, skips.pop()], dim=1), temb, context)
            if cache is not None and i == 0:
                cache.features = x
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock(nn.Module):
    def __init__(self, ch: int, temb_dim: int, cfg: UNetConfig, heads: int):
        super().__init__()
        g, eps, scale = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb_dim, g, eps, scale) for _ in range(2)])
        self.attentions = nn.ModuleList([
            SpatialTransformer(ch, heads, cfg.cross_attention_dim, g, cfg.use_linear_projection)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class DeepCache:
    """Reuse of the U-Net's deep features across calls (DeepCache, Ma et al. 2024, arXiv:2312.00858).

    Every `interval`-th call runs the whole U-Net and keeps the features entering the last up level's second layer;
    the calls in between run only the shallowest branch: conv_in and the first down layer, whose outputs are the
    skips of the last up level's last two layers, which then run on the kept features. One cache serves one run.
    Calls of another batch or text length (the guidance wrapper running the unconditional rows apart, or leaving
    them out) are counted and kept apart: each kind has its own features.
    """

    def __init__(self, interval: int):
        if interval < 1:
            raise ValueError(f"cache interval {interval} must be at least 1")
        self.interval, self.calls, self.kept, self.kind = interval, {}, {}, None

    def full_pass(self, batch: int, text_length: int) -> bool:
        """Whether this call (of `batch` latents, with text of `text_length` tokens) runs the whole U-Net: every
        interval-th call of its kind, and the first."""
        self.kind = batch, text_length
        calls = self.calls.get(self.kind, 0)
        self.calls[self.kind] = calls + 1
        return self.kind not in self.kept or calls % self.interval == 0

    @property
    def features(self) -> torch.Tensor | None:
        return self.kept.get(self.kind)

    @features.setter
    def features(self, x: torch.Tensor) -> None:
        self.kept[self.kind] = x


def down_blocks(cfg: UNetConfig, temb_dim: int) -> nn.ModuleList:
    """The encoder half's resolution levels (the U-Net's, and a ControlNet's copy of them)."""
    chs, n = cfg.block_out_channels, cfg.layers_per_block
    blocks, prev = nn.ModuleList(), chs[0]
    for i, (ch, kind) in enumerate(zip(chs, cfg.down_block_types)):
        last = i == len(chs) - 1
        blocks.append(UNetBlock([prev] + [ch] * (n - 1), ch, temb_dim, cfg, cfg.heads[i],
                                attn=kind.startswith("CrossAttn"), resample=None if last else "down"))
        prev = ch
    return blocks


def skip_count(blocks: nn.ModuleList) -> int:
    """How many skip connections down blocks keep: conv_in's output, every layer's, every downsampler's."""
    return 1 + sum(len(b.resnets) + hasattr(b, "downsamplers") for b in blocks)


def _with_residuals(skips: list[torch.Tensor], residuals: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The first len(skips) skip connections plus a ControlNet's residuals for them (when there are any)."""
    return skips if residuals is None else [s + r for s, r in zip(skips, residuals)]


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        chs, n = cfg.block_out_channels, cfg.layers_per_block
        temb_dim = chs[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        if cfg.time_cond_proj_dim is None:
            self.time_embedding = TimestepEmbedding(chs[0], temb_dim)
        else:
            self.time_embedding = GuidedTimestepEmbedding(chs[0], temb_dim, cfg.time_cond_proj_dim)

        self.down_blocks = down_blocks(cfg, temb_dim)
        self.mid_block = MidBlock(chs[-1], temb_dim, cfg, cfg.heads[-1])

        # Each up level takes n+1 skips: n from the matching down level's layers, the last one from the level
        # below it (or conv_in). Channel bookkeeping as in diffusers' UNet2DConditionModel.
        rev, rev_heads = list(reversed(chs)), list(reversed(cfg.heads))
        self.up_blocks = nn.ModuleList()
        prev = rev[0]
        for i, (ch, kind) in enumerate(zip(rev, cfg.up_block_types)):
            last = i == len(chs) - 1
            skip_in = rev[min(i + 1, len(chs) - 1)]
            in_chs = [(prev if j == 0 else ch) + (skip_in if j == n else ch) for j in range(n + 1)]
            self.up_blocks.append(UNetBlock(in_chs, ch, temb_dim, cfg, rev_heads[i],
                                            attn=kind.startswith("CrossAttn"), resample=None if last else "up"))
            prev = ch

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                cache: DeepCache | None = None, timestep_cond: torch.Tensor | None = None,
                down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_channels, h, w), t scalar or (B,) timesteps, context (B, L, cross_attention_dim) -> eps.
        With a DeepCache, most calls run only the shallowest branch on features kept from the last full call.
        timestep_cond (B or 1, time_cond_proj_dim): an LCM U-Net's guidance-scale embedding
        (`guidance_scale_embedding`); without it such a U-Net runs on the timestep embedding alone, as diffusers'.
        down_block_additional_residuals (one per skip connection, `skip_count`) and mid_block_additional_residual:
        a ControlNet's outputs, given together, added to the skips and to the mid block's output as diffusers'
        UNet2DConditionModel adds them (the down path itself runs without them)."""
        down_res, mid_res = self._check_residuals(down_block_additional_residuals, mid_block_additional_residual)
        cfg = self.config
        t = torch.as_tensor(t, device=x.device)
        t = t.reshape(-1).expand(x.shape[0])
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype)
        if timestep_cond is None:
            temb = self.time_embedding(emb)
        elif cfg.time_cond_proj_dim is None:
            raise ValueError("timestep_cond given, but this U-Net has no guidance embedding (time_cond_proj_dim)")
        else:
            temb = self.time_embedding(emb, timestep_cond.to(x.device, x.dtype))

        # Under classifier-free guidance the batch is [x; x] at one timestep, under two contexts: up to the first
        # cross-attention (conv_in, the first resnet, the first self-attention) both halves are the same, so that
        # part runs on one half (6% of a 512px SD 1.5 step's op time) and the first transformer block widens it.
        b = self._shared_half(x, t)
        h = self.conv_in(x[:b])
        top = h if b == x.shape[0] else h.repeat(x.shape[0] // b, 1, 1, 1)  # the last up layer's skip
        if cache is not None and not cache.full_pass(x.shape[0], context.shape[1]):
            first = self.down_blocks[0]._layer(0, h, temb, context)
            shallow = _with_residuals([top, first], down_res)
            h = self.up_blocks[-1].up(cache.features, shallow, temb, context, first=1)
            return self.conv_out(F.silu(self.conv_norm_out(h)))
        skips = [top]
        for block in self.down_blocks:
            h, s = block.down(h, temb, context)
            skips += s
        h = self.mid_block(h, temb, context)
        if mid_res is not None:
            skips, h = _with_residuals(skips, down_res), h + mid_res
        for block in self.up_blocks:
            level_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            # upsample to the next skip's size: 2x for sizes divisible by the total factor, exact otherwise
            size = skips[-1].shape[-2:] if skips else None
            h = block.up(h, level_skips, temb, context, size, cache=cache if block is self.up_blocks[-1] else None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def _check_residuals(self, down, mid) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """(down residuals, mid residual), both None when neither is given; ValueError for one without the other or
        a count that is not one per skip connection."""
        if down is None and mid is None:
            return None, None
        if down is None or mid is None:
            given = "down_block_additional_residuals" if mid is None else "mid_block_additional_residual"
            raise ValueError(f"{given} given alone; a ControlNet's down and mid residuals go in together")
        if len(down) != (n := skip_count(self.down_blocks)):
            raise ValueError(f"{len(down)} down_block_additional_residuals for the {n} skip connections of this U-Net")
        return list(down), mid

    def _shared_half(self, x: torch.Tensor, t: torch.Tensor) -> int:
        """len(x) // 2 where x = [a; a] at equal timesteps and the first layer has a transformer to widen it there,
        else len(x). CPU only: on a GPU the comparison would wait for the device (and break graph capture)."""
        n = len(x)
        if (n % 2 or x.device.type != "cpu" or self.down_blocks[0].attentions is None
                or torch.compiler.is_compiling() or not cpu.enabled("shared_half")):
            return n
        return n // 2 if torch.equal(x[:n // 2], x[n // 2:]) and torch.equal(t[:n // 2], t[n // 2:]) else n
