"""A separate VAE (single file in every layout people download, diffusers folders) and tiled VAE decode/encode,
both against diffusers' AutoencoderKL on a tiny random VAE."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
from conftest import TINY_VAE, assert_close, diffusers_vae

from stablediff import vae as vae_module
from stablediff.config import VAEConfig
from stablediff.keymap import rename_keys, vae_table
from stablediff.vae import AutoencoderKL, needs_tiling, peak_bytes
from stablediff.weights import CheckpointError, load_vae

TINY = VAEConfig.from_dict(dict(TINY_VAE, layers_per_block=1))  # diffusers default; downscale 2, tiles of 32 px


@pytest.fixture(scope="module")
def reference():
    """diffusers' tiny AutoencoderKL (random weights) with tiling on, and ours holding the same weights."""
    ref = diffusers_vae(TINY_VAE, seed=7)
    ours = AutoencoderKL(TINY).eval()
    ours.load_state_dict(ref.state_dict())
    ref.enable_tiling()
    return ref, ours


def latents(h=48, w=40, seed=0):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))


def pixels(h=96, w=80, seed=1):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------
# Tiled VAE

@torch.no_grad()
def test_tiled_decode_matches_diffusers(reference):
    ref, ours = reference
    z = latents()  # 48x40 latents: 4x4 tiles of 16 at stride 12, the last ones cut short
    expected = ref.decode(z).sample
    assert_close(ours.decode(z, tiled=True), expected, 1e-5)
    assert (ours.decode(z) - expected).abs().max() > 1e-2  # tiling really changes the result: the test can fail


@torch.no_grad()
def test_tiled_encode_matches_diffusers(reference):
    ref, ours = reference
    x = pixels()
    expected = ref.encode(x).latent_dist
    got = ours.encode(x, tiled=True)
    assert_close(got.mean, expected.mean, 1e-5)
    assert_close(got.std, expected.std, 1e-5)
    assert (ours.encode(x).mean - expected.mean).abs().max() > 1e-3


@torch.no_grad()
def test_no_tiling_within_one_tile(reference):
    ref, ours = reference
    z = latents(16, 12)  # fits one tile: diffusers does not tile either
    assert torch.equal(ours.decode(z, tiled=True), ours.decode(z))
    assert_close(ours.decode(z, tiled=True), ref.decode(z).sample, 1e-5)


