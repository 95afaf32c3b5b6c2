"""Side-by-side speed and memory of stablediff and diffusers on this machine (not part of the tests).

    python benchmarks/compare.py                 # full run: 512x512 and 256x256, 20 steps, fp32 + bf16 + cache
    python benchmarks/compare.py --quick         # 256x256 only, fewer repeats
    python benchmarks/compare.py --write         # also rewrite benchmarks/RESULTS.md
    python benchmarks/compare.py --engines all --size 256 --steps 4 --peers-python /work/venv-peers/bin/python
                                                 # one table of every engine: OpenVINO, ONNX Runtime,
                                                 # stable-diffusion.cpp, the LCM + TAESD row (benchmarks/peers.py)

The first run builds a random-weight SD 1.5 (the real architecture, configs from tests/data/sd15-layout) and saves
it once outside the repository ($STABLEDIFF_BENCH_CACHE, default ~/.cache/stablediff-bench) as a diffusers folder
and as one original-layout .safetensors file (4.3 GB). Every measurement runs in a fresh process (so peak RSS is
that run's own), and the two sides alternate, `--repeats` times each; the table shows each side's best time,
and the ratio ours / diffusers. This machine is shared and noisy: read the medians next to the minima.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = ROOT / "tests" / "data" / "sd15-layout"
CACHE = Path(os.environ.get("STABLEDIFF_BENCH_CACHE", Path.home() / ".cache" / "stablediff-bench"))
PROMPT = "silly dog wearing a batman costume, funny, realistic, canon, award winning photography"
SEED = 1055747


# ---------------------------------------------------------------------------------------------------------------
# the random-weight SD 1.5, built once

def save_random_pipeline(folder: Path, device: str = "cpu", dtype=None):
    """A random-weight SD 1.5 (the configs of tests/data/sd15-layout, seed 0) saved as a diffusers folder with the
    layout's scheduler config; returns diffusers' (unet, vae, text encoder). Used by gpu.py too."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    dtype = dtype or torch.float32
    cfg = lambda name: {k: v for k, v in json.loads((LAYOUT / name / "config.json").read_text()).items()
                        if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg("unet")).to(dtype)
        vae = AutoencoderKL(**cfg("vae")).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder"))).to(dtype)
    tokenizer = CLIPTokenizer.from_pretrained(str(ROOT / "src" / "stablediff" / "data" / "clip"))
    scheduler = PNDMScheduler.from_pretrained(str(LAYOUT), subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.copy(LAYOUT / "scheduler" / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    readable_by_transformers4(folder)
    return unet, vae, text


def readable_by_transformers4(folder: Path) -> None:
    """The peer engines' exporters pin transformers 4, which reads neither what transformers 5 saves for the tokenizer
    (tokenizer.json alone: the bundled CLIP vocab.json / merges.txt are added, the same vocabulary) nor its text
    encoder keys without the "text_model." prefix (4.x would initialise a new random encoder: the keys are renamed,
    which transformers 5 reads as well)."""
    import shutil

    from safetensors.torch import load_file, save_file

    for name in ("vocab.json", "merges.txt"):
        if not (folder / "tokenizer" / name).exists():
            shutil.copy(ROOT / "src" / "stablediff" / "data" / "clip" / name, folder / "tokenizer" / name)
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(path))
    if not all(k.startswith("text_model.") for k in state):
        save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, str(path),
                  metadata={"format": "pt"})


def build_models() -> tuple[Path, Path]:
    folder, single = CACHE / "sd15-random", CACHE / "sd15-random.safetensors"
    if (folder / "model_index.json").exists() and single.exists():
        return folder, single
    from safetensors.torch import save_file

    from stablediff import weights

    print(f"building a random SD 1.5 in {CACHE} (once)", file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    unet, vae, text = save_random_pipeline(folder)
    text_sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.state_dict().items()
               if not k.endswith("position_ids")}
    save_file({k: v.contiguous() for k, v in weights.to_original(unet.state_dict(), vae.state_dict(),
                                                                  text_sd).items()}, str(single))
    return folder, single


# ---------------------------------------------------------------------------------------------------------------
# one measurement, in a child process

def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class AnonPeak:
    """Peak anonymous resident memory (RssAnon: what no file backs), in GiB, sampled every 10 ms by a thread. Both
    sides memory-map the weight file, and ru_maxrss counts the pages of it in use (page cache, which the kernel can
    drop and read back); this is the rest: activations, buffers, the heap, the libraries' own data."""

    def __init__(self):
        import threading

        self.peak, self.running = 0.0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            with open("/proc/self/status") as f:
                kb = next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
            self.peak = max(self.peak, kb / 2**20)
            time.sleep(0.01)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak


