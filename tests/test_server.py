"""`stablediff serve`: real uvicorn servers on free loopback ports with the tiny random model, spoken to over HTTP by
the webuiapi client (unchanged), httpx, a raw socket and headless Chromium.

Two servers: one in a thread of this process (the API, load, bad input, the web page), and one started through the
CLI in a subprocess with --api-auth and --max-queue 4 (auth, overflow, interrupt).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import serve_process  # noqa: E402
from stablediff.cli import build_parser, main  # noqa: E402
from stablediff.limits import Limits  # noqa: E402
from stablediff.params import GenerationParams  # noqa: E402
from stablediff.pipeline import StableDiffusion  # noqa: E402
from stablediff.serve.sdapi import Img2ImgRequest, Txt2ImgRequest, check_request  # noqa: E402
from stablediff.serve.server import ServeConfig, bind_warning, create_app  # noqa: E402
from stablediff.serve.worker import ClientError  # noqa: E402

AUTH = ("user", "secret: pass")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # conftest's, for every test here
    yield


@pytest.fixture(scope="module")
def models_dir(tiny_model_dir, tmp_path_factory):
    """tiny-sd and sub/tiny-b (the same weights), plus symlinks that point out of the folder (never listed)."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_model_dir, root / "tiny-sd")
    shutil.copytree(tiny_model_dir, root / "sub" / "tiny-b")
    (root / "evil").symlink_to(tiny_model_dir, target_is_directory=True)
    (root / "evil.safetensors").symlink_to(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    return root


@pytest.fixture(scope="module")
def pipe(models_dir):
    return StableDiffusion.from_pretrained(models_dir / "tiny-sd")


def _loopback_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def _uvicorn(app):
    sock = _loopback_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    """(port, output_dir) of an in-process server: tiny-sd loaded, --max-queue 32 (the load test sends 20)."""
    output_dir = tmp_path_factory.mktemp("outputs")
    app = create_app(ServeConfig(model="tiny-sd", models_dir=models_dir, max_queue=32, output_dir=output_dir,
                                 device="cpu"))
    with _uvicorn(app) as port:
        yield port, output_dir


@pytest.fixture(scope="module")
def auth_server(models_dir, tmp_path_factory):
    """Port of `stablediff serve --api-auth ... --max-queue 4` run as a subprocess."""
    out = tmp_path_factory.mktemp("auth-out")
    args = ["--models-dir", str(models_dir), "--model", "tiny-sd", "--api-auth", ":".join(AUTH), "--max-queue", "4",
            "--output-dir", str(out), "--device", "cpu"]
    with serve_process(args, out / "server.log") as (_, port):
        yield port


def _post(port, path, payload, **kw):
    return httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/{path}", json=payload, timeout=120, **kw)


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _init_image() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))


def _same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# --- the API through the webuiapi client ---------------------------------------------------------------------------

def test_webuiapi_txt2img_equals_python_api(server, pipe):
    webuiapi = pytest.importorskip("webuiapi")  # only the tests that drive the client need it
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server[0])
    r = api.txt2img(prompt="a red fox", negative_prompt="blurry", seed=1234, steps=3, width=64, height=64,
                    batch_size=2, sampler_name="Euler a", cfg_scale=6.5)
    ref = pipe("a red fox", "blurry", steps=3, cfg_scale=6.5, seed=1234, width=64, height=64, batch_size=2,
               sampler="Euler a", rng="gpu")  # A1111's API: its sampler and its default noise, GPU's
    assert len(r.images) == 2
    for got, want, text in zip(r.images, ref.images, ref.infotexts):
        assert _same(got, want)
        assert got.info["parameters"] == text  # each PNG carries A1111's parameters chunk
    assert r.info["seed"] == 1234 and r.info["all_seeds"] == [1234, 1235]
    assert r.info["infotexts"] == ref.infotexts and r.info["sampler_name"] == "Euler a"
    assert r.info["interrupted"] is False and r.parameters["steps"] == 3

    r = api.txt2img(prompt="x", seed=7, steps=2, width=64, height=64, n_iter=2, sampler_name="DPM++ 2M Karras")
    assert r.info["all_seeds"] == [7, 8] and len(r.images) == 2 and "Schedule type: Karras" in r.info["infotexts"][0]


