"""Small frozen configs for each component, read from a checkpoint's own `config.json`.

Defaults are Stable Diffusion 1.5's. `from_dict` takes the fields we model, ignores bookkeeping keys
(`_class_name`, `architectures`, ...) and refuses values that would change the architecture in a way we do
not implement, so a foreign model fails here with a clear message instead of deep inside a matmul.

Every field is checked when a config is built (from config.json or from a single file's tensor shapes): its type
is the one the field is annotated with, and numbers lie in the class' `_ranges`. The bounds sit far above every
real SD 1.x / 2.x / inpainting config, so they only stop a broken or hostile file (`layers_per_block: 1000000`,
`num_train_timesteps: 2e9`) before anything is built or allocated from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 16 * 2**20  # a config or shard index is kilobytes; SD 1.5's whole U-Net index is 60 KB


def show(value, limit: int = 60) -> str:
    """A value for a one-line error message: its repr (a string '2' is not the number 2; newlines are escaped),
    cut to `limit` characters so that a hostile file's megabyte-long key or value stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_json(path: str | Path) -> Any:
    """A JSON file, refused with a ValueError naming it when it is unreadable, over MAX_JSON_BYTES (a config is
    kilobytes; this bounds the memory a hostile one costs) or nested too deeply for the parser."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path.stat().st_size:,} bytes, over the {MAX_JSON_BYTES:,} a JSON config may have")
        return json.loads(path.read_text())
    except RecursionError:
        raise ValueError(f"{path}: cannot read (JSON nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None


# bounds shared by the CLIP text and vision transformers (SD 1.x: 768 wide, 12 layers; SD 2.x's OpenCLIP-H 1024 /
# 23-24; SDXL's bigG 1280 / 32; the vision tower 1024 / 24)
_TRANSFORMER_RANGES = {"hidden_size": (1, 8192), "intermediate_size": (1, 32768), "num_hidden_layers": (1, 128),
                       "num_attention_heads": (1, 256), "layer_norm_eps": (0, 1)}
_LEVELS = 8  # resolution levels of a U-Net or VAE (SD: 4, SDXL: 3)


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


# the annotation names _has_type checks, each with its test; a nested config class is not checked here
_IS = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
       "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
       "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str), "None": lambda v: v is None}


def _has_type(value, annotation: str) -> bool:
    """Does `value` fit an annotation such as "int", "int | tuple[int, ...] | None" or "tuple[str, ...]"?"""
    def fits(v, name: str) -> bool:
        return _IS[name](v) if name in _IS else True

    for alternative in (a.strip() for a in annotation.split("|")):
        if alternative.startswith("tuple[") and alternative.endswith(", ...]"):
            item = alternative[len("tuple["):-len(", ...]")]
            if isinstance(value, tuple) and all(fits(v, item) for v in value):
                return True
        elif fits(value, alternative):
            return True
    return False


def _check_range(name: str, value, bounds: tuple) -> None:
    """Numbers (or every number of a tuple) within bounds = (low, high[, most items]); ValueError otherwise."""
    low, high, *most = bounds
    items = value if isinstance(value, tuple) else (value,)
    if most and not 1 <= len(items) <= most[0]:
        raise ValueError(f"{name} has {len(items)} values; it may have 1 to {most[0]}")
    for v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (math.isfinite(v) and low <= v <= high):
            raise ValueError(f"{name} {show(v)} is outside {low:g}..{high:g}")


class Config:
    # fields whose value must equal the one given here (config key -> allowed values)
    _fixed: dict[str, tuple] = {}
    # field -> (low, high[, most items]): numbers, or every number of a tuple, must lie within
    _ranges: dict[str, tuple] = {}

    def __post_init__(self):
        """Every field has its annotated type and lies in `_ranges` (ValueError naming field and value). The range
        is checked first, so that `num_train_timesteps: 2e9` says "outside 1..10000" rather than "not an int"."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self._ranges:
                _check_range(f.name, value, self._ranges[f.name])
            if not _has_type(value, str(f.type)):
                raise ValueError(f"{f.name} {show(value)} has the wrong type (expected {f.type})")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Config":
        if not isinstance(d, dict):
            raise ValueError(f"{source}: not a JSON object (a {type(d).__name__})")
        names = {f.name for f in dataclasses.fields(cls)}
        for key, allowed in cls._fixed.items():
            if key in d and d[key] not in allowed:
                raise ValueError(f"{source}: {key}={show(d[key])} is not supported (expected one of {list(allowed)})")
        kwargs = {k: _tuple(v) for k, v in d.items() if k in names and v is not None}
        return cls._build(source, **kwargs)

    @classmethod
    def _build(cls, source: str, **kwargs) -> "Config":
        """cls(**kwargs), its errors prefixed with where the values came from."""
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class CLIPTextConfig(Config):
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    _fixed = {"hidden_act": ("quick_gelu", "gelu")}
    _ranges = {**_TRANSFORMER_RANGES, "vocab_size": (1, 1_000_000), "max_position_embeddings": (1, 4096)}


