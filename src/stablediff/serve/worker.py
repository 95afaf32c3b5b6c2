"""The job queue behind `stablediff serve`: one worker thread that owns the model, and the models clients may name.

`Worker` runs `Job`s one at a time in the order `submit` accepted them. The queue of waiting jobs is bounded
(`max_queue`; the running job does not count): a submit that finds it full raises ClientError 503 with a Retry-After
from the mean duration of the last jobs. An accepted job runs at most once: `cancel(job)` (its client went away)
takes a waiting job out of the queue, so it never runs, and sets a running job's cancel event, which the pipeline
checks between U-Net blocks. A job's future gets the result or the error, and the worker goes on. `interrupt` sets
the running job's cancel event (A1111's rule: waiting jobs are not touched); `shutdown` fails the waiting jobs,
cancels the running one and accepts no more. The job's progress fields (its step count set when it is made, the
step written on the worker thread) make A1111's /progress answer. `skip` stops only the running job's current
iteration (`Job.skip`; `Job.resume` readies the next). One model is in memory: `Worker.use` frees the loaded one
before loading another, and sets the VAE the job asks for (a file, or the model's own kept from its loading).

`Catalog` is what a client may name: checkpoint files and diffusers folders under --models-dir (by their path
relative to it, never a client-given path; symlinks out of it are left out) plus the startup model.

Nothing here needs FastAPI: server.py is the HTTP layer on top.
"""

from __future__ import annotations

import collections
import gc
import itertools
import math
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import images
from ..params import DEFAULT_MODEL, HUB_ID, WEIGHT_SUFFIXES
from ..pipeline import Cancelled, StableDiffusion

LISTED_SUFFIXES = (".safetensors", ".ckpt")  # what A1111 lists as checkpoints; diffusers folders are listed too


class ClientError(Exception):
    """A request we refuse (a full queue, an unknown model, bad input): the server answers it with `status` and
    {"detail": message}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


# --- models clients may choose ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelEntry:
    title: str  # what clients call it: its path relative to --models-dir, e.g. "sd15.safetensors", "sub/tiny-sd"
    source: str  # what from_pretrained loads: a resolved path, or a file/folder/Hub id given on the command line

    @property
    def model_name(self) -> str:
        name = self.title.rsplit("/", 1)[-1]
        return name.rsplit(".", 1)[0] if name.endswith(LISTED_SUFFIXES) else name


def scan_models(models_dir: Path) -> dict[str, ModelEntry]:
    """Checkpoint files and diffusers folders under models_dir, by title. Symlinked folders are not walked, and an
    entry whose real path lies outside models_dir (a symlink out) is left out."""
    root = Path(models_dir).resolve()
    found = {}

    def add(path: Path):
        real = path.resolve()
        if root in real.parents:
            found[path.relative_to(root).as_posix()] = ModelEntry(path.relative_to(root).as_posix(), str(real))

    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here != root and (here / "model_index.json").is_file():
            add(here)
            dirnames.clear()  # its unet/, vae/ ... are parts, not checkpoints
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if (here / d).is_symlink() and (here / d / "model_index.json").is_file():
                add(here / d)
        for f in sorted(filenames):
            if f.lower().endswith(LISTED_SUFFIXES) and not f.startswith("."):
                add(here / f)
    return dict(sorted(found.items()))


class Catalog:
    """The models a client may name: those found in --models-dir (rescanned on each look-up) and the startup model."""

    def __init__(self, models_dir: Path | None, startup: ModelEntry | None = None):
        self.models_dir, self.startup = models_dir, startup

    def entries(self) -> dict[str, ModelEntry]:
        found = scan_models(self.models_dir) if self.models_dir is not None else {}
        if self.startup is not None and self.startup not in found.values():
            found = {self.startup.title: self.startup, **found}
        return found

    def find(self, name: str) -> ModelEntry:
        """By title, by title with A1111's " [hash]" suffix, or by model name; anything else is a 404."""
        entries = self.entries()
        key = name.rsplit(" [", 1)[0] if name.endswith("]") else name
        if key in entries:
            return entries[key]
        by_name = [e for e in entries.values() if e.model_name == key]
        if len(by_name) == 1:
            return by_name[0]
        raise ClientError(404, f"model {name!r} not found; choose a title from GET /sdapi/v1/sd-models "
                               f"({', '.join(entries) or 'none listed'})")


