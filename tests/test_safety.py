"""The SD 1.x safety checker against diffusers' StableDiffusionSafetyChecker and transformers' CLIPImageProcessor."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SD15, assert_close
from PIL import Image

from stablediff import weights
from stablediff.config import SafetyCheckerConfig
from stablediff.safety import SafetyChecker, blur, checker_keys, load_safety_checker, preprocess
from stablediff.weights import CheckpointError

TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, patch_size=14,
                   image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TINY_CHECKER = dict(projection_dim=32, vision_config=TINY_VISION,
                    text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2))


def sd15_json(name: str) -> dict:
    return json.loads((SD15 / name).read_text())


def diffusers_checker(config: dict, seed: int = 0):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(seed)
    return StableDiffusionSafetyChecker(CLIPConfig(**config)).eval()


def ours_from(ref) -> SafetyChecker:
    """Our checker built on the meta device, holding the same tensors as diffusers' (strict load)."""
    with torch.device("meta"):
        ours = SafetyChecker(SafetyCheckerConfig.from_dict(ref.config.to_dict()))
    weights.load_into(ours, checker_keys(ref.state_dict())[0])
    return ours.eval()


def images(n: int = 6) -> list[Image.Image]:
    """Odd sizes and modes, and contents different enough that their embeddings differ."""
    g = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 1013, dtype=np.float32)
    made = [
        Image.fromarray(g.integers(0, 256, (300, 511, 3), dtype=np.uint8)),
        Image.fromarray(np.stack([np.tile(ramp[:, None], (1, 97))] * 3, -1).astype(np.uint8)),  # 97x1013
        Image.fromarray(((np.indices((224, 224)).sum(0) // 16 % 2) * 255).astype(np.uint8)).convert("RGB"),
        Image.fromarray(g.integers(0, 256, (200, 300, 4), dtype=np.uint8), "RGBA"),
        Image.fromarray(g.integers(0, 256, (400, 150), dtype=np.uint8), "L"),
        Image.new("RGB", (50, 30), (200, 40, 90)),
    ]
    return made[:n]


def diffusers_loop(special_cos, cos, special_w, concept_w):
    """diffusers' scoring loop (StableDiffusionSafetyChecker.forward) transcribed: numpy float32 scalars, .item()
    thresholds, round(., 3), the 0.01 adjustment once a special-care score is above 0."""
    special_cos, cos = special_cos.float().numpy(), cos.float().numpy()
    special, concept = np.zeros(special_cos.shape, np.float32), np.zeros(cos.shape, np.float32)
    for i in range(len(cos)):
        adjustment = 0.0
        for j in range(special_cos.shape[1]):
            special[i, j] = round(special_cos[i][j] - special_w[j].item() + adjustment, 3)
            if special[i, j] > 0:
                adjustment = 0.01
        for j in range(cos.shape[1]):
            concept[i, j] = round(cos[i][j] - concept_w[j].item() + adjustment, 3)
    return torch.from_numpy(special), torch.from_numpy(concept), (concept > 0).any(1).tolist()


def diffusers_scores(ref, image_embeds):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    return diffusers_loop(cosine_distance(image_embeds, ref.special_care_embeds),
                          cosine_distance(image_embeds, ref.concept_embeds),
                          ref.special_care_embeds_weights, ref.concept_embeds_weights)


# Per image: (margin over its own concept, margin over its own special-care embedding or None). The score is the
# margin, plus 0.01 when a special-care score is above 0 (after rounding to 3 decimals).
PLANS = [(+0.003, None), (-0.003, None), (-0.005, +0.002), (+0.0004, +0.0004), (+0.0007, None), (-0.012, +0.003)]
EXPECTED = [True, False, True, False, True, False]  # the last four: special care, rounding to 0, rounding up, short


def plant(models, image_embeds, plans, seed=0):
    """Concept / special-care rows that single out one image each (its embedding minus the part the other images'
    embeddings span, so the others' cosine with it is 0), and thresholds so that each image scores its plan's
    margins there; the remaining rows are random and out of reach."""
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(image_embeds.double())
    dim = e.shape[1]
    own = torch.stack([e[i] - e[i] @ torch.linalg.pinv(others) @ others
                       for i in range(len(e)) for others in [torch.cat([e[:i], e[i + 1:]])]]).float()
    cos = (F.normalize(image_embeds.float()) @ F.normalize(own).t()).diagonal()
    assert cos.min() > 0.03, f"test images too alike for the plan (own cosines {cos.tolist()})"
    concepts, special = torch.randn(17, dim, generator=g), torch.randn(3, dim, generator=g)
    concept_w, special_w = torch.full((17,), 0.9), torch.full((3,), 0.9)
    slots = iter(range(3))
    for i, (margin, special_margin) in enumerate(plans):
        concepts[i], concept_w[i] = own[i], cos[i] - margin
        if special_margin is not None:
            s = next(slots)
            special[s], special_w[s] = own[i], cos[i] - special_margin
    for m in models:
        with torch.no_grad():
            for name, v in (("concept_embeds", concepts), ("special_care_embeds", special),
                            ("concept_embeds_weights", concept_w), ("special_care_embeds_weights", special_w)):
                getattr(m, name).copy_(v)


def check_against_diffusers(ref, ours, pixels, plans, expected):
    """Embeddings, cosines and scores against diffusers; flags from diffusers' own forward (one pass)."""
    embeds = ours.embed(pixels)
    plant([ref, ours], embeds, plans)
    captured = []
    hook = ref.visual_projection.register_forward_hook(lambda mod, inp, out: captured.append(out))
    try:
        _, ref_flags = ref(clip_input=pixels, images=[np.zeros((1, 1, 3))] * len(pixels))
    finally:
        hook.remove()
    ref_embeds = captured[0]
    err = assert_close(embeds, ref_embeds, 1e-4)
    result = ours.judge(embeds)
    ref_special, ref_concept, loop_flags = diffusers_scores(ref, ref_embeds)
    assert loop_flags == list(ref_flags)  # the transcription is faithful
    assert (result["concept_scores"] - ref_concept).abs().max() <= 1.01e-3  # 0 unless a cosine sits on a .0005
    assert (result["special_scores"] - ref_special).abs().max() <= 1.01e-3
    assert result["nsfw"].tolist() == list(ref_flags) == expected
    same = ours.judge(ref_embeds)  # from the very same embeddings: bit for bit
    assert torch.equal(same["concept_scores"], ref_concept) and torch.equal(same["special_scores"], ref_special)
    return err


# ----------------------------------------------------------------------------------------------------------------
# preprocessing

def test_preprocess_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(str(SD15 / "feature_extractor"))
    ims = images() + [Image.new("P", (230, 260), 7)]
    ref = proc(ims, return_tensors="pt").pixel_values
    ours = preprocess(ims, sd15_json("feature_extractor/preprocessor_config.json"))
    assert ours.shape == (len(ims), 3, 224, 224) and ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= 1 / 255
    assert torch.equal(ours, ref)  # the same operations in the same precision
    assert torch.equal(preprocess(ims), ours)  # None is SD 1.5's config


def test_preprocess_pads_like_transformers_when_not_resizing():
    from transformers import CLIPImageProcessor

    config = {**sd15_json("feature_extractor/preprocessor_config.json"), "do_resize": False}
    ims = [Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 300, 3), dtype=np.uint8))]
    assert torch.equal(preprocess(ims, config), CLIPImageProcessor(**config)(ims, return_tensors="pt").pixel_values)