@dataclass(frozen=True)
class CLIPVisionConfig(Config):
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    _fixed = {"hidden_act": ("quick_gelu", "gelu")}
    _ranges = {**_TRANSFORMER_RANGES, "image_size": (1, 4096), "patch_size": (1, 4096), "num_channels": (1, 64)}


@dataclass(frozen=True)
class UNetConfig(Config):
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    # diffusers' historical naming: for SD 1.x `attention_head_dim` is really the number of heads
    attention_head_dim: int | tuple[int, ...] = 8
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
    # LCM checkpoints: width of the guidance-scale embedding added to the timestep embedding (unet.py, `cond_proj`)
    time_cond_proj_dim: int | None = None

    _fixed = {
        "act_fn": ("silu",),
        "center_input_sample": (False,),
        "class_embed_type": (None,),
        "addition_embed_type": (None,),
        "time_embedding_type": ("positional",),
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "transformer_layers_per_block": (1,),
        "only_cross_attention": (False,),
        "dual_cross_attention": (False,),
        "resnet_time_scale_shift": ("default",),
        "encoder_hid_dim": (None,),
        "num_class_embeds": (None,),
    }
    # SD 1.x: 4 (8 instruct-pix2pix, 9 inpainting) in, 4 out, 64 latents (SD 2.x 96), (320, 640, 1280, 1280),
    # 2 layers, 8 heads (SD 2.x [5, 10, 20, 20]), 768 (SD 2.x 1024, SDXL 2048) wide cross-attention
    _ranges = {"in_channels": (1, 64), "out_channels": (1, 64), "sample_size": (1, 512),
               "block_out_channels": (1, 8192, _LEVELS), "layers_per_block": (1, 16),
               "attention_head_dim": (1, 1024, _LEVELS), "num_attention_heads": (1, 1024, _LEVELS),
               "cross_attention_dim": (1, 8192), "norm_num_groups": (1, 1024), "norm_eps": (0, 1),
               "freq_shift": (0, 16), "downsample_padding": (0, 16), "mid_block_scale_factor": (0, 100),
               "time_cond_proj_dim": (1, 8192)}

    def __post_init__(self):
        super().__post_init__()
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"unet config: {n} block_out_channels but {len(self.down_block_types)} down / "
                             f"{len(self.up_block_types)} up block types")
        if len(self.heads) != n:
            raise ValueError(f"unet config: {len(self.heads)} attention heads values for {n} block_out_channels")
        known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
        for t in self.down_block_types + self.up_block_types:
            if t not in known:
                raise ValueError(f"unet config: block type {show(t)} is not supported (expected one of "
                                 f"{sorted(known)})")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (up blocks use them reversed)."""
        h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return h if isinstance(h, tuple) else (h,) * len(self.block_out_channels)


@dataclass(frozen=True)
class VAEConfig(Config):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    _fixed = {
        "act_fn": ("silu",),
        "use_quant_conv": (True,),
        "use_post_quant_conv": (True,),
        "shift_factor": (None,),
        "latents_mean": (None,),
        "latents_std": (None,),
    }
    # SD: 3 in/out, 4 latent channels, (128, 256, 512, 512), 2 layers, 512 px, scaling 0.18215 (SDXL 0.13025)
    _ranges = {"in_channels": (1, 64), "out_channels": (1, 64), "latent_channels": (1, 64),
               "block_out_channels": (1, 8192, _LEVELS), "layers_per_block": (1, 16), "norm_num_groups": (1, 1024),
               "sample_size": (1, 8192), "scaling_factor": (1e-6, 100)}

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: 2 ** (levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SafetyCheckerConfig(Config):
    projection_dim: int = 768
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)

    _ranges = {"projection_dim": (1, 8192)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "SafetyCheckerConfig":
        if not isinstance(d, dict):
            raise ValueError(f"{source}: not a JSON object (a {type(d).__name__})")
        vision = CLIPVisionConfig.from_dict(d.get("vision_config") or {}, source=source)
        return cls._build(source, projection_dim=d.get("projection_dim", 768), vision_config=vision)
