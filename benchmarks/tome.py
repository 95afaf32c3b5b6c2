"""Token merging (tome.py): CPU time of one SD 1.5 U-Net step, and how far it moves the latents (not part of the
tests).

    PYTHONPATH=src python benchmarks/tome.py [--latent 64] [--ratios 0 0.3 0.5] [--dtypes float32 bfloat16]
                                             [--steps 10] [--repeats 2] [--demo]

The U-Net has random weights in SD 1.5's architecture (tests/data/sd15-layout/unet/config.json). One step is a
guided call: batch [x; x] under two random contexts, as the pipeline calls it; its time is CPU time
(time.process_time) with one thread, so that waiting for a core on a shared machine is not counted. Each dtype runs
one warm-up call, then `repeats` rounds of every ratio in turn; the minimum is reported, with how far that step's
eps is from ratio 0's.
The latent change: `steps` Euler steps (cfg 1, one image: one U-Net call a step) from the same noise with each
ratio, the relative L2 distance of the final latents from ratio 0's. --demo also measures it on the packaged demo
model through the whole pipeline (trained weights, 64x64 images).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from stablediff import malloc, samplers, tome
from stablediff.config import UNetConfig
from stablediff.denoiser import EpsDenoiser
from stablediff.schedule import NoiseSchedule
from stablediff.unet import UNet

LAYOUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sd15-layout"


def timed_step(unet: UNet, x: torch.Tensor, context: torch.Tensor, ratio: float) -> tuple[float, torch.Tensor]:
    """(CPU seconds, eps) of one guided U-Net call with `ratio`."""
    with tome.token_merging(unet, ratio):
        cpu = time.process_time()
        eps = unet(x, 500.0, context)
        return time.process_time() - cpu, eps.float()


def euler_latents(unet: UNet, noise: torch.Tensor, context: torch.Tensor, steps: int, ratio: float) -> torch.Tensor:
    """Final latents of `steps` Euler steps from `noise` (cfg 1: the conditional prediction alone)."""
    plan = samplers.prepare("euler", NoiseSchedule(), steps)
    dtype = unet.conv_in.weight.dtype
    denoiser = EpsDenoiser(lambda x, t: unet(x, t, context.to(dtype)), plan.sigma_to_t, dtype)
    with tome.token_merging(unet, ratio):
        return plan.sample(denoiser, noise * plan.init_noise_scale).float()


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def sd15(dtype: torch.dtype, latent: int, steps: int, ratios: list[float], repeats: int) -> None:
    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_json(LAYOUT / "unet" / "config.json")).eval().to(dtype)
    if dtype == torch.bfloat16:
        unet.to(memory_format=torch.channels_last)  # as the pipeline runs it (pipeline._channels_last)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, latent, latent, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    x = noise.repeat(2, 1, 1, 1).to(dtype)
    name = str(dtype).removeprefix("torch.")
    timed_step(unet, x, context.to(dtype), ratios[0])  # warm-up
    times, eps = {r: [] for r in ratios}, {}
    for _ in range(repeats):
        for ratio in ratios:
            seconds, eps[ratio] = timed_step(unet, x, context.to(dtype), ratio)
            times[ratio].append(seconds)
            print(f"{name} ratio {ratio}: {seconds:.2f} s CPU", flush=True)
    base = min(times[ratios[0]])
    for ratio in ratios:
        print(f"{name} ratio {ratio}: min {min(times[ratio]):.2f} s CPU, {min(times[ratio]) / base:.3f} x ratio "
              f"{ratios[0]}; one step's eps differs by {relative_l2(eps[ratio], eps[ratios[0]]):.4f} (relative L2)",
              flush=True)
    if steps:
        final = {r: euler_latents(unet, noise, context[1:], steps, r) for r in ratios}
        for ratio in ratios[1:]:
            print(f"{name} ratio {ratio}: latents after {steps} Euler steps differ from ratio {ratios[0]}'s by "
                  f"{relative_l2(final[ratio], final[ratios[0]]):.4f} (relative L2)", flush=True)


def demo(steps: int, ratios: list[float]) -> None:
    from stablediff.pipeline import StableDiffusion

    pipe = StableDiffusion.from_pretrained("demo")
    latents = {r: pipe("a red circle", steps=steps, seed=1, token_merging_ratio=r).latents for r in ratios}
    for ratio in ratios[1:]:
        print(f"demo ratio {ratio}: latents after {steps} Euler steps (cfg 7) differ from ratio {ratios[0]}'s by "
              f"{relative_l2(latents[ratio], latents[ratios[0]]):.4f} (relative L2)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 pixels)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=10, help="Euler steps for the latent change (0: none)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--demo", action="store_true", help="the latent change on the demo model too")
    args = parser.parse_args()
    malloc.keep_freed_memory()  # as the pipeline does
    torch.set_num_threads(1)
    with torch.no_grad():  # (not inference_mode: bfloat16's packed weights need a version counter: nn.py's Conv2d)
        if args.demo:
            demo(args.steps, args.ratios)
        for dtype in args.dtypes:
            sd15(getattr(torch, dtype), args.latent, args.steps, args.ratios, args.repeats)


if __name__ == "__main__":
    main()
