"""The engine table of `compare.py --engines`: stablediff against the CPU engines users pick instead (issue 25), and
the few-step row of issue 23, all on the same random-weight SD 1.5 (compare.build_models).

    python benchmarks/compare.py --engines all --size 512 --steps 20 --repeat 2 \\
        --peers-python /work/venv-peers/bin/python

Engines (each optional: a peer whose package does not import in --peers-python is skipped with one line):

- ours-f32, ours-bf16, diffusers-f32: Euler, cfg 7, as compare.py's own table.
- lcm-bf16, lcm-f32: ours, 4 "lcm" steps at cfg 1 with a random LoRA in LCM-LoRA's layout merged, TAESD decode
  (random AutoencoderTiny); compared, as issue 23 asks, with diffusers' --steps float32 image. Their children also
  time a live preview (pipe.preview) and our own float32 VAE decode, for the lines under the table: TAESD's decode
  against diffusers' and our VAE decode, and the preview against the row's step.
- openvino-f32, openvino-auto: optimum-intel's OVStableDiffusionPipeline on the folder exported once (f32 IR),
  reshaped to static shapes; compiled with INFERENCE_PRECISION_HINT f32, and with the CPU plugin's own choice.
- onnxruntime-f32: optimum's ORTStableDiffusionPipeline on the folder exported once, CPUExecutionProvider.
- sdcpp-f32, sdcpp-f16, sdcpp-q8_0: stable-diffusion.cpp (stable-diffusion-cpp-python) on the same single-file
  .safetensors, the weights converted at load to the named ggml type; one thread per CPU.

Every engine runs in a fresh process: a 2-step image (the warm-up), a --steps image (s/image), a 2-step image again;
s/step = (t(steps) - the faster 2-step time) / (steps - 2), so prompt encoding and the decode cancel out for every
engine alike. Decode: the VAE (or TAESD) on one latent, timed alone (stable-diffusion.cpp: its own log line). Load:
construction to ready (OpenVINO: read + reshape + compile; stable-diffusion.cpp: read + convert). Peak RSS: the
child's ru_maxrss. The peer packages conflict with the test extra's diffusers (see requirements-peers.txt), so they
run in their own interpreter, --peers-python; the exports run there once and are kept in compare.CACHE.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from compare import CACHE, LAYOUT, PROMPT, ROOT, SEED, readable_by_transformers4, peak_rss_gb, warm_page_cache

FOLDER, SINGLE = CACHE / "sd15-random", CACHE / "sd15-random.safetensors"
LCM_LORA, TAESD = CACHE / "lcm-lora-random.safetensors", CACHE / "taesd-random"
EXPORTS = {"openvino": CACHE / "sd15-random-openvino", "onnxruntime": CACHE / "sd15-random-onnx"}
LCM_STEPS = 4
ENGINES = ("ours-f32", "ours-bf16", "diffusers-f32", "lcm-bf16", "lcm-f32", "openvino-f32", "openvino-auto",
           "onnxruntime-f32", "sdcpp-f32", "sdcpp-f16", "sdcpp-q8_0")
PEER_MODULES = {"openvino": "optimum.intel", "onnxruntime": "optimum.onnxruntime", "sdcpp": "stable_diffusion_cpp"}
TARGETS = {"lcm-bf16": 0.07, "lcm-f32": 0.10}  # issue 23: x diffusers' 20-step float32 image


def family(engine: str) -> str:
    return engine.split("-")[0]


def timed(generate, steps: int) -> tuple[dict, object]:
    """generate(n) makes one image in n steps; runs 2, `steps`, 2 (the first is the warm-up). Returns the times and
    the last output."""
    if steps <= 2:
        raise ValueError(f"steps {steps}: s/step is taken from a {steps}-step and a 2-step image, so steps must be > 2")
    times = []
    for n in (2, steps, 2):
        t0 = time.perf_counter()
        out = generate(n)
        times.append(time.perf_counter() - t0)
    return dict(image=times[1], step=(times[1] - min(times[0], times[2])) / (steps - 2)), out


def seconds(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def random_latent(size: int):
    import torch

    return torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(SEED))


# ---------------------------------------------------------------------------------------------------------------
# the engines, one per child process; each returns load, image, step, decode (s), and what it ran in

def run_ours(size: int, steps: int, dtype: str, lcm: bool) -> dict:
    import torch

    from stablediff import StableDiffusion

    t0 = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(SINGLE, dtype=getattr(torch, dtype))
    if lcm:
        pipe.load_vae(TAESD)
    load = time.perf_counter() - t0
    kw = dict(sampler="lcm", cfg_scale=1.0, loras={str(LCM_LORA): 1.0}) if lcm else dict(sampler="euler",
                                                                                        cfg_scale=7.0)
    res, _ = timed(lambda n: pipe(PROMPT, steps=n, seed=SEED, width=size, height=size, **kw), steps)
    with torch.inference_mode():
        decode = seconds(lambda: pipe.decode(random_latent(size)))
        if lcm:  # a live preview (pipe.preview: TAESD, see there), then the full VAE decode TAESD stands in for
            preview = min(seconds(lambda: pipe.preview(random_latent(size))) for _ in range(2))
            pipe.use_own_vae()  # (our own, float32; the first decode of a process is slower: the best of 2)
            vae = min(seconds(lambda: pipe.decode(random_latent(size))) for _ in range(2))
    used = f"torch {torch.__version__} {dtype}" + (", TAESD f32 decode, LoRA merged" if lcm else "")
    return dict(res, load=load, decode=decode, used=used, **({"vae_decode": vae, "preview": preview} if lcm else {}))


def run_diffusers(size: int, steps: int) -> dict:
    import diffusers
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(str(SINGLE), config=str(FOLDER), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    load = time.perf_counter() - t0
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    res, _ = timed(lambda n: pipe(PROMPT, num_inference_steps=n, height=size, width=size, guidance_scale=7.0,
                                  generator=torch.Generator().manual_seed(SEED)), steps)
    with torch.inference_mode():
        decode = seconds(lambda: pipe.vae.decode(random_latent(size)))
    return dict(res, load=load, decode=decode, used=f"diffusers {diffusers.__version__}, torch {torch.__version__}")


def optimum_generate(pipe, size: int, generator):
    """An Euler scheduler (compare.py's) on an optimum pipeline, and its generate(n); generator(): a fresh seeded
    generator of the kind the pipeline takes (optimum-intel: numpy's; optimum-onnx, a diffusers subclass: torch's)."""
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return lambda n: pipe(PROMPT, num_inference_steps=n, height=size, width=size, guidance_scale=7.0,
                          generator=generator())


def run_openvino(size: int, steps: int, hint: str | None) -> dict:
    import openvino
    from optimum.intel import OVStableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(EXPORTS["openvino"], compile=False,
                                                     ov_config={"INFERENCE_PRECISION_HINT": hint} if hint else {})
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)  # static shapes, as its docs advise
    pipe.compile()
    load = time.perf_counter() - t0
    import numpy as np

    res, _ = timed(optimum_generate(pipe, size, lambda: np.random.RandomState(SEED)), steps)
    decode = seconds(lambda: pipe.vae_decoder(latent_sample=random_latent(size).numpy()))
    compiled = pipe.unet.request.get_property
    default = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    used = (f"openvino {openvino.__version__.split('-')[0]}: U-Net {compiled('INFERENCE_PRECISION_HINT').to_string()}, "
            f"{compiled('INFERENCE_NUM_THREADS')} threads; the CPU plugin's default {default.to_string()}")
    return dict(res, load=load, decode=decode, used=used)


def run_onnxruntime(size: int, steps: int) -> dict:
    import onnxruntime
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = ORTStableDiffusionPipeline.from_pretrained(EXPORTS["onnxruntime"], provider="CPUExecutionProvider")
    load = time.perf_counter() - t0
    import torch

    res, _ = timed(optimum_generate(pipe, size, lambda: torch.Generator().manual_seed(SEED)), steps)
    decode = seconds(lambda: pipe.vae_decoder(latent_sample=random_latent(size)))
    used = f"onnxruntime {onnxruntime.__version__}: {', '.join(pipe.unet.session.get_providers())}"
    return dict(res, load=load, decode=decode, used=used)


class Tee(io.TextIOBase):
    """stderr that also keeps what is written (stable-diffusion.cpp logs its timings there)."""

    def __init__(self, out):
        self.out, self.text = out, []

    def write(self, s: str) -> int:
        self.text.append(s)
        return self.out.write(s)


def run_sdcpp(size: int, steps: int, wtype: str) -> dict:
    import stable_diffusion_cpp
    from stable_diffusion_cpp import StableDiffusion

    log = Tee(sys.stderr)
    with contextlib.redirect_stderr(log):
        t0 = time.perf_counter()
        sd = StableDiffusion(model_path=str(SINGLE), wtype=wtype, n_threads=os.cpu_count(), verbose=True)
        load = time.perf_counter() - t0
        res, _ = timed(lambda n: sd.generate_image(PROMPT, width=size, height=size, cfg_scale=7.0,
                                                   sample_method="euler", sample_steps=n, seed=SEED), steps)
    text = "".join(log.text)
    decodes = [float(s) for s in re.findall(r"decode_first_stage completed, taking ([\d.]+)s", text)]
    features = re.findall(r"(\w+) = 1", stable_diffusion_cpp.sd_get_system_info().decode())
    used = (f"stable-diffusion.cpp (python {stable_diffusion_cpp.__version__}) {wtype}, {os.cpu_count()} threads; "
            f"ggml: {' '.join(features)}")
    return dict(res, load=load, decode=min(decodes) if decodes else float("nan"), used=used)


def child_engine(engine: str, size: int, steps: int) -> dict:
    kind, variant = engine.split("-", 1)
    dtype = {"f32": "float32", "bf16": "bfloat16"}.get(variant, variant)
    if kind in ("ours", "lcm"):
        res = run_ours(size, LCM_STEPS if kind == "lcm" else steps, dtype, lcm=kind == "lcm")
    elif kind == "diffusers":
        res = run_diffusers(size, steps)
    elif kind == "openvino":
        res = run_openvino(size, steps, None if variant == "auto" else variant)
    elif kind == "onnxruntime":
        res = run_onnxruntime(size, steps)
    else:
        res = run_sdcpp(size, steps, variant)
    return dict(res, rss=peak_rss_gb())


# ---------------------------------------------------------------------------------------------------------------
# what the engines read, made once

def child_export(kind: str) -> dict:
    """The diffusers folder exported for OpenVINO (f32 IR, no weight compression) or ONNX Runtime, into CACHE."""
    target = EXPORTS[kind]
    readable_by_transformers4(FOLDER)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    if kind == "openvino":
        from optimum.intel import OVStableDiffusionPipeline

        OVStableDiffusionPipeline.from_pretrained(FOLDER, export=True, compile=False,
                                                  load_in_8bit=False).save_pretrained(partial)
    else:  # optimum-cli export onnx --library diffusers (ORTStableDiffusionPipeline's export=True cannot tell the
        from optimum.exporters.onnx import main_export  # library of a local folder)

        main_export(str(FOLDER), output=partial, task="text-to-image", library_name="diffusers",
                    no_post_process=True, do_validation=False)
    partial.rename(target)
    return dict(export=time.perf_counter() - t0)


def child_lcm_assets() -> dict:
    """A random LoRA on every layer LCM-LoRA targets, in its file layout (tests/test_lcm_lora.py writes it), scaled
    so the merged weights stay of the model's size, and a random TAESD (diffusers' AutoencoderTiny, SD 1.x config)."""
    import torch
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "tests"))
    from test_lcm_lora import random_pairs, write_kohya_hf

    config = {k: v for k, v in json.loads((LAYOUT / "unet" / "config.json").read_text()).items()
              if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    write_kohya_hf(LCM_LORA, {name: (up * 0.1, down * 0.1) for name, (up, down) in random_pairs(unet).items()})
    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(TAESD)
    return {}


# ---------------------------------------------------------------------------------------------------------------
# the table

def run_child(python: str, *args: str) -> dict | None:
    """One child of compare.py under `python`; None (and its error's last line) when it fails."""
    proc = subprocess.run([python, str(ROOT / "benchmarks" / "compare.py"), "--child", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{' '.join(args)} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        log = CACHE / f"failed-{'-'.join(args)}.log"
        log.write_text(proc.stderr)
        print(f"  (its stderr: {log})", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available(engines: list[str], peers_python: str) -> list[str]:
    """The engines whose packages import in their interpreter; one line for each family skipped."""
    kept = []
    for kind in dict.fromkeys(map(family, engines)):
        module = PEER_MODULES.get(kind)
        if module:
            probe = subprocess.run([peers_python, "-c", f"import {module}"], capture_output=True, text=True)
            if probe.returncode != 0:
                print(f"skipping {kind}: `import {module}` fails in {peers_python} "
                      f"({(probe.stderr.strip().splitlines() or ['?'])[-1]})", file=sys.stderr)
                continue
        kept += [e for e in engines if family(e) == kind]
    return kept


def prepare(engines: list[str], peers_python: str) -> dict[str, float]:
    """The exports and LCM files the engines need and the cache lacks; returns the export times taken now."""
    made = {}
    if any(family(e) == "lcm" for e in engines) and not (LCM_LORA.exists() and TAESD.exists()):
        run_child(sys.executable, "lcm-assets")
    for kind, target in EXPORTS.items():
        if any(family(e) == kind for e in engines) and not target.exists():
            print(f"exporting the random SD 1.5 for {kind} into {target} (once)", file=sys.stderr)
            res = run_child(peers_python, "export", kind)
            if res:
                made[kind] = res["export"]
    return made


def cpu_lines() -> list[str]:
    flags = subprocess.run("grep -o 'avx[^ ]*\\|amx[^ ]*' /proc/cpuinfo | sort -u", shell=True,
                           capture_output=True, text=True).stdout.split()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                 "?")
    return [f"CPU: {model}, {os.cpu_count()} CPUs; flags: {' '.join(flags) or 'none of avx*/amx*'}"]


def table(results: dict[str, list[dict]], size: int, steps: int) -> list[str]:
    base = results.get("diffusers-f32")
    base_image = min(r["image"] for r in base) if base else None
    lines = ["| engine | dtype | steps | s/image (median) | vs diffusers f32 | s/step | decode, s | load, s "
             "| peak RSS, GiB | ran as |", "|---|---|---|---|---|---|---|---|---|---|"]
    for engine, runs in results.items():
        best = {k: min(r[k] for r in runs) for k in ("image", "step", "decode", "load", "rss")}
        median = statistics.median(r["image"] for r in runs)
        ratio = f"{best['image'] / base_image:.3f}" if base_image else "-"
        if engine in TARGETS:
            ratio += f" (target <= {TARGETS[engine]})"
        kind, dtype = engine.split("-", 1)
        n = LCM_STEPS if kind == "lcm" else steps
        lines.append(f"| {kind} | {dtype} | {n} | {best['image']:.2f} ({median:.2f}) | {ratio} | {best['step']:.3f} "
                     f"| {best['decode']:.2f} | {best['load']:.2f} | {best['rss']:.2f} | {runs[0]['used']} |")
    for engine, runs in results.items():  # issue 23: TAESD decode <= 0.05x of the full VAE decode, previews
        if family(engine) == "lcm":
            taesd, ours = min(r["decode"] for r in runs), min(r["vae_decode"] for r in runs)
            theirs = f"{taesd / min(r['decode'] for r in base):.3f}x diffusers' VAE decode, " if base else ""
            lines.append(f"{engine}: TAESD decode {taesd:.2f} s = {theirs}{taesd / ours:.3f}x our own float32 VAE "
                         f"decode ({ours:.2f} s)")
            preview, step = min(r["preview"] for r in runs), min(r["step"] for r in runs)  # target: <= 5% of a step
            lines.append(f"{engine}: a live preview {preview * 1e3:.0f} ms = {preview / step * 100:.1f}% of its step")
    return [f"{size}x{size}, batch 1, the random SD 1.5; best of the runs (median in brackets)."] + lines


def main(engines: str, sizes: list[int], steps: int, repeats: int, peers_python: str) -> None:
    wanted = list(ENGINES) if engines == "all" else engines.split(",")
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    wanted = available(wanted, peers_python)
    exports = prepare(wanted, peers_python)
    wanted = [e for e in wanted if family(e) not in EXPORTS or EXPORTS[family(e)].exists()]
    python = {e: peers_python if family(e) in PEER_MODULES else sys.executable for e in wanted}
    lines = cpu_lines()
    lines += [f"export ({kind}), s: {t:.1f}" for kind, t in exports.items()]
    for size in sizes:
        results: dict[str, list[dict]] = {}
        for r in range(repeats):  # alternate the order, so a noisy minute hits every engine
            for engine in (wanted if r % 2 == 0 else wanted[::-1]):
                warm_page_cache(SINGLE)
                res = run_child(python[engine], "engine", engine, str(size), str(steps))
                if res:
                    results.setdefault(engine, []).append(res)
        lines += [""] + table({e: results[e] for e in wanted if e in results}, size, steps)
    if any(family(e) == "lcm" for e in wanted) and steps != 20:
        lines.append(f"(issue 23's targets compare against diffusers' 20-step image; this run's has {steps})")
    print("\n".join(lines))
