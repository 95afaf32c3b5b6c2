"""ControlNet for SD 1.x (Zhang et al. 2023, arXiv:2302.05543): residuals that steer the U-Net by a hint image.

A ControlNet is a trainable copy of the U-Net's encoder half (conv_in, time embedding, down blocks, mid block: our
own U-Net blocks) that also sees the hint. Shape walk for SD 1.5 at 512x512 (latent 64x64, batch B):
  controlnet_cond_embedding  hint (B, 3, 512, 512) -> 16 -> 32@256 -> 96@128 -> 256@64 -> (B, 320, 64, 64)
  conv_in(x) + that          (B, 320, 64, 64)
  down_blocks, mid_block     as the U-Net's: 12 skips (320@64 x4, 640@32 x3, 1280@16 x3, 1280@8 x2), mid 1280@8
  controlnet_down_blocks.N   a zero-initialised 1x1 conv on skip N -> the U-Net's down residual N
  controlnet_mid_block       a zero-initialised 1x1 conv on the mid block's output -> the mid residual
The U-Net adds them to its skips and mid-block output (`UNet.forward`'s down_block_additional_residuals /
mid_block_additional_residual). Module names equal diffusers' `ControlNetModel` keys.

Loading: a diffusers ControlNetModel folder (config.json + diffusion_pytorch_model.*) or an original lllyasviel file
(`control_v11p_sd15_canny.pth` ...: `control_model.input_blocks.*`, `input_hint_block.N`, `zero_convs.N.0`,
`middle_block_out.0`, with or without the `control_model.` prefix), renamed through ONE key table (`key_table`):
the U-Net's original<->diffusers rows for the shared blocks (keymap.unet_key_table) plus the ControlNet's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import keymap
from .config import Config, UNetConfig
from .keymap import CheckpointError, rename_keys
from .nn import TimestepEmbedding, timestep_embedding
from .unet import MidBlock, down_blocks
from .weights import class_config, few, load_into, read_component, read_state_dict

ORIGINAL_PREFIX = "control_model."
# the U-Net config fields a ControlNet copies (diffusers' ControlNetModel.from_unet)
_UNET_FIELDS = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "attention_head_dim",
                "num_attention_heads", "cross_attention_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
                "freq_shift", "downsample_padding", "mid_block_scale_factor", "use_linear_projection",
                "upcast_attention")
# what must agree between a ControlNet and the U-Net its residuals go into
_FIT_FIELDS = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim")


@dataclass(frozen=True)
class ControlNetConfig(Config):
    """diffusers' ControlNetModel config; the defaults are SD 1.5's (lllyasviel/sd-controlnet-* config.json)."""
    in_channels: int = 4
    conditioning_channels: int = 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    attention_head_dim: int | tuple[int, ...] = 8  # heads, for SD 1.x (UNetConfig says why)
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    use_linear_projection: bool = False
    upcast_attention: bool = False
    # the hint encoder's widths: each level after the first halves the hint's size
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    # the shuffle ControlNet: residuals averaged over the image (and, in diffusers, never scaled for guess mode)
    global_pool_conditions: bool = False

    _fixed = {**UNetConfig._fixed, "encoder_hid_dim_type": (None,),
              "controlnet_conditioning_channel_order": ("rgb", "bgr")}
    _ranges = {**{k: v for k, v in UNetConfig._ranges.items() if k in _UNET_FIELDS},
               "conditioning_channels": (1, 64), "conditioning_embedding_out_channels": (1, 4096, 8)}

    def __post_init__(self):
        super().__post_init__()
        self.unet  # building the shared blocks' UNetConfig checks block types against head counts and widths

    @property
    def unet(self) -> UNetConfig:
        """The config of the U-Net whose encoder half this ControlNet copies (its up blocks mirror the down ones)."""
        ups = tuple(t.replace("Down", "Up") for t in reversed(self.down_block_types))
        return UNetConfig(**{k: getattr(self, k) for k in _UNET_FIELDS}, up_block_types=ups)

    @property
    def hint_downscale(self) -> int:
        """Hint pixels per latent along each side: the hint encoder halves the size at every level after the first."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **hint) -> "ControlNetConfig":
        """A ControlNet for `unet` (diffusers' ControlNetModel.from_unet); `hint` sets the hint encoder's fields."""
        return cls.from_dict({**{k: getattr(unet, k) for k in _UNET_FIELDS}, **hint}, source="ControlNet of a U-Net")