def since(ru) -> tuple[float, float]:
    """Minor page faults (millions) and system CPU seconds of this process since the rusage `ru`."""
    now = resource.getrusage(resource.RUSAGE_SELF)
    return (now.ru_minflt - ru.ru_minflt) / 1e6, now.ru_stime - ru.ru_stime


def child_ours(single: Path, size: int, steps: int, dtype: str, cache_interval: int,
               vae_dtype: str = "float32") -> dict:
    import torch

    from stablediff import StableDiffusion

    anon = AnonPeak()
    t0 = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(single, dtype=getattr(torch, dtype), vae_dtype=getattr(torch, vae_dtype))
    load = time.perf_counter() - t0
    stamps = []
    t0, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    result = pipe(PROMPT, steps=steps, seed=SEED, width=size, height=size, sampler="euler",
                  cache_interval=cache_interval, callback=lambda info: stamps.append(time.perf_counter()))
    whole = time.perf_counter() - t0
    faults, sys_s = since(ru)
    with torch.inference_mode():
        t1 = time.perf_counter()
        pipe.prompts.encode_pair(PROMPT, "")
        encode = time.perf_counter() - t1
        t1 = time.perf_counter()
        pipe.decode(result.latents)
        decode = time.perf_counter() - t1
    step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    torch.save(result.latents, CACHE / f"latents-ours-{size}-{dtype}-{cache_interval}.pt")
    rss, anon_peak = peak_rss_gb(), anon.stop()  # before the comparison below loads a second pipeline
    if vae_dtype != "float32":  # the decode's pixel error against the float32 VAE, in levels of 255
        exact = StableDiffusion.from_pretrained(single, dtype=getattr(torch, dtype)).decode(result.latents)
        fast = pipe.decode(result.latents)
        px = lambda x: (x.clamp(-1, 1) + 1) * 127.5
        diff = (px(fast) - px(exact)).abs()
        pixel_err = dict(mean=diff.mean().item(), max=diff.max().item())
    else:
        pixel_err = None
    return dict(load=load, encode=encode, step=step, decode=decode, whole=whole, first=load + whole,
                rss=rss, anon=anon_peak, pixel_err=pixel_err, faults=faults, sys=sys_s)


def child_diffusers(folder: Path, single: Path, size: int, steps: int, dtype: str) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    anon = AnonPeak()
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    load = time.perf_counter() - t0
    pipe.scheduler = EulerDiscreteScheduler.from_config(EulerDiscreteScheduler.load_config(str(LAYOUT),
                                                                                          subfolder="scheduler"))
    if dtype != "float32":
        pipe.unet.to(getattr(torch, dtype))
        pipe.text_encoder.to(getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    stamps = []

    def on_step(p, i, t, kw):
        stamps.append(time.perf_counter())
        return kw

    t0, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    out = pipe(PROMPT, num_inference_steps=steps, height=size, width=size, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(SEED), output_type="latent", callback_on_step_end=on_step)
    latents = out.images
    with torch.inference_mode():
        t1 = time.perf_counter()
        pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor)
        decode = time.perf_counter() - t1
        faults, sys_s = since(ru)
        t1 = time.perf_counter()
        pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
        encode = time.perf_counter() - t1
    whole = time.perf_counter() - t0 - encode  # the image: sampling + its own encode + decode (timed above)
    step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    torch.save(latents.float(), CACHE / f"latents-diffusers-{size}-{dtype}.pt")
    return dict(load=load, encode=encode, step=step, decode=decode, whole=whole, first=load + whole,
                rss=peak_rss_gb(), anon=anon.stop(), faults=faults, sys=sys_s)


def child_accuracy(folder: Path) -> dict:
    """U-Net output error of bfloat16 against float32 on one input, ours and diffusers' (cast and autocast)."""
    import torch
    from diffusers import UNet2DConditionModel

    from stablediff import StableDiffusion

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([500.0, 500.0])
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    out = {}
    with torch.inference_mode():
        ref = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        exact = ref(x, t, ctx).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["diffusers_autocast"] = rel(ref(x, t, ctx).sample, exact)
        ref.to(torch.bfloat16)
        out["diffusers_cast"] = rel(ref(x.bfloat16(), t, ctx.bfloat16()).sample, exact)
        del ref
        from torch.utils.flop_counter import FlopCounterMode

        from stablediff import winograd

        ours = StableDiffusion.from_pretrained(folder).unet
        # the model's cost by the direct algorithm (every convolution direct, two distinct halves) and what ours
        # executes on a guided step ([x; x]: Winograd convolutions, the shared first half once)
        thresholds, winograd.THRESHOLDS = winograd.THRESHOLDS, ()
        with FlopCounterMode(display=False) as counter:
            ours(x, t, ctx)
        out["unet_flops"] = counter.get_total_flops()
        winograd.THRESHOLDS = thresholds
        with FlopCounterMode(display=False) as counter:
            ours(x[:1].repeat(2, 1, 1, 1), t, ctx)
        out["unet_flops_executed"] = counter.get_total_flops()
        ours.to(torch.bfloat16)
        out["ours_bf16"] = rel(ours(x.bfloat16(), t, ctx.bfloat16()), exact)
    return out


