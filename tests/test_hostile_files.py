"""Hostile or careless files (issue 19): each is refused with one line naming the file and the bad value, before
any heavy work, or skipped with a warning where one bad file must not stop everything. One probe per item."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import pytest
import torch
from conftest import SD15, TINY_TEXT, TINY_UNET
from PIL import Image, ImageFile
from safetensors.torch import save_file

from stablediff import embeddings, images, lora, weights
from stablediff.clip import CLIPTextModel
from stablediff.config import CLIPTextConfig, UNetConfig, VAEConfig
from stablediff.prompts import PromptEncoder, parse
from stablediff.schedule import NoiseSchedule
from stablediff.tokenizer import CLIPTokenizer
from stablediff.unet import UNet
from stablediff.weights import CheckpointError


def _one_line(error: pytest.ExceptionInfo, *names: str) -> str:
    """The error's text, checked to be one line that names each of `names`."""
    text = str(error.value)
    assert "\n" not in text and all(n in text for n in names), text
    return text


# --- 1. safetensors headers and weight dtypes ------------------------------------------------------------------

def _raw_safetensors(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def _entry(shape, offsets, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize("header,data,length,expected", [
    ({"w": _entry([-1, 2], [0, 8])}, bytes(8), None, r"'w' has shape \[-1, 2\], not a list of whole numbers"),
    ({"w": _entry([2.0, 1], [0, 8])}, bytes(8), None, r"'w' has shape \[2.0, 1\], not a list"),
    ({"w": _entry([2], [0, 800])}, bytes(8), None, r"'w': float32 \[2\] is 8 bytes, its data_offsets 0..800, the "
                                                   r"data 8 bytes"),
    ({"w": _entry([3], [0, 8])}, bytes(12), None, r"'w': float32 \[3\] is 12 bytes, its data_offsets 0..8"),
    ({"w": _entry([2], [0, 8]), "v": _entry([2], [4, 12])}, bytes(12), None, r"tensors 'w' and 'v' overlap"),
    ({"w": _entry([2], [-8, 0])}, bytes(8), None, r"'w' has data_offsets \[-8, 0\]"),
    ({"w": _entry([2], [0, 8], dtype=["F32"])}, bytes(8), None, r"'w' has dtype \['F32'\]"),
    (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", None, "corrupt safetensors header"),
    (b"{}", b"", 2**40, "header length 1,099,511,627,776"),
])
def test_hostile_safetensors_headers(tmp_path, header, data, length, expected):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=expected) as err:
        weights.read_state_dict(path)
    _one_line(err, str(path))


@pytest.fixture(scope="module")
def tiny_original(tiny_model_dir):
    """The tiny random model as one original-layout state dict (what a single .ckpt/.safetensors file holds)."""
    ckpt = weights.load_checkpoint(tiny_model_dir)
    return weights.to_original(ckpt.unet, ckpt.vae, ckpt.text_encoder)


@pytest.mark.parametrize("suffix,dtype", [(".safetensors", torch.int32), (".ckpt", torch.bool)])
def test_integer_weights_are_refused_naming_key_and_dtype(tiny_original, tmp_path, suffix, dtype):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd = dict(tiny_original, **{key: tiny_original[key].to(dtype)})
    path = tmp_path / f"model{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    with pytest.raises(CheckpointError, match=rf"not floating point {key} {str(dtype)[6:]}") as err:
        weights.load_checkpoint(path)
    _one_line(err, str(path))


# --- 2. config.json values in range, checked before any weights are read ----------------------------------------

@pytest.mark.parametrize("component,key,value,expected", [
    ("unet", "layers_per_block", 1000000, "unet/config.json: layers_per_block 1000000 is outside 1..16"),
    ("unet", "block_out_channels", [32] * 1000, "unet/config.json: block_out_channels has 1000 values; it may have "
                                                "1 to 8"),
    ("unet", "cross_attention_dim", 10**12, "cross_attention_dim 1000000000000 is outside 1..8192"),
    ("unet", "in_channels", -4, "in_channels -4 is outside 1..64"),
    ("unet", "attention_head_dim", "8", "attention_head_dim '8' has the wrong type"),
    ("vae", "block_out_channels", [32, 10**9], "vae/config.json: block_out_channels 1000000000 is outside 1..8192"),
    ("vae", "scaling_factor", 0, "scaling_factor 0 is outside 1e-06..100"),
    ("text_encoder", "num_hidden_layers", 10**6, "text_encoder/config.json: num_hidden_layers 1000000 is outside"),
    ("text_encoder", "layer_norm_eps", None, None),  # null: the default
    ("scheduler", "num_train_timesteps", 2e9, "scheduler_config.json: num_train_timesteps 2000000000.0 is outside "
                                              "1..10000"),
    ("scheduler", "beta_end", -1, "beta_end -1 is outside 0..1"),
])
def test_hostile_configs_fail_before_weights_are_read(tiny_model_dir, tmp_path, monkeypatch, component, key, value,
                                                      expected):
    root = shutil.copytree(tiny_model_dir, tmp_path / "model")
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    config = json.loads((root / component / name).read_text())
    (root / component / name).write_text(json.dumps({**config, key: value}))
    if expected is None:
        assert weights.load_checkpoint(root).text_config.layer_norm_eps == 1e-5
        return
    monkeypatch.setattr(weights, "read_component", lambda *a, **k: pytest.fail("weights read before the configs"))
    with pytest.raises(CheckpointError, match=expected) as err:
        weights.load_checkpoint(root)
    _one_line(err)


def test_every_real_config_is_inside_the_bounds():
    for component, cls in (("unet", UNetConfig), ("vae", VAEConfig), ("text_encoder", CLIPTextConfig)):
        cls.from_json(SD15 / component / "config.json")
    NoiseSchedule.from_json(SD15 / "scheduler" / "scheduler_config.json")
    sd15 = json.loads((SD15 / "unet" / "config.json").read_text())
    UNetConfig.from_dict(dict(sd15, in_channels=9))  # inpainting
    UNetConfig.from_dict(dict(sd15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                              use_linear_projection=True))  # SD 2.x 768-v
    CLIPTextConfig.from_dict(dict(TINY_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                  num_attention_heads=16, hidden_act="gelu"))  # SD 2.x OpenCLIP-H
    UNetConfig.from_dict(TINY_UNET)


def test_inferred_configs_are_range_checked_too():
    """A single file's configs come from tensor shapes, which a zero-size tensor can make anything."""
    from stablediff.keymap import infer_unet_config

    with pytest.raises(CheckpointError, match=r"x.safetensors: the U-Net config its weights describe is not usable "
                                              r"\(in_channels 1000000000 is outside 1..64\)"):
        infer_unet_config({"down_blocks.0.resnets.0.conv1.weight": torch.empty(32, 0, 3, 3),
                           "conv_in.weight": torch.empty(32, 10**9, 0, 0)}, path="x.safetensors")


# --- 3. LoRA: rank 0, multipliers, overflow, the missing-LoRA message --------------------------------------------

@pytest.fixture(scope="module")
def small_models():
    torch.manual_seed(0)
    return UNet(UNetConfig.from_dict(TINY_UNET)).eval(), CLIPTextModel(CLIPTextConfig.from_dict(TINY_TEXT)).eval()


def _q_proj_lora(path: Path, up_value: float, alpha: float = 1.0) -> Path:
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{key}.lora_down.weight": torch.ones(1, 32), f"{key}.lora_up.weight": torch.full((32, 1), up_value),
               f"{key}.alpha": torch.tensor(alpha)}, str(path))
    return path


