"""Loading float32 (or float16) weights as bfloat16: the same tensors as converting a float32 load, made one tensor at
a time, so that the load never holds the float32 weights and the bfloat16 copy together (issue 25)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stablediff import StableDiffusion, cpu
from stablediff.config import UNetConfig
from stablediff.weights import expected_shapes

SRC = Path(__file__).parent.parent / "src"
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def _modules(pipe):
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


def _as_before(module, dtype):
    """What loading did before weights were converted tensor by tensor: the whole module converted, then the
    U-Net and VAE laid out channels-last where bfloat16 convolutions want it (pipeline._channels_last's rule)."""
    module = module.to(dtype)
    if dtype == torch.bfloat16 and cpu.enabled("channels_last"):
        module = module.to(memory_format=torch.channels_last)
    return module


def _assert_same_tensors(ours: torch.nn.Module, expected: torch.nn.Module):
    a, b = ours.state_dict(), expected.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].dtype, a[k].shape, a[k].stride()) == (b[k].dtype, b[k].shape, b[k].stride()), k
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k  # bit for bit (NaN payloads too)


@pytest.mark.parametrize("vae_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_load_is_the_float32_load_converted(tiny_model_dir, vae_dtype):
    ours = StableDiffusion.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, vae_dtype=vae_dtype)
    ref = StableDiffusion.from_pretrained(tiny_model_dir)
    assert ours.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # not trivially the same
    for name, module in _modules(ref).items():
        dtype = vae_dtype if name == "vae" else torch.bfloat16
        _assert_same_tensors(_modules(ours)[name], _as_before(module, dtype))


@pytest.fixture(scope="module")
def fp16_variant(tiny_model_dir, tmp_path_factory):
    """The tiny folder with only fp16 variant files (model.fp16.safetensors ...), as the Hub's fp16 branches."""
    root = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    shutil.copytree(tiny_model_dir, root)
    for comp, stem in WEIGHTS.items():
        sd = load_file(root / comp / f"{stem}.safetensors")
        save_file({k: v.half() for k, v in sd.items()}, root / comp / f"{stem}.fp16.safetensors")
        (root / comp / f"{stem}.safetensors").unlink()
    return root


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_float16_variant_loads_as_its_weights_converted(fp16_variant, dtype):
    ours = StableDiffusion.from_pretrained(fp16_variant, dtype=dtype, vae_dtype=torch.float32, variant="fp16")
    ref = StableDiffusion.from_pretrained(fp16_variant, dtype=torch.float16, vae_dtype=torch.float32, variant="fp16")
    assert ref.unet.conv_in.weight.dtype == torch.float16 and ours.unet.conv_in.weight.dtype == dtype
    _assert_same_tensors(ours.unet, _as_before(ref.unet, dtype))
    _assert_same_tensors(ours.text_encoder, _as_before(ref.text_encoder, dtype))


# -------------------------------------------------------------------------------------------------------------------
# Peak resident memory of a fresh process loading a mid-size model

MID_UNET = {"block_out_channels": [224, 448], "attention_head_dim": 8}  # the tiny U-Net widened: 212 MB in float32

LOAD = """
import sys, torch
from stablediff import StableDiffusion, cpu
cpu.native_bf16 = lambda: True  # bfloat16 as asked, on any CPU
dtype = getattr(torch, sys.argv[2])
pipe = StableDiffusion.from_pretrained(sys.argv[1], dtype=dtype)
if dtype == torch.float32:  # the float32 weights resident, as they are while the U-Net runs
    sum(p.sum().item() for p in pipe.unet.parameters())
peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(pipe.unet.conv_in.weight.dtype, peak)
"""


@pytest.fixture(scope="module")
def mid_model(tiny_model_dir, tmp_path_factory):
    """The tiny folder with a wider U-Net of random float32 weights, about 212 MB of them."""
    root = tmp_path_factory.mktemp("mid") / "mid-sd"
    shutil.copytree(tiny_model_dir, root)
    config_file = root / "unet" / "config.json"
    config = dict(json.loads(config_file.read_text()), **MID_UNET)
    config_file.write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    shapes = expected_shapes("unet", UNetConfig.from_dict(config))
    save_file({k: torch.randn(shape, generator=gen) * 0.02 for k, shape in shapes.items()},
              root / "unet" / "diffusion_pytorch_model.safetensors")
    return root


def _peak_kb(model: Path, dtype: str) -> int:
    """Peak resident memory (kB) of a fresh process that loads `model` in `dtype`: its VmHWM, since ru_maxrss keeps
    the peak of the process it was forked from, this one."""
    out = subprocess.run([sys.executable, "-c", LOAD, str(model), dtype], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, peak = out.stdout.split()
    assert loaded == f"torch.{dtype}"
    return int(peak)


def test_bfloat16_load_peaks_below_the_float32_weights(mid_model):
    """A bfloat16 load holds the bfloat16 weights, half the float32 ones: its peak was 78-94 MiB under the float32
    weights' (101 MiB less the noise, a 16 MiB spread over 12 runs). Converting whole modules, as loads did before,
    peaked 163 MiB over them. The bound is a quarter of the float32 weights (52 MiB) under their peak."""
    weights_kb = (mid_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size >> 10
    float32, bfloat16 = _peak_kb(mid_model, "float32"), _peak_kb(mid_model, "bfloat16")
    assert bfloat16 <= float32 - weights_kb // 4, f"bfloat16 load peak {bfloat16 >> 10} MiB, float32 weights' " \
                                                  f"{float32 >> 10} MiB"
