"""Job files for `stablediff batch`: what to make, read and checked before anything runs (batch.py makes it).

1. `read_jobs`: every non-blank line of JOBS is a row, known by its line number: a prompt (.txt), a JSON object
   or string (.jsonl), or a record under a header line (.csv). A row may set any of OPTIONS.
2. `plan`: every row becomes a GenerationParams (the command line's settings with the row's own) and is validated
   (all problems, with line numbers, before anything runs), then becomes images: its seeds (`seed` +
   0..batch_size-1, or the --seeds sweep; `row_seed` where it sets none) times its samplers (its own, or the
   --samplers sweep). An image's key is its file name, `LLLLL-SEED-SAMPLER[-karras]`. Runs of consecutive seeds go
   through the model together, batch_size at a time ("units"); that split depends on the job alone, so an image's
   pixels do not depend on what was made before, by which worker, or whether on Ray.
   A row's "controls" (a list of objects with controls.FIELDS; in a .csv cell, that list as JSON) are its ControlNet
   units: models resolved as `generate --control` resolves them (a path, else a name in --controlnet-dir), images
   relative to the job file, each checked (files exist, values known) with the row; a row without them gets the
   command line's --control units.
3. `JobError`: all the bad rows at once, one 'FILE: line N: what' text per row (batch.py raises it unless
   --skip-bad, which warns and runs the rest).
4. Limits (limits.py, the --max-* flags): each row's size, steps, U-Net batch and prompts are checked by the same
   validate as its other settings (a bad row); the images and work of the whole job are summed row by row *before*
   each row is expanded, and going over is an error for the whole job naming the line where it happens. A size
   left out counts as NATIVE_SIZE. So no job file or --seeds/--samplers sweep can make the plan itself take
   gigabytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import controls as controlnets
from .. import samplers
from ..limits import NATIVE_SIZE, UNIT_PIXELS, LimitError, Limits
from ..params import MAX_SEED, GenerationParams

SUFFIXES = (".txt", ".csv", ".jsonl")
OPTIONS = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "cfg_scale": float, "sampler": str,
           "schedule": str, "width": int, "height": int, "batch_size": int, "clip_skip": int, "tiling": bool,
           "controls": list}
# what an image's manifest line records of its settings, in this order (then loras and cache_interval where set, then
# seed): the shape the manifests written so far have, so that their images still compare equal on a resume
MANIFEST_FIELDS = ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "width", "height",
                   "clip_skip")


class JobError(ValueError):
    """Bad rows, found before anything is generated; `problems` holds one 'FILE: line N: what' text per row."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]):
        self.problems = [f"{path}: line {line}: {message}" for line, message in problems]
        lines = ", ".join(str(line) for line, _ in problems)
        what = self.problems[0] if len(problems) == 1 else f"{path}: {len(problems)} bad rows (lines {lines})"
        super().__init__(f"{what}; fix {'it' if len(problems) == 1 else 'them'} or pass --skip-bad to run the rest")


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the file where the row starts
    raw: dict  # as read (a .txt row is {"prompt": line})


# --- reading the job file ---------------------------------------------------------------------------------------