def test_webuiapi_img2img_with_and_without_mask(server, pipe):
    webuiapi = pytest.importorskip("webuiapi")  # only the tests that drive the client need it
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server[0])
    init = _init_image()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for m in (None, mask):
        r = api.img2img(images=[init], mask_image=m, prompt="a boat", denoising_strength=0.6, steps=4, width=64,
                        height=64, seed=7, sampler_name="Euler")
        # webuiapi sends A1111's inpainting defaults: mask blur 4, masked content fill, only masked
        ref = pipe("a boat", steps=4, seed=7, sampler="Euler", width=64, height=64, init_image=init,
                   mask_image=m, strength=0.6, rng="gpu", mask_blur=4, inpainting_fill=0, inpaint_full_res=True)
        assert len(r.images) == 1 and _same(r.images[0], ref.images[0])
        assert r.info["denoising_strength"] == 0.6 and r.info["infotexts"] == ref.infotexts
        assert r.parameters["init_images"] is None  # not echoed back unless include_init_images


def test_lists_options_model_switch_and_png_info(server):
    port, output_dir = server
    webuiapi = pytest.importorskip("webuiapi")  # only the tests that drive the client need it
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(api.util_get_sampler_names())
    assert set(api.util_get_scheduler_names()) == {"automatic", "uniform", "karras", "exponential", "polyexponential",
                                                   "sgm_uniform", "kl_optimal", "align_your_steps", "simple", "normal",
                                                   "ddim", "beta"}
    assert api.util_get_model_names() == ["sub/tiny-b", "tiny-sd"]  # the symlinks out of the folder are not listed
    progress = api.get_progress()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0

    assert api.util_get_current_model() == "tiny-sd"
    api.util_set_model("sub/tiny-b")
    assert api.get_options()["sd_model_checkpoint"] == "sub/tiny-b"
    r = api.txt2img(prompt="p", seed=1, steps=2, width=64, height=64)
    assert r.info["sd_model_name"] == "tiny-b"
    r = api.txt2img(prompt="p", seed=1, steps=2, width=64, height=64,
                    override_settings={"sd_model_checkpoint": "tiny-sd", "CLIP_stop_at_last_layers": 2})
    assert r.info["sd_model_name"] == "tiny-sd" and "Clip skip: 2" in r.info["infotexts"][0]
    assert api.get_options()["sd_model_checkpoint"] == "sub/tiny-b"  # an override is for that request only
    api.set_options({"sd_model_checkpoint": "tiny-sd"})
    assert api.util_get_current_model() == "tiny-sd"
    assert "RNG: GPU" in r.info["infotexts"][0]  # A1111's default noise source
    api.set_options({"randn_source": "CPU", "eta_noise_seed_delta": 31337})
    assert (api.get_options()["randn_source"], api.get_options()["eta_noise_seed_delta"]) == ("CPU", 31337)
    text = api.txt2img(prompt="p", seed=1, steps=2, width=64, height=64).info["infotexts"][0]
    assert "ENSD: 31337, RNG: CPU" in text
    api.set_options({"randn_source": "GPU", "eta_noise_seed_delta": 0})

    info = api.png_info(r.image)
    assert info.info == r.info["infotexts"][0] and info.parameters["Seed"] == "1"

    # save_images without send_images: the PNG lands in --output-dir with its parameters
    resp = _post(port, "txt2img", {"prompt": "saved", "seed": 99, "steps": 2, "width": 64, "height": 64,
                                   "send_images": False, "save_images": True})
    assert resp.status_code == 200 and resp.json()["images"] == []
    [saved] = output_dir.glob("*-99.png")
    assert Image.open(saved).info["parameters"] == json.loads(resp.json()["info"])["infotexts"][0]


# --- load ----------------------------------------------------------------------------------------------------------

