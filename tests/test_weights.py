"""Checkpoint reading: the key table against diffusers' own converter, every file layout, and refusing bad files.

diffusers and transformers are test-only oracles here: they build tiny seeded models whose state dicts we write in
each layout, and diffusers' `from_single_file` reads our single files back, which proves our table is the real one.
"""

import json
import os
import shutil
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stablediff.config import CLIPTextConfig, UNetConfig, VAEConfig
from stablediff.keymap import (detect, infer_text_config, infer_unet_config, infer_vae_config, split_original,
                               to_original)
from stablediff.weights import CheckpointError, expected_shapes, load_checkpoint, load_into, read_state_dict

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

SD15 = Path(__file__).parent / "data" / "sd15-layout"

UNET_TINY = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
# inpainting-like: 9 input channels, one layer per block, attention at the bottom only, linear projections
UNET_TINY2 = dict(sample_size=16, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=32, use_linear_projection=True)
VAE_TINY = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=2, latent_channels=4,
                norm_num_groups=32, sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2)
TEXT_TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _text_model(config):
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))


def _prefixed(text_sd):
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text_sd.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Seeded tiny models, their state dicts in our naming, and a diffusers folder saved by the oracles."""
    torch.manual_seed(0)
    unet, vae, text = UNet2DConditionModel(**UNET_TINY), AutoencoderKL(**VAE_TINY), _text_model(TEXT_TINY)
    root = tmp_path_factory.mktemp("tiny")
    folder = root / "diffusers"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    shutil.copytree(SD15 / "tokenizer", folder / "tokenizer")
    shutil.copytree(SD15 / "scheduler", folder / "scheduler")
    shutil.copy(SD15 / "model_index.json", folder)
    sds = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": _prefixed(text.state_dict())}
    single = root / "tiny.safetensors"
    save_file(to_original(sds["unet"], sds["vae"], text.state_dict()), single)  # text given unprefixed (transformers 5)
    return _Tiny(root=root, folder=folder, single=single, models=(unet, vae, text), sds=sds)


class _Tiny(types.SimpleNamespace):
    def __repr__(self):  # keep tensors out of failure reports
        return f"<tiny models in {self.root}>"


def _assert_same(ckpt, sds):
    for comp in ("unet", "vae", "text_encoder"):
        got, want = getattr(ckpt, comp), sds[comp]
        assert got.keys() == want.keys(), comp
        for k in want:
            assert torch.equal(got[k], want[k]), f"{comp}: {k}"


def _assert_configs(ckpt, unet_cfg, vae_cfg, text_cfg):
    u = UNetConfig.from_dict(unet_cfg)
    for name in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                 "up_block_types", "cross_attention_dim", "use_linear_projection"):
        assert getattr(ckpt.unet_config, name) == getattr(u, name), name
    assert ckpt.vae_config == VAEConfig.from_dict({**vae_cfg, "sample_size": 512})  # not in the shapes
    t = CLIPTextConfig.from_dict(text_cfg)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
        assert getattr(ckpt.text_config, name) == getattr(t, name), name


# ---------------------------------------------------------------------------------------------------------------
# The key table


def test_single_file_round_trip_safetensors_and_ckpt(tiny, tmp_path):
    ckpt = load_checkpoint(tiny.single)
    assert (ckpt.layout, ckpt.family, ckpt.scheduler_config, ckpt.tokenizer_dir) == ("single-file", "sd1", None, None)
    _assert_same(ckpt, tiny.sds)
    _assert_configs(ckpt, UNET_TINY, VAE_TINY, TEXT_TINY)
    # the same weights as a Lightning-style pickle, zip and legacy torch formats
    # keys real SD 1.x files carry besides the weights: schedule buffers, the CLIP position_ids buffer
    extras = {"alphas_cumprod": torch.rand(1000), "model_ema.num_updates": torch.tensor(7),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    original = {**read_state_dict(tiny.single), **extras}
    for legacy in (False, True):
        path = tmp_path / f"tiny-{legacy}.ckpt"
        torch.save({"state_dict": original, "global_step": 7}, path, _use_new_zipfile_serialization=not legacy)
        ckpt = load_checkpoint(path)
        _assert_same(ckpt, tiny.sds)
        assert sorted(ckpt.unused) == sorted(extras)


def test_table_round_trip_other_structure():
    """9 input channels, one layer per block, attention only at the bottom, linear projections."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**UNET_TINY2).state_dict()
    vae = AutoencoderKL(**{**VAE_TINY, "layers_per_block": 1, "block_out_channels": (32, 32, 64),
                           "down_block_types": ("DownEncoderBlock2D",) * 3,
                           "up_block_types": ("UpDecoderBlock2D",) * 3}).state_dict()
    text = _prefixed(_text_model(TEXT_TINY).state_dict())
    original = to_original(unet, vae, text)
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in original  # upsampler after attention
    assert original["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    parts = split_original(original)
    assert parts["unused"] == {}
    for comp, sd in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        assert parts[comp].keys() == sd.keys()
        assert all(torch.equal(parts[comp][k], sd[k]) for k in sd)
    assert infer_unet_config(unet).in_channels == 9 and infer_unet_config(unet).use_linear_projection


def test_diffusers_from_single_file_reads_our_file(tiny):
    """diffusers' own single-file loader turns our original-layout file into the very same weights."""
    unet, vae, _ = tiny.models
    theirs = UNet2DConditionModel.from_single_file(str(tiny.single), config=str(tiny.folder / "unet"),
                                                   local_files_only=True)
    for k, v in unet.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v), k
    theirs = AutoencoderKL.from_single_file(str(tiny.single), config=str(tiny.folder / "vae"), local_files_only=True)
    for k, v in vae.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v), k
    text = sfu.convert_ldm_clip_checkpoint(read_state_dict(tiny.single))
    assert text.keys() == tiny.sds["text_encoder"].keys()


