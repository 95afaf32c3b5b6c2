"""Batch generation: a job file -> PNGs and a manifest.jsonl, resumable, in a local loop or on Ray Data.

1. jobs.py reads the job file and checks every row (all bad rows, with line numbers, before anything runs), then
   plans the images: one key per image (its file name, `LLLLL-SEED-SAMPLER[-karras]`), grouped into "units" of
   consecutive seeds that go through the model together; the split depends on the job alone.
2. `Manifest`: DIR/manifest.jsonl, one JSON line per image file. A PNG is written to a temporary name and linked
   into place, then its line is appended in one write + fsync: a kill leaves whole files and whole lines, at most
   one PNG without its line (adopted on resume: the same bytes are made again) and one partial last line (dropped).
   A rerun skips the images the manifest has and refuses ones it made with other settings. Every line we write
   starts with `"stablediff": VERSION`; a line without it is ours only if it has exactly the fields 0.1.0 wrote
   (OLD_FIELDS). Any other line (someone else's manifest.jsonl, a hand edit, a wrong type) is refused with its
   line number and the file is never rewritten: only a manifest made wholly of our lines is ever tidied.
   A full disk stops the run (WriteError): what was written is whole and listed, so the same command resumes.
3. Units run in a local loop (one pipeline) or on a Ray Data actor pool (one pipeline per actor); either way only
   this process writes files, so a cluster needs no shared disk.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..images import png_bytes
from .jobs import JobError, Plan, Unit, parse_samplers, parse_seeds, plan, read_jobs
from ..limits import Limits
from .jobs import Row, row_seed  # noqa: F401 - re-exported: callers know them as batch.Row, batch.row_seed
from ..params import GenerationParams
from ..pipeline import StableDiffusion

MANIFEST = "manifest.jsonl"
MARKER = "stablediff"  # the first field of every manifest line we write; its value is the version that wrote it
OLD_FIELDS = frozenset({"key", "line", "row", "params", "model", "file", "sha256", "seconds", "nsfw"})  # 0.1.0's lines
ENTRY_TYPES = {"key": (str, "text"), "file": (str, "text"), "params": (dict, "an object"), "model": (str, "text")}
_TMP_PREFIX, _TMP_SUFFIX = ".batch-", ".png.tmp"
_LINE_STARTS = (b'{"' + MARKER.encode() + b'": ', b'{"key": ')  # how our lines (now, and 0.1.0's) begin


class WriteError(Exception):
    """Writing an image or its manifest line failed (a full disk, ...). The run stops there: what was written
    before is whole and in the manifest, so the same command, run again, makes only the rest."""

    def __init__(self, path: Path, error: OSError, made: int):
        super().__init__(f"{path}: cannot write it ({error.strerror or error}); stopped after {made} new images, all "
                         "in the manifest: free space and run the same command again to make the rest")


# --- the manifest and the files ---------------------------------------------------------------------------------

class Manifest:
    """DIR/manifest.jsonl for one writer at a time (a lock file next to it): `entries` maps key -> entry for
    every line whose file exists. Opening refuses (ValueError naming the line) a line we did not write; otherwise
    it drops a partial last line of ours, duplicate keys and lines whose file is gone (rewriting the manifest to a
    temporary name, then renaming), and removes our leftover temporary PNGs."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / MANIFEST
        self.entries: dict[str, dict] = {}
        self._fd = self._lock_fd = None

    def __enter__(self) -> "Manifest":
        self._lock_fd = _lock(self.directory / f".{MANIFEST}.lock")
        try:
            for leftover in self.directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
                leftover.unlink(missing_ok=True)
            self.entries, rewrite = self._read()
            if rewrite:
                text = "".join(_line(e) for e in self.entries.values())
                _write_new(self.path, text.encode(), replace=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            os.close(self._lock_fd)
            raise
        return self

    def __exit__(self, *exc):
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    def _read(self) -> tuple[dict, bool]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}, False
        lines = data.split(b"\n")
        tail = len(lines) if lines[-1] else None  # the number of a last line without its newline
        entries, rewrite = {}, tail is not None  # rewritten with its newline, or dropped
        for number, line in enumerate(lines if tail else lines[:-1], 1):
            if not line.strip() or (number == tail and _cut_short(line)):  # a kill in the middle of our write
                continue
            entry, problem = _parse_entry(line)
            if problem:
                raise ValueError(f"{self.path}: line {number} is not a `stablediff batch` manifest entry ({problem}); "
                                 "the file is left as it is: fix or remove that line, or choose another --output-dir")
            if entry["key"] in entries or not (self.directory / entry["file"]).is_file():
                rewrite = True
                continue
            entries[entry["key"]] = entry
        return entries, rewrite

    def append(self, entry: dict) -> None:
        """One whole line, in one write, on disk before this returns."""
        data = _line(entry).encode()
        while data:
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)
        self.entries[entry["key"]] = entry