class ConditioningEmbedding(nn.Module):
    """The hint encoder (diffusers' ControlNetConditioningEmbedding): 3x3 convs with SiLU, a stride-2 conv into
    each next width, then a zero-initialised conv to the U-Net's first width."""

    def __init__(self, in_ch: int, out_ch: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c, c_next in zip(widths, widths[1:]):
            self.blocks.append(nn.Conv2d(c, c, 3, padding=1))
            self.blocks.append(nn.Conv2d(c, c_next, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_ch, 3, padding=1)

    def forward(self, hint):
        h = nn.functional.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = nn.functional.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        unet = cfg.unet
        chs = cfg.block_out_channels
        temb_dim = chs[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb_dim)
        self.controlnet_cond_embedding = ConditioningEmbedding(cfg.conditioning_channels, chs[0],
                                                               cfg.conditioning_embedding_out_channels)
        self.down_blocks = down_blocks(unet, temb_dim)
        self.mid_block = MidBlock(chs[-1], temb_dim, unet, unet.heads[-1])
        # one zero conv per skip: conv_in's, then each level's layers and (but the last level) its downsampler
        skip_chs = [chs[0]] + [c for i, c in enumerate(chs)
                               for _ in range(cfg.layers_per_block + (i < len(chs) - 1))]
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c, c, 1) for c in skip_chs])
        self.controlnet_mid_block = nn.Conv2d(chs[-1], chs[-1], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, hint: torch.Tensor,
                conditioning_scale: float = 1.0, guess_mode: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (B, in_channels, h, w) latents, t scalar or (B,) timesteps, context (B, L, cross_attention_dim), hint
        (B or 1, conditioning_channels, h * hint_downscale, w * hint_downscale): the control image, RGB in [0, 1]
        for SD 1.5's ControlNets -> (down residuals, one per U-Net skip connection; mid residual), each multiplied
        by conditioning_scale. guess_mode (diffusers'): residual i of n+1 scaled by 10 ** (i / n - 1), 0.1 at the
        top level rising to 1 at the mid block, so the hint's shallow features weigh less (for a ControlNet run on
        the conditional half of a guided batch only)."""
        cfg = self.config
        self._check_hint(x, hint)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            hint = hint.flip(1)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_embedding(
            timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype))
        h = self.conv_in(x) + self.controlnet_cond_embedding(hint.to(x.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, s = block.down(h, temb, context)
            skips += s
        h = self.mid_block(h, temb, context)
        outs = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)] + [self.controlnet_mid_block(h)]
        return self._scaled(outs, conditioning_scale, guess_mode)

    def _scaled(self, outs: list[torch.Tensor], conditioning_scale: float, guess_mode: bool):
        """(down residuals, mid residual) scaled as diffusers' ControlNetModel does, pooled for the shuffle model."""
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(outs), device=outs[0].device) * conditioning_scale
            outs = [o * s for o, s in zip(outs, scales)]
        else:
            outs = [o * conditioning_scale for o in outs]
        if self.config.global_pool_conditions:
            outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]
        return outs[:-1], outs[-1]

    def _check_hint(self, x: torch.Tensor, hint: torch.Tensor) -> None:
        cfg, f = self.config, self.config.hint_downscale
        want = (cfg.conditioning_channels, x.shape[-2] * f, x.shape[-1] * f)
        if hint.dim() != 4 or tuple(hint.shape[1:]) != want or hint.shape[0] not in (1, x.shape[0]):
            batch = "1" if x.shape[0] == 1 else f"1 or {x.shape[0]}"
            raise ValueError(f"ControlNet hint of shape {tuple(hint.shape)} does not fit latents {tuple(x.shape)}: "
                             f"expected ({batch}, {want[0]}, {want[1]}, {want[2]}), {f}x the latent size")


# ----------------------------------------------------------------------------------------------------------------
# The original layout's key table

def key_table(levels: int, layers: int, down_attn, hint_levels: int) -> list[tuple]:
    """Rows of (our module prefix, original module prefix, leaf renames), as keymap's: the U-Net's rows for the
    encoder half, the hint encoder's Sequential (convs at even indices, SiLUs between), the zero convs."""
    shared = ("conv_in", "time_embedding", "down_blocks.", "mid_block.")
    rows = [r for r in keymap.unet_key_table(levels, layers, down_attn, list(reversed(down_attn)))
            if r[0].startswith(shared)]
    n_blocks = 2 * (hint_levels - 1)
    rows += [("controlnet_cond_embedding.conv_in", "input_hint_block.0", None),
             ("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * (n_blocks + 1)}", None)]
    rows += [(f"controlnet_cond_embedding.blocks.{j}", f"input_hint_block.{2 * (j + 1)}", None)
             for j in range(n_blocks)]
    skips = 1 + levels * layers + levels - 1
    rows += [(f"controlnet_down_blocks.{n}", f"zero_convs.{n}.0", None) for n in range(skips)]
    return rows + [("controlnet_mid_block", "middle_block_out.0", None)]


def config_table(cfg: ControlNetConfig) -> list[tuple]:
    """key_table for a config."""
    return key_table(len(cfg.block_out_channels), cfg.layers_per_block,
                     [t.startswith("CrossAttn") for t in cfg.down_block_types],
                     len(cfg.conditioning_embedding_out_channels))


def to_original(state_dict: dict, cfg: ControlNetConfig) -> dict:
    """Our (diffusers') naming -> the original file's, `control_model.` prefixed (the inverse of loading one)."""
    mapped, left = rename_keys(state_dict, config_table(cfg), to_ours=False)
    if left:
        raise CheckpointError(f"to_original: {len(left)} ControlNet keys have no original name (e.g. {left[:3]})")
    return {ORIGINAL_PREFIX + k: v for k, v in mapped.items()}


