"""Nearest 2x upsampling + 3x3 convolution, done plainly or as 2x2 phase convolutions (nn.upsample_conv3x3), at
SD 1.5's and TAESD's shapes; and what a TAESD preview costs (not part of the tests).

    PYTHONPATH=src python benchmarks/upsample_conv.py [--repeats 3] [--only unet,vae,taesd] [--dtype float32,bfloat16]
    PYTHONPATH=src python benchmarks/upsample_conv.py --preview   # TAESD decode (f32, bf16, each also of the
                                                                  # 2x2-averaged latents) vs U-Net steps
    PYTHONPATH=src python benchmarks/upsample_conv.py --decode    # TAESD decode (f32, bf16) vs our VAE decode

Random weights, 2 torch threads, wall time; the variants of one measurement alternate in one process after a
warm-up each, and the best of --repeats runs is kept (the machine may be shared). float32 runs NCHW as the
pipeline's float32 models do; bfloat16 runs channels-last, as the pipeline keeps bfloat16 models on the CPU.
TAESD runs channels-last in both. The plain way is F.interpolate and then F.conv2d; the phase way's weight is
folded beforehand, as nn.Upsample keeps it (the fold's own time is printed apart: TAESD folds on every call).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from controlnet_overhead import random_model  # beside this file

from stablediff import cpu, malloc
from stablediff.config import UNetConfig, VAEConfig
from stablediff.nn import phase_weight, upsample_conv3x3
from stablediff.taesd import TinyAutoencoder, TinyAutoencoderConfig
from stablediff.unet import UNet
from stablediff.vae import AutoencoderKL

LAYOUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sd15-layout"

# (model, batch, channels, input side) of every upsampler at 512x512 pixels (U-Net also at 256x256), guided batch 2
SHAPES = [("unet", 2, 1280, 4), ("unet", 2, 1280, 8), ("unet", 2, 640, 16),  # 256 px
          ("unet", 2, 1280, 16), ("unet", 2, 640, 32),  # 512 px (and 1280ch 8->16 above)
          ("vae", 1, 512, 64), ("vae", 1, 512, 128), ("vae", 1, 256, 256),
          ("taesd", 1, 64, 64), ("taesd", 1, 64, 128), ("taesd", 1, 64, 256)]


def best_of(runs: dict, repeats: int) -> dict[str, float]:
    """Each run's best wall time over `repeats`, the runs alternating after one warm-up each."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def shapes(args) -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"{'model':6} {'dtype':9} {'shape':22} {'plain ms':>9} {'phases ms':>9} {'ratio':>6} {'fold ms':>8}")
    for dtype in (getattr(torch, d) for d in args.dtype.split(",")):
        for model, n, c, side in SHAPES:
            if model not in args.only.split(","):
                continue
            layout = torch.channels_last if dtype == torch.bfloat16 or model == "taesd" else torch.contiguous_format
            x = torch.randn(n, c, side, side, generator=gen).to(dtype).contiguous(memory_format=layout)
            w = (torch.randn(c, c, 3, 3, generator=gen) * 0.02).to(dtype).contiguous(memory_format=layout)
            b = torch.randn(c, generator=gen).to(dtype)
            phases = phase_weight(w)
            t = best_of({"plain": lambda: F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b,
                                                   padding=1),
                         "phases": lambda: upsample_conv3x3(x, w, b, phases), "fold": lambda: phase_weight(w)},
                        args.repeats)
            shape = f"{n}x{c}x{side}->{2 * side}"
            print(f"{model:6} {str(dtype)[6:]:9} {shape:22} {t['plain'] * 1e3:9.1f} {t['phases'] * 1e3:9.1f} "
                  f"{t['phases'] / t['plain']:6.2f} {t['fold'] * 1e3:8.1f}", flush=True)


def taesd_decoders(args) -> dict:
    decoder = random_model(TinyAutoencoder, TinyAutoencoderConfig())
    z = torch.randn(1, 4, args.latent, args.latent)
    half = random_model(TinyAutoencoder, TinyAutoencoderConfig()).to(torch.bfloat16)
    half.load_state_dict(decoder.state_dict())
    pool = lambda z: F.avg_pool2d(z, 2, ceil_mode=True, count_include_pad=False)
    up = lambda x: F.interpolate(x.float(), scale_factor=2.0, mode="bilinear", align_corners=False)
    # "pooled": a preview on the CPU (pipeline.preview: the 2x2-averaged latents, bfloat16 with bfloat16 units)
    return {"taesd f32": lambda: decoder.decode(z), "taesd bf16": lambda: half.decode(z.bfloat16()),
            "taesd f32 pooled": lambda: up(decoder.decode(pool(z))),
            "taesd bf16 pooled": lambda: up(half.decode(pool(z.bfloat16())))}


def preview(args) -> None:
    """Issue 23's target: a TAESD preview at most 5% of a U-Net step: guided (batch 2) and at cfg <= 1 (batch 1,
    e.g. LCM), in float32 and, where the CPU has bfloat16 units, in bfloat16 (channels-last, as the pipeline)."""
    ucfg = UNetConfig.from_json(LAYOUT / "unet" / "config.json")
    unet = random_model(UNet, ucfg)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16) if cpu.native_bf16() else (torch.float32,):
        model = unet if dtype == torch.float32 else copy.deepcopy(unet).to(dtype, memory_format=torch.channels_last)
        for batch in (2, 1):
            x = torch.randn(batch, 4, args.latent, args.latent).to(dtype)
            x = x.contiguous(memory_format=torch.channels_last) if dtype == torch.bfloat16 else x
            t, context = torch.full((batch,), 500.0), torch.randn(batch, 77, ucfg.cross_attention_dim).to(dtype)
            name = f"unet step {str(dtype)[6:]} batch {batch}"
            runs[name] = lambda model=model, x=x, t=t, context=context: model(x, t, context)
    best = best_of({**runs, **taesd_decoders(args)}, args.repeats)
    report(best, "unet step float32 batch 2")
    used = "taesd bf16 pooled" if cpu.native_bf16() else "taesd f32 pooled"
    print(f"the preview pipeline.preview makes here ({used}, {best[used] * 1e3:.1f} ms) against each step:")
    for name in runs:
        print(f"  {name:28} {best[name] * 1e3:9.1f} ms  {best[used] / best[name] * 100:6.2f}%")


def decode(args) -> None:
    vae = random_model(AutoencoderKL, VAEConfig.from_json(LAYOUT / "vae" / "config.json"))
    z = torch.randn(1, 4, args.latent, args.latent)
    report(best_of({"vae decode f32": lambda: vae.decode(z), **taesd_decoders(args)}, args.repeats), "vae decode f32")


def report(best: dict[str, float], base: str) -> None:
    for name, seconds in best.items():
        print(f"{name:16} {seconds * 1e3:9.1f} ms  {seconds / best[base] * 100:6.2f}% of {base}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="unet,vae,taesd", help="models whose upsampler shapes to time")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--latent", type=int, default=64, help="latent side for --preview/--decode (64 = 512 px)")
    parser.add_argument("--preview", action="store_true", help="TAESD decode vs U-Net steps")
    parser.add_argument("--decode", action="store_true", help="TAESD decode vs the VAE decode")
    args = parser.parse_args()
    torch.set_num_threads(2)
    malloc.keep_freed_memory()  # as the pipeline does
    with torch.inference_mode():
        preview(args) if args.preview else decode(args) if args.decode else shapes(args)


if __name__ == "__main__":
    main()