def test_lora_rank_0_multipliers_and_overflow(small_models, tmp_path):
    unet, text = small_models
    rank0 = tmp_path / "rank0.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(0, 4, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 0, 1, 1)}, str(rank0))
    with pytest.raises(lora.LoraError, match=r"lora_down.weight \(0, 4, 3, 3\) has rank 0") as err:
        lora.read_lora(rank0, unet, text)
    _one_line(err, str(rank0))

    with pytest.raises(ValueError, match=r"tag '<lora:x:1e308>': multiplier 1e\+308 is outside -100..100") as err:
        parse("a cat <lora:x:1e308>")
    _one_line(err)
    assert parse("a <lora:x:-5>")[1][0].multiplier == -5.0

    loras = lora.LoraSet(unet, text.half())
    try:
        good, huge = _q_proj_lora(tmp_path / "good.safetensors", 0.01), _q_proj_lora(tmp_path / "huge.safetensors", 1e6)
        with pytest.raises(lora.LoraError, match=r"multiplier 1000 is outside -100..100"):
            loras.apply({good: 1000.0})
        loras.apply({good: 1.0})
        q = text.get_parameter("text_model.encoder.layers.0.self_attn.q_proj.weight")
        with_good = q.detach().clone()
        with pytest.raises(lora.LoraError, match=r"huge.safetensors at multiplier 1: the merged weight .*q_proj.weight "
                                                 r"would be 1e\+06, beyond float16") as err:
            loras.apply({good: 1.0, huge: 1.0})
        _one_line(err)
        assert torch.equal(q, with_good) and loras.applied == {good: 1.0}  # the previous set is back
        loras.apply({})
    finally:
        text.float()