def _indices(keys, prefix: str) -> list[int]:
    heads = (k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix))
    return sorted({int(h) for h in heads if h.isdigit()})


def _original_table(sd: dict) -> list[tuple]:
    """The key table for an original file, its structure read from the block numbering (it carries no config)."""
    inputs = _indices(sd, "input_blocks.")
    ops = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in sd]
    layers = ops[0] - 1 if ops else len(inputs) - 1
    levels = len(inputs) // (layers + 1) if layers > 0 else 0
    attn = [f"input_blocks.{1 + i * (layers + 1)}.1.proj_in.weight" in sd for i in range(levels)]
    return key_table(levels, layers, attn, len(_indices(sd, "input_hint_block.")) // 2)


def _infer_config(sd: dict, where: str) -> ControlNetConfig:
    """An original file's config from its shapes (our naming): the U-Net fields as keymap infers a U-Net's."""
    unet = keymap.infer_unet_config(sd, path=where)
    keymap.check_widths(where, unet.cross_attention_dim, None, "the width attn2.to_k reads")
    hint = _indices(sd, "controlnet_cond_embedding.blocks.")
    try:
        return ControlNetConfig.from_unet(
            unet, conditioning_channels=sd["controlnet_cond_embedding.conv_in.weight"].shape[1],
            conditioning_embedding_out_channels=(sd["controlnet_cond_embedding.conv_in.weight"].shape[0],) + tuple(
                sd[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0] for j in hint if j % 2))
    except KeyError as e:
        raise CheckpointError(f"{where}: not a ControlNet (no {e}; expected input_hint_block.N keys)") from None
    except ValueError as e:
        raise CheckpointError(f"{where}: the ControlNet config its weights describe is not usable ({e})") from None


def _from_original(path: Path) -> tuple[ControlNetConfig, dict]:
    """(config, weights in our naming) of an original single file. A file holding a whole SD model besides (the
    first control_sd15_*.pth) has its ControlNet under `control_model.`: only that part is read."""
    sd = read_state_dict(path)
    if any(k.startswith(ORIGINAL_PREFIX) for k in sd):
        sd = {k[len(ORIGINAL_PREFIX):]: v for k, v in sd.items() if k.startswith(ORIGINAL_PREFIX)}
    ours, left = rename_keys(sd, _original_table(sd), to_ours=True)
    if not any(k.startswith("controlnet_") for k in ours):
        raise CheckpointError(f"{path}: not a ControlNet (no input_hint_block / zero_convs keys; it has "
                              f"{few(list(sd))})")
    if left:
        raise CheckpointError(f"{path}: ControlNet weights with no place in the model: {few(left)}")
    return _infer_config(ours, str(path)), ours


def _from_folder(folder: Path) -> tuple[ControlNetConfig, dict, Path]:
    """(config, weights, weights file) of a diffusers ControlNetModel folder."""
    config_file, d = class_config(folder, "ControlNetModel", "a diffusers ControlNetModel folder or an "
                                          "original control_*.pth/.safetensors file")
    # before the config check, which would refuse SDXL's added embeddings less plainly
    keymap.check_widths(str(folder), d.get("cross_attention_dim"), None, "config.json cross_attention_dim")
    try:
        cfg = ControlNetConfig.from_dict(d, source=str(config_file))
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from None
    weights_file, sd = read_component(folder, ("diffusion_pytorch_model",))
    return cfg, sd, weights_file


def _check_fits(where: str, cfg: ControlNetConfig, like: UNetConfig) -> None:
    """The residuals must have the U-Net's skip shapes, and the ControlNet must read the same text features."""
    ours, theirs = ({k: getattr(c, k) for k in _FIT_FIELDS} for c in (cfg, like))
    if ours != theirs:
        bad = [f"{k} {ours[k]} (the U-Net's {theirs[k]})" for k in _FIT_FIELDS if ours[k] != theirs[k]]
        raise CheckpointError(f"{where}: this ControlNet does not fit the model's U-Net: {'; '.join(bad)}")


def load_controlnet(source, *, like: UNetConfig | None = None, device="cpu",
                    dtype: torch.dtype = torch.float32) -> ControlNet:
    """A ControlNet from a diffusers ControlNetModel folder or an original .pth/.safetensors file (pickles through
    the restricted unpickler), built on the meta device and loaded with every key and shape checked. SD 2.x / SDXL
    ControlNets are refused in one line; with `like`, so is one whose blocks do not fit that U-Net."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{source}: no such ControlNet file or folder")
    if path.is_dir():
        cfg, sd, where = _from_folder(path)
    else:
        (cfg, sd), where = _from_original(path), path
    if like is not None:
        _check_fits(str(path), cfg, like)
    with torch.device("meta"):
        model = ControlNet(cfg)
    load_into(model, sd, path=str(where), component="ControlNet")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