@torch.no_grad()
def test_tiled_decode_keeps_activations_tile_sized(reference):
    _, ours = reference
    sizes = []
    hooks = [m.register_forward_hook(lambda m, a, out: sizes.append(out.shape[-2] * out.shape[-1]))
             for m in ours.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        ours.decode(latents(), tiled=True)
        tiled = max(sizes)
        sizes.clear()
        ours.decode(latents())
        untiled = max(sizes)
    finally:
        for h in hooks:
            h.remove()
    assert tiled == 32 * 32  # one tile of sample_size pixels, whatever the image's 96x80
    assert untiled == 96 * 80


def test_automatic_rule():
    sd = VAEConfig()  # SD 1.x: the decoder's widest activation is 256 channels at full size, the encoder's 128
    assert peak_bytes(sd, 512, 512, torch.float32, "decoder") == 5 * 256 * 512 * 512 * 4
    assert peak_bytes(sd, 512, 512, torch.float32, "encoder") == 5 * 128 * 512 * 512 * 4
    assert peak_bytes(sd, 512, 512, torch.bfloat16, "decoder") == 5 * 256 * 512 * 512 * 2
    assert not needs_tiling(sd, 1024, 1024, torch.float32, "decoder")
    assert needs_tiling(sd, 1536, 1536, torch.float32, "decoder")
    assert not needs_tiling(sd, 1536, 1536, torch.bfloat16, "decoder")
    assert needs_tiling(sd, 2048, 2048, torch.bfloat16, "decoder")


@torch.no_grad()
def test_tiled_none_tiles_only_over_the_budget(reference, monkeypatch):
    _, ours = reference
    z = latents()
    untiled, tiled = ours.decode(z), ours.decode(z, tiled=True)
    assert torch.equal(ours.decode(z, tiled=None), untiled)  # 96x80 of the tiny VAE is far below 8 GiB
    monkeypatch.setattr(vae_module, "AUTO_TILING_BYTES", 5 * 64 * 96 * 80 * 4 - 1)  # one byte under its peak
    assert torch.equal(ours.decode(z, tiled=None), tiled)


def test_tiles_too_small_to_overlap():
    tiny = AutoencoderKL(VAEConfig.from_dict(dict(TINY_VAE, sample_size=2))).eval()  # a 1-latent tile
    with pytest.raises(ValueError, match="too small"):
        tiny.decode(latents(4, 4), tiled=True)


# ---------------------------------------------------------------------------------------------------------------
# Separate VAE

def original_layout(ref) -> dict:
    """diffusers' VAE weights in the original LDM layout (encoder.down.*, mid.attn_1 as 1x1 convolutions)."""
    sd, left = rename_keys(ref.state_dict(), vae_table(TINY), to_ours=False)
    assert not left
    return sd


def save_ckpt(obj, path):
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def vae_files(reference, tmp_path_factory):
    """The reference VAE saved in the layouts people download."""
    from safetensors.torch import save_file

    ref, _ = reference
    d = tmp_path_factory.mktemp("vaes")
    sd = {k: v.contiguous() for k, v in original_layout(ref).items()}
    save_file(sd, d / "plain.safetensors")
    # a training .ckpt: under state_dict, with the loss network and EMA counters A1111 drops
    save_ckpt({"state_dict": {**sd, "loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999)},
               "global_step": 840000}, d / "trained.ckpt")
    save_ckpt({f"first_stage_model.{k}": v for k, v in sd.items()} | {"model.diffusion_model.x": torch.zeros(1)},
              d / "prefixed.pt")
    ref.save_pretrained(d / "diffusers-vae")
    return d


@torch.no_grad()
@pytest.mark.parametrize("name", ["plain.safetensors", "trained.ckpt", "prefixed.pt", "diffusers-vae"])
def test_separate_vae_decodes_and_encodes_as_diffusers(reference, vae_files, name):
    ref, _ = reference
    found = load_vae(vae_files / name, like=TINY)
    ours = AutoencoderKL(found.config).eval()
    ours.load_state_dict(found.state_dict)
    z, x = latents(12, 10), pixels(24, 20)
    ref.disable_tiling()
    try:
        assert_close(ours.decode(z), ref.decode(z).sample, 1e-5)
        assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, 1e-5)
    finally:
        ref.enable_tiling()
    if name == "trained.ckpt":
        assert sorted(found.unused) == ["loss.logvar", "model_ema.decay"]
    if name == "prefixed.pt":
        assert found.unused == ["model.diffusion_model.x"]


def test_model_folder_gives_its_vae(vae_files, tmp_path):
    import shutil

    shutil.copytree(vae_files / "diffusers-vae", tmp_path / "model" / "vae")
    found = load_vae(tmp_path / "model", like=TINY)
    assert found.weights_file == tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors"


def test_refuses_vaes_of_other_latents(vae_files, tmp_path):
    import json
    import shutil

    sdxl = tmp_path / "sdxl-vae"
    shutil.copytree(vae_files / "diffusers-vae", sdxl)
    config = json.loads((sdxl / "config.json").read_text())
    (sdxl / "config.json").write_text(json.dumps(dict(config, scaling_factor=0.13025)))
    with pytest.raises(CheckpointError, match=r"sdxl-vae: VAE scaling_factor 0.13025 \(SDXL's\)"):
        load_vae(sdxl, like=TINY)

    sixteen = diffusers_vae(dict(TINY_VAE, latent_channels=16))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in rename_keys(sixteen.state_dict(), vae_table(TINY), to_ours=False)[0]
               .items()}, tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match=r"flux.safetensors: a VAE with 16 latent channels"):
        load_vae(tmp_path / "flux.safetensors", like=TINY)

    save_ckpt({"conditioner.embedders.0.x": torch.zeros(1)}, tmp_path / "sdxl.ckpt")
    with pytest.raises(CheckpointError, match=r"sdxl.ckpt: looks like an SDXL checkpoint"):
        load_vae(tmp_path / "sdxl.ckpt", like=TINY)

    broken = {k: v for k, v in original_layout(sixteen).items() if not k.startswith("decoder.conv_out")}
    save_ckpt(broken, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"broken.pt: VAE weights do not fit the model: missing "
                                              r"decoder.conv_out"):
        load_vae(tmp_path / "broken.pt", like=TINY)

    with pytest.raises(CheckpointError, match="nowhere.safetensors: no such VAE file or folder"):
        load_vae(tmp_path / "nowhere.safetensors", like=TINY)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(CheckpointError, match="evil.ckpt: refused to load: its pickle asks for builtins.print"):
        load_vae(path, like=TINY)