@pytest.mark.parametrize("bad", [{"size": {"longest_edge": 3}}, {"crop_size": -1}, {"resample": 42},
                                 {"image_mean": [0.5, 0.5]}])
def test_preprocess_refuses_bad_configs_naming_the_value(bad):
    key, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"{key}={value!r}".replace("[", r"\[").replace("{", r"\{")):
        preprocess(images(1), bad)


# ----------------------------------------------------------------------------------------------------------------
# the checker on random weights

def test_scoring_arithmetic_is_diffusers_bit_for_bit():
    """Cosines placed just around the thresholds (on the rounding boundaries too): every rounding and
    special-care case, compared bit for bit with diffusers' loop."""
    ref = diffusers_checker(TINY_CHECKER)
    ours = ours_from(ref)
    g = torch.Generator().manual_seed(3)
    n, dim = 400, 32
    w = 0.15 + 0.01 * torch.rand(20, generator=g)  # 17 concept then 3 special-care thresholds
    offsets = torch.cat([torch.rand(n, 17, generator=g) * 0.016 - 0.015,
                         torch.rand(n, 3, generator=g) * 0.013 - 0.01], dim=1)
    offsets[:100] = torch.round(offsets[:100], decimals=3) + 0.0005  # on the rounding boundaries
    cos = w + offsets  # with the rows the first 20 unit vectors, these are the cosines
    embeds = torch.cat([cos, (1 - cos.pow(2).sum(1, keepdim=True)).sqrt(), torch.zeros(n, dim - 21)], 1)
    with torch.no_grad():
        ref.concept_embeds.copy_(torch.eye(dim)[:17])
        ref.special_care_embeds.copy_(torch.eye(dim)[17:20])
        ref.concept_embeds_weights.copy_(w[:17])
        ref.special_care_embeds_weights.copy_(w[17:])
    result = ours.judge(embeds)
    special, concept, flags = diffusers_scores(ref, embeds)
    assert torch.equal(result["special_scores"], special) and torch.equal(result["concept_scores"], concept)
    assert result["nsfw"].tolist() == flags
    assert 0 < sum(flags) < len(flags)
    assert ((special > 0).sum(1) >= 2).any()  # a special-care hit after another one (the running adjustment)
    hit_special, below = (special > 0).any(1, keepdim=True), cos[:, :17] < w[:17]
    assert (hit_special & below & (concept > 0)).any()  # lifted over 0 by the special-care adjustment
    assert not (~hit_special & below & (concept > 0)).any()