def test_twenty_concurrent_requests_each_run_once_in_fifo_order(server):
    port = server[0]
    init = _b64(_init_image())
    payloads = [("img2img" if i % 2 else "txt2img",
                 {"prompt": f"job {i}", "seed": 100 + i, "steps": 2, "width": 64, "height": 64,
                  **({"init_images": [init], "denoising_strength": 0.5} if i % 2 else {})}) for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda p: _post(port, *p), payloads))
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses if r.status_code != 200]
    infos = [json.loads(r.json()["info"]) for r in responses]
    assert [i["seed"] for i in infos] == [100 + i for i in range(20)]  # each answer is its own request's
    assert all(len(r.json()["images"]) == 1 for r in responses)
    assert len({i["job_id"] for i in infos}) == 20
    runs = [i["run_no"] for i in sorted(infos, key=lambda i: i["job_id"])]
    assert runs == list(range(runs[0], runs[0] + 20))  # run in the order accepted, each once, nothing between


# --- bad input -----------------------------------------------------------------------------------------------------

BAD = [  # (route, payload, text the message must contain)
    ("txt2img", {"width": 100000}, "width"),
    ("txt2img", {"steps": -3}, "steps"),
    ("txt2img", {"steps": "many"}, "steps"),
    ("txt2img", {"cfg_scale": True}, "cfg_scale"),
    ("txt2img", {"prompt": ["a", "list"]}, "prompt"),
    ("txt2img", {"seed": 2**40}, "seed"),
    ("txt2img", {"batch_size": 0}, "batch_size"),
    ("txt2img", {"sampler_name": "Nonexistent Sampler"}, "unknown sampler 'Nonexistent Sampler'"),
    ("txt2img", {"scheduler": "cosine"}, "scheduler"),
    ("txt2img", {"enable_hr": True, "hr_upscaler": "Nonexistent"}, "hr_upscaler 'Nonexistent' is not one of"),
    ("txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 0}}, "override_settings.CLIP_stop_at_last_layers"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "not found"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "not found"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "evil"}}, "not found"),  # a symlink out
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "no-such-model"}}, "not found"),
    ("txt2img", [1, 2], "body"),
    ("img2img", {"init_images": ["not base64 at all!"]}, "init_images[0]"),
    ("img2img", {"init_images": [base64.b64encode(b"hello, not a PNG").decode()]}, "init_images[0]"),
    ("img2img", {"init_images": []}, "init_images"),
    ("img2img", {"prompt": "no image"}, "init_images"),
    ("img2img", {"init_images": ["AAAA"], "denoising_strength": 1.5}, "denoising_strength"),
    ("options", {"sd_model_checkpoint": "../tiny-sd"}, "not found"),
    ("options", {"CLIP_stop_at_last_layers": "two"}, "CLIP_stop_at_last_layers"),
    ("png-info", {"image": "%%%"}, "image"),
]