# ---------------------------------------------------------------------------------------------------------------
# In the pipeline and the CLI

@torch.no_grad()
def test_pipeline_with_separate_vae(tiny_model_dir, reference, vae_files, tmp_path, monkeypatch):
    from stablediff import StableDiffusion

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the hash cache

    ref, _ = reference  # z below fits one tile: its tiling does not apply
    pipe = StableDiffusion.from_pretrained(tiny_model_dir, vae=vae_files / "plain.safetensors",
                                           vae_dtype=torch.bfloat16)
    assert pipe.vae.post_quant_conv.weight.dtype == torch.bfloat16  # the VAE dtype rule holds for it
    pipe = StableDiffusion.from_pretrained(tiny_model_dir, vae=vae_files / "plain.safetensors")
    z = latents(16, 16) * pipe.vae.config.scaling_factor
    assert_close(pipe.decode(z), ref.decode(z / pipe.vae.config.scaling_factor).sample, 1e-5)

    result = pipe("a cat", steps=2, seed=3, width=64, height=64)
    digest = hashlib.sha256((vae_files / "plain.safetensors").read_bytes()).hexdigest()
    assert f"VAE hash: {digest[:10]}, VAE: plain.safetensors," in result.infotexts[0]

    own = StableDiffusion.from_pretrained(tiny_model_dir)
    assert "VAE" not in own("a cat", steps=2, seed=3, width=64, height=64).infotexts[0]
    own.load_vae(vae_files / "diffusers-vae")
    assert_close(own.decode(z), pipe.decode(z), 1e-6)
    assert own.vae_name == "diffusers-vae"


@torch.no_grad()
def test_pipeline_vae_tiling(tiny_model_dir, tiny_reference):
    from stablediff import StableDiffusion

    pipe = StableDiffusion.from_pretrained(tiny_model_dir)
    ref = tiny_reference.vae
    sf = pipe.vae.config.scaling_factor
    z = latents(40, 24) * sf
    ref.enable_tiling()
    try:
        expected = ref.decode(z / sf).sample
        pipe.vae_tiling = True
        assert_close(pipe.decode(z), expected, 1e-5)
        pipe.vae_tiling = None  # automatic: this size is far below the budget, so untiled
        assert (pipe.decode(z) - expected).abs().max() > 1e-3
    finally:
        ref.disable_tiling()


def test_cli_options(tiny_model_dir, vae_files):
    import argparse

    from stablediff.cli import UsageError, add_generation_options, load_model

    p = argparse.ArgumentParser()
    add_generation_options(p)
    assert (p.parse_args([]).vae, p.parse_args([]).vae_tiling) == (None, None)
    assert p.parse_args(["--no-vae-tiling"]).vae_tiling is False
    args = p.parse_args(["--model", str(tiny_model_dir), "--vae", str(vae_files / "trained.ckpt"), "--vae-tiling",
                         "--embeddings-dir", str(vae_files / "none")])
    pipe = load_model(args)
    assert (pipe.vae_name, pipe.vae_tiling) == ("trained.ckpt", True)
    args.vae = str(vae_files / "missing.pt")
    with pytest.raises(UsageError, match="missing.pt: no such VAE file or folder"):
        load_model(args)
