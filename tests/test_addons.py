"""LoRA files and textual-inversion embeddings through the whole pipeline, against diffusers."""

import numpy as np
import pytest
import torch

from conftest import SD15, assert_close
from stablediff import StableDiffusion
from stablediff.lora import LoraError
from test_lora import random_pairs, write_embeddings, write_kohya, write_peft

TOL = 5e-4


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(str(SD15), subfolder="scheduler"))
    return ref


def ref_latents(ref, prompt, **kw):
    with torch.no_grad():
        return ref(prompt, num_inference_steps=4, guidance_scale=7.0, generator=torch.Generator().manual_seed(9),
                   output_type="latent", **kw).images


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_tags_and_argument_match_diffusers_and_come_off_exactly(pipe, ref, tmp_path, fmt):
    pairs = random_pairs(pipe.unet, pipe.text_encoder, seed=3)
    pairs = {k: (up, down, 2.0) for k, (up, down, _) in pairs.items()}  # one alpha: diffusers' kohya reader
    (tmp_path / "loras").mkdir()
    path = tmp_path / "loras" / "shiny.safetensors"
    write_kohya(path, pairs) if fmt == "kohya" else write_peft(path, pairs)
    pipe.lora_dir = tmp_path / "loras"
    kw = dict(steps=4, cfg_scale=7.0, seed=9, sampler="euler")

    base = pipe("a cat", **kw)
    for scale in (0.5, 1.0):
        tagged = pipe(f"a cat <lora:shiny:{scale}>", **kw)
        ref.load_lora_weights(str(path))
        ref.fuse_lora(lora_scale=scale)
        try:
            expected = ref_latents(ref, "a cat")
        finally:
            ref.unfuse_lora()
            ref.unload_lora_weights()
        assert_close(tagged.latents, expected, TOL)
        assert not torch.equal(tagged.latents, base.latents)
        assert f'Lora hashes: "shiny: {pipe.loras.lora(path).hash}"' in tagged.infotexts[0]
        by_argument = pipe("a cat", loras={"shiny": scale}, **kw)
        assert torch.equal(by_argument.latents, tagged.latents)
    assert torch.equal(pipe("a cat", **kw).latents, base.latents)  # taken off bit-exactly
    assert "Lora hashes" not in base.infotexts[0]


def test_missing_or_unfitting_loras_fail_before_any_work(pipe, tmp_path):
    pipe.lora_dir = tmp_path
    calls = []
    with pytest.raises(LoraError, match="missing"):
        pipe("a cat <lora:missing:1>", steps=2, callback=calls.append)
    with pytest.raises(LoraError, match=r"\.\./x"):
        pipe("a cat <lora:../x:1>", steps=2, callback=calls.append)
    from safetensors.torch import save_file

    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 7, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(LoraError, match="wrong.safetensors"):
        pipe("a cat <lora:wrong>", steps=2, callback=calls.append)
    assert calls == []


def test_textual_inversion_matches_diffusers(pipe, tiny_model_dir, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    vec = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    files = write_embeddings(tmp_path / "embeddings", vec)
    assert pipe.load_embeddings(tmp_path / "embeddings") == []
    fresh = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                    requires_safety_checker=False)
    fresh.scheduler = EulerDiscreteScheduler.from_config(
        EulerDiscreteScheduler.load_config(str(SD15), subfolder="scheduler"))
    fresh.load_textual_inversion(str(files["inkstyle"]), token="inkstyle")
    prompt, negative = "a house, inkstyle", "blurry"
    ours = pipe(prompt, negative_prompt=negative, steps=4, cfg_scale=7.0, seed=9)
    assert_close(ours.latents, ref_latents(fresh, prompt, negative_prompt=negative), TOL)
    from stablediff.embeddings import embedding_hash

    assert f'TI hashes: "inkstyle: {embedding_hash(files["inkstyle"])}"' in ours.infotexts[0]
    # a negative embedding works in the negative prompt and changes the image
    neg = pipe("a house", negative_prompt="watercolor", steps=4, cfg_scale=7.0, seed=9)
    plain = pipe("a house", negative_prompt="", steps=4, cfg_scale=7.0, seed=9)
    assert not np.array_equal(np.asarray(neg.images[0]), np.asarray(plain.images[0]))
    pipe.load_embeddings([])  # leave the shared pipeline as it was
