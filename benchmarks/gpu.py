"""GPU side by side: stablediff and diffusers in float16, 512x512, 50 Euler steps, cfg 7.5 (not part of the tests).

    python benchmarks/gpu.py                       # on a machine with CUDA and diffusers + transformers installed
    python benchmarks/gpu.py --device cpu --size 64 --steps 3 --dtype float32   # a dry run of the script itself

Builds a random-weight SD 1.5 (configs from tests/data/sd15-layout) on the GPU, saves it once as a diffusers folder
($STABLEDIFF_BENCH_GPU, default /tmp/sd15-gpu), and loads it into both pipelines in one process. Each measurement
runs a 1-step and an N-step image and reports it/s = (N - 1) / (t_N - t_1) (fixed costs such as prompt encoding
and the VAE decode cancel out) and the whole N-step image time; the sides alternate, several rounds, best of each.
Variants of ours: as loaded, channels-last U-Net, and torch.compile (`StableDiffusion.compile`). Every result is
printed as one JSON line (and appended to $OUT/gpu.jsonl when OUT is set).

First, on CUDA, `rng_parity` checks stablediff.rng's Philox (A1111's "NV" noise) against torch.randn on the GPU;
`--rng-only` stops after it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from compare import save_random_pipeline  # (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "silly dog wearing a batman costume, funny, realistic, canon, award winning photography"
SEED = 1055747
T0 = time.perf_counter()


def log(**kw) -> None:
    kw["t"] = round(time.perf_counter() - T0, 1)
    line = json.dumps(kw)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "gpu.jsonl", "a") as f:
            f.write(line + "\n")


def build(folder: Path, device: str, dtype: torch.dtype) -> None:
    if not (folder / "model_index.json").exists():
        save_random_pipeline(folder, device, dtype)


def load_diffusers(folder: Path, dev: str, dtype: torch.dtype):
    """diffusers' StableDiffusionPipeline on the folder, with the Euler scheduler and no progress bars."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(dev)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def trajectory(pipe, prompt: str, noise: torch.Tensor, n: int, ours: bool) -> list[torch.Tensor]:
    """The latents after every step of an n-step Euler run from the given initial noise (float32, on the CPU)."""
    seen = []
    if ours:
        pipe(prompt, steps=n, cfg_scale=7.5, seed=SEED, width=noise.shape[-1] * 8, height=noise.shape[-2] * 8,
             sampler="euler", callback=lambda info: seen.append(info.latents.float().cpu()))
    else:
        def keep(p, i, t, kw):
            seen.append(kw["latents"].float().cpu())
            return kw
        pipe(prompt, num_inference_steps=n, guidance_scale=7.5, height=noise.shape[-2] * 8, width=noise.shape[-1] * 8,
             latents=noise.to(pipe.device, pipe.unet.dtype), output_type="latent", callback_on_step_end=keep)
    return seen


def parity(ours, theirs, folder: Path, dev: str, dtype: torch.dtype, size: int, steps: int) -> torch.Tensor:
    """Correctness before speed: each component on the same input, then whole runs from the same initial noise,
    step by step; then both sides again in float32 (TF32 off), to tell a bug from float16 rounding growing over
    the steps. Returns diffusers' final latents (the reference the compiled variants are checked against)."""
    from stablediff import StableDiffusion

    rel = lambda x, y: ((x.float().cpu() - y.float().cpu()).norm() / y.float().cpu().norm()).item()
    with torch.inference_mode():
        ctx_ours = ours.encode_prompt(PROMPT)
        ctx_theirs = theirs.encode_prompt(PROMPT, dev, 1, False)[0]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dev, dtype)
        ctx = torch.cat([ctx_theirs, ctx_theirs])
        unet = {}
        for tv in (999.0, 500.0, 20.0):
            t = torch.tensor([tv, tv], device=dev)
            unet[str(tv)] = rel(ours.unet(x, t, ctx), theirs.unet(x, t, ctx).sample)
        z = torch.randn(1, 4, size // 8, size // 8, generator=g).to(dev)
        vae_err = rel(ours.vae.decode(z), theirs.vae.decode(z.to(theirs.vae.dtype)).sample)
    log(event="parity-components", text=rel(ctx_ours, ctx_theirs), unet=unet, vae_decode=vae_err)
    noise = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(SEED))
    mine = trajectory(ours, PROMPT, noise, steps, True)
    ref = trajectory(theirs, PROMPT, noise, steps, False)
    marks = sorted({1, 2, 3, 5, 10, 20, 30, 40, steps} & set(range(1, steps + 1)))
    log(event="parity-steps", dtype=str(dtype), ours_vs_diffusers={k: rel(mine[k - 1], ref[k - 1]) for k in marks},
        norm_ours={k: round(mine[k - 1].norm().item(), 2) for k in marks},
        norm_diffusers={k: round(ref[k - 1].norm().item(), 2) for k in marks})
    if dev == "cuda":  # float32 on the GPU: no TF32, so both sides compute what the CPU would
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    exact = StableDiffusion.from_pretrained(folder, device=dev, dtype=torch.float32)
    exact_theirs = load_diffusers(folder, dev, torch.float32)
    mine32 = trajectory(exact, PROMPT, noise, steps, True)
    ref32 = trajectory(exact_theirs, PROMPT, noise, steps, False)
    log(event="parity-steps", dtype="float32", ours_vs_diffusers={k: rel(mine32[k - 1], ref32[k - 1]) for k in marks},
        ours_lowp_vs_ours_fp32={k: rel(mine[k - 1], mine32[k - 1]) for k in marks},
        diffusers_lowp_vs_diffusers_fp32={k: rel(ref[k - 1], ref32[k - 1]) for k in marks})
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
    del exact, exact_theirs
    return ref[-1]