def _meta_models(unet_cfg, vae_cfg, text_cfg):
    with torch.device("meta"):
        return (UNet2DConditionModel(**unet_cfg).state_dict(), AutoencoderKL(**vae_cfg).state_dict(),
                _prefixed(_text_model(text_cfg).state_dict()))


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _json(path):
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


@pytest.mark.parametrize("layout", ["tiny", "sd15"])
def test_table_and_shapes_match_diffusers_converter(layout):
    """Key sets and shapes, at SD 1.5 size on the meta device: our expected shapes equal diffusers' models, and
    diffusers' converter maps our original layout onto exactly those keys and shapes."""
    if layout == "sd15":
        unet_cfg, vae_cfg = _json(SD15 / "unet" / "config.json"), _json(SD15 / "vae" / "config.json")
        text_cfg = {k: v for k, v in _json(SD15 / "text_encoder" / "config.json").items() if k != "architectures"}
    else:
        unet_cfg, vae_cfg, text_cfg = UNET_TINY, VAE_TINY, TEXT_TINY
    unet, vae, text = _meta_models(unet_cfg, vae_cfg, text_cfg)
    assert expected_shapes("unet", UNetConfig.from_dict(unet_cfg)) == _shapes(unet)
    assert expected_shapes("vae", VAEConfig.from_dict(vae_cfg)) == _shapes(vae)
    assert expected_shapes("text_encoder", CLIPTextConfig.from_dict(text_cfg)) == _shapes(text)

    original = to_original(unet, vae, text)
    assert _shapes(sfu.convert_ldm_unet_checkpoint(original, unet_cfg)) == _shapes(unet)
    assert _shapes(sfu.convert_ldm_vae_checkpoint(original, {**vae_cfg, **_vae_block_types(vae_cfg)})) == _shapes(vae)
    assert _shapes(sfu.convert_ldm_clip_checkpoint(original)) == _shapes(text)
    parts = split_original(original)
    for comp, sd in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        assert _shapes(parts[comp]) == _shapes(sd)
    if layout == "sd15":
        assert infer_unet_config(unet) == UNetConfig.from_dict(unet_cfg)
        assert infer_vae_config(vae) == VAEConfig.from_dict(vae_cfg)
        assert infer_text_config(text) == CLIPTextConfig.from_dict(text_cfg)
        assert len([k for k in original if k.startswith("model.diffusion_model.")]) == 686  # as in v1-5-pruned
        assert detect(original) == "sd1"


