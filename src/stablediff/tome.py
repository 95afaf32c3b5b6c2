"""Token merging for Stable Diffusion (ToMe for SD: Bolya & Hoffman 2023, arXiv:2303.17604).

Before a transformer block's self-attention, the r = int(ratio * N) source tokens most similar (cosine, on the
block's input) to a destination token are averaged into it; attention runs on the N - r tokens left, and its output
is copied back to every token that was merged ("unmerge") before the residual. Destinations are one token per
sx x sy cell of the token grid; the rest are sources (bipartite soft matching).

The settings are AUTOMATIC1111's, who calls the tomesd package with: merge before self-attention only (not the
cross-attention, not the feed-forward), only at the highest-resolution level (max_downsample 1), sx = sy = 2, and
use_rand=False ("can cause issues with some samplers"): the destination is each cell's top-left token, so the
same latents always merge the same way and no generator is drawn from. A ratio of 0 leaves the U-Net untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .params import MAX_TOKEN_MERGING_RATIO


@dataclass(frozen=True)
class Merge:
    """One bipartite matching of a (B, N, C) token batch: which sources go into which destinations.

    dst (D,), src (S,): token positions of the destinations and the sources; kept (B, S - r) and merged (B, r):
    positions into src of the sources left alone and of those merged; into (B, r): the destination (position
    into dst) each merged source goes into."""

    dst: torch.Tensor
    src: torch.Tensor
    kept: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): the kept sources, then the destinations averaged with what merged in."""
        src, dst = x[:, self.src], x[:, self.dst]
        kept = _take(src, self.kept)
        dst = dst.scatter_reduce(1, _expand(self.into, x), _take(src, self.merged), reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): each token gets its merged token's value back."""
        n_kept = self.kept.shape[1]
        kept, dst = y[:, :n_kept], y[:, n_kept:]
        out = y.new_empty(y.shape[0], len(self.dst) + len(self.src), y.shape[2])
        out[:, self.dst] = dst
        out.scatter_(1, _expand(self.src[self.kept], y), kept)
        out.scatter_(1, _expand(self.src[self.merged], y), _take(dst, self.into))
        return out


def bipartite_soft_matching(metric: torch.Tensor, h: int, w: int, r: int, sx: int = 2, sy: int = 2) -> Merge:
    """The matching for tokens metric (B, h*w, C) of an h x w grid, merging r of them (at most every source).

    Destinations: the top-left token of every whole sx x sy cell (a last row or column that fills no cell is all
    sources). Each source's best destination is the most similar one; the r sources with the highest best
    similarity merge, each into its best destination."""
    rows = torch.arange(h, device=metric.device)[:, None]
    cols = torch.arange(w, device=metric.device)[None, :]
    is_dst = ((rows % sy == 0) & (rows < h // sy * sy) & (cols % sx == 0) & (cols < w // sx * sx)).reshape(-1)
    dst, src = is_dst.nonzero()[:, 0], (~is_dst).nonzero()[:, 0]
    r = min(r, len(src))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, src] @ unit[:, dst].transpose(1, 2)  # (B, S, D) cosine similarities
    best, best_dst = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged = order[:, :r]
    return Merge(dst, src, kept=order[:, r:], merged=merged, into=best_dst.gather(1, merged))


@dataclass(frozen=True)
class TokenMerging:
    """The merging of one transformer block (its `merging` hook, unet.TransformerBlock): `ratio` of its tokens."""

    ratio: float
    sx: int = 2
    sy: int = 2

    def plan(self, x: torch.Tensor, size: tuple[int, int]) -> Merge | None:
        """The matching for the block's input x (B, h*w, C), or None where it would merge no token."""
        r = int(x.shape[1] * self.ratio)
        return bipartite_soft_matching(x, *size, r, self.sx, self.sy) if r > 0 else None


def check_ratio(ratio) -> None:
    """ValueError naming a ratio that is not a number in 0..MAX_TOKEN_MERGING_RATIO (GenerationParams checks it
    too; this is for callers of `token_merging` itself)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= MAX_TOKEN_MERGING_RATIO:
        raise ValueError(f"token merging ratio {ratio!r} is outside 0..{MAX_TOKEN_MERGING_RATIO}")


def merged_blocks(unet: nn.Module, max_downsample: int = 1) -> list[nn.Module]:
    """The transformer blocks of the U-Net's levels downsampled at most `max_downsample` times (1: the top level
    only, in the first down block and the last up block; the mid block sits at the lowest level)."""
    levels = len(unet.down_blocks)
    chosen = [b for i, b in enumerate(unet.down_blocks) if 2 ** i <= max_downsample]
    chosen += [b for i, b in enumerate(unet.up_blocks) if 2 ** (levels - 1 - i) <= max_downsample]
    chosen += [unet.mid_block] if 2 ** (levels - 1) <= max_downsample else []
    return [block for level in chosen for t in (level.attentions or ()) for block in t.transformer_blocks]


@contextlib.contextmanager
def token_merging(unet: nn.Module, ratio: float, max_downsample: int = 1):
    """While inside, the U-Net's self-attention at levels downsampled at most `max_downsample` times runs on
    tokens merged by `ratio` (0: nothing changes). The blocks' hooks are cleared on leaving, on an error too."""
    check_ratio(ratio)
    blocks = merged_blocks(unet, max_downsample) if ratio > 0 else []
    try:
        for block in blocks:
            block.merging = TokenMerging(ratio)
        yield
    finally:
        for block in blocks:
            block.merging = None


def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, k) or (k,) token positions -> (B, k, C) for gather/scatter along the tokens of `like` (B, N, C)."""
    return index.expand(like.shape[0], -1)[..., None].expand(-1, -1, like.shape[2])


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) at per-batch token positions index (B, k) -> (B, k, C)."""
    return x.gather(1, _expand(index, x))