def rng_parity() -> None:
    """stablediff.rng's PhiloxGenerator against torch.randn(device="cuda"): several seeds and shapes, successive
    draws from one generator, sizes past one wave of this card's threads; max abs difference and offsets per seed."""
    from stablediff.rng import PhiloxGenerator, cuda_max_threads

    props = torch.cuda.get_device_properties(0)
    cap = cuda_max_threads(props.multi_processor_count, props.max_threads_per_multi_processor)
    shapes = [(3, 4), (4, 64, 64), (1, 4, 97, 131), (5,), (4, 128, 128), (4 * cap + 7,), (4, 64, 64)]
    for seed in (0, 1, SEED, 2 ** 32 + 17):
        g = torch.Generator("cuda").manual_seed(seed)
        ours, nv = PhiloxGenerator(seed, max_threads=cap), PhiloxGenerator(seed)
        diffs, nv_diffs, offsets_agree = [], [], True
        for shape in shapes:
            want = torch.randn(shape, device="cuda", generator=g).cpu()
            diffs.append((ours.randn(shape) - want).abs().max().item())
            nv_diffs.append((nv.randn(shape) - want).abs().max().item())
            offsets_agree &= ours.offset == g.get_offset()
        log(event="rng-parity", seed=seed, max_threads=cap, shapes=[list(s) for s in shapes], max_abs_diff=diffs,
            nv_uncapped_max_abs_diff=nv_diffs, offsets_agree=offsets_agree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=420.0, help="skip later variants after this many seconds")
    ap.add_argument("--variants", default="as-loaded,channels-last,compile,reduce-overhead")
    ap.add_argument("--rng-only", action="store_true", help="only the NV noise check (rng_parity)")
    args = ap.parse_args()
    dev, dtype, size, steps = args.device, getattr(torch, args.dtype), args.size, args.steps
    folder = Path(os.environ.get("STABLEDIFF_BENCH_GPU", "/tmp/sd15-gpu"))
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    log(event="machine", device=name, torch=torch.__version__, dtype=args.dtype, size=size, steps=steps)
    if dev == "cuda":
        rng_parity()
    if args.rng_only:
        return
    build(folder, dev, dtype)
    log(event="built", folder=str(folder))

    from stablediff import StableDiffusion

    theirs = load_diffusers(folder, dev, dtype)
    ours = StableDiffusion.from_pretrained(folder, device=dev, dtype=dtype)
    log(event="loaded")

    def run_theirs(n: int):
        sync(dev)
        t0 = time.perf_counter()
        out = theirs(PROMPT, num_inference_steps=n, guidance_scale=7.5, height=size, width=size,
                     generator=torch.Generator().manual_seed(SEED))
        sync(dev)
        return time.perf_counter() - t0, out

    def run_ours(n: int):
        sync(dev)
        t0 = time.perf_counter()
        out = ours(PROMPT, steps=n, cfg_scale=7.5, seed=SEED, width=size, height=size, sampler="euler")
        sync(dev)
        return time.perf_counter() - t0, out

    b = parity(ours, theirs, folder, dev, dtype, size, steps)

    def rounds(label: str, n_rounds: int) -> None:
        best = {"ours": [1e9, 1e9], "diffusers": [1e9, 1e9]}
        for r in range(n_rounds):
            sides = [("ours", run_ours), ("diffusers", run_theirs)]
            for side, fn in (sides if r % 2 == 0 else sides[::-1]):
                t1, _ = fn(1)
                tn, _ = fn(steps)
                best[side][0] = min(best[side][0], tn)
                best[side][1] = min(best[side][1], (tn - t1) / (steps - 1))
                log(event="run", variant=label, side=side, round=r, whole_s=round(tn, 3),
                    it_s=round((steps - 1) / (tn - t1), 2))
        (ow, os_), (dw, ds) = best["ours"], best["diffusers"]
        log(event="summary", variant=label, ours_whole_s=round(ow, 3), diffusers_whole_s=round(dw, 3),
            ratio_whole=round(ow / dw, 3), ours_it_s=round(1 / os_, 2), diffusers_it_s=round(1 / ds, 2),
            ratio_step=round(os_ / ds, 3))

    variants = args.variants.split(",")
    run_ours(2), run_theirs(2)  # warm-up (cuDNN autotuning, allocator)
    if "as-loaded" in variants:
        rounds("as loaded", args.rounds)
    if "channels-last" in variants:
        ours.unet.to(memory_format=torch.channels_last)
        run_ours(2)
        rounds("channels_last", args.rounds)
    for label, mode in (("compile", None), ("reduce-overhead", "reduce-overhead")):
        if label not in variants:
            continue
        if time.perf_counter() - T0 > args.budget:
            log(event="skipped", variant=label, reason="time budget")
            continue
        try:
            ours.unet.to(memory_format=torch.channels_last)
            ours.unet._compiled_call_impl = None  # start from the plain module
            ours.compile(mode)
            t0 = time.perf_counter()
            run_ours(2)
            run_ours(1)
            log(event="compiled", variant=label, first_images_s=round(time.perf_counter() - t0, 1))
            _, mine = run_ours(steps)
            a = mine.latents.float().cpu()
            log(event="parity", variant=label, latent_rel_err=((a - b).norm() / b.norm()).item())
            rounds(label, max(2, args.rounds - 1))
        except Exception as exc:  # report and go on: the other variants' numbers still count
            log(event="error", variant=label, error=f"{type(exc).__name__}: {exc}"[:2000])


if __name__ == "__main__":
    sys.exit(main())