def child_peak() -> dict:
    """Best-of matmul throughput (GFLOP/s) at 1024..3072, float32 and bfloat16."""
    import torch

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for n in (1024, 2048, 3072):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            for _ in range(3):
                t0 = time.perf_counter()
                a @ b
                best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        out[str(dtype).removeprefix("torch.")] = best
    return out


def warm_page_cache(*paths: Path) -> None:
    """Read the weight files once, so that neither side pays the first read from disk (the issue's numbers assume
    the file in the page cache) and the side that runs first is not penalised."""
    for path in paths:
        for f in ([path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# the comparison

def machine() -> str:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def summarize(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return min(values), statistics.median(values)


def main() -> None:
    import peers  # benchmarks/peers.py, beside this file (it imports this module's helpers)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", "--repeat", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", "--size", default="512,256")
    ap.add_argument("--engines", help="instead of the table below, one table of these engines (comma-separated, "
                                      "or 'all'): " + ", ".join(peers.ENGINES))
    ap.add_argument("--peers-python", default=sys.executable,
                    help="the interpreter with the peer engines' packages (benchmarks/requirements-peers.txt)")
    ap.add_argument("--quick", action="store_true", help="256x256 only, one repeat")
    ap.add_argument("--write", action="store_true", help="rewrite benchmarks/RESULTS.md with this run's table")
    args = ap.parse_args()
    if args.child:
        folder, single = CACHE / "sd15-random", CACHE / "sd15-random.safetensors"
        kind, *rest = args.child
        if kind == "ours":
            res = child_ours(single, int(rest[0]), int(rest[1]), rest[2], int(rest[3]), rest[4])
        elif kind == "diffusers":
            res = child_diffusers(folder, single, int(rest[0]), int(rest[1]), rest[2])
        elif kind == "accuracy":
            res = child_accuracy(folder)
        elif kind == "engine":
            res = peers.child_engine(rest[0], int(rest[1]), int(rest[2]))
        elif kind == "export":
            res = peers.child_export(rest[0])
        elif kind == "lcm-assets":
            res = peers.child_lcm_assets()
        else:
            res = child_peak()
        print(json.dumps(res))
        return
    if args.quick:
        args.sizes, args.repeats = "256", 1
    folder, single = build_models()
    if args.engines:
        return peers.main(args.engines, [int(s) for s in args.sizes.split(",")], args.steps, args.repeats,
                          args.peers_python)
    import torch

    def child(*args: str) -> dict:
        warm_page_cache(single)  # before every run: the last one may have pushed part of the file out
        return run_child(*args)

    first_peak = run_child("peak")  # measured again at the end: the better of the two (a slow minute lowers it)
    steps, lines = args.steps, []
    lines.append(f"Machine: {machine()}. SD 1.5 architecture, random weights, {steps} Euler steps, cfg 7, batch 1.")
    lines.append("")
    lines.append("| measurement | ours | diffusers | ours / diffusers |")
    lines.append("|---|---|---|---|")
    latent_err, vae_notes = {}, []
    for size in map(int, args.sizes.split(",")):
        ours, theirs, ours_bf16, theirs_bf16, cached, bf16_vae = [], [], [], [], [], []
        ours_child = lambda dtype, cache="1", vae="float32": child("ours", str(size), str(steps), dtype, cache, vae)
        for r in range(args.repeats):  # alternate the sides (and who goes first), so a noisy minute hits both
            group = [lambda: ours.append(ours_child("float32")),
                     lambda: theirs.append(child("diffusers", str(size), str(steps), "float32"))]
            for run in (group if r % 2 == 0 else group[::-1]):
                run()
                if run is group[0]:  # the cached run next to the uncached one it is compared with
                    cached.append(ours_child("float32", cache="3"))
            ours_bf16.append(ours_child("bfloat16"))
            bf16_vae.append(ours_child("bfloat16", vae="bfloat16"))
        theirs_bf16.append(child("diffusers", str(size), str(steps), "bfloat16"))
        rows = [("load from single file, s", "load"), ("load + first image, s", "first"),
                ("prompt encoding, s", "encode"), ("U-Net per guided step, s", "step"),
                ("VAE decode, s", "decode"), ("whole image, s", "whole"), ("peak RSS, GiB", "rss"),
                ("peak anonymous memory (RssAnon), GiB", "anon"),
                ("image: minor page faults, millions", "faults"), ("image: system CPU time, s", "sys")]
        for label, key in rows:
            (a, am), (b, bm) = summarize(ours, key), summarize(theirs, key)
            lines.append(f"| {size}px fp32 {label} | {a:.2f} (median {am:.2f}) | {b:.2f} (median {bm:.2f}) "
                         f"| {a / b:.2f} |")
        fp32_whole = summarize(theirs, "whole")[0]
        for label, runs in ((f"{size}px bf16 whole image, s", ours_bf16),
                            (f"{size}px bf16 + bf16 VAE whole image, s", bf16_vae),
                            (f"{size}px fp32 cache_interval=3 whole image, s", cached)):
            a, am = summarize(runs, "whole")
            lines.append(f"| {label} | {a:.2f} (median {am:.2f}) | {fp32_whole:.2f} (fp32) | {a / fp32_whole:.2f} |")
        a = summarize(ours_bf16, "whole")[0]
        b = summarize(theirs_bf16, "whole")[0]
        lines.append(f"| {size}px bf16 whole image vs diffusers bf16, s | {a:.2f} | {b:.2f} | {a / b:.2f} |")
        a, b = summarize(ours_bf16, "step")[0], summarize(theirs_bf16, "step")[0]
        lines.append(f"| {size}px bf16 U-Net per guided step vs diffusers bf16, s | {a:.2f} | {b:.2f} | {a / b:.2f} |")
        pix = bf16_vae[0]["pixel_err"]
        vae_notes.append(f"- {size}px bfloat16 VAE decode vs float32 VAE: mean {pix['mean']:.2f}, max "
                         f"{pix['max']:.1f} levels of 255; decode {summarize(bf16_vae, 'decode')[0]:.2f} s vs "
                         f"{summarize(ours_bf16, 'decode')[0]:.2f} s")
        a, b = summarize(cached, "whole")[0], summarize(ours, "whole")[0]
        lines.append(f"| {size}px cache_interval=3 vs uncached (same dtype), s | {a:.2f} | {b:.2f} (ours fp32) "
                     f"| {a / b:.2f} |")
        ref = torch.load(CACHE / f"latents-ours-{size}-float32-1.pt")
        for name in (f"latents-ours-{size}-float32-3.pt", f"latents-ours-{size}-bfloat16-1.pt",
                     f"latents-diffusers-{size}-float32.pt"):
            x = torch.load(CACHE / name)
            latent_err[f"{size}px {name[8:-3]}"] = ((x - ref).norm() / ref.norm()).item()
        if size == 512:
            unet_step = summarize(ours, "step")[0]
    acc = run_child("accuracy")
    peak = {k: max(v, first_peak[k]) for k, v in run_child("peak").items()}
    lines.append("")
    lines.append("Accuracy (relative L2 error against float32):")
    lines.append("")
    lines.append(f"- U-Net output, 512px input, bfloat16: ours {acc['ours_bf16']:.4f}; diffusers pure cast "
                 f"{acc['diffusers_cast']:.4f}, autocast {acc['diffusers_autocast']:.4f}")
    for k, v in latent_err.items():
        lines.append(f"- final latents, {k} vs ours float32: {v:.2e}")
    lines += vae_notes
    flops = acc["unet_flops"]
    lines.append("")
    executed = acc["unet_flops_executed"]
    lines.append(f"U-Net: {flops / 1e9:.0f} GFLOP per guided step at 512px (batch 2) by the direct algorithm; ours "
                 f"executes {executed / 1e9:.0f} (Winograd convolutions, the guided batch's shared first half once). "
                 f"Matmul peak here: {peak['float32']:.0f} GFLOP/s float32, {peak['bfloat16']:.0f} bfloat16.")
    if "unet_step" in locals():
        achieved, done = flops / unet_step / 1e9, executed / unet_step / 1e9
        lines.append(f"Ours float32: {achieved:.0f} GFLOP/s of the model's direct cost = "
                     f"{achieved / peak['float32']:.0%} of the float32 matmul peak; {done:.0f} GFLOP/s executed "
                     f"({done / peak['float32']:.0%}).")
    table = "\n".join(lines)
    print(table)
    if args.write:  # the CPU table is replaced; the GPU section (benchmarks/gpu.py, by hand) is kept
        results = ROOT / "benchmarks" / "RESULTS.md"
        old = results.read_text() if results.exists() else ""
        gpu = old[old.index("\n## GPU"):] if "\n## GPU" in old else ""
        results.write_text("# Benchmark results\n\nThe latest run of `python benchmarks/compare.py --write`.\n\n"
                           + table + "\n" + gpu)


if __name__ == "__main__":
    main()