def _vae_block_types(cfg):
    n = len(cfg["block_out_channels"])
    return {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}


# ---------------------------------------------------------------------------------------------------------------
# Diffusers folders


def test_diffusers_folder(tiny):
    ckpt = load_checkpoint(tiny.folder)
    assert ckpt.layout == "diffusers" and ckpt.tokenizer_dir == tiny.folder / "tokenizer"
    assert ckpt.scheduler_config["beta_schedule"] == "scaled_linear"
    _assert_same(ckpt, tiny.sds)
    unet, vae, text = tiny.models
    assert ckpt.unet_config == UNetConfig.from_dict(dict(unet.config))
    assert ckpt.vae_config == VAEConfig.from_dict(dict(vae.config))
    assert ckpt.text_config == CLIPTextConfig.from_dict(text.config.to_dict())


def _copy_folder(src, dst, weights=True):
    shutil.copytree(src, dst, ignore=None if weights else shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dst


def test_diffusers_folder_variants_and_bin(tiny, tmp_path):
    unet, vae, text = tiny.models
    both = _copy_folder(tiny.folder, tmp_path / "both")
    fp16_only = _copy_folder(tiny.folder, tmp_path / "fp16", weights=False)
    for folder in (both, fp16_only):  # written by hand: casting the shared models would round their weights
        for name, model, file in (("unet", unet, "diffusion_pytorch_model"), ("vae", vae, "diffusion_pytorch_model"),
                                  ("text_encoder", text, "model")):
            save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
                      folder / name / f"{file}.fp16.safetensors")
    assert load_checkpoint(both).unet["conv_in.weight"].dtype == torch.float32
    for ckpt in (load_checkpoint(both, variant="fp16"), load_checkpoint(fp16_only)):
        assert {v.dtype for comp in (ckpt.unet, ckpt.vae, ckpt.text_encoder) for v in comp.values()} == {torch.float16}
        assert torch.equal(ckpt.vae["decoder.conv_out.weight"], vae.state_dict()["decoder.conv_out.weight"].half())
    with pytest.raises(CheckpointError, match="no bf16 weights file"):
        load_checkpoint(both, variant="bf16")

    bins = _copy_folder(tiny.folder, tmp_path / "bin", weights=False)
    torch.save(unet.state_dict(), bins / "unet" / "diffusion_pytorch_model.bin")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_vae = {}
    for k, v in vae.state_dict().items():
        if "mid_block.attentions" in k:
            for new, old in old_names.items():
                k = k.replace(f".{new}.", f".{old}.")
        old_vae[k] = v
    torch.save(old_vae, bins / "vae" / "diffusion_pytorch_model.bin")  # pre-0.14 diffusers attention names
    torch.save(text.state_dict(), bins / "text_encoder" / "pytorch_model.bin")
    assert "vae/encoder.mid_block.attentions.0.query.weight" not in load_checkpoint(bins).unused
    _assert_same(load_checkpoint(bins), tiny.sds)


def test_diffusers_folder_sharded(tiny, tmp_path):
    unet, vae, text = tiny.models
    sharded = _copy_folder(tiny.folder, tmp_path / "sharded", weights=False)
    unet.save_pretrained(sharded / "unet", max_shard_size="1MB")
    vae.save_pretrained(sharded / "vae")
    text.save_pretrained(sharded / "text_encoder")
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _assert_same(load_checkpoint(sharded), tiny.sds)


