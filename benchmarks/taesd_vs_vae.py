"""TAESD decode time against the full SD 1.5 VAE decode on this CPU (not part of the tests).

    PYTHONPATH=src python benchmarks/taesd_vs_vae.py [--latent 64] [--repeats 3]

Both models have random weights in their real architectures (the VAE from tests/data/sd15-layout/vae/config.json,
TAESD from its default config), float32, one thread, batch 1, malloc keeping freed memory as the pipeline
has it. The two alternate, TAESD first, after one small
warm-up each; every run's wall and CPU time is printed, then the ratios of the minima and of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from stablediff import malloc
from stablediff.config import VAEConfig
from stablediff.taesd import TinyAutoencoder, TinyAutoencoderConfig
from stablediff.vae import AutoencoderKL

LAYOUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "sd15-layout"


def seconds(decode, z) -> tuple[float, float]:
    """(wall, CPU) seconds of one decode: on a shared machine the CPU time of a one-thread run leaves out the time
    spent waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    decode(z)
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 pixels)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    malloc.keep_freed_memory()  # as the pipeline does
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = {"taesd": TinyAutoencoder(TinyAutoencoderConfig()).eval(),
              "vae": AutoencoderKL(VAEConfig.from_json(LAYOUT / "vae" / "config.json")).eval()}
    z = torch.randn(1, 4, args.latent, args.latent)
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.decode(torch.randn(1, 4, 8, 8))
        for i in range(args.repeats):
            for name, model in models.items():
                times[name].append(seconds(model.decode, z))
                print(f"run {i + 1} {name}: wall {times[name][-1][0]:.3f} s, CPU {times[name][-1][1]:.3f} s",
                      flush=True)
    for clock, k in (("wall", 0), ("CPU", 1)):
        for label, pick in (("min", min), ("median", statistics.median)):
            t, v = pick(r[k] for r in times["taesd"]), pick(r[k] for r in times["vae"])
            print(f"{clock} {label}: taesd {t:.3f} s, vae {v:.3f} s, taesd / vae = {t / v:.4f}")


if __name__ == "__main__":
    main()