def _line(entry: dict) -> str:
    return json.dumps({MARKER: __version__, **entry}, ensure_ascii=False) + "\n"


def _parse_entry(line: bytes) -> tuple[dict | None, str | None]:
    """A manifest line -> (entry, None) when we wrote it, else (None, why not): it must carry MARKER (or have
    exactly OLD_FIELDS) and the fields resuming relies on, of the right types, naming a file beside it."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None, "not JSON"
    except RecursionError:
        return None, "JSON nested too deeply"
    if not isinstance(entry, dict):
        return None, f"a JSON {type(entry).__name__}, not an object"
    if not isinstance(entry.get(MARKER), str) and set(entry) != OLD_FIELDS:
        return None, f'no "{MARKER}" field: not written by stablediff'
    for name, (kind, kind_name) in ENTRY_TYPES.items():
        if not isinstance(entry.get(name), kind):
            return None, f"{name} {entry.get(name)!r} is not {kind_name}" if name in entry else f"no {name!r} field"
    if entry["file"] != f"{entry['key']}.png":
        return None, f"file {entry['file']!r} is not the key's {entry['key']}.png"
    return entry, None


def _cut_short(line: bytes) -> bool:
    """A last line that one of our writes began but a kill cut short: it begins as ours do and is not JSON."""
    if not any(line.startswith(start) or start.startswith(line) for start in _LINE_STARTS):
        return False
    try:
        json.loads(line)
    except (ValueError, RecursionError):
        return True
    return False


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(f"--output-dir {path.parent}: another `stablediff batch` is writing there; "
                         "wait for it or choose another --output-dir") from None
    return fd


def _write_new(target: Path, data: bytes, replace: bool = False) -> bool:
    """Write data under a temporary name, then give it the name `target`: always when `replace`, otherwise only
    if the name is free (False when it was taken). Nobody ever sees a half-written file under `target`."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 is for secrets, not pictures
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, target)
            return True
        try:
            os.link(tmp, target)  # atomic, and refuses to replace an existing file
        except FileExistsError:
            return False
        except OSError:  # no hard links here: check, then rename (the manifest lock keeps other batches out)
            if target.exists():
                return False
            os.replace(tmp, target)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_image(directory: Path, key: str, png: bytes) -> bool:
    """Put the PNG at DIR/KEY.png. True when that file now holds exactly these bytes (written now, or left by a
    run killed before its manifest line); False when another file has the name (left alone)."""
    target = directory / f"{key}.png"
    if target.exists() or not _write_new(target, png):
        return target.read_bytes() == png
    return True


# --- making images ----------------------------------------------------------------------------------------------

def load_pipeline(model: str, *, device: str = "auto", dtype: str = "float32", safety_checker=False):
    return StableDiffusion.from_pretrained(model, device=device, dtype=getattr(torch, dtype),
                                           safety_checker=safety_checker)