def test_missing_lora_names_a_few_close_names_and_no_paths(tmp_path):
    folder = tmp_path / "server" / "loras"
    folder.mkdir(parents=True)
    for i in range(40):
        (folder / f"style{i:02d}.safetensors").write_bytes(b"x")
    (folder / "cat_watercolor.safetensors").write_bytes(b"x")
    with pytest.raises(lora.LoraError, match=r"did you mean cat_watercolor\?") as err:
        lora.resolve("cat_watercolour", folder)
    text = _one_line(err, "<lora:cat_watercolour>")
    assert str(tmp_path) not in text and "style" not in text
    with pytest.raises(lora.LoraError) as err:
        lora.resolve("style", folder)
    assert str(tmp_path) not in str(err.value)
    assert len(str(err.value).partition("did you mean ")[2].split(", ")) == 3  # of 40 similar names


# --- 4. one unusable embedding is skipped, the rest load --------------------------------------------------------

def test_unusable_embeddings_are_skipped_with_a_line_each(tmp_path):
    folder = tmp_path / "embeddings"
    (folder / "diffusers").mkdir(parents=True)
    save_file({"emb_params": torch.randn(2, 32)}, str(folder / "good.safetensors"))
    save_file({"emb_params": torch.randn(3000, 32)}, str(folder / "long.safetensors"))
    save_file({"emb_params": torch.randn(3000)}, str(folder / "flat.safetensors"))
    save_file({"emb_params": torch.full((1, 32), float("nan"))}, str(folder / "nan.safetensors"))
    save_file({"emb_params": torch.ones(1, 32, dtype=torch.int64)}, str(folder / "int.safetensors"))
    save_file({"<big>": torch.randn(100, 32)}, str(folder / "diffusers" / "learned_embeds.safetensors"))
    skipped: list[str] = []
    vectors = embeddings.load_embeddings(folder, width=32, skipped=skipped)
    assert list(vectors) == ["good"]
    assert len(skipped) == 5 and all("\n" not in line for line in skipped)
    said = " ".join(skipped)
    for bit in ("long.safetensors: the embedding has 3000 vectors; one prompt chunk holds at most 75",
                "flat.safetensors: embedding vectors are 3000 wide", "nan.safetensors: the embedding holds NaN",
                "int.safetensors: the embedding is int64", "learned_embeds.safetensors: the embedding has 100"):
        assert bit in said, said
    text_encoder = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=32))
    PromptEncoder(CLIPTokenizer(), text_encoder, embeddings=vectors)  # what the pipeline builds: no error


# --- 5. init images and masks -----------------------------------------------------------------------------------