def read_jobs(path: str | Path) -> tuple[list[Row], list[tuple[int, str]]]:
    """The rows of a .txt/.csv/.jsonl file, and (line, problem) for the lines that are not rows at all."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"JOBS {path}: expected a .txt, .csv or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"JOBS {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"JOBS {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    read = {".txt": _read_txt, ".csv": _read_csv, ".jsonl": _read_jsonl}[path.suffix.lower()]
    rows, problems = read(text)
    if not rows and not problems:
        raise ValueError(f"JOBS {path}: has no rows")
    return rows, problems


def _lines(text: str):
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): editors count only \n
        if line.strip():
            yield number, line.rstrip("\r")


def _read_txt(text):
    return [Row(n, {"prompt": line.strip()}) for n, line in _lines(text)], []


def _read_jsonl(text):
    rows, problems = [], []
    for n, line in _lines(text):
        try:
            value = json.loads(line)
        except ValueError as e:
            problems.append((n, f"not JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"))
            continue
        except RecursionError:  # json nests by recursion: '[[[[...' 100000 deep
            problems.append((n, "JSON nested too deeply"))
            continue
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            problems.append((n, f"expected a JSON object or string, got {type(value).__name__}"))
            continue
        rows.append(Row(n, value))
    return rows, problems


def _read_csv(text):
    rows, problems, header = [], [], None
    reader = csv.reader(io.StringIO(text))
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            problems.append((start, f"not CSV ({e})"))
            break
        if not any(cell.strip() for cell in record):
            continue
        if header is None:
            header = [cell.strip().lower().replace("-", "_").replace(" ", "_") for cell in record]
            continue
        if len(record) > len(header):
            problems.append((start, f"{len(record)} cells under a header of {len(header)} columns"))
            continue
        rows.append(Row(start, {k: v for k, v in zip(header, record) if v.strip()}))
    return rows, problems


def _coerce(key: str, value):
    """A row's value as OPTIONS[key] (CSV gives text: '20' -> 20), or ValueError naming it."""
    kind = OPTIONS[key]
    if kind is bool:
        return _flag(key, value)
    return _text(key, value) if kind is str else _number(key, value, kind)


def _flag(key: str, value) -> bool:
    """true/false (JSON), or the text true/false/1/0 (CSV)."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text in (True, "true", "1"):
        return True
    if text in (False, "false", "0"):
        return False
    raise ValueError(f"{key} {value!r} is not true or false")


def _text(key: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} {value!r} is not text")
    return value.strip()


def _number(key: str, value, kind: type):
    """value (a number, or text of one) as `kind`: an int also from 20.0, a float also from 20."""
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            pass  # named below, as it was written
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise ValueError(f"{key} {value!r} is not {'a whole number' if kind is int else 'a number'}")
    return kind(value)


# --- rows -> images ---------------------------------------------------------------------------------------------

def parse_seeds(text: str, limits: Limits = Limits()) -> list[int]:
    """'1-100' / '1,5,9-12' -> the sorted distinct seeds. Their number is counted from the merged ranges before any
    list is built, and more than --max-images seeds is refused (no job could make them all): '0-2999999' fails in
    microseconds instead of building 3 million ints."""
    merged: list[list[int]] = []
    for a, b in sorted(_seed_range(text, part.strip()) for part in text.split(",")):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    count = sum(b - a + 1 for a, b in merged)
    if count > limits.max_images:
        raise LimitError(f"--seeds {text!r}: seeds", count, limits.max_images, Limits.flag("max_images"))
    return [seed for a, b in merged for seed in range(a, b + 1)]


def _seed_range(text: str, part: str) -> tuple[int, int]:
    """One part of --seeds, '7' or '1-100', as (first, last)."""
    lo, sep, hi = part.partition("-")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ValueError(f"--seeds {text!r}: {part!r} is not a seed or a range like 1-100") from None
    if not 0 <= a <= b <= MAX_SEED:
        raise ValueError(f"--seeds {text!r}: {part!r} is not a range within 0..{MAX_SEED}")
    return a, b


def parse_samplers(text: str) -> list[str]:
    """'euler,DPM++ 2M Karras' -> the names, each checked (ValueError names a bad one)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--samplers {text!r} names no sampler")
    for name in names:
        try:
            samplers.get_sampler(name)
        except ValueError as e:
            raise ValueError(f"--samplers {text!r}: {e}") from None
    return names


