"""TAESD, the tiny autoencoder (madebyollin/taesd), and a preview that needs no model at all.

TAESD is distilled from the SD 1.x VAE: plain 3x3 convolutions and ReLUs, 64 channels throughout, no norms and no
attention, so it decodes a preview (or a whole image, a little blurred) for a sliver of the full VAE's cost. Its
latents are the ones the diffusion model sees, already multiplied by the VAE's 0.18215 (diffusers'
`AutoencoderTiny` has `scaling_factor` 1.0): `encode(x)` compares with `vae.encode(x).mean * 0.18215`, and
`decode(z)` takes the sampler's latents as they are. Pixels are in [-1, 1] at both ends, like our VAE's; TAESD
itself works in [0, 1], and the two ends convert.

Module names equal diffusers' `AutoencoderTiny` keys (`encoder.layers.N...`, `decoder.layers.N...`). The original
files (`taesd_encoder.*`, `taesd_decoder.*`) are one `nn.Sequential` each, whose decoder starts with a weightless
soft clamp at index 0 that diffusers (and we) do in `forward` instead: `original_table` is the one key table.

`cheap_preview` is AUTOMATIC1111's "Approx cheap" live preview: one fixed linear map of the 4 latent channels to RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import Config, show
from .images import to_pil
from .nn import upsample_conv3x3
from .weights import CheckpointError, load_into, read_component, read_json_object, read_state_dict

# The decoder first squashes latents softly into (-3, 3): z -> tanh(z / 3) * 3 (TAESD's `Clamp`)
LATENT_CLAMP = 3.0
# Both halves run channels-last: oneDNN's 64-channel convolutions on the CPU are much faster on NHWC tensors (an
# NCHW input is reordered on every call), and every layer here (conv, ReLU, add, nearest upsampling) keeps NHWC
CHANNELS_LAST = torch.channels_last

# The weight file stems of the original layout (madebyollin/taesd), for a folder holding them
ORIGINAL_STEMS = {"encoder": "taesd_encoder", "decoder": "taesd_decoder"}
ORIGINAL_SUFFIXES = (".safetensors", ".pth")

# AUTOMATIC1111's "Approx cheap" (modules/sd_vae_approx.py, cheap_approximation; the factors Keturn fitted for SD 1.4
# at discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2): row l is latent channel l's
# contribution to (R, G, B); the result is taken as pixels in [-1, 1] (sd_samplers_common.single_sample_to_image)
CHEAP_RGB = ((0.298, 0.207, 0.208),
             (0.187, 0.286, 0.173),
             (-0.158, 0.189, 0.264),
             (-0.184, -0.271, -0.473))


@dataclass(frozen=True)
class TinyAutoencoderConfig(Config):
    """diffusers' AutoencoderTiny config; the defaults are TAESD for SD 1.x (madebyollin/taesd's config.json)."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    upsampling_scaling_factor: int = 2
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5

    # scaling_factor 1.0: the latents are already in the diffusion model's scale (see the module docstring)
    _fixed = {"act_fn": ("relu",), "upsample_fn": ("nearest",), "scaling_factor": (1.0,), "shift_factor": (0.0,)}
    _ranges = {"in_channels": (1, 64), "out_channels": (1, 64), "latent_channels": (1, 64),
               "encoder_block_out_channels": (1, 4096, 8), "decoder_block_out_channels": (1, 4096, 8),
               "num_encoder_blocks": (0, 64, 8), "num_decoder_blocks": (0, 64, 8),
               "upsampling_scaling_factor": (1, 8), "latent_magnitude": (1e-6, 1000), "latent_shift": (-1000, 1000)}

    def __post_init__(self):
        """Each side has as many widths as levels, all equal: diffusers' EncoderTiny and DecoderTiny build a level's
        convolutions as width -> width of that level only, so a file with differing widths cannot exist."""
        super().__post_init__()
        for side in ("encoder", "decoder"):
            widths, blocks = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if len(widths) != len(blocks):
                raise ValueError(f"taesd config: {len(widths)} {side}_block_out_channels but {len(blocks)} "
                                 f"num_{side}_blocks")
            if len(set(widths)) != 1:
                raise ValueError(f"taesd config: {side}_block_out_channels {show(list(widths))} differ; every "
                                 f"level must have the same width")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side: the encoder halves the size at every level after the first."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)