def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header (IHDR) claims width x height: a few bytes, nothing of that size allocated."""
    buffer = bytearray(images.png_bytes(Image.new("RGB", (1, 1)), "x"))
    assert buffer[12:16] == b"IHDR"
    buffer[16:24] = struct.pack(">II", width, height)
    buffer[29:33] = struct.pack(">I", zlib.crc32(bytes(buffer[12:29])))
    path.write_bytes(bytes(buffer))
    return path


@pytest.mark.parametrize("size,expected", [(12000, r"image 12000x12000 \(144,000,000 pixels\) is over the limit of "
                                                   r"67,108,864 pixels"),
                                           (20000, r"image of 400,000,000 pixels is over the limit")])
def test_huge_init_images_are_refused_from_the_header(tmp_path, monkeypatch, size, expected):
    path = _png_claiming(tmp_path / "bomb.png", size, size)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    for read in (images.open_image, images.image_size):
        with pytest.raises(ValueError, match=expected) as err:
            read(path)
        _one_line(err, str(path))


def test_init_size_and_mask_aspect(recwarn):
    with pytest.raises(ValueError, match=r"init image 4x4 is smaller than 64x64"):
        images.init_size(Image.new("RGB", (4, 4)).size, None, None)
    assert images.init_size((100, 70), None, None) == (96, 64)
    assert images.init_size((64, 64), None, None) == (64, 64)
    assert images.init_size((4000, 3000), 512, 384) == (512, 384)
    assert [str(w.message) for w in recwarn] == ["init image 100x70 is resized to 96x64",
                                                  "init image 4000x3000 is resized to 512x384"]

    with pytest.raises(ValueError, match=r"mask 64x128 does not have the aspect ratio of the init image 128x128"):
        images.check_mask_size((64, 128), (128, 128))
    with pytest.warns(UserWarning, match=r"^mask 64x48 is resized to the init image's 128x96$"):
        images.check_mask_size((64, 48), (128, 96))
    recwarn.clear()
    images.check_mask_size((128, 96), (128, 96))
    assert not recwarn


# --- 6. saving PNGs: permissions, stale temp files, concurrent numbering, a full disk ---------------------------

def _img():
    return Image.new("RGB", (8, 8), (10, 20, 30))


def test_saved_pngs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = images.save_png(_img(), tmp_path, 1, "p")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_stale_temp_files_are_cleaned_on_the_next_save(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()  # its pid now belongs to no process
    names = {"dead": f".tmp-{child.pid}-abc.png", "live": f".tmp-{os.getpid()}-def.png",
             "fresh_dead": f".tmp-{child.pid}-fresh.png", "old_live": f".tmp-{os.getpid()}-old.png",
             "old_style": ".tmp-k3j_x9a2.png", "not_ours": ".tmp-notes.txt"}
    now = time.time()
    ages = {"dead": 120, "live": 0, "fresh_dead": 0, "old_live": 7200, "old_style": 7200, "not_ours": 7200}
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / name, (now - ages[key], now - ages[key]))
    images.save_png(_img(), tmp_path, 1, "p")
    left = {key for key, name in names.items() if (tmp_path / name).exists()}
    assert left == {"live", "fresh_dead", "not_ours"}


_SAVER = """
import sys, time
from PIL import Image
from stablediff import images
folder, seed, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
for _ in range(40):
    images.save_png(Image.new("RGB", (4, 4)), folder, seed, "p")
"""


def test_concurrent_processes_never_share_a_number(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(images.__file__).parents[1]))
    start = time.time() + 1.5  # both past their imports, then saving at once
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path), str(seed), str(start)], env=env)
             for seed in (1, 2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    numbers = [name.split("-")[0] for name in os.listdir(tmp_path)]
    assert len(numbers) == 80 and len(set(numbers)) == 80


def test_a_full_disk_keeps_the_image_and_says_where(tmp_path, monkeypatch):
    def full_disk(fd, data):
        os.write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(images, "_write", full_disk)
    with pytest.raises(images.SaveError) as err:
        images.save_png(_img(), tmp_path / "out", 42, "the parameters")
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    _one_line(err, str(tmp_path / "out"), "seed 42", "No space left on device", "kept in memory")
    assert os.listdir(tmp_path / "out") == []  # no partial temp file left
    monkeypatch.undo()
    path = images.save_png_bytes(err.value.data, tmp_path / "elsewhere", err.value.seed)
    with Image.open(path) as im:
        assert path.name == "00000-42.png" and im.text["parameters"] == "the parameters" and im.size == (8, 8)
