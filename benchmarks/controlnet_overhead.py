"""What one ControlNet adds to a guided SD 1.5 step on this CPU, against the U-Net's encoder half (not a test).

    PYTHONPATH=src python benchmarks/controlnet_overhead.py [--latent 64] [--repeats 2]

The U-Net comes from tests/data/sd15-layout/unet/config.json, the ControlNet is its copy (ControlNetConfig.from_unet,
SD 1.5's hint encoder), both with random weights, float32, a guided batch of 2 ([uncond; cond], equal latents and
timestep, as the pipeline runs them) and a 512x512 hint. One torch thread, timed in this thread's CPU time
(time.thread_time), so other jobs on a shared machine do not count. Three measurements, interleaved, after one
warm-up each; the minimum of the repeats is kept:
- step: the U-Net alone;
- controlled step: controls.ActiveControl's residuals (the ControlNet on the batch) and the U-Net with them;
- encoder half: the U-Net's conv_in, down blocks and mid block on the batch (what a ControlNet copies).
The overhead is controlled step - step; the ratio overhead / encoder half is what the ControlNet costs beyond the
blocks it must run (1.0 would be the encoder half and nothing else).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from stablediff import malloc
from stablediff.config import UNetConfig
from stablediff.controlnet import ControlNet, ControlNetConfig
from stablediff.controls import ActiveControl, Control
from stablediff.nn import timestep_embedding
from stablediff.unet import UNet

LAYOUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sd15-layout"


def random_model(cls, cfg):
    """The model with random weights (std 0.02, no denormals), made without its slow default initialisation."""
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def encoder_half(unet: UNet, x, t, context):
    """conv_in, the down blocks and the mid block, as UNet.forward runs them (without its shared-half shortcut)."""
    cfg = unet.config
    temb = unet.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift))
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        h, _ = block.down(h, temb, context)
    return unet.mid_block(h, temb, context)


def cpu_seconds(fn) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 pixels)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    malloc.keep_freed_memory()
    ucfg = UNetConfig.from_json(LAYOUT / "unet" / "config.json")
    unet = random_model(UNet, ucfg)
    net = random_model(ControlNet, ControlNetConfig.from_unet(ucfg))
    n = args.latent
    x = torch.randn(1, 4, n, n).repeat(2, 1, 1, 1)
    t = torch.full((2,), 500.0)
    context = torch.randn(2, 77, ucfg.cross_attention_dim)
    hint = torch.rand(1, 3, n * net.config.hint_downscale, n * net.config.hint_downscale)
    unit = ActiveControl(Control(None, net), net, hint)

    def controlled():
        down, mid = unit.residuals(x, t, context, uncond_rows=0)
        unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    runs = {"step": lambda: unet(x, t, context), "controlled step": controlled,
            "encoder half": lambda: encoder_half(unet, x, t, context)}
    times = {name: [] for name in runs}
    with torch.no_grad():
        for name, fn in runs.items():
            print(f"warm-up {name}: {cpu_seconds(fn):.2f} s", flush=True)
        for r in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(cpu_seconds(fn))
                print(f"run {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    best = {name: min(v) for name, v in times.items()}
    overhead = best["controlled step"] - best["step"]
    print(f"\n{n * 8}x{n * 8}, float32, 1 thread, guided batch 2, CPU seconds (min of {args.repeats}):")
    for name, value in best.items():
        print(f"  {name}: {value:.2f}")
    print(f"  ControlNet overhead: {overhead:.2f} ({overhead / best['step']:.2f} of a step)")
    print(f"  overhead / encoder half: {overhead / best['encoder half']:.2f}")


if __name__ == "__main__":
    main()
