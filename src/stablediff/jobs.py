"""Job files for `stablediff batch`: what to make, read and checked before anything runs (batch.py makes it).

1. `read_jobs`: every non-blank line of JOBS is a row, known by its line number: a prompt (.txt), a JSON object
   or string (.jsonl), or a record under a header line (.csv). A row may set any of OPTIONS.
2. `plan`: every row is checked (all problems, with line numbers, before anything runs) and becomes images: its
   seeds (`seed` + 0..batch_size-1, or the --seeds sweep; `row_seed` where it sets none) times its samplers (its
   own, or the --samplers sweep). An image's key is its file name, `LLLLL-SEED-SAMPLER[-karras]`. Runs of
   consecutive seeds go through the model together, batch_size at a time ("units"); that split depends on the job
   alone, so an image's pixels do not depend on what was made before, by which worker, or whether on Ray.
3. `JobError`: all the bad rows at once, one 'FILE: line N: what' text per row (batch.py raises it unless
   --skip-bad, which warns and runs the rest).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import samplers
from .pipeline import MAX_SEED, check_params

SUFFIXES = (".txt", ".csv", ".jsonl")
OPTIONS = {"prompt": str, "negative_prompt": str, "seed": int, "steps": int, "cfg_scale": float, "sampler": str,
           "schedule": str, "width": int, "height": int, "batch_size": int, "clip_skip": int}


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
            problems.append((n, f"not JSON ({e.msg} at column {e.colno})"))
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
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} {value!r} is not text")
        return value.strip()
    try:
        value = kind(value.strip()) if isinstance(value, str) else value
        value = int(value) if kind is int and isinstance(value, float) and value.is_integer() else value
    except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ValueError(f"{key} {value!r} is not {'a whole number' if kind is int else 'a number'}")
    return kind(value)


# --- rows -> images ---------------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """'1-100' / '1,5,9-12' -> the sorted distinct seeds."""
    seeds = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"--seeds {text!r}: {part.strip()!r} is not a seed or a range like 1-100") from None
        if not 0 <= a <= b <= MAX_SEED:
            raise ValueError(f"--seeds {text!r}: {part.strip()!r} is not a range within 0..{MAX_SEED}")
        if b - a >= 1_000_000:
            raise ValueError(f"--seeds {text!r}: {part.strip()!r} has more than a million seeds")
        seeds.update(range(a, b + 1))
    return sorted(seeds)


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


@dataclass
class Plan:
    units: list[dict] = field(default_factory=list)  # {"params", "seed": the first, "keys": one per seed}
    images: dict[str, dict] = field(default_factory=dict)  # key -> {"line", "row", "params" (with its seed)}
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, what is wrong)


def plan(rows: list[Row], defaults: dict, *, seeds: list[int] | None = None, sampler_sweep: list[str] | None = None,
         base_seed: int = 0) -> Plan:
    """Check every row and expand the good ones into images and units (see the module docstring)."""
    result = Plan()
    for row in rows:
        try:
            unknown = [k for k in row.raw if k not in OPTIONS]
            if unknown:
                raise ValueError(f"unknown option {unknown[0]!r}; a row may set {', '.join(OPTIONS)}")
            s = {"prompt": "", **defaults}
            s.update({k: _coerce(k, v) for k, v in row.raw.items() if v is not None})
            if not s.get("prompt"):
                raise ValueError("the prompt is empty")
            count = s.pop("batch_size")
            first = s.pop("seed")
            if seeds is None and first is not None and first + count - 1 > MAX_SEED:
                raise ValueError(f"seed {first} + batch size {count} runs past {MAX_SEED}")
            units = []
            for name in sampler_sweep or [s["sampler"]]:
                check_params(steps=s["steps"], cfg_scale=s["cfg_scale"], width=s["width"], height=s["height"],
                             batch_size=count, sampler=name, schedule=s["schedule"], clip_skip=s["clip_skip"],
                             seed=first)
                spec, alias = samplers.get_sampler(name)
                params = dict(s, sampler=spec.name, schedule=s["schedule"] or alias)
                units.append(params)
        except ValueError as e:
            result.problems.append((row.line, str(e)))
            continue
        if seeds is None:
            first = row_seed(base_seed, row.line, count) if first is None else first
        image_seeds = seeds if seeds is not None else list(range(first, first + count))
        for params in units:
            tag = params["sampler"] + ("-karras" if params["schedule"] == "karras" else "")
            for chunk in _runs(image_seeds, count):
                keys = [f"{row.line:05d}-{seed}-{tag}" for seed in chunk]
                if keys[0] in result.images:  # the same sampler twice in --samplers
                    continue
                result.units.append({"params": params, "seed": chunk[0], "keys": keys})
                for key, seed in zip(keys, chunk):
                    result.images[key] = {"line": row.line, "row": row.raw, "params": dict(params, seed=seed)}
    return result


def _runs(seeds: list[int], size: int):
    """Sorted seeds -> runs of consecutive seeds, at most `size` long (one pipeline call each)."""
    run = []
    for seed in seeds:
        if run and (seed != run[-1] + 1 or len(run) == size):
            yield run
            run = []
        run.append(seed)
    if run:
        yield run
