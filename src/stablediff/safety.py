"""The NSFW safety checker that ships with Stable Diffusion 1.x (`safety_checker/` + `feature_extractor/`).

    checker = load_safety_checker("path/to/stable-diffusion-v1-5")
    images, nsfw = checker.censor(images)  # flagged images come back blurred, nsfw says which

An image is preprocessed as CLIP's image processor does (shortest side to 224, bicubic; centre crop 224; x/255;
CLIP mean/std), embedded with the CLIP ViT-L/14 vision tower (`clip.CLIPVisionModel`, pooled class token) and
projected to 768 without bias. Its cosine similarity to 17 concept embeddings and 3 "special care" embeddings,
minus one threshold per embedding and rounded to 3 decimals, gives the scores; a special-care score above 0 adds
0.01 to every concept score (and to the special-care scores after it); an image is flagged when any concept score
is above 0. This is exactly the arithmetic of diffusers' StableDiffusionSafetyChecker, whose weight names we keep
(`vision_model.vision_model.*`, `visual_projection.weight`, `concept_embeds`, ...). diffusers blacks flagged images
out; `censor` blurs them instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from . import weights
from .clip import CLIPVisionModel
from .config import SafetyCheckerConfig
from .weights import CheckpointError

__all__ = ["SafetyChecker", "load_safety_checker", "preprocess", "blur", "checker_keys", "SD15_PREPROCESSOR"]

CONCEPTS = 17
SPECIAL_CARE = 3
SPECIAL_CARE_ADJUSTMENT = 0.01  # added to the later scores of an image once one special-care score is above 0
DECIMALS = 3  # scores are rounded before they are compared with 0

# SD 1.5's feature_extractor/preprocessor_config.json, with transformers' defaults for the keys it leaves out
SD15_PREPROCESSOR = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


# ----------------------------------------------------------------------------------------------------------------
# Images in and out

def _size(value, key: str, square: bool) -> dict:
    """A processor config's size: an int (shortest edge, or a square when `square`) or a dict, as a dict."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, dict) and set(value) in ({"shortest_edge"}, {"height", "width"}):
        if all(isinstance(v, int) and v > 0 for v in value.values()):
            return value
    raise ValueError(f"preprocessor config: {key}={value!r} is not supported (expected a positive int, "
                     f"{{'shortest_edge': n}} or {{'height': h, 'width': w}})")


def _settings(config: dict | None) -> dict:
    """Check a preprocessor config (None: SD 1.5's) and fill in transformers' defaults."""
    c = {**SD15_PREPROCESSOR, **(config or {})}
    size, crop = _size(c["size"], "size", square=False), _size(c["crop_size"], "crop_size", square=True)
    if c["do_center_crop"] and "height" not in crop:
        raise ValueError(f"preprocessor config: crop_size={c['crop_size']!r} must give a height and a width")
    try:
        Image.Resampling(c["resample"])
    except ValueError:
        raise ValueError(f"preprocessor config: resample={c['resample']!r} is not a PIL resampling filter") from None
    for key in ("image_mean", "image_std"):
        if len(np.atleast_1d(c[key])) not in (1, 3):
            raise ValueError(f"preprocessor config: {key}={c[key]!r} needs 1 or 3 values")
    return {**c, "size": size, "crop_size": crop}


