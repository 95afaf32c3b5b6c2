"""`stablediff batch`: job files, bad rows, the manifest, resuming after a kill -9, and local vs Ray.

The runs that stand for a user's (local vs Ray, kill -9) are subprocesses of the CLI with one torch thread (as
Ray's actors use): pixels are the same for the same thread count; with a different one a rare pixel may be 1/255
off. The rest calls batch.py in this process on the tiny model with 2 steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from stablediff import cli
from stablediff.serve import batch
from stablediff.images import file_sha256
from stablediff.params import GenerationParams

DEFAULTS = GenerationParams(steps=2)
JOB_ROWS = [  # 12 rows, 14 images: own seeds, derived seeds, a second sampler, batch sizes, a karras schedule
    {"prompt": "a red circle", "seed": 100}, {"prompt": "a blue square", "sampler": "dpmpp_2m"},
    {"prompt": "a green cat", "batch_size": 2}, {"prompt": "a tree", "seed": 7, "cfg_scale": 5},
    {"prompt": "a house", "negative_prompt": "blurry"}, {"prompt": "a boat", "sampler": "DPM++ 2M Karras"},
    {"prompt": "a dog", "steps": 3}, {"prompt": "a car", "batch_size": 2, "seed": 11}, {"prompt": "the sea"},
    {"prompt": "a (bird:1.2)", "sampler": "euler_a"}, {"prompt": "a lamp", "width": 80}, {"prompt": "a chair"},
]


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                RAY_USAGE_STATS_ENABLED="0")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def cli_batch(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "stablediff", "batch", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def manifest(directory: Path) -> dict:
    lines = (directory / "manifest.jsonl").read_text().splitlines()
    entries = {e["key"]: e for e in map(json.loads, lines)}
    assert len(entries) == len(lines), "duplicate keys in the manifest"
    return entries


def assert_complete(directory: Path, keys: set[str]):
    """Exactly these images, each a whole PNG whose sha256 the manifest holds; no temporary files."""
    entries = manifest(directory)
    assert set(entries) == keys
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".manifest")) == sorted(
        [f"{k}.png" for k in keys] + ["manifest.jsonl"])
    for key, e in entries.items():
        Image.open(directory / e["file"]).load()
        assert file_sha256(directory / e["file"]) == e["sha256"]


def run(jobs, out, **kw):
    return batch.run_batch(jobs, out, defaults=DEFAULTS.replace(**kw.pop("defaults", {})), progress=False, **kw)


# --- job files and bad rows (no model needed) ------------------------------------------------------------------

def test_read_jobs_in_three_formats_with_line_numbers(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \r\n")
    assert [(r.line, r.raw) for r in batch.read_jobs(txt)[0]] == [(1, {"prompt": "a cat"}), (3, {"prompt": "a dog"})]
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,Seed,cfg-scale\n"a cat, sitting",5,\n\n"two\nlines",,6.5\n')
    rows, problems = batch.read_jobs(csv)
    assert [(r.line, r.raw) for r in rows] == [(2, {"prompt": "a cat, sitting", "seed": "5"}),
                                               (4, {"prompt": "two\nlines", "cfg_scale": "6.5"})]
    work = batch.plan(rows, DEFAULTS)
    assert [u.params.cfg_scale for u in work.units] == [7.0, 6.5] and work.units[0].params.seed == 5
    rows, problems = batch.read_jobs(write_jsonl(tmp_path / "p.jsonl", ['"a cat"', "{oops", "[1]"]))
    assert [r.raw for r in rows] == [{"prompt": "a cat"}] and [p[0] for p in problems] == [2, 3]


def test_seeds_sweep_samplers_and_keys(tmp_path):
    assert batch.parse_seeds("1-3,7,2") == [1, 2, 3, 7]
    with pytest.raises(ValueError, match="'5-1'"):
        batch.parse_seeds("5-1")
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        batch.parse_samplers("euler,nope")
    rows = [batch.Row(4, {"prompt": "a", "batch_size": 2}), batch.Row(9, {"prompt": "b"})]
    # "DPM++ 2M" is A1111's, whose own schedule is karras: the same as "DPM++ 2M Karras"; "euler" is diffusers'
    work = batch.plan(rows, DEFAULTS, seeds=[1, 2, 3, 7], sampler_sweep=["euler", "DPM++ 2M Karras", "DPM++ 2M"])
    assert [u.keys for u in work.units[:3]] == [["00004-1-euler", "00004-2-euler"], ["00004-3-euler"],
                                                   ["00004-7-euler"]]  # runs of consecutive seeds, batch_size long
    assert len(work.images) == 2 * 4 * 2 and "00009-7-k_dpmpp_2m-karras" in work.images
    plain = batch.plan(rows, DEFAULTS)  # no seed: derived from line (and --seed), the same every time
    other_base = batch.plan(rows, DEFAULTS, base_seed=1)
    assert plain.units[0].params.seed == batch.row_seed(0, 4, 2) != other_base.units[0].params.seed


def test_rows_become_validated_params_and_manifest_lines_keep_their_shape():
    defaults = DEFAULTS.replace(loras=(("style", 0.5), ("ink", 1.0), ("style", 0.8)), cache_interval=2)
    rows = [batch.Row(3, {"prompt": " a cat ", "sampler": "DPM++ 2M Karras", "cfg_scale": "6", "batch_size": 3,
                          "seed": 10, "negative_prompt": None})]
    work = batch.plan(rows, defaults)
    unit = work.units[0]
    assert unit.keys == ["00003-10-k_dpmpp_2m-karras", "00003-11-k_dpmpp_2m-karras", "00003-12-k_dpmpp_2m-karras"]
    assert (unit.params.prompt, unit.params.sampler, unit.params.schedule) == ("a cat", "DPM++ 2M", "karras")
    assert (unit.params.seed, unit.params.batch_size, unit.params.cfg_scale) == (10, 3, 6.0)
    assert unit.params.loras == (("style", 0.8), ("ink", 1.0))  # validated: the last mention of a LoRA wins
    assert batch.Unit.from_json(unit.to_json()) == unit  # as Ray carries it
    # the manifest records what 0.1.0 did, loras and cache_interval only where set, the image's own seed last
    assert list(work.images["00003-11-k_dpmpp_2m-karras"]["params"].items()) == [
        ("prompt", "a cat"), ("negative_prompt", ""), ("steps", 2), ("cfg_scale", 6.0), ("sampler", "DPM++ 2M"),
        ("schedule", "karras"), ("width", None), ("height", None), ("clip_skip", 1),
        ("loras", {"style": 0.8, "ink": 1.0}), ("cache_interval", 2), ("seed", 11)]
    assert set(batch.plan(rows, DEFAULTS).images["00003-10-k_dpmpp_2m-karras"]["params"]) == {
        "prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "width", "height", "clip_skip",
        "seed"}
    # with a --seeds sweep, a row's batch size only bounds the U-Net batch
    swept = batch.plan(rows, defaults, seeds=[1, 2])
    assert [(u.params.seed, u.params.batch_size, u.keys[-1]) for u in swept.units] == [
        (1, 2, "00003-2-k_dpmpp_2m-karras")]


def test_bad_rows_are_named_by_line_before_anything_runs(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": "fine"}, {"prompt": "x", "sampler": "warp9"}, {"prompt": "ok"}, {"prompt": "  "},
            {"prompt": "ok too", "steps": 2}]
    jobs = write_jsonl(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    assert cli.main(["batch", str(jobs), "--model", str(tiny_model_dir), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "jobs.jsonl: line 2: unknown sampler 'warp9'" in err and "jobs.jsonl: line 4: the prompt is empty" in err
    assert "2 bad rows (lines 2, 4)" in err.splitlines()[-1] and "--skip-bad" in err
    assert not (out / "manifest.jsonl").exists() and not list(out.glob("*.png"))
    for row, needle in [({"prompt": "a", "width": 100}, "width 100 is not a multiple of 8"),
                        ({"prompt": "a", "color": "red"}, "unknown option 'color'"),
                        ({"prompt": "a", "steps": "many"}, "steps 'many' is not a whole number")]:
        with pytest.raises(batch.JobError, match=needle):
            run(write_jsonl(tmp_path / "one.jsonl", [row]), out, model=str(tiny_model_dir))

    assert cli.main(["batch", "--ray", str(jobs), "--workers", "0"]) == 2  # --ray took JOBS: given back
    assert capsys.readouterr().err == "stablediff: error: --workers 0: must be at least 1\n"

    summary = run(jobs, out, model=str(tiny_model_dir), skip_bad=True, warn=lambda m: None)
    assert (summary.made, summary.bad_rows) == (3, 2)
    assert sorted(e["line"] for e in manifest(out).values()) == [1, 3, 5]


# --- the manifest and resuming ----------------------------------------------------------------------------------

def test_resume_adopts_orphans_drops_partial_lines_and_leaves_other_files_alone(tmp_path, tiny_model_dir):
    model = str(tiny_model_dir)
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [{"prompt": "a cat", "seed": 5}, {"prompt": "a dog", "seed": 6},
                                                 {"prompt": "a cow", "seed": 7}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "00003-7-euler.png").write_bytes(b"someone else's file")
    warnings = []
    first = run(jobs, out, model=model, warn=warnings.append)
    assert (first.made, first.failed) == (2, 1) and "00003-7-euler.png: a different file" in warnings[0]
    assert (out / "00003-7-euler.png").read_bytes() == b"someone else's file"
    (out / "00003-7-euler.png").unlink()

    # a kill between a PNG's rename and its manifest line, and another in the middle of writing a line
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    (out / "manifest.jsonl").write_bytes(lines[0] + lines[1][:40])
    (out / ".batch-x.png.tmp").write_bytes(b"half a png")
    again = run(jobs, out, model=model)
    assert (again.made, again.existing, again.failed) == (2, 1, 0)
    assert_complete(out, {"00001-5-euler", "00002-6-euler", "00003-7-euler"})
    assert manifest(out)["00002-6-euler"]["sha256"] == json.loads(lines[1])["sha256"]  # the same bytes again

    assert run(jobs, out, model=model).made == 0
    with pytest.raises(ValueError, match="made with steps 2, this run asks for 3"):
        run(jobs, out, model=model, defaults={"steps": 3})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.jsonl").write_text("my notes\n")
    with pytest.raises(ValueError, match="not a `stablediff batch` manifest"):
        run(jobs, tmp_path / "mine", model=model)
    with batch.Manifest(out), pytest.raises(ValueError, match="another `stablediff batch` is writing there"):
        run(jobs, out, model=model)


def test_killed_run_resumes_to_exactly_the_full_set(tmp_path, tiny_model_dir, env):
    jobs = write_jsonl(tmp_path / "jobs.jsonl", JOB_ROWS)
    out = tmp_path / "out"
    args = [jobs, "--model", tiny_model_dir, "--output-dir", out, "--steps", "6", "--seeds", "1-3", "--quiet"]
    proc = cli_batch(args, env)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        text = (out / "manifest.jsonl").read_text() if (out / "manifest.jsonl").exists() else ""
        if text.count("\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = manifest(out)  # whatever a kill leaves: whole lines for whole files
    assert len(done) >= 2
    for e in done.values():
        Image.open(out / e["file"]).load()

    proc = cli_batch(args, env)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"{len(done)} already there, 0 failed" in stdout
    assert_complete(out, {k for k in batch.plan(batch.read_jobs(jobs)[0], DEFAULTS, seeds=[1, 2, 3]).images})


# --- the same job locally and on Ray ------------------------------------------------------------------------------

def test_local_and_ray_make_the_same_files_and_manifest(tmp_path, tiny_model_dir, env):
    pytest.importorskip("ray.data", reason='the Ray test needs pip install "ray[data]"')
    jobs = write_jsonl(tmp_path / "jobs.jsonl", JOB_ROWS)
    common = [jobs, "--model", tiny_model_dir, "--steps", "2", "--quiet"]
    runs = {"local": cli_batch([*common, "--output-dir", tmp_path / "local"], env)}
    runs["ray"] = cli_batch([*common, "--output-dir", tmp_path / "ray", "--ray", "--workers", "2"], env)
    for name, proc in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, stderr)
        assert "14 images made" in stdout, (name, stdout)
    local, ray = manifest(tmp_path / "local"), manifest(tmp_path / "ray")
    assert len(local) == 14
    for entries in (local, ray):
        for e in entries.values():
            del e["seconds"]
    assert local == ray
    for key, e in local.items():
        assert (tmp_path / "local" / e["file"]).read_bytes() == (tmp_path / "ray" / e["file"]).read_bytes()


def test_manifest_records_the_noise_source_where_not_the_default():
    rows = [batch.Row(1, {"prompt": "a", "seed": 4})]
    plain = batch.plan(rows, DEFAULTS).images["00001-4-euler"]["params"]
    assert "rng" not in plain and "ensd" not in plain
    nv = batch.plan(rows, DEFAULTS.replace(rng="nv", ensd=31337)).images["00001-4-euler"]["params"]
    assert (nv["rng"], nv["ensd"], list(nv)[-1]) == ("nv", 31337, "seed")


def test_rows_may_ask_for_seamless_tiling():
    rows = [batch.Row(2, {"prompt": "a", "seed": 1, "tiling": "true"}), batch.Row(3, {"prompt": "b", "tiling": "x"})]
    work = batch.plan(rows, DEFAULTS)
    assert work.units[0].params.tiling is True
    assert work.problems == [(3, "tiling 'x' is not true or false")]