BUNDLED_MODELS = ("demo", "demo-lcm")  # the names StableDiffusion.from_pretrained knows without a file


def startup_model(model: str | None, models_dir: Path | None) -> ModelEntry:
    """The model to load first: --model as a name from --models-dir, else a file/folder/Hub id or a bundled demo model
    (BUNDLED_MODELS); when None, the first checkpoint in models_dir, else DEFAULT_MODEL. ValueError if there is no such
    model."""
    catalog = Catalog(models_dir)
    entries = catalog.entries()
    if model is None:
        return next(iter(entries.values()), ModelEntry(DEFAULT_MODEL, DEFAULT_MODEL))
    if model in BUNDLED_MODELS and model not in entries:
        return ModelEntry(model, model)  # a bundled demo model: from_pretrained knows the name
    path = Path(model).expanduser()
    for entry in entries.values():
        if model == entry.title or (path.exists() and str(path.resolve()) == entry.source):
            return entry
    if path.exists():
        return ModelEntry(path.name, str(path.resolve()))
    if HUB_ID.fullmatch(model) and not model.lower().endswith(WEIGHT_SUFFIXES):
        return ModelEntry(model, model)  # a Hub id
    where = f" and is not listed in --models-dir {models_dir}" if models_dir else ""
    raise ValueError(f"--model {model}: no such file or folder{where}")


# --- the worker: one thread, one model, a bounded FIFO of jobs ----------------------------------------------------

@dataclass(eq=False)
class Job:
    kind: str  # "txt2img", "img2img", "load model"
    run: Callable[["Job"], Any]  # called on the worker thread; its return value answers the request
    job_count: int = 1  # iterations, as A1111's state.job_count
    job_id: int = 0  # order of acceptance (1, 2, ...)
    run_no: int = 0  # order of running: equal to job_id's order (FIFO)
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)
    steps: int = 0  # sampler steps of one iteration, known when the job is made (so /progress is right at once)
    job_no: int = 0  # progress, written by the worker thread
    step: int = 0
    started: float = 0.0
    timestamp: str = ""
    skipped: bool = False  # a skip asked for (A1111's /skip): the running iteration stops, the next ones run
    stopped: bool = False  # interrupted or cancelled: no more iterations
    preview_every: int = 0  # live previews: every N steps (0: none)
    preview: tuple | None = None  # (step, pipeline, denoised latents (1, C, h, w) on the CPU) of the last preview
    preview_png: tuple | None = None  # (step, base64 PNG): the last one encoded, for the polls that follow
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def stop(self) -> None:
        """Stop the job: the running pipeline call within a U-Net block, and no more iterations."""
        with self._lock:
            self.stopped = True
            self.cancel.set()

    def skip(self) -> None:
        """Stop the running iteration only (the pipeline drops it); `resume` lets the next one run."""
        with self._lock:
            if not self.stopped:
                self.skipped = True
                self.cancel.set()

    def resume(self) -> bool:
        """After a skip, ready the job for its next iteration: True unless the job was stopped as well."""
        with self._lock:
            if self.skipped and not self.stopped:
                self.skipped = False
                self.cancel.clear()
            return not self.stopped