def row_seed(base: int, line: int, count: int) -> int:
    """The first seed of a row that sets none: from --seed (the base, 0 if not given) and its line number, so a
    rerun makes the same images and no two rows share seeds by accident."""
    digest = hashlib.sha256(f"{base}:{line}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (MAX_SEED + 2 - count)


@dataclass(frozen=True)
class Unit:
    """One pipeline call: `params` with the first seed and the batch size, making the images `keys` (one a seed),
    with the row's ControlNet units `controls`."""
    params: GenerationParams
    keys: list[str]
    controls: tuple = ()

    def to_json(self) -> str:
        """As Ray carries it to a worker (from_json reads it back)."""
        return json.dumps({"params": self.params.to_row(), "keys": self.keys,
                           "controls": [c.to_row() for c in self.controls]})

    @classmethod
    def from_json(cls, text: str) -> "Unit":
        unit = json.loads(text)
        return cls(GenerationParams.from_row(unit["params"]), unit["keys"],
                   tuple(controlnets.Control(**c) for c in unit.get("controls", ())))


@dataclass
class Plan:
    units: list[Unit] = field(default_factory=list)
    images: dict[str, dict] = field(default_factory=dict)  # key -> {"line", "row", "params" (manifest_params)}
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, what is wrong)


def plan(rows: list[Row], defaults: GenerationParams, *, seeds: list[int] | None = None,
         sampler_sweep: list[str] | None = None, base_seed: int = 0, limits: Limits = Limits(),
         controls: tuple = (), controlnet_dir: Path = Path("controlnet"), job_dir: Path = Path(".")) -> Plan:
    """Check every row and expand the good ones into images and units (see the module docstring). `defaults`: the
    settings a row leaves out (its prompt and seed are not used: a row states its prompt, and a row without a seed
    gets row_seed(base_seed, ...)); `controls`: the ControlNet units of a row that names none; `controlnet_dir`:
    where a row's ControlNet names are looked up; `job_dir`: the job file's folder, which a row's control images
    are relative to. The job's images and work are summed before each row is expanded: LimitError (for the whole
    job) where they go over."""
    result, images, pixel_steps = Plan(), 0, 0
    for row in rows:
        try:
            by_tag = _check_row(row, defaults, seeds, sampler_sweep, limits)
            units = _row_controls(row, controls, controlnet_dir, job_dir)
        except ValueError as e:
            result.problems.append((row.line, str(e)))
            continue
        some = next(iter(by_tag.values()))  # they differ only in sampler and schedule
        image_seeds = seeds if seeds is not None else _own_seeds(some, row.line, base_seed)
        images += len(image_seeds) * len(by_tag)
        pixel_steps += len(image_seeds) * len(by_tag) * some.steps * _size(some.width) * _size(some.height)
        _check_total(limits, row.line, images, pixel_steps)
        for tag, params in by_tag.items():
            _expand(result, row, tag, params, image_seeds, units)
    return result


def manifest_params(params: GenerationParams, seed: int, controls: tuple = ()) -> dict:
    """An image's settings as its manifest line records them: MANIFEST_FIELDS, then loras, cache_interval, rng,
    ensd, tiling and controls only where not at their default (so the settings of images made before these existed
    still compare equal on a resume), then seed."""
    recorded = {name: getattr(params, name) for name in MANIFEST_FIELDS}
    if params.loras:
        recorded["loras"] = dict(params.loras)
    if params.cache_interval != 1:
        recorded["cache_interval"] = params.cache_interval
    if params.rng != "cpu":
        recorded["rng"] = params.rng
    if params.ensd:
        recorded["ensd"] = params.ensd
    if params.tiling:
        recorded["tiling"] = True
    if controls:
        recorded["controls"] = [c.to_row() for c in controls]
    return dict(recorded, seed=seed)


def _row_controls(row: Row, default: tuple, controlnet_dir: Path, job_dir: Path) -> tuple:
    """The row's ControlNet units (controls.from_row each; `default` where it names none); ValueError naming the
    bad one."""
    value = row.raw.get("controls")
    if value is None:
        return default
    if isinstance(value, str):  # a .csv cell
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"controls {value!r} is not a JSON list") from None
    if not isinstance(value, list):
        raise ValueError(f"controls {value!r} is not a list of objects")
    units = []
    for n, unit in enumerate(value):
        try:
            units.append(controlnets.from_row(unit, controlnet_dir, job_dir))
        except ValueError as e:
            raise ValueError(f"controls[{n}]: {e}") from None
    return tuple(units)