def conv3x3(c_in: int, c_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


class Block(nn.Module):
    """ReLU(conv-ReLU-conv-ReLU-conv(x) + x): TAESD's only block (diffusers' AutoencoderTinyBlock; the widths are
    equal, so the skip is the identity). The ReLUs work in place on tensors just made, saving a buffer each."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Sequential(conv3x3(ch, ch), nn.ReLU(inplace=True), conv3x3(ch, ch), nn.ReLU(inplace=True),
                                  conv3x3(ch, ch))
        self.fuse = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.fuse(self.conv(x) + x)


class TinyEncoder(nn.Module):
    """[-1, 1] pixels -> latents: per level a 3x3 convolution (stride 2 and no bias after the first) and its blocks,
    then a 3x3 convolution to the latent channels."""

    def __init__(self, cfg: TinyAutoencoderConfig):
        super().__init__()
        layers = []
        for i, (ch, blocks) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks)):
            layers.append(conv3x3(cfg.in_channels, ch) if i == 0 else conv3x3(ch, ch, stride=2, bias=False))
            layers += [Block(ch) for _ in range(blocks)]
        layers.append(conv3x3(cfg.encoder_block_out_channels[-1], cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        x = x.add(1).div(2).contiguous(memory_format=CHANNELS_LAST)  # TAESD was trained on [0, 1] pixels
        return self.layers(x).contiguous()


class TinyDecoder(nn.Module):
    """Latents -> [-1, 1] pixels: soft clamp, a 3x3 convolution and ReLU, then per level its blocks, a nearest
    upsampling (not after the last) and a 3x3 convolution (without bias, except the last one, to RGB).

    A 2x upsampling and the convolution after it run as one (nn.upsample_conv3x3: four 2x2 convolutions of the
    small input, equal to rounding), which never makes the upsampled tensor; they stay two layers of the Sequential
    so that the keys stay the original's."""

    def __init__(self, cfg: TinyAutoencoderConfig):
        super().__init__()
        widths, last = cfg.decoder_block_out_channels, len(cfg.decoder_block_out_channels) - 1
        layers = [conv3x3(cfg.latent_channels, widths[0]), nn.ReLU(inplace=True)]
        for i, (ch, blocks) in enumerate(zip(widths, cfg.num_decoder_blocks)):
            layers += [Block(ch) for _ in range(blocks)]
            if i < last:
                layers.append(nn.Upsample(scale_factor=cfg.upsampling_scaling_factor, mode="nearest"))
            layers.append(conv3x3(ch, cfg.out_channels if i == last else ch, bias=i == last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        x = (torch.tanh(z / LATENT_CLAMP) * LATENT_CLAMP).contiguous(memory_format=CHANNELS_LAST)
        layers = iter(self.layers)
        for layer in layers:
            if isinstance(layer, nn.Upsample) and layer.scale_factor == 2:
                conv = next(layers)
                x = upsample_conv3x3(x, conv.weight, conv.bias)
            else:
                x = layer(x)
        return x.mul(2).sub(1).contiguous()  # TAESD's [0, 1] -> [-1, 1]


class TinyAutoencoder(nn.Module):
    """TAESD. Either half may be absent (`encoder=False` / `decoder=False`): a preview needs only the decoder, and
    the original layout ships the halves as separate files."""

    def __init__(self, cfg: TinyAutoencoderConfig, *, encoder: bool = True, decoder: bool = True):
        super().__init__()
        if not (encoder or decoder):
            raise ValueError("a TinyAutoencoder needs its encoder, its decoder or both")
        self.config = cfg
        self.encoder = TinyEncoder(cfg) if encoder else None
        self.decoder = TinyDecoder(cfg) if decoder else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) in the diffusion model's scale."""
        _check_input(x, self.encoder, self.config.in_channels, "encode", "pixels")
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, 4, h, w) in the diffusion model's scale -> pixels (B, 3, 8h, 8w), roughly in [-1, 1]."""
        _check_input(z, self.decoder, self.config.latent_channels, "decode", "latents")
        return self.decoder(z)

    def decoder_copy(self, dtype: torch.dtype) -> TinyAutoencoder:
        """A copy of the decoder alone in `dtype` (the pipeline's bfloat16 previews); this model stays as it is."""
        with torch.device("meta"):
            copy = TinyAutoencoder(self.config, encoder=False)
        copy.load_state_dict({k: v.to(dtype, copy=True) for k, v in self.state_dict().items()
                              if k.startswith("decoder.")}, assign=True)
        return copy.eval()

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> [0, 1], as TAESD stores latents in 8-bit images: z / (2 * magnitude) + shift, clamped."""
        return z.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> latents, the inverse of `scale_latents` within its clamp."""
        return x.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)