def _rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8; transparency is composited onto white, as transformers 5's convert_to_rgb does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def _resize(image: np.ndarray, size: dict, resample: int) -> np.ndarray:
    h, w = image.shape[:2]
    if "shortest_edge" in size:  # the long side is truncated, as torchvision's Resize(int) does
        s = size["shortest_edge"]
        new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    else:
        new_w, new_h = size["width"], size["height"]
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling(resample)))


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre height x width; where the image is smaller, the rest is zeros (as transformers pads)."""
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    out = np.zeros((height, width, image.shape[2]), image.dtype)
    y0, y1, x0, x1 = max(top, 0), min(top + height, h), max(left, 0), min(left + width, w)
    out[y0 - top:y1 - top, x0 - left:x1 - left] = image[y0:y1, x0:x1]
    return out


def preprocess(images: list[Image.Image], config: dict | None = None) -> torch.Tensor:
    """PIL images (any size and mode) -> (B, 3, crop, crop) float32, equal to transformers' CLIPImageProcessor
    given the same preprocessor_config.json (`config`; None is SD 1.5's). Images always become RGB."""
    s = _settings(config)
    mean, std = np.float32(s["image_mean"]), np.float32(s["image_std"])
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"preprocess takes PIL images, got a {type(image).__name__}")
        x = _rgb(image)
        if s["do_resize"]:
            x = _resize(x, s["size"], s["resample"])
        if s["do_center_crop"]:
            x = _center_crop(x, s["crop_size"]["height"], s["crop_size"]["width"])
        # in float64, then float32, as transformers rescales; normalises in float32
        x = (x.astype(np.float64) * s["rescale_factor"]).astype(np.float32) if s["do_rescale"] else x.astype(np.float32)
        if s["do_normalize"]:
            x = (x - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
    if len({tuple(x.shape) for x in out}) > 1:
        raise ValueError(f"preprocessed images differ in size ({sorted({tuple(x.shape) for x in out})}); "
                         f"the preprocessor config must crop or resize to a fixed size")
    return torch.stack(out)


def blur(image: Image.Image) -> Image.Image:
    """A strong Gaussian blur (radius 1/16 of the longer side) that keeps the colours, not a black square."""
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    return image.filter(ImageFilter.GaussianBlur(max(2.0, max(image.size) / 16)))


# ----------------------------------------------------------------------------------------------------------------
# The checker

def checker_keys(sd: dict) -> tuple[dict, list[str]]:
    """A safety checker file's keys in our naming: transformers 5 saves the vision tower as `vision_model.*`, the
    SD 1.5 files (transformers 4) as `vision_model.vision_model.*`; the position_ids buffer is dropped."""
    out, dropped = {}, []
    for k, v in sd.items():
        if k.endswith("embeddings.position_ids"):
            dropped.append(k)
        elif k.startswith("vision_model.") and not k.startswith("vision_model.vision_model."):
            out["vision_model." + k] = v
        else:
            out[k] = v
    return out, dropped


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(F.normalize(a), F.normalize(b).t())


class SafetyChecker(nn.Module):
    def __init__(self, cfg: SafetyCheckerConfig, preprocessor: dict | None = None):
        super().__init__()
        _settings(preprocessor)  # a bad preprocessor config fails here, not at the first image
        self.config = cfg
        self.preprocessor = preprocessor  # feature_extractor/preprocessor_config.json; None is SD 1.5's
        dim = cfg.projection_dim
        self.vision_model = CLIPVisionModel(cfg.vision_config)
        self.visual_projection = nn.Linear(cfg.vision_config.hidden_size, dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.empty(CONCEPTS, dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.empty(SPECIAL_CARE, dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.empty(CONCEPTS), requires_grad=False)  # thresholds
        self.special_care_embeds_weights = nn.Parameter(torch.empty(SPECIAL_CARE), requires_grad=False)

    @classmethod
    def from_folder(cls, path, *, device="cpu", dtype: torch.dtype = torch.float32, variant: str | None = None,
                    preprocessor: dict | None = None) -> "SafetyChecker":
        """A `safety_checker/` folder: config.json + model.safetensors (or pytorch_model.bin, or a variant's file).
        Built on the meta device; every weight must be there and nothing else (the position_ids buffer aside)."""
        folder = Path(path).expanduser()
        config_file = folder / "config.json"
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such safety checker folder")
        if not config_file.is_file():
            raise CheckpointError(f"{folder}: no config.json; a safety checker folder holds config.json and "
                                  f"model.safetensors (or pytorch_model.bin), as a diffusers model's safety_checker/")
        d = weights.read_json_object(config_file)
        # configs saved by transformers 4 also hold `vision_config_dict`, which wins over `vision_config` there
        vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        if not vision:
            raise CheckpointError(f"{config_file}: not a safety checker config (no vision_config; architectures "
                                  f"{d.get('architectures')})")
        try:
            cfg = SafetyCheckerConfig.from_dict({**d, "vision_config": vision}, source=str(config_file))
        except (ValueError, TypeError) as e:
            raise CheckpointError(str(e)) from None
        path, sd = weights.read_component(folder, ("model", "pytorch_model"), variant=variant)
        sd, _ = checker_keys(sd)
        with torch.device("meta"):
            model = cls(cfg, preprocessor)
        weights.load_into(model, sd, path=str(path), component="safety checker")
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) preprocessed pixels -> (B, projection_dim) image embeddings, in the model's dtype."""
        w = self.visual_projection.weight
        return self.visual_projection(self.vision_model(pixel_values.to(w.device, w.dtype)))

    @torch.no_grad()
    def judge(self, image_embeds: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image embeddings -> scores and flags, with diffusers' float32 arithmetic (on the CPU, as there)."""
        special_cos = _cosine(image_embeds, self.special_care_embeds).cpu().float()
        concept_cos = _cosine(image_embeds, self.concept_embeds).cpu().float()
        special_w = self.special_care_embeds_weights.cpu().float()
        concept_w = self.concept_embeds_weights.cpu().float()
        adjustment = torch.zeros(len(image_embeds))
        special = torch.empty_like(special_cos)
        for j in range(special_cos.shape[1]):  # in order: a special-care hit raises the ones after it too
            special[:, j] = torch.round(special_cos[:, j] - special_w[j] + adjustment, decimals=DECIMALS)
            adjustment = torch.where(special[:, j] > 0, SPECIAL_CARE_ADJUSTMENT, adjustment)
        concept = torch.round(concept_cos - concept_w + adjustment[:, None], decimals=DECIMALS)
        return {"image_embeds": image_embeds, "special_scores": special, "concept_scores": concept,
                "nsfw": (concept > 0).any(dim=1)}

    def scores(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preprocessed pixels -> {"image_embeds" (B, D), "special_scores" (B, 3), "concept_scores" (B, 17),
        "nsfw" (B,) bool}; a score above 0 is a hit."""
        return self.judge(self.embed(pixel_values))

    def check(self, images: list[Image.Image]) -> list[bool]:
        """Which of the PIL images are flagged."""
        return self.scores(preprocess(images, self.preprocessor))["nsfw"].tolist() if images else []

    def censor(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """The images with the flagged ones blurred, and the flags."""
        nsfw = self.check(images)
        return [blur(im) if bad else im for im, bad in zip(images, nsfw)], nsfw


def load_safety_checker(source, *, device="cpu", dtype: torch.dtype = torch.float32,
                        variant: str | None = None) -> SafetyChecker:
    """A diffusers model folder (its safety_checker/ and feature_extractor/) or a safety checker folder itself
    (preprocessor_config.json read from it or from a sibling feature_extractor/; SD 1.5's when neither has one)."""
    root = Path(source).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{source}: no such folder; pass a diffusers model folder that has safety_checker/, "
                              f"or a safety_checker folder (config.json + model.safetensors)")
    folder = root / "safety_checker" if (root / "safety_checker").is_dir() else root
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{root}: has no safety checker (neither safety_checker/ nor config.json); pass a "
                              f"diffusers model folder that has safety_checker/, or a safety_checker folder")
    candidates = [folder / "preprocessor_config.json", folder.parent / "feature_extractor" / "preprocessor_config.json"]
    found = [c for c in candidates if c.is_file()]
    preprocessor = weights.read_json_object(found[0]) if found else None
    return SafetyChecker.from_folder(folder, device=device, dtype=dtype, variant=variant, preprocessor=preprocessor)
