"""The command line as a new user meets it: real subprocesses of `python -m stablediff` and the `stablediff` script.

Where a case only differs in its arguments (each bad input, each missing path), `cli.main` runs in this process
instead: the same code without paying a torch import per case."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image


CANONICAL = ["euler", "euler_a", "heun", "lms", "dpm2", "dpm2_a", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "pndm",
             "unipc", "ddpm", "deis"]


@pytest.fixture
def env(tmp_path):
    # one torch thread each: the machine is shared, and two threads fighting over it make tiny models crawl
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run(args, env, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "stablediff", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("stablediff: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- help is instant --------------------------------------------------------------------------------------------

def _min_wall(cmd, env, n=3):
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        best = min(best, time.perf_counter() - t)
        assert res.returncode == 0, res.stderr
        assert "generate" in res.stdout and "samplers" in res.stdout and "info" in res.stdout
    return best


def test_help_is_fast_module(env):
    assert _min_wall([sys.executable, "-m", "stablediff", "--help"], env) < 0.5


def test_help_is_fast_script(env):
    script = shutil.which("stablediff") or os.path.join(os.path.dirname(sys.executable), "stablediff")
    assert os.path.exists(script), "the stablediff console script is not installed (pip install -e .)"
    assert _min_wall([script, "--help"], env) < 0.5


def test_parser_imports_no_torch(env):
    code = "import sys; from stablediff.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.stdout.strip() == "False", res.stderr


def test_version_and_no_command(env):
    res = run(["--version"], env)
    assert res.returncode == 0 and res.stdout.startswith("stablediff ")
    assert_one_line_error(run([], env), "generate")


# --- bad input: one line, exit 2, before any model is loaded ----------------------------------------------------

BAD = [  # (arguments, what the one line must mention)
    (["--width", "513"], ("width", "513")),
    (["--height", "4104"], ("height", "4104")),
    (["--width", "56"], ("width", "56")),
    (["--steps", "0"], ("steps", "0")),
    (["--steps", "1001"], ("steps", "1001")),
    (["--batch-size", "0"], ("batch", "0")),
    (["--cfg-scale", "nan"], ("cfg", "nan")),
    (["--cfg-scale", "inf"], ("cfg", "inf")),
    (["--sampler", "bogus"], ("bogus",)),
    (["--sampler", "ddim", "--schedule", "karras"], ("ddim", "karras")),
    (["--clip-skip", "13"], ("clip", "13")),
    (["--clip-skip", "0"], ("clip", "0")),
    (["--steps", "abc"], ("steps", "abc")),
    (["--width", "5x"], ("width", "5x")),
    (["--seed", "-1"], ("seed", "-1")),
]


def _main_in_process(argv, capsys):
    """cli.main in this process (torch is already imported here, so each case takes milliseconds)."""
    from stablediff import cli

    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


@pytest.mark.parametrize("args,needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input(tmp_path, capsys, args, needles):
    # the model file exists but is garbage: if anything tried to load it, the error would be about the file
    model = tmp_path / "corrupt.safetensors"
    model.write_bytes(b"not a checkpoint")
    res = _main_in_process(["generate", "a dog", "--model", str(model), "--output-dir", str(tmp_path / "out"),
                            *args], capsys)
    assert_one_line_error(res, *needles)
    assert "corrupt" not in res.stderr


@pytest.mark.parametrize("args,needles", [BAD[0], BAD[12]], ids=["check_params", "argparse"])
def test_bad_input_subprocess(tmp_path, env, args, needles):
    model = tmp_path / "corrupt.safetensors"
    model.write_bytes(b"not a checkpoint")
    res = run(["generate", "a dog", "--model", str(model), "--output-dir", str(tmp_path / "out"), *args], env)
    assert_one_line_error(res, *needles)
    assert "corrupt" not in res.stderr


def test_bad_sampler_lists_the_valid_ones(tmp_path, capsys):
    res = _main_in_process(["generate", "a dog", "--sampler", "bogus", "--output-dir", str(tmp_path)], capsys)
    assert_one_line_error(res, "bogus", "euler_a", "dpmpp_2m")


@pytest.mark.parametrize("model", ["missing/dir/model.safetensors", "nope.ckpt", "./nowhere", "/abs/none",
                                   "models/sd15"])
def test_missing_model_path(tmp_path, capsys, monkeypatch, model):
    (tmp_path / "models").mkdir()  # "models/sd15" is then a missing local folder, not a Hub id
    monkeypatch.chdir(tmp_path)
    res = _main_in_process(["generate", "a dog", "--model", model, "--output-dir", str(tmp_path / "out")], capsys)
    assert_one_line_error(res, model)


def test_hub_id_is_not_taken_for_a_path():
    from stablediff.cli_options import check_model_source

    check_model_source("stable-diffusion-v1-5/stable-diffusion-v1-5")  # no error: left to the loader


def test_unwritable_output_dir(tmp_path, capsys):
    model = tmp_path / "corrupt.safetensors"
    model.write_bytes(b"not a checkpoint")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = _main_in_process(["generate", "a dog", "--model", str(model), "--output-dir", str(blocker / "sub")], capsys)
    assert_one_line_error(res, str(blocker / "sub"))


def test_corrupt_checkpoint_is_one_line(tmp_path, env, capsys):
    model = tmp_path / "corrupt.safetensors"
    model.write_bytes(b"not a checkpoint")
    res = run(["generate", "a dog", "--model", str(model), "--output-dir", str(tmp_path / "out")], env)
    assert_one_line_error(res, "corrupt.safetensors")
    assert_one_line_error(_main_in_process(["info", str(model)], capsys), "corrupt.safetensors")


def test_info_missing_path(tmp_path, capsys):
    assert_one_line_error(_main_in_process(["info", str(tmp_path / "none.safetensors")], capsys), "none.safetensors")


# --- samplers ---------------------------------------------------------------------------------------------------

def test_samplers_lists_every_canonical_name(env):
    res = run(["samplers"], env)
    assert res.returncode == 0, res.stderr
    first_column = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert set(CANONICAL) <= first_column
    assert "Euler a" in res.stdout and "DPM++ 2M" in res.stdout


# --- end to end on a tiny random model --------------------------------------------------------------------------

def test_generate_end_to_end(tiny_model_dir, tmp_path, env):
    out = tmp_path / "outputs"
    args = ["generate", "a red circle", "--model", str(tiny_model_dir), "--steps", "3", "--seed", "5",
            "--device", "cpu", "--output-dir", str(out)]
    first = run(args, env)
    assert first.returncode == 0, first.stderr
    second = run(args + ["--quiet"], env)
    assert second.returncode == 0, second.stderr

    assert sorted(os.listdir(out)) == ["00000-5.png", "00001-5.png"]
    assert first.stdout.strip() == str(out / "00000-5.png")
    assert second.stdout.strip() == str(out / "00001-5.png")
    assert "Traceback" not in first.stderr and second.stderr.strip() == ""  # --quiet: no progress bar
    with Image.open(out / "00000-5.png") as a, Image.open(out / "00001-5.png") as b:
        assert a.size == (64, 64) and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))
        text = a.text["parameters"]
        assert b.text["parameters"] == text
    assert re.fullmatch(r"a red circle\nSteps: 3, Sampler: euler, Schedule type: Automatic, CFG scale: 7\.0, Seed: 5, "
                        r"Size: 64x64, "
                        r"Model hash: [0-9a-f]{10}, Model: tiny-sd, RNG: CPU, Version: stablediff \d+\.\d+\.\d+\S*", text), text


def test_generate_batch_and_options(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "o"
    args = ["generate", "a cat", "--negative-prompt", "blurry, dark", "--model", str(tiny_model_dir), "--steps", "2",
            "--seed", "9", "--batch-size", "2", "--sampler", "DPM++ 2M Karras", "--clip-skip", "2", "--width", "72",
            "--height", "64", "--cfg-scale", "5.5", "--quiet", "--output-dir", str(out)]
    res = _main_in_process(args, capsys)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(out)) == ["00000-9.png", "00001-10.png"]
    with Image.open(out / "00001-10.png") as im:
        assert im.size == (72, 64)
        text = im.text["parameters"]
    lines = text.splitlines()
    assert lines[:2] == ["a cat", "Negative prompt: blurry, dark"]
    assert lines[2].startswith("Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 10, "
                               "Size: 72x64, Model hash: "), text
    assert ", Clip skip: 2, RNG: CPU, Version: stablediff " in lines[2], text


def test_info_on_folder(tiny_model_dir, env):
    res = run(["info", str(tiny_model_dir)], env)
    assert res.returncode == 0, res.stderr
    rows = {line.split("  ")[0]: line for line in res.stdout.splitlines()}
    assert "diffusers" in rows["layout"] and "sd1" in rows["family"]
    assert "64x64" in rows["native size"]
    assert "4 (text-to-image)" in rows["unet in_channels"]
    for component in ("unet", "vae", "text_encoder"):
        assert "parameters" in rows[component] and "float32" in rows[component]


def test_ctrl_c_exits_130_quietly(tiny_model_dir, tmp_path, env):
    """Ctrl-C in the middle of sampling (once the progress bar shows): exit 130, no traceback, no file."""
    import selectors

    proc = subprocess.Popen([sys.executable, "-m", "stablediff", "generate", "x", "--model", str(tiny_model_dir),
                             "--steps", "500", "--seed", "1", "--output-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            # a shell's background job inherits SIGINT ignored: give the child the default back
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = b"", time.monotonic() + 60
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while b"/500" not in seen and proc.poll() is None and time.monotonic() < deadline:
            if sel.select(timeout=1):
                seen += os.read(proc.stderr.fileno(), 4096)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    stderr = (seen + stderr).decode(errors="replace")
    assert b"/500" in seen, stderr  # sampling had begun
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert not any(name.endswith(".png") for name in os.listdir(tmp_path))


def test_from_png_remakes_the_image_and_takes_overrides(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, again, changed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    args = ["generate", "a cat, dark", "--negative-prompt", "blurry", "--model", str(tiny_model_dir),
            "--steps", "2", "--seed", "9", "--sampler", "DPM++ 2M Karras", "--clip-skip", "2", "--width", "72",
            "--height", "64", "--cfg-scale", "5.5", "--quiet"]
    assert _main_in_process([*args, "--output-dir", str(first)], capsys).returncode == 0
    png = first / "00000-9.png"
    res = _main_in_process(["generate", "--from-png", str(png), "--model", str(tiny_model_dir), "--quiet",
                            "--output-dir", str(again)], capsys)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    with Image.open(png) as a, Image.open(again / "00000-9.png") as b:
        assert a.text["parameters"] == b.text["parameters"]
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # options on the command line win over the PNG's; the rest still comes from it
    res = _main_in_process(["generate", "a dog", "--from-png", str(png), "--model", str(tiny_model_dir),
                            "--steps=3", "--quiet", "--output-dir", str(changed)], capsys)
    assert res.returncode == 0, res.stderr
    with Image.open(changed / "00000-9.png") as c:
        text = c.text["parameters"]
    assert text.startswith("a dog\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, "
                           "CFG scale: 5.5, Seed: 9, Size: 72x64, "), text


def test_from_png_keeps_eta(tiny_model_dir, tmp_path, capsys):
    """A DDIM image made with eta 1 ("Eta DDIM: 1.0") is remade with it: the same text and pixels."""
    args = ["generate", "a cat", "--model", str(tiny_model_dir), "--steps", "3", "--seed", "4", "--sampler", "DDIM",
            "--eta", "1", "--width", "64", "--height", "64", "--quiet"]
    assert _main_in_process([*args, "--output-dir", str(tmp_path / "a")], capsys).returncode == 0
    png = tmp_path / "a" / "00000-4.png"
    res = _main_in_process(["generate", "--from-png", str(png), "--model", str(tiny_model_dir), "--quiet",
                            "--output-dir", str(tmp_path / "b")], capsys)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    with Image.open(png) as a, Image.open(tmp_path / "b" / "00000-4.png") as b:
        assert "Eta DDIM: 1.0" in a.text["parameters"] and a.text["parameters"] == b.text["parameters"]
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sigma_churn_options_and_from_png(tiny_model_dir, tmp_path, capsys):
    """--s-churn / --s-tmin / --s-tmax / --s-noise reach A1111's Heun (the image changes, "Sigma churn" etc. are
    written), --from-png remakes it with them; a negative churn is a usage error before the model loads."""
    args = ["generate", "a cat", "--model", str(tiny_model_dir), "--steps", "3", "--seed", "4", "--sampler", "Heun",
            "--width", "64", "--height", "64", "--quiet"]
    churn = ["--s-churn", "5", "--s-tmin", "0.1", "--s-tmax", "20", "--s-noise", "0.95"]
    assert _main_in_process([*args, *churn, "--output-dir", str(tmp_path / "a")], capsys).returncode == 0
    assert _main_in_process([*args, "--output-dir", str(tmp_path / "plain")], capsys).returncode == 0
    png = tmp_path / "a" / "00000-4.png"
    res = _main_in_process(["generate", "--from-png", str(png), "--model", str(tiny_model_dir), "--quiet",
                            "--output-dir", str(tmp_path / "b")], capsys)
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    with Image.open(png) as a, Image.open(tmp_path / "b" / "00000-4.png") as b, \
            Image.open(tmp_path / "plain" / "00000-4.png") as plain:
        assert "Sigma churn: 5.0, Sigma tmin: 0.1, Sigma tmax: 20.0, Sigma noise: 0.95" in a.text["parameters"]
        assert a.text["parameters"] == b.text["parameters"]
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(plain)) and "Sigma" not in plain.text["parameters"]
    res = _main_in_process([*args, "--s-churn", "-1", "--output-dir", str(tmp_path / "c")], capsys)
    assert res.returncode == 2 and "s_churn -1.0 is outside 0..100" in res.stderr and "Traceback" not in res.stderr


def test_from_png_names_what_it_does_not_use_and_refuses_a_png_without_parameters(tiny_model_dir, tmp_path,
                                                                                    capsys):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, "
                                "Model hash: 0123456789, Face restoration: CodeFormer, Denoising strength: 0.4")
    png = tmp_path / "a1111.png"
    Image.new("RGB", (64, 64)).save(png, pnginfo=info)
    res = _main_in_process(["generate", "--from-png", str(png), "--model", str(tiny_model_dir), "--quiet",
                            "--output-dir", str(tmp_path / "o")], capsys)
    assert res.returncode == 0, res.stderr
    warning = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "Face restoration: CodeFormer" in warning[0], res.stderr
    assert "Denoising strength: 0.4" in warning[0] and "Model hash" not in warning[0]
    with Image.open(tmp_path / "o" / "00000-3.png") as im:
        text = im.text["parameters"]  # A1111's Euler, its own schedule, and its GPU noise (no RNG in the text)
    assert text.startswith("a cat\nSteps: 2, Sampler: Euler, Schedule type: Uniform, CFG scale: 7.0, Seed: 3, ")
    assert ", RNG: GPU, " in text

    bare = tmp_path / "bare.png"
    Image.new("RGB", (64, 64)).save(bare)
    res = _main_in_process(["generate", "--from-png", str(bare), "--model", str(tiny_model_dir),
                            "--output-dir", str(tmp_path / "o2")], capsys)
    assert_one_line_error(res, "--from-png", "bare.png", "no generation parameters")
    res = _main_in_process(["generate", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o3")],
                           capsys)
    assert_one_line_error(res, "PROMPT", "--from-png")


def test_preview_file_is_written_atomically_and_never_over_a_file_that_is_not_ours(tmp_path, capsys, monkeypatch):
    from stablediff import preview_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    written = []
    write = preview_file.write
    monkeypatch.setattr(preview_file, "write", lambda path, image: written.append(image.size) or write(path, image))
    args = ["generate", "a red circle", "--model", "demo", "--steps", "4", "--seed", "1", "--quiet",
            "--output-dir", str(out), "--preview-every", "2"]
    res = _main_in_process(args, capsys)
    assert res.returncode == 0, res.stderr
    preview = out / "preview.png"  # the default: in --output-dir
    assert written == [(64, 64), (64, 64)]  # steps 2 and 4, A1111's Approx cheap at the image's size
    assert preview_file.is_ours(preview) and sorted(os.listdir(out)) == ["00000-1.png", "preview.png"]
    # the last step's denoised estimate (Euler's last step lands on it: the final latents) through the cheap map
    from stablediff.pipeline import StableDiffusion
    from stablediff.taesd import cheap_preview

    final = StableDiffusion.from_pretrained("demo")("a red circle", steps=4, seed=1).latents[0]
    with Image.open(preview) as im:
        assert "parameters" not in im.info
        diff = np.asarray(im, dtype=int) - np.asarray(cheap_preview(final, upscale=8), dtype=int)
    assert np.abs(diff).max() <= 1
    # our preview from before is replaced; a file of anyone else's at the path is refused before the model loads
    assert _main_in_process([*args, "--preview-file", str(preview)], capsys).returncode == 0
    theirs = tmp_path / "mine.png"
    Image.new("RGB", (8, 8), "red").save(theirs)
    before = theirs.read_bytes()
    written.clear()
    corrupt = tmp_path / "corrupt.safetensors"  # were it loaded, the error would be about it
    corrupt.write_bytes(b"not a checkpoint")
    res = _main_in_process([*args, "--model", str(corrupt), "--preview-file", str(theirs)], capsys)
    assert_one_line_error(res, "--preview-file", "mine.png", "not a preview stablediff wrote")
    assert theirs.read_bytes() == before and written == []
    res = _main_in_process([*args, "--preview-every", "0"], capsys)
    assert_one_line_error(res, "--preview-every 0", "at least 1")
    res = _main_in_process([*args[:-2], "--preview-file", str(preview)], capsys)
    assert_one_line_error(res, "--preview-file", "needs --preview-every")
    # a file put there during the run: a warning, no more previews, the image still made
    late = tmp_path / "late.png"

    def someone_else_saves_first(path, image):
        if not late.exists():
            theirs.rename(late)
        write(path, image)

    monkeypatch.setattr(preview_file, "write", someone_else_saves_first)
    res = _main_in_process([*args, "--preview-file", str(late), "--output-dir", str(tmp_path / "o2")], capsys)
    assert res.returncode == 0 and late.read_bytes() == before, res.stderr
    assert res.stderr.count("no more previews") == 1 and os.listdir(tmp_path / "o2") == ["00000-1.png"]