def test_tiny_checker_matches_diffusers():
    ref = diffusers_checker(TINY_CHECKER, seed=1)
    ours = ours_from(ref)
    check_against_diffusers(ref, ours, preprocess(images()), PLANS, EXPECTED)


@pytest.fixture(scope="module")
def full_size():
    """ViT-L/14 at SD 1.5's config (300M random weights), built once; ours shares diffusers' tensors."""
    ref = diffusers_checker(sd15_json("safety_checker/config.json"))
    return ref, ours_from(ref)


def test_full_size_checker_matches_diffusers(full_size):
    ref, ours = full_size
    assert sum(p.numel() for p in ours.vision_model.parameters()) > 300e6
    plans = [PLANS[2], PLANS[3]]  # flagged through special care; above 0 only before rounding
    check_against_diffusers(ref, ours, preprocess(images(2)), plans, [True, False])


def test_vision_tower_refuses_wrong_sizes(full_size):
    with pytest.raises(ValueError, match=r"\(1, 3, 256, 256\).*\(B, 3, 224, 224\)"):
        full_size[1].vision_model(torch.zeros(1, 3, 256, 256))


# ----------------------------------------------------------------------------------------------------------------
# loading

@pytest.fixture(scope="module")
def saved_checker(tmp_path_factory):
    """A tiny random checker saved by diffusers as a model folder's safety_checker/ + feature_extractor/."""
    ref = diffusers_checker(TINY_CHECKER, seed=2)
    root = tmp_path_factory.mktemp("sd") / "model"
    ref.save_pretrained(root / "safety_checker")
    shutil.copytree(SD15 / "feature_extractor", root / "feature_extractor")
    return ref, root


