"""What a careless or hostile user of the command line meets (issue 19): bounds on the work asked for, job files and
manifests that are not ours, seeds past the last one, a full disk.

Every refusal is one line on stderr naming the bad value, exit 2 for bad input and 1 for a failure while running,
no traceback, and (for limits) before any model is loaded. Most cases run `cli.main` in this process (torch is
already imported, so each takes milliseconds); a few run the real command to prove there is no traceback and that
the answer comes at once. Real runs use `--model demo` (64x64, a fraction of a second an image)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_cli import _main_in_process, assert_one_line_error

from stablediff import cli, images, limits
from stablediff.serve import batch, jobs
from stablediff.limits import Limits



def disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def no_load(monkeypatch):
    """cli.load_model replaced by a recorder that stops the command: the list says whether a model was asked for."""
    calls = []

    def load_model(args):
        calls.append(args.model)
        raise cli.UsageError("stopped before loading (test)")

    monkeypatch.setattr(cli, "load_model", load_model)
    return calls


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def generate(tmp_path, *args):
    return ["generate", "a red circle", "--model", "demo", "--output-dir", str(tmp_path / "out"), *args]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- limits on one command: refused before any model is loaded -----------------------------------------------

LIMITED = [  # (arguments, what the one line must mention; its last words name the flag that raises the bound)
    (["--batch-size", "10000"], ("batch size 10000", "2,621,440,000", "--max-batch-pixels")),
    (["--batch-size", "9", "--max-images", "8"], ("images 9", "--max-images")),
    (["--steps", "600"], ("steps 600", "500", "--max-steps")),
    (["--width", "4096", "--height", "4096"], ("4096x4096", "--max-pixels")),
    (["--width", "1024", "--max-pixels", "500000"], ("1024x512", "--max-pixels")),  # a size left out counts as 512
    (["--steps", "200", "--max-work", "100"], ("work", "200", "--max-work")),
    (["--negative-prompt", "blurry " * 1001], ("negative prompt length in tokens 1,003", "--max-prompt-tokens")),
    # (BOS and EOS count: the text encoder's tokens)
    (["--max-prompt-tokens", "5", "--negative-prompt", "a b c d"], ("negative prompt", "tokens 6", "limit of 5")),
]


@pytest.mark.parametrize("args,needles", LIMITED, ids=[" ".join(a)[:40] for a, _ in LIMITED])
def test_work_over_a_limit_is_one_line_before_loading(tmp_path, capsys, no_load, args, needles):
    res = _main_in_process(generate(tmp_path, *args), capsys)
    assert_one_line_error(res, *needles)
    assert res.stderr.rstrip().endswith(")") and "(set with --max-" in res.stderr
    assert no_load == []


def test_prompt_is_measured_in_characters_before_tokens(tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.setattr(limits, "count_tokens", lambda text: pytest.fail("a 10 MB prompt was tokenized"))
    res = _main_in_process(["generate", "x" * 10_000_000, "--model", "demo", "--output-dir", str(tmp_path)], capsys)
    assert_one_line_error(res, "prompt length in characters 10,000,000", "--max-prompt-tokens")
    assert no_load == []


@pytest.mark.parametrize("args,needle", [(["--max-steps", "0"], "--max-steps 0"),
                                         (["--max-images", "-5"], "--max-images -5"),
                                         (["--max-work", "lots"], "--max-work")])
def test_bad_limit_flags(tmp_path, capsys, no_load, args, needle):
    assert_one_line_error(_main_in_process(generate(tmp_path, *args), capsys), needle)


def test_a_raised_limit_lets_the_run_through(tmp_path, capsys, no_load):
    res = _main_in_process(generate(tmp_path, "--steps", "600", "--max-steps", "600"), capsys)
    assert "stopped before loading (test)" in res.stderr and no_load == ["demo"]


def test_a_value_no_limit_allows_is_not_blamed_on_a_limit(tmp_path, capsys, no_load):
    res = _main_in_process(generate(tmp_path, "--steps", "1001", "--max-steps", "5000"), capsys)
    assert_one_line_error(res, "steps 1001 is outside 1..1000")


@pytest.mark.parametrize("command", ["img2img", "inpaint"])
def test_img2img_counts_the_init_image_size(tmp_path, capsys, no_load, command):
    from PIL import Image

    Image.new("RGB", (100, 76)).save(tmp_path / "in.png")  # runs at 96x72, rounded down to multiples of 8
    args = [command, "a cat", "--init-image", str(tmp_path / "in.png"), "--model", "demo", "--output-dir",
            str(tmp_path / "out"), "--max-pixels", "6000"]
    args += ["--mask", str(tmp_path / "in.png")] if command == "inpaint" else []
    assert_one_line_error(_main_in_process(args, capsys), "96x72 = 6,912", "--max-pixels")
    assert no_load == []


def test_decompression_bomb_is_one_line(tmp_path, capsys, no_load):
    """A PNG whose header claims 30000x30000 pixels: PIL refuses it unread, with an error that is no ValueError."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    res = _main_in_process(["img2img", "a cat", "--init-image", str(bomb), "--model", "demo", "--output-dir",
                            str(tmp_path)], capsys)
    assert_one_line_error(res, "--init-image", "bomb.png", "900,000,000 pixels")
    assert no_load == []