def test_check_request_builds_the_validated_generation_params():
    limits = Limits()
    plan = check_request(Txt2ImgRequest(prompt="p", seed=-1, sampler_name="DPM++ 2M Karras", steps=20), limits, 64,
                         settings={"CLIP_stop_at_last_layers": 2})
    assert plan.params == GenerationParams(prompt="p", seed=None, width=64, height=64, steps=20, sampler="DPM++ 2M",
                                           schedule="karras", clip_skip=2, cfg_scale=7.0, rng="gpu")  # A1111's
    assert plan.steps == 20
    plan = check_request(Txt2ImgRequest(sampler_index="Euler", scheduler=" Karras", seed=9, batch_size=2,
                                        override_settings={"CLIP_stop_at_last_layers": 3, "randn_source": "NV",
                                                           "eta_noise_seed_delta": 31337}),
                         limits, 512, settings={"CLIP_stop_at_last_layers": 2, "randn_source": "CPU"})
    assert (plan.params.sampler, plan.params.schedule, plan.params.seed, plan.params.clip_skip) == ("Euler", "karras",
                                                                                                    9, 3)
    assert (plan.params.rng, plan.params.ensd) == ("nv", 31337)  # the request's override_settings win
    assert check_request(Txt2ImgRequest(), limits, 512, settings={"randn_source": "CPU"}).params.rng == "cpu"
    assert check_request(Txt2ImgRequest(sampler_name="DDIM"), limits, 512).params.schedule is None
    # img2img: only the last denoising_strength of the steps run (PLMS one more), and some must be left
    img2img = dict(init_images=["unused here"], steps=20, denoising_strength=0.6)
    assert check_request(Img2ImgRequest(**img2img), limits, 512, (64, 64)).steps == 13  # A1111's: int(0.6 * 20) + 1
    assert check_request(Img2ImgRequest(**img2img, sampler_name="euler"), limits, 512, (64, 64)).steps == 12
    assert check_request(Img2ImgRequest(**img2img, sampler_name="PLMS"), limits, 512, (64, 64)).steps == 11  # A1111
    assert check_request(Img2ImgRequest(**img2img, sampler_name="plms"), limits, 512, (64, 64)).steps == 13
    bad = [(Img2ImgRequest(**{**img2img, "steps": 1, "denoising_strength": 0.5, "sampler_name": "euler"}),
            "leaves no step of 1"),
           (Txt2ImgRequest(seed=2**32 - 3, batch_size=2, n_iter=2), "seed 4294967293 + 4 images runs past"),
           (Txt2ImgRequest(sampler_name="ddim", scheduler="karras"), "'ddim' does not take the karras schedule")]
    for req, text in bad:
        with pytest.raises(ClientError, match=re.escape(text)) as e:
            check_request(req, limits, 512, (64, 64) if isinstance(req, Img2ImgRequest) else None)
        assert e.value.status == 422


def test_bad_input_gets_4xx_naming_the_value_and_the_server_goes_on(server):
    port = server[0]
    good_image = _b64(_init_image())
    for route, payload, text in BAD:
        r = _post(port, route, payload)
        assert 400 <= r.status_code < 500, (route, payload, r.status_code, r.text)
        assert text in r.json()["detail"], (route, payload, r.text)
    r = _post(port, "img2img", {"init_images": [good_image], "mask": "@@@", "steps": 2})
    assert r.status_code == 422 and "mask" in r.json()["detail"]
    r = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/nothing-here").status_code == 404
    # a body over the 50 MB cap is refused from its Content-Length, before it is read
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 60000000\r\n\r\n{")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")
    # no CORS unless --cors-origin is given
    r = httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/samplers", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers

    r = _post(port, "txt2img", {"prompt": "fine", "steps": 2, "width": 64, "height": 64, "seed": 3})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


# --- the CLI server: auth, overflow, interrupt ---------------------------------------------------------------------

ROUTES = [("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/nothing-here")] + [
    ("GET", f"/sdapi/v1/{r}") for r in ("progress", "samplers", "schedulers", "sd-models", "options", "scripts")] + [
    ("POST", f"/sdapi/v1/{r}") for r in ("txt2img", "img2img", "interrupt", "options", "png-info")]


def test_api_auth_on_every_route(auth_server):
    base = f"http://127.0.0.1:{auth_server}"
    for method, path in ROUTES:
        for auth in (None, (AUTH[0], "wrong"), ("someone", AUTH[1]), (AUTH[0], "")):
            r = httpx.request(method, base + path, auth=auth, json={} if method == "POST" else None)
            assert r.status_code == 401, (method, path, auth, r.status_code)
            assert r.headers["www-authenticate"].startswith("Basic")
    r = httpx.get(f"{base}/", auth=AUTH)
    assert r.status_code == 200 and "<progress" in r.text