def generate(pipe, unit: Unit) -> list[dict]:
    """One unit through the pipeline -> one result per image: key, png (bytes), seconds, nsfw, error."""
    keys = unit.keys
    start = time.perf_counter()
    try:
        result = pipe.generate(unit.params, controls=unit.controls)
    except Exception as e:  # noqa: BLE001 - one unit's failure (NaN, out of memory, ...) must not end the job
        message = f"{type(e).__name__}: {' '.join(str(e).split())}"
        return [dict(key=k, png=b"", seconds=0.0, nsfw=False, error=message) for k in keys]
    seconds = round((time.perf_counter() - start) / len(keys), 3)
    flags = result.nsfw or [False] * len(keys)
    return [dict(key=k, png=png_bytes(image, text), seconds=seconds, nsfw=bool(flag), error="")
            for k, image, text, flag in zip(keys, result.images, result.infotexts, flags)]


class RayWorker:
    """A Ray Data actor: one pipeline, loaded on the first batch (rows carry the load settings, so Ray keeps no
    constructor arguments); takes units (Unit.to_json), gives back images."""

    def __init__(self):
        torch.set_num_threads(1)  # one CPU per actor, so actors on a machine do not fight over its cores
        self.pipe = None

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        if self.pipe is None:
            self.pipe = load_pipeline(**json.loads(str(batch["load"][0])))
        results = [r for text in batch["unit"] for r in generate(self.pipe, Unit.from_json(str(text)))]
        return {name: np.array([r[name] for r in results], dtype=object)
                for name in ("key", "png", "seconds", "nsfw", "error")}


def run_ray(units: list[Unit], on_result: Callable[[dict], None], *, address: str | None, workers: int | None,
            model: str, device: str, dtype: str, safety_checker) -> int:
    """The units on a Ray Data actor pool (`workers` actors, each with a GPU where the cluster has them) on a
    new local Ray (address None) or the cluster at `address`; results come back here. Returns the actor count."""
    try:
        import ray
    except ImportError:
        raise ValueError('--ray needs Ray Data: pip install "ray[data]" (the `ray` extra)') from None
    started = _start_ray(ray, address, workers)
    try:
        with _quiet_ray_data(ray):
            workers, actor_device, use_gpu = _actors(ray, device, workers)
            load = json.dumps(dict(model=model, device=actor_device, dtype=dtype, safety_checker=safety_checker))
            dataset = ray.data.from_items([{"unit": u.to_json(), "load": load} for u in units],
                                          override_num_blocks=min(len(units), 10_000))
            dataset = dataset.map_batches(RayWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                                          num_gpus=1 if use_gpu else 0, num_cpus=1)
            for row in dataset.iter_rows():
                on_result({"key": str(row["key"]), "png": bytes(row["png"]), "seconds": float(row["seconds"]),
                           "nsfw": bool(row["nsfw"]), "error": str(row["error"])})
    finally:
        if started:
            ray.shutdown()
    return workers


def _start_ray(ray, address: str | None, workers: int | None) -> bool:
    """Connect to Ray unless this process already is; True when we started it (and so shut it down)."""
    if ray.is_initialized():
        return False
    if address is None:  # room for the asked-for actors even where they outnumber the cores
        ray.init(num_cpus=max(os.cpu_count() or 1, workers or 1), include_dashboard=False, logging_level="ERROR",
                 configure_logging=True)
    else:
        ray.init(address=address, logging_level="ERROR")
    return True


