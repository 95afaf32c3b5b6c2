"""images.py: AUTOMATIC1111 infotext format both ways, numbered PNG files, hash cache, tensor <-> PIL parity."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from stablediff import images

BASE = dict(steps=30, sampler_label="Euler", schedule_label=None, cfg_scale=7.0, seed=1055747, width=512,
            height=512, model_hash="6ce0161689", model_name="v1-5-pruned-emaonly", version="0.1.0")
TAIL = "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly"


# --- infotext ---------------------------------------------------------------------------------------------------

def test_infotext_no_negative():
    assert images.infotext("a dog", "", **BASE) == (
        "a dog\n"
        f"Steps: 30, Sampler: Euler, CFG scale: 7.0, Seed: 1055747, {TAIL}, Version: stablediff 0.1.0")


def test_infotext_negative_and_karras():
    text = images.infotext("a dog", "blurry, ugly", **{**BASE, "sampler_label": "DPM++ 2M",
                                                        "schedule_label": "Karras", "cfg_scale": 7.5})
    assert text == (
        "a dog\n"
        "Negative prompt: blurry, ugly\n"
        f"Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1055747, {TAIL}, "
        "Version: stablediff 0.1.0")


def test_infotext_integer_cfg_is_written_as_float():
    assert "CFG scale: 7.0," in images.infotext("p", "", **{**BASE, "cfg_scale": 7})


def test_infotext_extra_items_go_where_a1111_puts_them():
    extra = {"NSFW": "true", "Clip skip": 2, "Denoising strength": 0.6, "Image CFG scale": 1.5,
             "Face restoration": "CodeFormer"}
    text = images.infotext("p", "", **BASE, extra=extra)
    assert text.splitlines()[1] == (
        "Steps: 30, Sampler: Euler, CFG scale: 7.0, Image CFG scale: 1.5, Seed: 1055747, "
        "Face restoration: CodeFormer, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
        "Denoising strength: 0.6, Clip skip: 2, NSFW: true, Version: stablediff 0.1.0")


def test_infotext_leaves_out_none_and_clip_skip_1():
    text = images.infotext("p", "", **{**BASE, "model_hash": None, "model_name": ""},
                           extra={"Clip skip": 1, "Denoising strength": None})
    assert text == "p\nSteps: 30, Sampler: Euler, CFG scale: 7.0, Seed: 1055747, Size: 512x512, " \
                   "Version: stablediff 0.1.0"


def test_infotext_quotes_values_with_commas_and_colons():
    text = images.infotext("p", "", **{**BASE, "model_name": 'my,model "v2"'},
                           extra={"Lora hashes": "a: 1, b: 2", "Flag": "Flag"})
    assert 'Model: "my,model \\"v2\\""' in text
    assert 'Lora hashes: "a: 1, b: 2", Flag, Version' in text


# --- parse_infotext ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,negative", [
    ("a dog", ""),
    ("a dog, (masterpiece:1.2)", "blurry, ugly"),
    ("line one\nline two: with colon", "neg one\nneg two"),
])
def test_parse_infotext_round_trip(prompt, negative):
    text = images.infotext(prompt, negative, **{**BASE, "schedule_label": "Karras", "model_name": "a,b"},
                           extra={"Clip skip": 2, "Lora hashes": 'x: "1", y: 2'})
    res = images.parse_infotext(text)
    assert res["Prompt"] == prompt
    assert res["Negative prompt"] == negative
    assert res["Steps"] == "30" and res["Sampler"] == "Euler" and res["Schedule type"] == "Karras"
    assert res["CFG scale"] == "7.0" and res["Seed"] == "1055747"
    assert (res["Size-1"], res["Size-2"]) == ("512", "512")
    assert res["Model hash"] == "6ce0161689" and res["Model"] == "a,b"
    assert res["Clip skip"] == "2" and res["Lora hashes"] == 'x: "1", y: 2'
    assert res["Version"] == "stablediff 0.1.0"


def test_parse_infotext_a1111_sample():
    text = ("girl with an artist's beret, determined\n"
            "Negative prompt: ugly, fat\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b")
    assert images.parse_infotext(text) == {
        "Prompt": "girl with an artist's beret, determined", "Negative prompt": "ugly, fat", "Steps": "20",
        "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size-1": "512", "Size-2": "768",
        "Model hash": "45dee52b"}


def test_parse_infotext_prompt_only():
    assert images.parse_infotext("just a prompt, with: commas") == {
        "Prompt": "just a prompt, with: commas", "Negative prompt": ""}


# --- save_png ---------------------------------------------------------------------------------------------------

def _img(color=(10, 20, 30)):
    return Image.new("RGB", (16, 8), color)


def test_save_png_numbers_and_metadata(tmp_path):
    out = tmp_path / "new" / "sub"
    p0 = images.save_png(_img(), out, 5, "first")
    p1 = images.save_png(_img(), out, 7, "second")
    assert (p0.name, p1.name) == ("00000-5.png", "00001-7.png")
    with Image.open(p1) as im:
        assert im.text["parameters"] == "second"
        assert im.size == (16, 8)
    assert sorted(os.listdir(out)) == ["00000-5.png", "00001-7.png"]  # no temp files left


def test_save_png_continues_after_highest_with_gaps(tmp_path):
    for name in ("00000-1.png", "00007-3.png", "00002-9.jpg", "notes.txt", "12-x.png"):
        (tmp_path / name).write_bytes(b"x")
    assert images.save_png(_img(), tmp_path, 42, "p").name == "00013-42.png"


def test_save_png_never_overwrites(tmp_path, monkeypatch):
    # another writer took the number we computed: the file must go to the next free one
    (tmp_path / "00000-5.png").write_bytes(b"theirs")
    (tmp_path / "00001-5.png").write_bytes(b"theirs too")
    monkeypatch.setattr(images, "_next_number", lambda d: 0)
    path = images.save_png(_img(), tmp_path, 5, "ours")
    assert path.name == "00002-5.png"
    assert (tmp_path / "00000-5.png").read_bytes() == b"theirs"
    assert (tmp_path / "00001-5.png").read_bytes() == b"theirs too"


def test_save_png_without_hard_links(tmp_path, monkeypatch):
    (tmp_path / "00000-5.png").write_bytes(b"theirs")
    monkeypatch.setattr(images, "_next_number", lambda d: 0)
    monkeypatch.setattr(os, "link", lambda a, b: (_ for _ in ()).throw(PermissionError("no links")))
    path = images.save_png(_img(), tmp_path, 5, "ours")
    assert path.name == "00001-5.png" and (tmp_path / "00000-5.png").read_bytes() == b"theirs"
    with Image.open(path) as im:
        assert im.text["parameters"] == "ours"


def test_save_png_non_latin1_text(tmp_path):
    path = images.save_png(_img(), tmp_path, 1, "猫, café\nSteps: 3")
    with Image.open(path) as im:
        assert im.text["parameters"] == "猫, café\nSteps: 3"


# --- file_sha256 ------------------------------------------------------------------------------------------------

@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_file_sha256_cached_and_invalidated(tmp_path, cache_home, monkeypatch):
    import hashlib

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(f.read_bytes()).hexdigest()
    reads = []
    real = images._hash_file
    monkeypatch.setattr(images, "_hash_file", lambda p: reads.append(p) or real(p))

    assert images.file_sha256(f) == expected and len(reads) == 1
    assert (cache_home / "stablediff" / "hashes.json").exists()
    assert images.file_sha256(str(f)) == expected and len(reads) == 1  # from the cache
    assert images.model_hash(f) == expected[:10] and len(reads) == 1

    f.write_bytes(b"other!!" * 1000)  # same size: only the mtime tells
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert images.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() and len(reads) == 2


def test_file_sha256_corrupt_cache(tmp_path, cache_home):
    import hashlib

    (cache_home / "stablediff").mkdir(parents=True)
    (cache_home / "stablediff" / "hashes.json").write_text("{not json")
    f = tmp_path / "m.ckpt"
    f.write_bytes(b"abc")
    assert images.file_sha256(f) == hashlib.sha256(b"abc").hexdigest()
    assert images.file_sha256(f) == hashlib.sha256(b"abc").hexdigest()


def test_file_sha256_unwritable_cache(tmp_path, monkeypatch):
    import hashlib

    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # stablediff/ cannot be made under a file
    f = tmp_path / "m.bin"
    f.write_bytes(b"abc")
    assert images.model_hash(f) == hashlib.sha256(b"abc").hexdigest()[:10]


# --- tensors <-> PIL, against diffusers' VaeImageProcessor ------------------------------------------------------

@pytest.fixture(scope="module")
def processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_to_pil_matches_diffusers(processor, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 24, 40, generator=g) * 0.8).to(dtype)
    x[0, 0, 0, :4] = torch.tensor([-3.0, 3.0, 0.0, 1.0], dtype=dtype)  # clamping and the exact endpoints
    ours, ref = images.to_pil(x), processor.postprocess(x, output_type="pil")
    assert len(ours) == 2
    for a, b in zip(ours, ref):
        assert a.mode == "RGB" and a.size == (40, 24)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_to_pil_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        images.to_pil(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("size,target", [((37, 23), (None, None)), ((64, 48), (32, 40)), ((50, 70), (64, 64))])
def test_from_pil_matches_diffusers(processor, size, target):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    width, height = target
    ours = images.from_pil(image, width, height)
    ref = processor.preprocess(image, height=height, width=width)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.equal(ours, ref)


def test_from_pil_converts_modes(processor):
    rgba = Image.new("RGBA", (16, 16), (200, 100, 50, 128))
    x = images.from_pil(rgba)
    assert x.shape == (1, 3, 16, 16)
    assert torch.equal(x, processor.preprocess(rgba.convert("RGB")))


def test_images_imports_no_torch():
    import subprocess

    code = "import sys, stablediff.images; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