def test_queue_overflow_gets_503_and_interrupt_stops_a_50_step_job_within_a_step(auth_server):
    port = auth_server
    webuiapi = pytest.importorskip("webuiapi")  # only the tests that drive the client need it
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username=AUTH[0], password=AUTH[1])
    job = {"width": 64, "height": 64, "seed": 5}
    with ThreadPoolExecutor(9) as pool:
        long = pool.submit(_post, port, "txt2img", {**job, "prompt": "long", "steps": 50}, auth=AUTH)
        deadline = time.monotonic() + 60
        while api.get_progress()["state"]["sampling_step"] < 1:
            assert time.monotonic() < deadline and not long.done(), "the 50-step job did not start"
            time.sleep(0.05)
        short = [pool.submit(_post, port, "txt2img", {**job, "prompt": f"short {i}", "steps": 2}, auth=AUTH)
                 for i in range(8)]
        while sum(f.done() for f in short) < 4:  # the overflow is answered at once; 4 wait behind the long job
            assert time.monotonic() < deadline and not long.done(), [f.result().text for f in short if f.done()]
            time.sleep(0.05)
        overflow = [f for f in short if f.done()]
        rejected = [f.result() for f in overflow]
        assert [r.status_code for r in rejected] == [503] * 4
        assert all(r.headers["retry-after"].isdigit() and "queue is full" in r.json()["detail"] for r in rejected)
        state = api.get_progress()["state"]
        assert state["queue_size"] == 4 and state["job_count"] == 1
        # live previews (A1111's defaults: every 10 steps): the image forming, as a PNG of the output's size
        while (preview := api.get_progress()["current_image"]) is None:
            assert time.monotonic() < deadline and not long.done(), "no live preview came"
            time.sleep(0.05)
        with Image.open(io.BytesIO(base64.b64decode(preview))) as im:
            assert im.size == (64, 64)

        step_before = api.get_progress()["state"]["sampling_step"]
        assert api.interrupt() == {}
        r = long.result(timeout=60)
        assert r.status_code == 200 and r.json()["images"] == []  # the unfinished batch is dropped
        info = json.loads(r.json()["info"])
        assert info["interrupted"] is True and info["sampling_step"] <= min(step_before + 2, 49)
        accepted = [f.result(timeout=120) for f in short if f not in overflow]
    assert [r.status_code for r in accepted] == [200] * 4
    r = api.txt2img(prompt="after", steps=2, width=64, height=64, seed=1)
    assert len(r.images) == 1 and api.get_progress()["state"]["queue_size"] == 0


# --- the CLI -------------------------------------------------------------------------------------------------------

def test_serve_cli_checks_and_bind_warning(capsys):
    code = "import sys; from stablediff.cli import build_parser; build_parser(); print('fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # `stablediff --help` stays fast
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert main(["serve", "--api-auth", "no-password"]) == 2
    assert main(["serve", "--models-dir", "/no/such/dir"]) == 2
    assert main(["serve", "--max-queue", "0"]) == 2
    err = capsys.readouterr().err
    assert "--api-auth must be USER:PASSWORD" in err and "/no/such/dir" in err and "--max-queue 0" in err
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        assert bind_warning(host, None) is None
    assert "without --api-auth" in bind_warning("0.0.0.0", None)
    assert bind_warning("0.0.0.0", "u:p") is None


# --- the web page --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                                             "the web page test drives it headless")
def test_web_page_generates_in_headless_chromium(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 400, "height": 860})  # phone-sized
            page.goto(f"http://127.0.0.1:{server[0]}/")
            page.wait_for_function("document.querySelectorAll('#sampler_name option').length > 1")
            assert page.input_value("#model") == "tiny-sd"
            page.fill("#prompt", "a small red house")
            page.fill("#steps", "15")
            page.fill("#seed", "42")
            page.click("#generate")
            page.wait_for_function("() => { const v = document.getElementById('progress').value; "
                                   "return v > 0 && v < 1; }", timeout=60_000)  # the bar moves
            page.wait_for_selector("#gallery figure img", timeout=120_000)
            assert page.eval_on_selector("#progress", "e => e.value") == 1
            assert "Seed: 42" in page.inner_text("#gallery figcaption pre")
            assert page.get_attribute("#gallery a", "href").startswith("data:image/png;base64,")
            assert page.eval_on_selector("#gallery img", "e => e.naturalWidth") == 64
            shot = tmp_path / "stablediff-server.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    shutil.copy(shot, "/tmp/stablediff-server.png")