def test_folder_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_checkpoint(tmp_path / "nowhere.safetensors")
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        load_checkpoint(tmp_path)
    broken = _copy_folder(tiny.folder, tmp_path / "broken")
    sd = read_state_dict(broken / "unet" / "diffusion_pytorch_model.safetensors")
    save_file({k: v.clone() for k, v in sd.items() if not k.startswith("conv_out")},
              broken / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors: U-Net weights .*missing conv_out"):
        load_checkpoint(broken)
    sd2 = _copy_folder(tiny.folder, tmp_path / "sd2")
    config = json.loads((sd2 / "unet" / "config.json").read_text())
    (sd2 / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 1024}))
    with pytest.raises(CheckpointError, match="SD 2.x"):
        load_checkpoint(sd2)


# ---------------------------------------------------------------------------------------------------------------
# Single-file errors, EMA, safety


def test_missing_and_misshapen_keys_named_as_in_the_file(tiny, tmp_path):
    original = read_state_dict(tiny.single)
    path = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in original.items() if not k.startswith("model.diffusion_model.out.2")}, path)
    missing = "missing model.diffusion_model.out.2.weight"
    with pytest.raises(CheckpointError, match=rf"{path.name}: U-Net weights .*{missing}"):
        load_checkpoint(path)
    key = "first_stage_model.decoder.mid.attn_1.q.weight"
    save_file({**original, key: torch.zeros(64, 32, 1, 1)}, path)
    with pytest.raises(CheckpointError, match=rf"wrong shape {key} \(64, 32\) \(expected \(64, 64\)\)"):
        load_checkpoint(path)
    save_file({k: v for k, v in original.items() if not k.startswith("first_stage_model.")}, path)
    with pytest.raises(CheckpointError, match="has no VAE weights"):
        load_checkpoint(path)


def test_ema(tiny, tmp_path):
    original = read_state_dict(tiny.single)
    unet_keys = [k for k in original if k.startswith("model.diffusion_model.")]
    ema = {"model_ema." + "".join(k.split(".")[1:]): original[k] + 1 for k in unet_keys}  # diffusers' flat naming
    path = tmp_path / "ema.safetensors"
    save_file({**original, **ema, "model_ema.decay": torch.tensor(0.9999)}, path)
    plain, with_ema = load_checkpoint(path), load_checkpoint(path, use_ema=True)
    assert "model_ema.decay" in plain.unused and len(plain.unused) == len(ema) + 1
    assert torch.equal(plain.unet["conv_in.weight"], tiny.sds["unet"]["conv_in.weight"])
    assert torch.equal(with_ema.unet["conv_in.weight"], tiny.sds["unet"]["conv_in.weight"] + 1)
    assert "model.diffusion_model.input_blocks.0.0.weight" in with_ema.unused
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_checkpoint(tiny.single, use_ema=True)
    del ema["model_ema.diffusion_modelinput_blocks00weight"]
    partial = {**original, **ema}
    with pytest.raises(CheckpointError, match=rf"^x.ckpt: use_ema=True but 1 of {len(unet_keys)} U-Net weights have "
                                              r"no EMA copy \(e.g. model_ema.diffusion_modelinput_blocks00weight\); "
                                              r"load it without use_ema$"):
        split_original(partial, use_ema=True, path="x.ckpt")


