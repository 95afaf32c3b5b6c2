"""Which of a layer's correct kernels is fastest on this machine: timed at first use, remembered per CPU.

A float32 layer on the CPU can often run more than one way (nn.py): a 3x3 convolution as oneDNN's direct
convolution, by Winograd's algorithm (winograd.py) or as one matrix product over the unfolded input (im2col); a
linear layer as the BLAS product torch calls or as oneDNN's; an attention as torch's flash attention or by oneDNN's
products. Which is fastest depends on the CPU, the BLAS, the thread count and the shape, so fixed thresholds tuned on
one machine lose on another. Measured on a 2-core AMD EPYC (Zen 4, AVX-512), where MKL's float32 GEMM runs at 2/3
of oneDNN's speed: Winograd gains at SD 1.5's 32x32 level and loses 1.3-1.7x at its 16x16 level, which an Intel AVX2
machine had it win; benchmarks/RESULTS.md.

`pick(key, ways)` runs `ways` (name -> a function computing the layer), the first of which is the plain op. The
first time a key is seen (large layers: on a slab of their input, TRIAL_PIXELS), every way runs once and then ROUNDS
more times (once more for layers taking LONG or more: their timing is less noisy, and the timing is what makes a
machine's first image slow; up to MAX_ROUNDS times for the others while a way's two best runs disagree by more than
SETTLED), alternating; the fastest best run wins, but another way must take at most MARGIN of the
plain op's time to replace it, so that timing noise on a near tie keeps the plain op. The choice is remembered for
the process and in `$XDG_CACHE_HOME/stablediff/kernels.json` under this machine's key (CPU model, a digest of its
flags, torch version, a digest of the kernels' code, thread count), so a later process on the same machine starts
with it; at most MAX_ENTRIES per machine are written. Other code for the ways (KERNEL_SOURCES, e.g. after an
upgrade) is timed afresh: a choice made between other kernels says nothing about these (an im2col made faster had
kept the direct convolution chosen before it: 9% of a 256x256 float32 step), and writing drops the choices other
code made on this CPU with this torch and thread count. The result returned is the chosen way's own (every way is
correct to rounding; this keeps a run's numbers those of its choices). A way other than the plain op that raises a
RuntimeError at its first run is left out.

$STABLEDIFF_TUNING: `on` (the default) as above; `memory`, timed but not written to disk; `off`, no timing: the
layers use their fixed rules (nn.py) and the plain op elsewhere, the same on every machine (the test suite runs
so). Under torch.compile the layers do not ask. Ways that $STABLEDIFF_DISABLE turns off are never offered (cpu.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import cpu, usercache

ENV = "STABLEDIFF_TUNING"
MODES = ("on", "memory", "off")
ROUNDS = 2  # timed runs per way after the first one (also timed: the best run counts)
LONG = 0.1  # seconds: a layer whose plain op takes this long the first time gets one more run per way, not ROUNDS
# a shorter layer gets more rounds, up to MAX_ROUNDS, while some way's two fastest runs differ by more than SETTLED:
# a first touch of fresh memory (page faults) had made 2 of 3 runs of oneDNN's product 5x slower inside the first
# 512x512 step (145 and 155 ms against 31), and a process kept the BLAS one at half oneDNN's speed
SETTLED, MAX_ROUNDS = 1.15, 6
MARGIN = 0.95  # another way replaces the plain op only at <= this fraction of its time
MAX_ENTRIES = 4096  # choices written per machine (a key per layer shape: a few dozen per model and image size)
# the code of the ways offered (nn.py's layers, winograd.py, cpu.py's probes and products) and of their timing
KERNEL_SOURCES = ("nn.py", "winograd.py", "cpu.py", "tuning.py")
# a layer with more output pixels than this (N x H x W) is timed on a slab of its first rows holding about as many
# (`trial_slab`: at least TRIAL_MIN_ROWS rows), and only the chosen way runs on the whole input: the VAE's 512x512
# layers cost 16x less to time (a 512x512 image's first decode took 25 s more without this), a 1024x1024 one's 64x
TRIAL_PIXELS, TRIAL_MIN_ROWS = 16384, 8

_lock = threading.Lock()
_choices: dict[str, dict[str, str]] = {}  # machine key -> {layer key -> way}, as loaded and decided
_announced = False  # whether this process has said that it times kernels (`_announce`)


def mode() -> str:
    value = os.environ.get(ENV, "on").strip().lower() or "on"
    return value if value in MODES else "on"


def active() -> bool:
    """Whether layers should ask `pick` (not when $STABLEDIFF_TUNING=off)."""
    return mode() != "off"


def machine_key() -> str:
    """What the timings depend on besides the shape: the CPU model, its flags, the torch build, the kernels' code
    and the threads."""
    return f"{_build_key()} | {torch.get_num_threads()} threads"


@functools.cache
def _build_key() -> str:
    """The part of machine_key that cannot change within a process (asked on every tuned layer call)."""
    flags = hashlib.sha256(" ".join(sorted(cpu.cpu_flags())).encode()).hexdigest()[:12]
    return f"{cpu.cpu_model()} | flags {flags} | torch {torch.__version__} | kernels {kernels_digest()}"


@functools.cache
def kernels_digest() -> str:
    """A digest of KERNEL_SOURCES as installed (a file that cannot be read counts by its name only)."""
    digest = hashlib.sha256()
    for name in KERNEL_SOURCES:
        try:
            digest.update((Path(__file__).parent / name).read_bytes())
        except OSError:
            digest.update(name.encode())
    return digest.hexdigest()[:12]


def _other_kernels(key: str, machine: str) -> bool:
    """Whether the machine key `key` is `machine` (this CPU, torch and threads) with another kernels digest, or
    with none (written before the digest was part of the key)."""
    pattern = r"(.*) \| kernels \w+( \| .*)"
    ours, theirs = re.fullmatch(pattern, machine), re.fullmatch(pattern, key)
    return key != machine and ("".join(ours.groups()) == key or bool(theirs and theirs.groups() == ours.groups()))


def cache_file() -> Path:
    return usercache.path("kernels.json")


def _table(machine: str) -> dict[str, str]:
    """This machine's choices: read from the cache file the first time it is asked (only valid entries)."""
    table = _choices.get(machine)
    if table is None:
        stored = usercache.read(cache_file()).get(machine) if mode() == "on" else None
        table = {k: v for k, v in stored.items() if isinstance(v, str)} if isinstance(stored, dict) else {}
        _choices[machine] = table
    return table