class Worker:
    """The one thread that owns the model. Jobs run one at a time, in the order `submit` accepted them."""

    def __init__(self, load: Callable[[ModelEntry], StableDiffusion], max_queue: int):
        self._load, self.max_queue = load, max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._ids, self._runs = itertools.count(1), itertools.count(1)
        self._durations: collections.deque[float] = collections.deque(maxlen=10)
        self._closed = False
        self.current: Job | None = None
        self.pipe: StableDiffusion | None = None
        self.loaded: ModelEntry | None = None
        self.sha256: str | None = None
        self.vae: Path | None = None  # the VAE file the pipeline decodes with; None: the model's own
        self.native_sizes: dict[ModelEntry, int] = {}  # of every model loaded so far
        self._thread = threading.Thread(target=self._loop, name="stablediff-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closed:
                raise ClientError(503, "the server is shutting down")
            if len(self._queue) >= self.max_queue:
                mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
                wait = min(3600, max(1, math.ceil(mean * len(self._queue))))
                raise ClientError(503, f"the queue is full ({len(self._queue)} jobs waiting); retry in {wait} s",
                                  headers={"Retry-After": str(wait)})
            job.job_id = next(self._ids)
            self._queue.append(job)
            self._cond.notify()
        return job.future

    @property
    def closed(self) -> bool:
        return self._closed

    def interrupt(self) -> None:
        """Stop the running job within a U-Net block (waiting jobs are not touched, as in A1111)."""
        with self._cond:
            if self.current is not None:
                self.current.stop()

    def skip(self) -> None:
        """Stop the running job's current iteration (n_iter) and go on with its next one (A1111's /skip)."""
        with self._cond:
            if self.current is not None:
                self.current.skip()

    def cancel(self, job: Job) -> None:
        """The job is no longer wanted: a waiting one leaves the queue and never runs (its future gets Cancelled);
        a running one has its cancel event set."""
        with self._cond:
            job.stop()
            try:
                self._queue.remove(job)
            except ValueError:
                return  # running, or finished already
        job.future.set_exception(Cancelled("the job was cancelled before it started"))

    def shutdown(self) -> None:
        """Accept no more jobs, fail the waiting ones (ClientError 503) and cancel the running one; returns at once."""
        with self._cond:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            if self.current is not None:
                self.current.stop()
            self._cond.notify()
        for job in waiting:
            job.stop()
            job.future.set_exception(ClientError(503, "the server is shutting down; the job did not run"))

    def use(self, entry: ModelEntry, vae: Path | None = None) -> StableDiffusion:
        """The loaded pipeline for entry, loading it in place of the current one if needed, decoding with `vae` (a
        VAE file) or, for None, the model's own VAE (worker thread only)."""
        if self.loaded != entry:
            self.pipe = self.loaded = self.sha256 = None  # one model in memory: free the old one first
            gc.collect()
            try:
                pipe = self._load(entry)
                self.sha256 = images.file_sha256(pipe.weights_file) if pipe.weights_file else None
            except Exception as e:
                raise RuntimeError(f"cannot load model {entry.title!r}: {e}") from e
            self.pipe, self.loaded, self.vae = pipe, entry, None
            self.native_sizes[entry] = pipe.native_size
        self._use_vae(vae)
        return self.pipe

    def _use_vae(self, vae: Path | None) -> None:
        """Load `vae` into the pipeline, or put the model's own back for None (a VAE that fails to load leaves
        the one in use)."""
        if vae == self.vae:
            return
        if vae is None:
            self.pipe.use_own_vae()
        else:
            self.pipe.load_vae(vae)
        self.vae = vae

    def progress(self) -> dict:
        """A1111's /progress answer: progress 0..1 over the running job's iterations and steps, ETA in seconds, state
        (sampling_steps and job_count from the moment the job starts; queue_size: the jobs waiting behind it)."""
        with self._cond:
            job, waiting = self.current, len(self._queue)
        state = dict(skipped=False, interrupted=False, stopping_generation=False, job="", job_count=0,
                     job_timestamp="0", job_no=0, sampling_step=0, sampling_steps=0, queue_size=waiting, job_id=None)
        if job is None:
            return dict(progress=0.0, eta_relative=0.0, state=state, current_image=None, textinfo=None)
        done = (job.job_no + (job.step / job.steps if job.steps else 0.0)) / job.job_count
        elapsed = time.time() - job.started
        state.update(skipped=job.skipped, interrupted=job.stopped, job=job.kind, job_count=job.job_count,
                     job_timestamp=job.timestamp, job_no=job.job_no, sampling_step=job.step,
                     sampling_steps=job.steps, job_id=job.job_id)
        eta = elapsed / done - elapsed if done > 0 else 0.0
        return dict(progress=min(done, 1.0), eta_relative=eta, state=state, current_image=None, textinfo=None)

    def close(self, timeout: float = 5.0) -> bool:
        """`shutdown`, then wait up to `timeout` s for the worker thread to end; True if it did."""
        self.shutdown()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                job.run_no, job.started = next(self._runs), time.time()
                job.timestamp = time.strftime("%Y%m%d%H%M%S")
                self.current = job
            job.future.set_running_or_notify_cancel()
            try:
                result = job.run(job)
            except BaseException as e:  # the request gets the error; the worker goes on
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                with self._cond:
                    self.current = None
                    self._durations.append(time.time() - job.started)