def _check_input(x, half: nn.Module | None, channels: int, what: str, name: str) -> None:
    if half is None:
        raise ValueError(f"cannot {what}: this TinyAutoencoder was loaded without its {what}r")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: expected {name} of shape (B, {channels}, H, W), got {shape}")


# ----------------------------------------------------------------------------------------------------------------
# Loading

def original_table(cfg: TinyAutoencoderConfig) -> dict[str, tuple[str, str]]:
    """Our key -> (half, key in that half's original file). The original encoder's Sequential indices are ours; the
    original decoder's are ours + 1, its index 0 being the weightless clamp (`decoder.layers.0.weight` is
    `1.weight` of taesd_decoder). Derived from the model built on the meta device."""
    with torch.device("meta"):
        keys = TinyAutoencoder(cfg).state_dict().keys()
    table = {}
    for key in keys:
        half, _, index, rest = key.split(".", 3)
        table[key] = (half, f"{int(index) + (half == 'decoder')}.{rest}")
    return table


def to_original(state_dict: dict[str, torch.Tensor], cfg: TinyAutoencoderConfig) -> dict[str, dict]:
    """Our (or diffusers') state dict -> {"encoder": {...}, "decoder": {...}} in the original files' naming."""
    table = original_table(cfg)
    out = {"encoder": {}, "decoder": {}}
    for key, tensor in state_dict.items():
        half, original = table[key]
        out[half][original] = tensor
    return {half: sd for half, sd in out.items() if sd}


def _original_half(sd: dict[str, torch.Tensor], path: Path) -> str:
    """Which half an original file holds, from its keys: the decoder's index 0 (the clamp) has no weights."""
    if "0.weight" in sd:
        return "encoder"
    if "1.weight" in sd:
        return "decoder"
    raise CheckpointError(f"{path}: not a TAESD encoder or decoder file (neither '0.weight' nor '1.weight' in it; "
                          f"keys {', '.join(list(sd)[:3])}, ...)")


def _from_original(files: list[Path], cfg: TinyAutoencoderConfig) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The original files' tensors renamed to our keys, and the halves they hold."""
    by_original = {(half, original): key for key, (half, original) in original_table(cfg).items()}
    sd, halves = {}, set()
    for path in files:
        tensors = read_state_dict(path)
        half = _original_half(tensors, path)
        if half in halves:
            raise CheckpointError(f"{path}: a second TAESD {half}; give one encoder and/or one decoder file")
        halves.add(half)
        unknown = [k for k in tensors if (half, k) not in by_original]
        if unknown:
            raise CheckpointError(f"{path}: TAESD {half} weights do not fit the model: unexpected "
                                  f"{', '.join(unknown[:3])} ({len(unknown)} in all)")
        sd.update({by_original[half, k]: v for k, v in tensors.items()})
    return sd, halves


def _original_files(folder: Path) -> list[Path]:
    """taesd_encoder.* and taesd_decoder.* in a folder (a clone of madebyollin/taesd), safetensors preferred."""
    found = []
    for stem in ORIGINAL_STEMS.values():
        found += [p for p in (folder / f"{stem}{s}" for s in ORIGINAL_SUFFIXES) if p.is_file()][:1]
    if not found:
        raise CheckpointError(f"{folder}: no TAESD weights (expected config.json and diffusion_pytorch_model.*, or "
                              f"{' / '.join(s + '.safetensors' for s in ORIGINAL_STEMS.values())})")
    return found


