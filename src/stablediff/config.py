"""Small frozen configs for each component, read from a checkpoint's own `config.json`.

Defaults are Stable Diffusion 1.5's. `from_dict` takes the fields we model, ignores bookkeeping keys
(`_class_name`, `architectures`, ...) and refuses values that would change the architecture in a way we do
not implement, so a foreign model fails here with a clear message instead of deep inside a matmul.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


class _Config:
    # fields whose value must equal the one given here (config key -> allowed values)
    _fixed: dict[str, tuple] = {}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "_Config":
        names = {f.name for f in dataclasses.fields(cls)}
        for key, allowed in cls._fixed.items():
            if key in d and d[key] not in allowed:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (expected one of {list(allowed)})")
        kwargs = {k: _tuple(v) for k, v in d.items() if k in names and v is not None}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "_Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read config ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class CLIPTextConfig(_Config):
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    _fixed = {"hidden_act": ("quick_gelu", "gelu")}


@dataclass(frozen=True)
class CLIPVisionConfig(_Config):
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


@dataclass(frozen=True)
class UNetConfig(_Config):
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

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"unet config: {n} block_out_channels but {len(self.down_block_types)} down / "
                             f"{len(self.up_block_types)} up block types")
        known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
        for t in self.down_block_types + self.up_block_types:
            if t not in known:
                raise ValueError(f"unet config: block type {t!r} is not supported (expected one of {sorted(known)})")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (up blocks use them reversed)."""
        h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return h if isinstance(h, tuple) else (h,) * len(self.block_out_channels)


@dataclass(frozen=True)
class VAEConfig(_Config):
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

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: 2 ** (levels - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class SafetyCheckerConfig(_Config):
    projection_dim: int = 768
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "SafetyCheckerConfig":
        vision = CLIPVisionConfig.from_dict(d.get("vision_config") or {}, source=source)
        return cls(projection_dim=d.get("projection_dim", 768), vision_config=vision)