def test_limit_error_is_fast_and_one_line_from_a_shell(tmp_path, env):
    """The whole command, interpreter start and the torch import included, with a Hub id that cannot be reached:
    had anything tried to load it, the error would be about the Hub. Timed in the child's CPU seconds (about 2,
    mostly importing torch), which other jobs on a shared machine stretch far less than the wall clock."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([sys.executable, "-m", "stablediff", "generate", "a dog", "--batch-size", "10000",
                          "--model", "nobody/no-such-model", "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime < 5
    assert_one_line_error(res, "batch size 10000", "--max-batch-pixels")
    assert "nobody" not in res.stderr


# --- seeds past the last one --------------------------------------------------------------------------------------

def test_seed_run_past_the_last_seed(tmp_path, capsys, no_load):
    res = _main_in_process(generate(tmp_path, "--seed", "4294967295", "--batch-size", "2"), capsys)
    assert_one_line_error(res, "seed 4294967295 + 2 images runs past 4294967295", "seed 4294967294 or less")
    assert no_load == []
    _main_in_process(generate(tmp_path, "--seed", "4294967294", "--batch-size", "2"), capsys)
    assert no_load == ["demo"]  # the last seed itself is fine


def test_batch_row_seed_run_past_the_last_seed(tmp_path, capsys, no_load):
    jobs_file = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "a", "seed": 4294967295, "batch_size": 2}])
    res = _main_in_process(["batch", str(jobs_file), "--model", "demo", "--output-dir", str(tmp_path)], capsys)
    assert_one_line_error(res, "line 1: seed 4294967295 + 2 images runs past 4294967295")
    # --seed of a batch is the base its rows' seeds come from, not a first image's seed
    write_jsonl(jobs_file, [{"prompt": "a", "batch_size": 2}])
    _main_in_process(["batch", str(jobs_file), "--model", "demo", "--seed", "4294967295", "--batch-size", "2",
                      "--output-dir", str(tmp_path)], capsys)
    assert no_load == ["demo"]


# --- the batch plan is bounded before it is built -----------------------------------------------------------------

def test_parse_seeds_counts_before_building():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"--seeds '0-4294967295': seeds 4,294,967,296 is over the limit of 800 "
                                         r"\(set with --max-images\)"):
        jobs.parse_seeds("0-4294967295")
    assert time.perf_counter() - start < 0.1  # 2**32 ints would take minutes and 150 GB
    assert jobs.parse_seeds("1-500,300-800") == list(range(1, 801))  # overlaps counted once: 800 seeds
    with pytest.raises(ValueError, match="seeds 801"):
        jobs.parse_seeds("1-500,300-801")
    assert jobs.parse_seeds("5,1-3,2", Limits(max_images=4)) == [1, 2, 3, 5]
    for bad in ["1-", "-3", "x", "3-1", "1-4294967296", "9" * 5000]:
        with pytest.raises(ValueError, match="--seeds"):
            jobs.parse_seeds(bad)


def test_batch_sweep_over_the_limits_is_one_line(tmp_path, capsys, no_load):
    jobs_file = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    base = ["batch", str(jobs_file), "--model", "demo", "--output-dir", str(tmp_path / "out")]
    start = time.perf_counter()
    res = _main_in_process([*base, "--seeds", "0-2999999", "--samplers", "euler,dpmpp_2m"], capsys)
    assert time.perf_counter() - start < 2
    assert_one_line_error(res, "seeds 3,000,000", "--max-images")
    # each row alone fits; the job is refused at the row where it goes over
    res = _main_in_process([*base, "--seeds", "0-399", "--samplers", "euler,dpmpp_2m"], capsys)
    assert_one_line_error(res, "up to line 2", "images (rows x seeds x samplers) = 1,600", "--max-images")
    res = _main_in_process([*base, "--seeds", "1-400", "--steps", "300"], capsys)  # 400 x 300 steps of 512x512 a row
    assert_one_line_error(res, "up to line 2", "work", "= 240,000 is over the limit of 120,000", "--max-work")
    assert no_load == []


def test_batch_rows_over_the_limits(tmp_path, capsys, no_load):
    rows = [{"prompt": "ok", "batch_size": 8}] * 100 + [{"prompt": "one too many"}]
    jobs_file = write_jsonl(tmp_path / "j.jsonl", rows)
    out = str(tmp_path / "out")
    res = _main_in_process(["batch", str(jobs_file), "--model", "demo", "--output-dir", out], capsys)
    assert_one_line_error(res, "the job up to line 101", "= 801", "--max-images")
    rows = [{"prompt": "a", "steps": 600}, {"prompt": "b", "batch_size": 10000}, {"prompt": "c " * 1001},
            {"prompt": "d", "width": 4096, "height": 4096}, "[" * 100_000, {"prompt": "fine"}]
    write_jsonl(jobs_file, rows)
    res = _main_in_process(["batch", str(jobs_file), "--model", "demo", "--output-dir", out], capsys)
    err = res.stderr
    assert res.returncode == 2 and err.splitlines()[-1].startswith("stablediff: error: ")
    for needle in ["line 1: steps 600 is over the limit of 500 (set with --max-steps)",
                   "line 2: batch size 10000 x 512x512", "line 3: prompt length in tokens 1,003",
                   "line 4: image size 4096x4096", "line 5: JSON nested too deeply",
                   "5 bad rows (lines 1, 2, 3, 4, 5)"]:
        assert needle in err, (needle, err)
    assert "Traceback" not in err and no_load == []


# --- manifests we did not write ------------------------------------------------------------------------------------

FOREIGN = [  # manifest.jsonl text someone else wrote (or edited), and what the error must say about it
    ('{"key": "a", "file": "a.png"}\n{"key": "b", "file": "b.png"}\n', "line 1", 'no "stablediff" field'),
    ('{"key": "a", "file": "a.png"}', "line 1", 'no "stablediff" field'),  # no newline: not a cut line of ours
    ("my notes\n", "line 1", "not JSON"),
    ('{"stablediff": "0.1.0", "key": "k", "file": "k.png", "params": 5, "model": "demo"}\n', "line 1",
     "params 5 is not an object"),
    ('{"stablediff": "9", "key": "k", "file": "../k.png", "params": {}, "model": "demo"}\n', "line 1",
     "file '../k.png' is not the key's k.png"),
    ('{"stablediff": "9", "key": "k", "file": "k.png", "params": {}}\n', "line 1", "no 'model' field"),
    ("[1, 2]\n", "line 1", "a JSON list"),
    ("\n" + "[" * 100_000 + "\n", "line 2", "JSON nested too deeply"),
]


@pytest.mark.parametrize("text,line,why", FOREIGN, ids=[f[2][:30] for f in FOREIGN])
def test_a_manifest_we_did_not_write_is_left_byte_identical(tmp_path, capsys, no_load, text, line, why):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.png", "k.png"):
        (out / name).write_bytes(b"their picture")
    (out / "manifest.jsonl").write_text(text)
    jobs_file = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "a"}])
    res = _main_in_process(["batch", str(jobs_file), "--model", "demo", "--output-dir", str(out)], capsys)
    assert_one_line_error(res, f"manifest.jsonl: {line} is not a `stablediff batch` manifest entry ({why}")
    assert (out / "manifest.jsonl").read_text() == text
    assert no_load == []


def test_foreign_manifest_from_a_shell(tmp_path, env):
    out = tmp_path / "out"
    out.mkdir()
    text = '{"stablediff": "0.1.0", "key": "k", "file": "k.png", "params": 5, "model": "demo"}\n'
    (out / "manifest.jsonl").write_text(text)
    jobs_file = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "a"}])
    res = subprocess.run([sys.executable, "-m", "stablediff", "batch", str(jobs_file), "--model", "demo",
                          "--output-dir", str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert_one_line_error(res, "line 1", "params 5 is not an object")
    assert (out / "manifest.jsonl").read_text() == text


def run_demo_batch(tmp_path, capsys, rows, *args):
    jobs_file = write_jsonl(tmp_path / "j.jsonl", rows)
    out = tmp_path / "out"
    res = _main_in_process(["batch", str(jobs_file), "--model", "demo", "--steps", "2", "--quiet", "--output-dir",
                            str(out), *args], capsys)
    return res, out


def test_our_old_and_new_lines_resume(tmp_path, capsys):
    rows = [{"prompt": "a red circle", "seed": 1}, {"prompt": "a blue square", "seed": 2}]
    res, out = run_demo_batch(tmp_path, capsys, rows[:1])
    assert res.returncode == 0, res.stderr
    manifest = out / "manifest.jsonl"
    entry = json.loads(manifest.read_text())
    assert list(entry)[0] == "stablediff" and set(entry) - {"stablediff"} == batch.OLD_FIELDS

    del entry["stablediff"]  # as 0.1.0 wrote it, and without its newline (a whole line: kept, not dropped)
    manifest.write_text(json.dumps(entry))
    res, out = run_demo_batch(tmp_path, capsys, rows)
    assert res.returncode == 0, res.stderr
    assert "1 images made" in res.stdout and "1 already there" in res.stdout
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [e["key"] for e in lines] == ["00001-1-euler", "00002-2-euler"]

    lines[0]["params"]["extra"] = 1  # a setting this version does not know: named, not a StopIteration
    manifest.write_text("".join(json.dumps(e) + "\n" for e in lines))
    res, _ = run_demo_batch(tmp_path, capsys, rows)
    assert_one_line_error(res, "00001-1-euler.png was made with extra 1, this run asks for None")


# --- a full disk ---------------------------------------------------------------------------------------------------

@pytest.fixture
def full_disk(monkeypatch, tmp_path):
    """images.save_png fails with ENOSPC in tmp_path/out for every image but the first; the system's temporary
    folder is tmp_path/tmp (where the fallback goes)."""
    real, seen = images.save_png, []

    def save_png(image, directory, seed, parameters):
        seen.append(seed)
        if Path(directory) == tmp_path / "out" and len(seen) > 1:
            raise disk_full()
        return real(image, directory, seed, parameters)

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(images, "save_png", save_png)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return seen


def test_full_disk_keeps_the_images_and_names_the_seeds(tmp_path, capsys, full_disk):
    res = _main_in_process(generate(tmp_path, "--steps", "2", "--seed", "7", "--batch-size", "3", "--quiet"), capsys)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    (fallback,) = (tmp_path / "tmp").iterdir()
    assert sorted(p.name for p in fallback.iterdir()) == ["00000-8.png", "00001-9.png"]
    assert res.stderr.strip() == (
        f"stablediff: error: could not save 2 of 3 images to {tmp_path / 'out'} (No space left on device): "
        f"seeds 8, 9; saved them to {fallback} instead; the same command with --seed 7 makes them again "
        "(image k has seed + k)")
    assert res.stdout.split() == [str(tmp_path / "out" / "00000-7.png"), str(fallback / "00000-8.png"),
                                  str(fallback / "00001-9.png")]


def test_full_disk_everywhere_still_names_the_seeds(tmp_path, capsys, full_disk, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    res = _main_in_process(generate(tmp_path, "--steps", "2", "--seed", "7", "--batch-size", "2", "--quiet"), capsys)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "seeds 8; they are not saved anywhere; the same command with --seed 7 makes them again" in res.stderr

    real, fallback_saves = images.save_png, []  # the fallback folder fills up after one image

    def save_png(image, directory, seed, parameters):
        if Path(directory) != tmp_path / "out":
            fallback_saves.append(seed)
            if len(fallback_saves) > 1:
                raise disk_full()
        return real(image, directory, seed, parameters)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(images, "save_png", save_png)
    res = _main_in_process(generate(tmp_path, "--steps", "2", "--seed", "7", "--batch-size", "3", "--quiet"), capsys)
    (fallback,) = (tmp_path / "tmp").iterdir()
    assert f"could not save 3 of 3 images to {tmp_path / 'out'} (No space left on device): seeds 7, 8, 9; saved 1 " \
           f"of them to {fallback}, the rest nowhere" in res.stderr, res.stderr


def test_full_disk_in_a_batch_stops_and_resumes(tmp_path, capsys, monkeypatch):
    real = batch.save_image

    def save_image(directory, key, png):
        if key.startswith("00002"):
            raise disk_full()
        return real(directory, key, png)

    monkeypatch.setattr(batch, "save_image", save_image)
    rows = [{"prompt": "a red circle", "seed": 1}, {"prompt": "a blue square", "seed": 2}, {"prompt": "a star"}]
    res, out = run_demo_batch(tmp_path, capsys, rows)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (f"stablediff: error: {out / '00002-2-euler.png'}: cannot write it (No space left "
                                  "on device); stopped after 1 new images, all in the manifest: free space and run "
                                  "the same command again to make the rest")
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(batch, "save_image", real)
    res, out = run_demo_batch(tmp_path, capsys, rows)
    assert res.returncode == 0 and "2 images made" in res.stdout and "1 already there" in res.stdout


def test_batch_passes_lora_and_cache_interval_on_as_generate_does(tmp_path, capsys):
    """They were accepted and silently dropped: a batch image must equal `generate`'s with the same options."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    (tmp_path / "loras").mkdir()
    g = torch.Generator().manual_seed(0)
    from stablediff import StableDiffusion

    w = StableDiffusion.from_pretrained("demo").unet.conv_in.weight
    save_file({"lora_unet_conv_in.lora_down.weight": torch.randn(2, *w.shape[1:], generator=g),
               "lora_unet_conv_in.lora_up.weight": torch.randn(w.shape[0], 2, 1, 1, generator=g),
               "lora_unet_conv_in.alpha": torch.tensor(2.0)}, str(tmp_path / "loras" / "style.safetensors"))
    options = ["--model", "demo", "--steps", "6", "--lora", "style:0.8", "--lora-dir", str(tmp_path / "loras"),
               "--cache-interval", "2", "--quiet"]
    jobs_file = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "a red circle", "seed": 3}])
    assert _main_in_process(["batch", str(jobs_file), "--output-dir", str(tmp_path / "b"), *options],
                            capsys).returncode == 0
    assert _main_in_process(["generate", "a red circle", "--seed", "3", "--output-dir", str(tmp_path / "g"),
                             *options], capsys).returncode == 0
    (made,), (reference,) = (tmp_path / "b").glob("*.png"), (tmp_path / "g").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(reference)))
    assert 'LoRA weights: "style:0.8"' in Image.open(made).info["parameters"]
    assert "Cache interval: 2" in Image.open(made).info["parameters"]
    plain = tmp_path / "plain"
    _main_in_process(["generate", "a red circle", "--seed", "3", "--output-dir", str(plain), "--model", "demo",
                      "--steps", "6", "--quiet"], capsys)
    assert not np.array_equal(np.asarray(Image.open(next(plain.glob("*.png")))), np.asarray(Image.open(made)))


def test_batch_on_ray_refuses_lora_files(tmp_path, capsys, no_load):
    jobs_file = write_jsonl(tmp_path / "j.jsonl", [{"prompt": "a"}])
    res = _main_in_process(["batch", str(jobs_file), "--model", "demo", "--output-dir", str(tmp_path), "--ray",
                            "local", "--lora", "x:0.5"], capsys)
    assert_one_line_error(res, "--lora is not supported with --ray yet")
    assert no_load == []