def _check_row(row: Row, defaults: GenerationParams, seeds: list[int] | None, sampler_sweep: list[str] | None,
               limits: Limits) -> dict[str, GenerationParams]:
    """One row's settings, validated against `limits` (ValueError says what is wrong): {file-name tag: the settings
    of each distinct sampler and schedule}, with the row's seed (None: it sets none) and the U-Net batch size."""
    params = _row_params(row, defaults)
    if seeds is not None:  # with a --seeds sweep, batch_size only says how many go through the model at once
        params = params.replace(batch_size=min(params.batch_size, len(seeds)))
    by_tag = {}
    for name in sampler_sweep or [params.sampler]:
        checked = params.replace(sampler=name).validate(limits)
        by_tag.setdefault(file_tag(checked), checked)
    return by_tag


def file_tag(params: GenerationParams) -> str:
    """The sampler and schedule in an image's key and file name: diffusers' samplers by name, A1111's by its own
    `k_` alias (its labels hold spaces and '+'), e.g. "euler", "dpmpp_2m-karras", "k_dpmpp_2m-karras"."""
    spec = samplers.SAMPLERS[params.sampler]
    name = spec.aliases[0] if spec.family == "a1111" else spec.name
    return name + (f"-{params.schedule}" if params.schedule else "")


def _row_params(row: Row, defaults: GenerationParams) -> GenerationParams:
    """The defaults with what the row sets (JSON null: the default); ValueError for an unknown key, a value of the
    wrong kind or an empty prompt."""
    unknown = [k for k in row.raw if k not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; a row may set {', '.join(OPTIONS)}")
    changes = {k: _coerce(k, v) for k, v in row.raw.items() if v is not None and k != "controls"}
    params = defaults.replace(**{"prompt": "", **changes})
    if not params.prompt:
        raise ValueError("the prompt is empty")
    return params


def _own_seeds(params: GenerationParams, line: int, base_seed: int) -> range:
    """A row's seeds without a --seeds sweep: its seed (or row_seed's) and the batch_size - 1 after it."""
    first = row_seed(base_seed, line, params.batch_size) if params.seed is None else params.seed
    return range(first, first + params.batch_size)


def _expand(result: Plan, row: Row, tag: str, params: GenerationParams, seeds, controls: tuple) -> None:
    """Add one row's images of one sampler to the plan, in units of at most its batch size."""
    for run in _runs(seeds, params.batch_size):
        keys = [f"{row.line:05d}-{seed}-{tag}" for seed in run]
        result.units.append(Unit(params.replace(seed=run[0], batch_size=len(run)), keys, controls))
        for key, seed in zip(keys, run):
            result.images[key] = {"line": row.line, "row": row.raw,
                                  "params": manifest_params(params, seed, controls)}


def _runs(seeds, size: int):
    """Sorted seeds -> runs of consecutive seeds, at most `size` long (one pipeline call each)."""
    run = []
    for seed in seeds:
        if run and (seed != run[-1] + 1 or len(run) == size):
            yield run
            run = []
        run.append(seed)
    if run:
        yield run


# --- limits -----------------------------------------------------------------------------------------------------

def _size(value: int | None) -> int:
    return value or NATIVE_SIZE


def _check_total(limits: Limits, line: int, images: int, pixel_steps: int) -> None:
    """The job so far (its rows up to `line`) against --max-images and --max-work. Limits.check_work bounds one
    run of one size and step count; a job mixes them, so its work is summed here in the same unit."""
    work = -(-pixel_steps // UNIT_PIXELS)
    for name, what, value in (("max_images", "images (rows x seeds x samplers)", images),
                              ("max_work", "work (images x steps x pixels, in 512x512 steps)", work)):
        limits.check(name, f"the job up to line {line}: {what} =", value)