def is_taesd(source) -> bool:
    """Whether `source` holds TAESD rather than a full VAE: a diffusers folder whose config.json names
    AutoencoderTiny, a folder with taesd_encoder/taesd_decoder files, or a file named as madebyollin names them
    (taesd_decoder.safetensors ...; the original files carry no other mark short of reading their keys)."""
    path = Path(source)
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            return read_json_object(config).get("_class_name") == "AutoencoderTiny"
        return any((path / f"{stem}{s}").is_file() for stem in ORIGINAL_STEMS.values() for s in ORIGINAL_SUFFIXES)
    return path.suffix.lower() in ORIGINAL_SUFFIXES and path.name.lower().startswith("taesd")


def weights_file(source) -> Path:
    """The file that names a TAESD (its hash goes in the infotext): the file itself, or the folder's weights (the
    decoder's, for the original files)."""
    path = Path(source)
    if path.is_file():
        return path
    names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             *(f"{ORIGINAL_STEMS['decoder']}{s}" for s in ORIGINAL_SUFFIXES))
    for name in names:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: no TAESD weights ({', '.join(names)})")


def load_taesd(*sources, config: TinyAutoencoderConfig | None = None, device="cpu",
               dtype: torch.dtype = torch.float32) -> TinyAutoencoder:
    """TAESD from a diffusers folder (config.json + diffusion_pytorch_model.safetensors/.bin), a folder with the
    original taesd_encoder / taesd_decoder files, or one or two original files (.safetensors or .pth; a decoder
    alone is enough for previews). The original files hold no config: theirs is `config` (default: TAESD for SD
    1.x). Every key and shape is checked; pickles go through the restricted unpickler."""
    paths = [Path(s) for s in sources]
    if not paths:
        raise ValueError("load_taesd: give a TAESD folder or its encoder/decoder files")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise CheckpointError(f"{missing[0]}: no such file or directory")
    cfg = config or TinyAutoencoderConfig()
    if len(paths) == 1 and (paths[0] / "config.json").is_file():
        config_path = paths[0] / "config.json"
        cfg = TinyAutoencoderConfig.from_dict(read_json_object(config_path), source=str(config_path))
        where, sd = read_component(paths[0], ("diffusion_pytorch_model",))
        halves = {"encoder", "decoder"}
    else:
        files = _original_files(paths[0]) if len(paths) == 1 and paths[0].is_dir() else paths
        where, (sd, halves) = ", ".join(map(str, files)), _from_original(files, cfg)
    with torch.device("meta"):
        model = TinyAutoencoder(cfg, encoder="encoder" in halves, decoder="decoder" in halves)
    load_into(model, sd, path=str(where), component="TAESD")
    return model.to(device, dtype).eval()


# ----------------------------------------------------------------------------------------------------------------
# The preview without a model

def cheap_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, 4, h, w) in the diffusion model's scale -> rough pixels (B, 3, h, w) in [-1, 1]: CHEAP_RGB."""
    if latents.dim() != 4 or latents.shape[1] != len(CHEAP_RGB):
        raise ValueError(f"cheap preview: expected latents of shape (B, {len(CHEAP_RGB)}, h, w), "
                         f"got {tuple(latents.shape)}")
    factors = torch.tensor(CHEAP_RGB, dtype=torch.float32, device=latents.device)
    return torch.einsum("blhw,lr->brhw", latents.float(), factors)


def cheap_preview(latent: torch.Tensor, *, upscale: int = 1):
    """One latent (4, h, w) -> a PIL image of h x w pixels (times `upscale`, by repeating pixels: 8 gives the
    final image's size) through `cheap_rgb`. No model, so it costs nothing at every step."""
    if isinstance(upscale, bool) or not isinstance(upscale, int) or not 1 <= upscale <= 64:
        raise ValueError(f"cheap preview: upscale {show(upscale)} must be a whole number from 1 to 64")
    if latent.dim() != 3:
        raise ValueError(f"cheap preview: expected one latent of shape (4, h, w), got {tuple(latent.shape)}")
    rgb = cheap_rgb(latent[None])
    if upscale > 1:
        rgb = rgb.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    return to_pil(rgb)[0]
