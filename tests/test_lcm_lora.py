"""Few-step distillation LoRAs (LCM-LoRA, TCD-LoRA, Hyper-SD 1.5) in the layouts their files use, merged against
diffusers' load_lora_weights + fuse_lora on the tiny random model, and a 4-step "lcm" image against diffusers'
StableDiffusionPipeline + LCMScheduler with the same LoRA.

What the files hold (issue 23): the LoRA targets of diffusers' LCM distillation script
(examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py), which TCD and Hyper-SD share: every attention
projection (to_q, to_k, to_v, to_out.0), proj_in / proj_out, ff.net.0.proj / ff.net.2, the resnets' conv1, conv2
(3x3: down (r, in, 3, 3), up (out, r, 1, 1)), conv_shortcut (1x1) and time_emb_proj, and the down/upsampler convs
(3x3); U-Net only. The released latent-consistency/lcm-lora-sdv1-5 stores them kohya-style with diffusers module
paths and one alpha per layer (lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight / .lora_up.weight /
.alpha; stable-diffusion.cpp PR 955 lists it as "unet|lora_down+lora_up+alpha|hf"), in float16. A LoRA saved by
the training script itself (save_lora_weights) is the PEFT layout: unet.<module path>.lora_A.weight / .lora_B.weight;
diffusers before PEFT (0.2x) wrote unet.<module path>.lora.down.weight / .lora.up.weight.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import SD15, assert_close, tiny_diffusers_pipeline
from safetensors.torch import load_file, save_file

from stablediff import lora
from stablediff.config import UNetConfig
from stablediff.unet import UNet

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

# the module names LCM distillation puts a LoRA on (peft matches a target by the end of the module name)
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
RANK, ALPHA = 4, 2.0


def lcm_layers(unet) -> list[str]:
    """Every Linear / Conv2d of the U-Net that one of LCM_TARGETS names."""
    pattern = re.compile(r"(^|\.)(" + "|".join(re.escape(t) for t in LCM_TARGETS) + r")$")
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and pattern.search(n)]


@pytest.fixture(scope="module")
def oracle():
    pipe = tiny_diffusers_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, copy.deepcopy(pipe.unet.state_dict())


@pytest.fixture()
def unet(oracle):
    pipe, base = oracle
    ours = UNet(UNetConfig.from_dict(dict(pipe.unet.config))).eval().requires_grad_(False)
    ours.load_state_dict(base)
    return ours


def random_pairs(unet, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (up (out, r[, 1, 1]), down (r, in[, kh, kw])), scaled so the merged deltas are of the weights' size."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in lcm_layers(unet):
        w = unet.get_submodule(name).weight
        down = torch.randn(RANK, *w.shape[1:], generator=g) * 0.3
        up = torch.randn(w.shape[0], RANK, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.3
        out[name] = up, down
    return out


def write_kohya_hf(path, pairs, dtype=torch.float16):
    """lcm-lora-sdv1-5 / Hyper-SD15: lora_unet_<diffusers path, _ for .>.lora_down/.lora_up/.alpha, in float16."""
    sd = {}
    for name, (up, down) in pairs.items():
        flat = "lora_unet_" + name.replace(".", "_")
        sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = down.to(dtype), up.to(dtype)
        sd[f"{flat}.alpha"] = torch.tensor(ALPHA, dtype=dtype)
    save_file(sd, str(path))
    return path


def write_peft(path, pairs):
    """save_lora_weights of the distillation script: unet.<path>.lora_A / .lora_B, alpha / rank folded into B."""
    sd = {}
    for name, (up, down) in pairs.items():
        sd[f"unet.{name}.lora_A.weight"] = down
        sd[f"unet.{name}.lora_B.weight"] = (up * (ALPHA / RANK)).contiguous()
    save_file(sd, str(path))
    return path


def write_diffusers_old(path, pairs):
    """diffusers' own layout before PEFT (LoRACompatibleLinear / LoRACompatibleConv): unet.<path>.lora.down.weight
    / .lora.up.weight, no alpha, alpha / rank folded into up."""
    sd = {}
    for name, (up, down) in pairs.items():
        sd[f"unet.{name}.lora.down.weight"] = down
        sd[f"unet.{name}.lora.up.weight"] = (up * (ALPHA / RANK)).contiguous()
    save_file(sd, str(path))
    return path


WRITERS = {"kohya_hf": write_kohya_hf, "peft": write_peft, "diffusers_old": write_diffusers_old}


def test_the_targets_cover_every_layer_kind(unet):
    """The tiny U-Net has each kind the real files hold, so the parity tests below see all of them."""
    names = lcm_layers(unet)
    kinds = {t for t in LCM_TARGETS if any(n == t or n.endswith("." + t) for n in names)}
    assert kinds == set(LCM_TARGETS)
    convs3x3 = [n for n in names if unet.get_submodule(n).weight.shape[2:] == (3, 3)]
    assert "down_blocks.0.downsamplers.0.conv" in convs3x3 and "up_blocks.0.upsamplers.0.conv" in convs3x3
    assert "mid_block.resnets.0.conv1" in convs3x3 and len(names) > 50


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_layouts_read_to_the_same_deltas(unet, tmp_path, layout):
    pairs = random_pairs(unet)
    got = lora.read_lora(WRITERS[layout](tmp_path / f"{layout}.safetensors", pairs), unet, torch.nn.Module())
    assert sorted(got.deltas) == sorted(f"unet.{n}.weight" for n in pairs)
    for name, (up, down) in pairs.items():
        shape = unet.get_submodule(name).weight.shape
        expected = (ALPHA / RANK) * (up.half().float().flatten(1) @ down.half().float().flatten(1)).reshape(shape) \
            if layout == "kohya_hf" else (ALPHA / RANK) * (up.flatten(1) @ down.flatten(1)).reshape(shape)
        assert_close(got.deltas[f"unet.{name}.weight"].weight_delta(shape, "cpu"), expected, 1e-6)


@pytest.mark.parametrize("scale", [0.5, 1.0])
@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_merged_unet_equals_diffusers(oracle, unet, tmp_path, layout, scale):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (the test extra installs it)")
    pipe, base = oracle
    path = WRITERS[layout](tmp_path / f"{layout}.safetensors", random_pairs(unet, seed=1))
    text = torch.nn.Module()  # these LoRAs hold no text-encoder layers
    try:
        pipe.load_lora_weights(str(path), adapter_name=layout)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
        ref = pipe.unet.state_dict()
        assert sum(not torch.equal(ref[k], base[k]) for k in ref) == len(lcm_layers(unet))  # every layer applied

        lora.LoraSet(unet, text).apply({path: scale})
        g = torch.Generator().manual_seed(3)
        x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
        with torch.no_grad():
            ours, theirs = unet(x, 500, ctx), pipe.unet(x, 500, ctx).sample
        assert_close(ours, theirs, 1e-5)
    finally:
        pipe.unet.load_state_dict(base)


def test_lcm_image_with_lcm_lora_equals_diffusers(tiny_model_dir, tmp_path):
    """4 "lcm" steps at cfg 1 with the LoRA at 1.0, the way LCM-LoRA is meant to be used: the latents against
    StableDiffusionPipeline + LCMScheduler + load_lora_weights / fuse_lora."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (the test extra installs it)")
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from stablediff import StableDiffusion

    ours = StableDiffusion.from_pretrained(tiny_model_dir)
    path = write_kohya_hf(tmp_path / "lcm-lora-sdv1-5.safetensors", random_pairs(ours.unet, seed=2))
    ref = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = LCMScheduler.from_config(LCMScheduler.load_config(str(SD15), subfolder="scheduler"))
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=1.0)
    prompt, seed = "a photo of an astronaut riding a horse", 1055747
    with torch.no_grad():
        expected = ref(prompt, num_inference_steps=4, guidance_scale=1.0, width=64, height=64,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
        plain = ours(prompt, steps=4, cfg_scale=1.0, seed=seed, width=64, height=64, sampler="lcm").latents
    result = ours(prompt, steps=4, cfg_scale=1.0, seed=seed, width=64, height=64, sampler="lcm",
                  loras={str(path): 1.0})
    assert (plain - expected).abs().max() > 0.05  # the LoRA does change the image
    assert_close(result.latents, expected, 5e-4)


def test_proj_in_and_out_written_as_linear_merge_as_the_1x1_conv(unet, tmp_path):
    """SD 1.5's proj_in / proj_out are 1x1 convolutions; a LoRA made for a linear-projection U-Net (SD 2.x style)
    writes their halves 2-D. Both shapes give the same delta."""
    pairs = {n: p for n, p in random_pairs(unet, seed=4).items() if n.endswith(("proj_in", "proj_out"))}
    assert pairs and all(down.ndim == 4 for _, down in pairs.values())
    flat = {n: (up.flatten(1), down.flatten(1)) for n, (up, down) in pairs.items()}
    conv = lora.read_lora(write_kohya_hf(tmp_path / "conv.safetensors", pairs), unet, torch.nn.Module()).deltas
    linear = lora.read_lora(write_kohya_hf(tmp_path / "linear.safetensors", flat), unet, torch.nn.Module()).deltas
    assert sorted(conv) == sorted(linear)
    for name, d in conv.items():
        shape = unet.get_parameter(name[5:]).shape
        assert len(shape) == 4 and torch.equal(d.weight_delta(shape, "cpu"), linear[name].weight_delta(shape, "cpu"))


def test_an_lcm_lora_for_another_unet_is_a_one_line_error(unet, tmp_path):
    """lcm-lora-sdxl writes the same kohya layout, with blocks SD 1.x does not have: named, not skipped."""
    pairs = random_pairs(unet, seed=5)
    path = write_kohya_hf(tmp_path / "lcm-lora-sdxl.safetensors", pairs)
    sd = {k.replace("down_blocks_1_resnets", "down_blocks_2_resnets"): v
          for k, v in load_file(str(path)).items()}
    save_file(sd, str(path))
    with pytest.raises(lora.LoraError) as e:
        lora.read_lora(path, unet, torch.nn.Module())
    assert "\n" not in str(e.value)
    assert re.search(r"lcm-lora-sdxl\.safetensors: \d+ of \d+ keys name no layer.*lora_unet_down_blocks_2_resnets",
                     str(e.value))