def test_from_folder_round_trip(saved_checker):
    ref, root = saved_checker
    ours = SafetyChecker.from_folder(root / "safety_checker")
    pixels = preprocess(images(3))
    a, b = ours.scores(pixels), ours_from(ref).scores(pixels)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.is_meta or p.requires_grad for p in ours.parameters())
    half = SafetyChecker.from_folder(root / "safety_checker", dtype=torch.bfloat16)
    assert half.visual_projection.weight.dtype == torch.bfloat16 and half.check(images(2)) == ours.check(images(2))


def test_load_safety_checker_from_a_model_folder_or_the_folder_itself(saved_checker):
    _, root = saved_checker
    for source in (root, root / "safety_checker"):
        checker = load_safety_checker(source)
        assert checker.preprocessor == sd15_json("feature_extractor/preprocessor_config.json")
        assert len(checker.check(images(2))) == 2


def test_sd15_file_naming_loads(saved_checker, tmp_path):
    """SD 1.5's files (saved by transformers 4) say vision_model.vision_model.* and carry position_ids; their
    config.json has a vision_config_dict that overrides vision_config."""
    ref, root = saved_checker
    sd = checker_keys(ref.state_dict())[0]
    assert all(k.startswith("vision_model.vision_model.") for k in sd if "vision" in k)
    sd["vision_model.vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    folder = tmp_path / "safety_checker"
    folder.mkdir()
    config = {"architectures": ["StableDiffusionSafetyChecker"], "projection_dim": 32,
              "vision_config": {**sd15_json("safety_checker/config.json")["vision_config"], "dropout": 0},
              "vision_config_dict": {k: TINY_VISION[k] for k in ("hidden_size", "intermediate_size",
                                                                 "num_attention_heads", "num_hidden_layers")}}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(sd, folder / "pytorch_model.bin")
    pixels = preprocess(images(1))
    assert torch.equal(SafetyChecker.from_folder(folder).embed(pixels), ours_from(ref).embed(pixels))


def test_missing_or_wrong_folders_are_named(saved_checker, tmp_path):
    _, root = saved_checker
    with pytest.raises(CheckpointError, match="nowhere"):
        load_safety_checker(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*has no safety checker"):
        load_safety_checker(tmp_path)
    with pytest.raises(CheckpointError, match="nowhere.*no such safety checker folder"):
        SafetyChecker.from_folder(tmp_path / "nowhere")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps(TINY_CHECKER["text_config"]))
    with pytest.raises(CheckpointError, match="text_encoder.*not a safety checker config"):
        SafetyChecker.from_folder(tmp_path / "text_encoder")
    empty = tmp_path / "safety_checker"
    empty.mkdir()
    shutil.copy(root / "safety_checker" / "config.json", empty)
    with pytest.raises(CheckpointError, match="safety_checker: no weights file"):
        SafetyChecker.from_folder(empty)


# ----------------------------------------------------------------------------------------------------------------
# what a flagged image becomes

def test_blur_is_strong_but_not_black():
    image = images(1)[0]
    out = blur(image)
    a, b = np.asarray(image, np.float32), np.asarray(out, np.float32)
    assert out.size == image.size and out.mode == image.mode
    assert abs(a.mean() - b.mean()) < 0.05 * a.mean()  # brightness kept
    assert b.std() < 0.2 * a.std()  # the noise is gone
    assert blur(Image.new("P", (64, 64), 3)).mode == "RGB"


def test_censor_blurs_only_flagged_images():
    ref = diffusers_checker(TINY_CHECKER, seed=1)
    ours = ours_from(ref)
    ims = images()
    plant([ours], ours.embed(preprocess(ims)), PLANS)
    out, nsfw = ours.censor(ims)
    assert nsfw == EXPECTED
    for im, o, bad in zip(ims, out, nsfw):
        assert (o is not im) == bad
    assert ours.censor([]) == ([], [])