def _write(machine: str, key: str, way: str) -> None:
    """Adds one choice to the cache file (reread first: another process may have added some), dropping the choices
    other kernels made on this machine; a file that cannot be written only costs the timing again in the next
    process."""
    path = cache_file()
    data = {k: v for k, v in usercache.read(path).items() if not _other_kernels(k, machine)}
    entries = data.get(machine)
    entries = entries if isinstance(entries, dict) else {}
    if len(entries) >= MAX_ENTRIES:
        return
    data[machine] = {**entries, key: way}
    try:
        usercache.write(path, data)
    except OSError:
        pass


def decide(times: dict[str, list[float]]) -> str:
    """The way to keep, given each way's run times (the first way is the plain op): the fastest by its best run,
    if that is the plain op or takes at most MARGIN of the plain op's best."""
    best = {name: min(t) for name, t in times.items()}
    plain = next(iter(best))
    fastest = min(best, key=best.get)
    return fastest if best[fastest] <= MARGIN * best[plain] else plain


def _settled(times: dict[str, list[float]]) -> bool:
    """Whether every way's two fastest runs are within SETTLED of each other."""
    return all(sorted(t)[1] <= SETTLED * min(t) for t in times.values() if len(t) > 1)


def trial_slab(x: torch.Tensor, out_pixels: int) -> torch.Tensor | None:
    """The first rows (dim 2) of x (N, C, H, W), in x's memory format, in the share that makes about TRIAL_PIXELS of
    the layer's `out_pixels` output pixels (at least TRIAL_MIN_ROWS rows, an even number), for timing a large
    layer's ways on (`pick`'s `trial`); None where the layer is not larger than that."""
    h = x.shape[2]
    rows = max(TRIAL_MIN_ROWS, -(-h * TRIAL_PIXELS // out_pixels))
    rows += rows % 2
    if out_pixels <= TRIAL_PIXELS or rows >= h:
        return None
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return x[:, :, :rows].contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def pick(key: str, ways: dict[str, Callable], trial: dict[str, Callable] | None = None):
    """The layer's result, computed the way chosen for `key` on this machine (timing the ways the first time).
    `trial`: the same ways on a slab of the input (`trial_slab`), timed instead of `ways` where given; the chosen
    way then runs on the whole input."""
    machine = machine_key()
    with _lock:
        chosen = _table(machine).get(key)
    if chosen is not None:
        return ways[chosen]() if chosen in ways else next(iter(ways.values()))()
    _announce()
    timed = trial or ways
    results, times, plain = {}, {}, next(iter(timed))
    for name, way in timed.items():
        try:
            start = time.perf_counter()
            results[name] = way()
            times[name] = [time.perf_counter() - start]
        except RuntimeError:  # a kernel that does not run for this shape here is not a choice (the plain op raises)
            if name == plain:
                raise
    least, most = (1, 1) if times[plain][0] >= LONG else (ROUNDS, MAX_ROUNDS)
    for done in range(most):
        if done >= least and _settled(times):
            break
        for name in times:
            way = timed[name]
            start = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - start)
    chosen = decide(times)
    with _lock:
        _table(machine)[key] = chosen
    if mode() == "on":
        _write(machine, key, chosen)
    return results[chosen] if trial is None else ways[chosen]()


def chosen(key: str) -> str | None:
    """The way chosen for `key` on this machine, None where it has not been timed (or read from the file) yet."""
    with _lock:
        return _table(machine_key()).get(key)


def _announce() -> None:
    """Say once per process (a RuntimeWarning: the CLI prints it as one line) why this image runs slower."""
    global _announced
    with _lock:
        if _announced:
            return
        _announced = True
    kept = f"kept in {cache_file()}" if mode() == "on" else f"not kept: {ENV}={mode()}"
    warnings.warn(f"timing this CPU's kernels for layer shapes not seen before ({kept}): this image runs slower, "
                  "later ones of the same size on this machine do not", RuntimeWarning, stacklevel=3)


def forget() -> None:
    """Drops the choices held in memory (the file stays): the next `pick` of each key reads or times again."""
    global _announced
    with _lock:
        _choices.clear()
        _announced = False