class _Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("how", ["os.system", "builtins.eval"])
def test_pickle_that_runs_code_is_refused(tmp_path, how, legacy):
    marker = tmp_path / "ran"
    evil = (_Evil(os.system, f"touch {marker}") if how == "os.system"
            else _Evil(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": evil}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refused .*(system|eval)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_lightning_checkpoint_with_model_checkpoint_callback(tiny, tmp_path, monkeypatch):
    """Old Lightning checkpoints pickle the ModelCheckpoint class itself; it loads as an inert stub."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    fake = {n: types.ModuleType(n) for n in names}
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    fake[names[-1]].ModelCheckpoint = ModelCheckpoint
    with monkeypatch.context() as m:
        for n, mod in fake.items():
            m.setitem(sys.modules, n, mod)
        path = tmp_path / "lightning.ckpt"
        torch.save({"state_dict": read_state_dict(tiny.single), "epoch": 6, "pytorch-lightning_version": "1.4.2",
                    "callbacks": {ModelCheckpoint: {"best_model_score": None, "monitor": None}}}, path)
    assert "pytorch_lightning" not in sys.modules
    assert b"ModelCheckpoint" in (tmp_path / "lightning.ckpt").read_bytes()
    _assert_same(load_checkpoint(path), tiny.sds)


def test_truncated_files(tiny, tmp_path):
    data = tiny.single.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: truncated or corrupt"):
        load_checkpoint(cut)
    cut.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: not a safetensors file or truncated"):
        read_state_dict(cut)
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": read_state_dict(tiny.single)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:20000])
    with pytest.raises(CheckpointError, match=r"cut.ckpt: cannot read"):
        load_checkpoint(ckpt)


def test_safetensors_are_copy_on_write_views(tiny):
    sd = read_state_dict(tiny.single)
    sd["model.diffusion_model.input_blocks.0.0.weight"].zero_()  # writes go to private pages, never the file
    assert torch.equal(read_state_dict(tiny.single)["model.diffusion_model.input_blocks.0.0.weight"],
                       tiny.sds["unet"]["conv_in.weight"])


@pytest.mark.parametrize("family,keys,evidence", [
    ("SDXL", {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (10, 768),
              "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "conditioner.embedders"),
    ("SD 2.x", {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (10, 1024)},
     "1024-wide cross-attention"),
    ("SD 2.x", {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                "cond_stage_model.model.token_embedding.weight": (10, 1024)}, "OpenCLIP"),
    (None, {"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3)}, "standalone VAE"),
    (None, {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "another diffusion"),
    (None, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "a LoRA"),
    (None, {"lm_head.weight": (10, 4)}, "no model.diffusion_model"),
])
def test_other_families_are_named(tmp_path, family, keys, evidence):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, path)
    expected = f"looks like an {family} checkpoint" if family else "looks like"
    with pytest.raises(CheckpointError, match=rf"other.safetensors: {expected}.*{evidence}"):
        load_checkpoint(path)


UNET_IN, TO_K = "model.diffusion_model.input_blocks.0.0.weight", \
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
TOKENS = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
NOT_WHOLE = "; stablediff needs a Stable Diffusion 1.x checkpoint"


@pytest.mark.parametrize("keys,said", [
    # the first test that fits names the file: a diffusers U-Net before a VAE before a LoRA before a text encoder
    ({"down_blocks.0.resnets.0.conv1.weight": (1,), "encoder.down.0.block.0.conv1.weight": (1,)},
     "looks like a diffusers U-Net weights file (down_blocks.*), not a whole checkpoint; pass the diffusers folder"
     + NOT_WHOLE),
    ({"conv_in.weight": (1,)}, "looks like a diffusers U-Net weights file"),
    ({"decoder.up.0.block.0.conv1.weight": (1,), "lora_te_x.alpha": (1,)}, "looks like a standalone VAE"),
    ({"unet.conv_in.lora_A.weight": (1,), "text_model.x": (1,)},
     "looks like a LoRA (lora_* keys), not a whole checkpoint" + NOT_WHOLE),
    ({"text_model.embeddings.token_embedding.weight": (1,)},
     "looks like a text encoder only, not a whole checkpoint" + NOT_WHOLE),
    ({TOKENS: (1,)}, "looks like a text encoder only"),
    ({"embeddings.token_embedding.weight": (1,)}, "looks like a text encoder only"),
    ({"a": (1,), "b": (1,), "c": (1,), "d": (1,)},
     "looks like something other than Stable Diffusion: no model.diffusion_model.* keys (it has ['a', 'b', 'c']...)"
     + NOT_WHOLE),
    ({UNET_IN: (1,), TO_K: (320, 768), TOKENS: (10, 1024)},
     "the U-Net attends to 768-wide text features but the text encoder is 1024 wide; the file mixes parts of "
     "different models"),
    ({UNET_IN: (1,), TO_K: (320, 1280)}, f"looks like an SDXL checkpoint (1280-wide cross-attention, {TO_K}); "
                                         f"stablediff supports Stable Diffusion 1.x only"),
    ({UNET_IN: (1,), TO_K: (320, 768), TOKENS: (10, 768)}, None),
    ({UNET_IN: (1,), TO_K: (320, 768)}, None),  # no text encoder: nothing to compare with
    ({UNET_IN: (1,)}, None),  # no cross-attention: nothing to check
])
def test_detect_says_what_a_file_is(keys, said):
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    if said is None:
        assert detect(sd, "f.ckpt") == "sd1"
        return
    with pytest.raises(CheckpointError) as err:
        detect(sd, "f.ckpt")
    assert str(err.value).startswith(f"f.ckpt: {said}")
    with pytest.raises(CheckpointError, match="^checkpoint: "):
        detect(sd)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Hub ids


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="stable-diffusion-v1-5/stable-diffusion-v1-5: .*local path"):
        load_checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert time.monotonic() - start < 5


def test_hub_id_from_local_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny.folder, repo / "snapshots" / ("0" * 40))
    ckpt = load_checkpoint("someone/tiny-sd")
    assert ckpt.layout == "diffusers"
    _assert_same(ckpt, tiny.sds)


# ---------------------------------------------------------------------------------------------------------------
# Loading into modules built on the meta device


def test_load_into_meta_modules(tiny):
    ckpt = load_checkpoint(tiny.single)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_TINY)  # any module in our naming: diffusers' stands in for ours
    load_into(unet, ckpt.unet, path=str(tiny.single), component="unet")
    assert torch.equal(unet.conv_in.weight, tiny.sds["unet"]["conv_in.weight"])
    with torch.device("meta"):
        vae = AutoencoderKL(**VAE_TINY)
    broken = {k: v for k, v in ckpt.vae.items() if k != "quant_conv.bias"}
    broken["decoder.conv_in.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"tiny.safetensors: vae weights do not fit the model: "
                                              r"missing quant_conv.bias; wrong shape decoder.conv_in.weight \(1,\)"):
        load_into(vae, broken, path=str(tiny.single), component="vae")


def test_load_into_our_modules(tiny):
    unet_mod = pytest.importorskip("stablediff.unet")
    vae_mod = pytest.importorskip("stablediff.vae")
    clip_mod = pytest.importorskip("stablediff.clip")
    ckpt = load_checkpoint(tiny.single)
    with torch.device("meta"):
        modules = {"unet": unet_mod.UNet(ckpt.unet_config), "vae": vae_mod.AutoencoderKL(ckpt.vae_config),
                   "text_encoder": clip_mod.CLIPTextModel(ckpt.text_config)}
    for comp, module in modules.items():
        load_into(module, getattr(ckpt, comp), path=ckpt.path, component=comp)
        assert not any(p.is_meta for p in module.parameters()), comp


SD15_REPO_FILES = [  # the file list of stable-diffusion-v1-5/stable-diffusion-v1-5, abridged
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors"]


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_hub_download_asks_for_one_weights_format_only(tiny, tmp_path, monkeypatch, variant):
    """The online path, with the Hub faked: only configs, tokenizer and one weights file per component."""
    import fnmatch

    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, *, local_files_only=False, allow_patterns=None, **kw):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        asked.update(patterns=allow_patterns, revision=kw.get("revision"))
        return str(tiny.folder)

    info = types.SimpleNamespace(sha="a" * 40, siblings=[types.SimpleNamespace(rfilename=f) for f in SD15_REPO_FILES])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: info)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    if variant:  # the tiny folder standing in for the download has no fp16 files: only the patterns matter here
        with pytest.raises(CheckpointError, match="no fp16 weights file"):
            load_checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5", variant=variant)
    else:
        _assert_same(load_checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5"), tiny.sds)
    got = {f for f in SD15_REPO_FILES if any(fnmatch.fnmatch(f, p) for p in asked["patterns"])}
    mid = f".{variant}" if variant else ""
    load = {f"{w}{mid}.safetensors" for w in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model",
                                               "text_encoder/model")}
    assert asked["revision"] == "a" * 40
    assert got == load | {"model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                          "vae/config.json", "text_encoder/config.json", "tokenizer/merges.txt",
                          "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                          "tokenizer/vocab.json"}
