"""Shared fixtures: random-weight models in the real layouts, built with diffusers/transformers (test-only oracles)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
SD15 = DATA / "sd15-layout"

# Tiny models are dominated by per-op overhead, which extra threads only add to (and on a shared machine they
# oversubscribe the cores). Full-size SD 1.5 checks ask for every core through the `all_cores` fixture.
CORES = torch.get_num_threads()
torch.set_num_threads(1)
# Layers take their fixed kernel rules, the same on every machine, and nothing is timed or written to the user's
# cache (tuning.py); tests/test_tuning.py and the tuned SD 1.5 check switch tuning on themselves
os.environ.setdefault("STABLEDIFF_TUNING", "off")


@pytest.fixture(autouse=True)
def bf16_as_asked(monkeypatch):
    """bfloat16 runs as asked on any CPU: a load would otherwise run float32 on CPUs without bfloat16 units
    (cpu.cpu_dtype; tests/test_cpu.py tests that switch with the real probe)."""
    from stablediff import cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: True)


@pytest.fixture()
def all_cores():
    torch.set_num_threads(CORES)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module whose servers run generations while the test process waits on them: two
    threads fighting other processes for 2 cores make every step 20x slower here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture
def winograd_inputs(monkeypatch) -> list:
    """The input shapes of the convolutions done by Winograd's algorithm during the test."""
    from stablediff import winograd

    calls, conv3x3 = [], winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda x, *a, **k: calls.append(tuple(x.shape)) or conv3x3(x, *a, **k))
    return calls


TINY_UNET = dict(
    block_out_channels=[32, 64], layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32, norm_num_groups=32, attention_head_dim=[2, 4],
)
TINY_VAE = dict(
    block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
)
TINY_TEXT = dict(
    hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406,
    eos_token_id=49407, pad_token_id=49407, projection_dim=32,
)


def sd15_config(component: str) -> dict:
    return json.loads((SD15 / component / "config.json").read_text())


def diffusers_unet(cfg: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()


def diffusers_vae(cfg: dict, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()


def transformers_text(cfg: dict, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def text_state_dict(model) -> dict:
    """A CLIPTextModel's weights named the way real SD 1.x files name them (`text_model.` prefix)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float):
    """max |ours - ref| <= rel * max(1, max |ref|), the project's parity criterion."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours.float() - ref.float()).abs().max().item()
    bound = rel * max(1.0, ref.float().abs().max().item())
    assert err <= bound, f"max abs diff {err:.3g} > {bound:.3g}"
    return err


BUNDLED_TOKENIZER = Path(__file__).parent.parent / "src" / "stablediff" / "data" / "clip"


def tiny_diffusers_pipeline(seed: int = 0, unet_overrides: dict | None = None, scheduler=None):
    """A random tiny StableDiffusionPipeline in the real layout (no safety checker)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet = diffusers_unet(dict(TINY_UNET, **(unet_overrides or {})), seed)
    vae = diffusers_vae(TINY_VAE, seed + 1)
    text = transformers_text(TINY_TEXT, seed + 2)
    # random weights are tiny in scale; make the text matter so prompts change images
    tokenizer = CLIPTokenizer.from_pretrained(str(BUNDLED_TOKENIZER))
    scheduler = scheduler or PNDMScheduler.from_pretrained(str(SD15), subfolder="scheduler")
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny random pipeline saved as a diffusers folder (model_index.json + subfolders)."""
    import shutil

    path = tmp_path_factory.mktemp("tiny-sd") / "tiny-sd"
    tiny_diffusers_pipeline().save_pretrained(path)
    # the scheduler config exactly as the SD 1.5 repository ships it (save_pretrained would add
    # timestep_spacing="leading", which every other scheduler class made from it would then inherit)
    shutil.copy(SD15 / "scheduler" / "scheduler_config.json", path / "scheduler" / "scheduler_config.json")
    return path


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir):
    """diffusers' pipeline loaded from the tiny folder (the oracle)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                   requires_safety_checker=False)


@contextmanager
def serve_process(args: list[str], log_path: Path, wait_s: float = 180):
    """`stablediff serve ARGS` as a subprocess on a free loopback port: yields (process, port) once it answers
    HTTP at all (a 401 counts: it is up), and stops it after."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once; uvicorn binds it next
    cmd = [sys.executable, "-m", "stablediff", "serve", *args, "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + wait_s
        while True:
            assert proc.poll() is None, f"server exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"server did not answer in {wait_s:g} s"
            try:
                httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/progress", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Kernel tuning on (tuning.py), every fast path allowed, the cache file under tmp_path (yielded); nothing
    remembered before or after."""
    from stablediff import cpu, tuning

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(tuning.ENV, "on")
    monkeypatch.setenv(cpu.ENV, "")
    tuning.forget()
    yield tmp_path / "stablediff" / "kernels.json"
    tuning.forget()