def _actors(ray, device: str, workers: int | None) -> tuple[int, str, bool]:
    """(how many actors, their device, whether each takes a GPU): one per GPU where the cluster has GPUs and
    `device` allows them, else one on the CPU, unless `workers` says how many."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and device in ("auto", "cuda")
    if device == "cuda" and not use_gpu:
        raise ValueError("--device cuda: the Ray cluster has no GPUs")
    actor_device = "cuda" if use_gpu else ("cpu" if device == "auto" else device)
    return workers or max(gpus if use_gpu else 1, 1), actor_device, use_gpu


@contextlib.contextmanager
def _quiet_ray_data(ray):
    """Ray Data without its progress bars (ours counts images) and its log below errors, restored after."""
    context, logger = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    bars, level = context.enable_progress_bars, logger.level
    context.enable_progress_bars = False
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        context.enable_progress_bars = bars
        logger.setLevel(level)


# --- the whole command ------------------------------------------------------------------------------------------

@dataclass
class Summary:
    made: int  # images written by this run
    existing: int  # images the manifest already had
    failed: int  # images not made (a pipeline error, or their file name taken by another file)
    bad_rows: int  # rows skipped by --skip-bad
    seconds: float
    manifest: Path

    def __str__(self):
        rate = f" ({self.made / self.seconds:.2f} images/s)" if self.made and self.seconds else ""
        skipped = f", {self.bad_rows} bad rows skipped" if self.bad_rows else ""
        return (f"{self.made} images made in {self.seconds:.1f} s{rate}, {self.existing} already there, "
                f"{self.failed} failed{skipped}; manifest: {self.manifest}")


def run_batch(jobs: str | Path, output_dir: str | Path, *, model: str, defaults: GenerationParams,
              seeds: str | None = None, samplers: str | None = None, base_seed: int | None = None,
              skip_bad: bool = False, ray: str | None = None, workers: int | None = None, device: str = "auto",
              dtype: str = "float32", safety_checker=False, load: Callable[[], object] | None = None,
              progress: bool = True, warn: Callable[[str], None] | None = None, limits: Limits = Limits(),
              controls: tuple = (), controlnet_dir: Path = Path("controlnet")) -> Summary:
    """Everything `stablediff batch` does after parsing. `defaults`: the settings a row leaves out (the command
    line's; see jobs.plan); `controls`: the ControlNet units of a row that names none, `controlnet_dir`: where a
    row's ControlNet names are looked up; `ray`: None for the local loop, "local" for a new local Ray, else a cluster
    address; `load` makes the local loop's pipeline (default load_pipeline); `limits`: the --max-* bounds on the job. Bad
    input raises ValueError (JobError for rows, LimitError for the job's size) before anything is generated; a file
    that cannot be written (a full disk) raises WriteError."""
    from tqdm.auto import tqdm

    warn = warn or (lambda message: tqdm.write(f"stablediff: warning: {message}", file=sys.stderr))
    jobs, output_dir, model = Path(jobs), Path(output_dir), _model_id(model)
    work, bad_rows = _plan_job(jobs, defaults, seeds, samplers, base_seed or 0, limits, skip_bad, warn,
                               dict(controls=tuple(controls), controlnet_dir=Path(controlnet_dir)))
    load = load or functools.partial(load_pipeline, model, device=device, dtype=dtype, safety_checker=safety_checker)
    output_dir.mkdir(parents=True, exist_ok=True)
    with Manifest(output_dir) as manifest:
        pending = _pending(manifest, work, model)
        existing = len(work.images) - len(pending)
        units = [u for u in work.units if any(k in pending for k in u.keys)]
        bar = tqdm(total=len(pending), unit="image", disable=not progress or not pending, dynamic_ncols=True)
        saver = _Saver(manifest, work, model, pending, lambda: bar.update(1), warn, jobs)
        with contextlib.closing(bar):
            seconds = _make(units, saver, load, ray=ray, workers=workers, model=model, device=device, dtype=dtype,
                            safety_checker=safety_checker)
        return Summary(saver.made, existing, saver.failed + len(pending), bad_rows, seconds, manifest.path)


def _model_id(model: str) -> str:
    """A local model by its absolute path, wherever we run from (it is in every manifest line); a Hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _make(units: list[Unit], on_result: Callable[[dict], None], load: Callable[[], object], *, ray: str | None,
          **ray_options) -> float:
    """The units through one pipeline here (ray None) or on Ray (run_ray); the seconds that took, not counting
    loading the pipeline here. No units: nothing is loaded or started."""
    if not units:
        return 0.0
    if ray is not None:
        start = time.perf_counter()
        run_ray(units, on_result, address=None if ray == "local" else ray, **ray_options)
        return time.perf_counter() - start
    pipe = load()
    start = time.perf_counter()
    for unit in units:
        for result in generate(pipe, unit):
            on_result(result)
    return time.perf_counter() - start


def _plan_job(jobs: Path, defaults: GenerationParams, seeds: str | None, samplers: str | None, base_seed: int,
              limits: Limits, skip_bad: bool, warn: Callable[[str], None], control_settings: dict) -> tuple[Plan, int]:
    """The job's plan and how many bad rows it leaves out: JobError for bad rows unless `skip_bad`, which warns.
    control_settings: jobs.plan's controls and controlnet_dir."""
    sweep_seeds = parse_seeds(seeds, limits) if seeds else None
    sweep_samplers = parse_samplers(samplers) if samplers else None
    rows, problems = read_jobs(jobs)
    work = plan(rows, defaults, seeds=sweep_seeds, sampler_sweep=sweep_samplers, base_seed=base_seed, limits=limits,
                job_dir=jobs.parent, **control_settings)
    problems = sorted(problems + work.problems)
    if problems and not skip_bad:
        raise JobError(jobs, problems)
    for line in JobError(jobs, problems).problems if problems else []:
        warn(f"{line} (skipped)")
    return work, len(problems)


def _pending(manifest: Manifest, work: Plan, model: str) -> set[str]:
    """The keys of the images still to make; ValueError where the manifest has one made with other settings."""
    for key, info in work.images.items():
        if key in manifest.entries:
            _check_same_settings(manifest, key, dict(info["params"], model=model))
    return {key for key in work.images if key not in manifest.entries}


class _Saver:
    """Takes the results as they come back: writes each image still `pending` and its manifest line, or warns why
    it was not made; counts both."""

    def __init__(self, manifest: Manifest, work: Plan, model: str, pending: set[str], advance: Callable[[], None],
                 warn: Callable[[str], None], jobs: Path):
        self.manifest, self.work, self.model, self.pending = manifest, work, model, pending
        self.advance, self.warn, self.jobs = advance, warn, jobs
        self.made = self.failed = 0

    def __call__(self, result: dict) -> None:
        key = result["key"]
        if key not in self.pending:  # already made (a unit re-run whole for its missing images)
            return
        self.pending.discard(key)
        self.advance()
        info = self.work.images[key]
        if result["error"]:
            self.failed += 1
            self.warn(f"{self.jobs}: line {info['line']}: seed {info['params']['seed']}: {result['error']}")
        elif self._save(key, info, result):
            self.made += 1
        else:
            self.failed += 1

    def _save(self, key: str, info: dict, result: dict) -> bool:
        """The PNG, then its manifest line; False (with a warning) where another file has its name."""
        directory = self.manifest.directory
        with _writing(directory / f"{key}.png", self.made):
            saved = save_image(directory, key, result["png"])
        if not saved:
            self.warn(f"{directory / key}.png: a different file already has this name; left it alone "
                      "(move it away and run again)")
            return False
        with _writing(self.manifest.path, self.made):
            self.manifest.append({"key": key, **info, "model": self.model, "file": f"{key}.png",
                                  "sha256": hashlib.sha256(result["png"]).hexdigest(),
                                  "seconds": result["seconds"], "nsfw": result["nsfw"]})
        if result["nsfw"]:
            self.warn(f"{directory / key}.png: flagged by the safety checker; saved blurred")
        return True


def _check_same_settings(manifest: Manifest, key: str, now: dict) -> None:
    """An image the manifest has must have been made with this run's settings (its params and model): otherwise
    ValueError naming the first that differs, since skipping it would leave a folder of mixed settings."""
    old = manifest.entries[key]
    made = dict(old["params"], model=old["model"])
    if made == now:
        return
    name = next(k for k in [*now, *made] if (k in made) != (k in now) or made.get(k) != now.get(k))
    raise ValueError(f"{manifest.path}: {key}.png was made with {name} {made.get(name)!r}, this run asks for "
                     f"{now.get(name)!r}; run the same command as before, or choose another --output-dir")


@contextlib.contextmanager
def _writing(path: Path, made: int):
    """An OSError (a full disk, ...) while writing `path` becomes a WriteError naming it; a PNG or manifest line
    cut short there is cleaned up by the next run (see Manifest)."""
    try:
        yield
    except OSError as e:
        raise WriteError(path, e, made) from None
