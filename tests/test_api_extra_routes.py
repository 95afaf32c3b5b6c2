"""A1111's read-only routes that clients call besides generation (/internal/ping, /cmd-flags, /memory,
/face-restorers, /hypernetworks, /extensions, /realesrgan-models, /script-info) and POST /extra-batch-images, on the
app with a stand-in for the SD model (none of these routes uses it) and an --upscaler-dir of two small models."""

from __future__ import annotations

import base64
import io
import os
import re
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
testclient = pytest.importorskip("fastapi.testclient")

from test_upscalers import compact, write  # noqa: E402
from stablediff import upscalers  # noqa: E402
from stablediff.images import png_bytes  # noqa: E402
from stablediff.limits import Limits  # noqa: E402
from stablediff.serve import sdapi  # noqa: E402
from stablediff.serve.resources import cuda_memory, ram_memory  # noqa: E402
from stablediff.serve.server import ServeConfig, cmd_flags, create_app  # noqa: E402
from stablediff.serve.worker import Job  # noqa: E402

AUTH = ("user", "s3cret:pass")
MAX_PIXELS = 256 * 256
PARAMETERS = "a cat\nSteps: 5, Seed: 7, Size: 24x20"


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory) -> Path:
    """compact-x2.safetensors, sub/compact-x4.pth (random SRVGGNetCompact weights) and a file that is no upscaler."""
    folder = tmp_path_factory.mktemp("upscaler-dir")
    (folder / "sub").mkdir()
    write(folder / "compact-x2.safetensors", compact(9, scale=2))
    write(folder / "sub" / "compact-x4.pth", compact(8), "params_ema")
    write(folder / "notes.safetensors", {"x": torch.zeros(1)})
    return folder


def _client(config: ServeConfig):
    stand_in = types.SimpleNamespace(weights_file=None, native_size=64, load_embeddings=lambda folder: [])
    return testclient.TestClient(create_app(config, load=lambda entry: stand_in), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def client(upscaler_dir):
    config = ServeConfig(model="demo", upscaler_dir=upscaler_dir, device="cpu", limits=Limits(max_pixels=MAX_PIXELS))
    with _client(config) as c:
        yield c


@pytest.fixture(scope="module")
def auth_client(upscaler_dir):
    config = ServeConfig(model="demo", upscaler_dir=upscaler_dir, device="cpu", api_auth=":".join(AUTH),
                         host="0.0.0.0", port=7861, cors_origins=("http://app.example",))
    with _client(config) as c:
        yield c


def _png_b64(image: Image.Image, parameters: str | None = None) -> str:
    """A base64 PNG, with A1111's `parameters` text chunk if given."""
    if parameters is not None:
        return base64.b64encode(png_bytes(image, parameters)).decode()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _decoded(b64: str) -> Image.Image:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        image.load()
        return image


def _noise(width: int, height: int) -> Image.Image:
    return Image.effect_noise((width, height), 60).convert("RGB")


# --- the lists ------------------------------------------------------------------------------------------------------

def test_ping_and_what_the_server_has_none_of(client):
    assert client.get("/internal/ping").json() == {}
    for route in ("face-restorers", "hypernetworks", "extensions"):
        answer = client.get(f"/sdapi/v1/{route}")
        assert answer.status_code == 200 and answer.json() == [], route


def test_script_info_describes_the_scripts_listed(client):
    info = client.get("/sdapi/v1/script-info").json()
    assert info == [{"name": "controlnet", "is_alwayson": True, "is_img2img": False, "args": []},
                    {"name": "controlnet", "is_alwayson": True, "is_img2img": True, "args": []}]
    listed = client.get("/sdapi/v1/scripts").json()
    for tab in ("txt2img", "img2img"):
        assert [s["name"] for s in info if s["is_img2img"] == (tab == "img2img")] == listed[tab]


def test_realesrgan_models_are_the_upscaler_dir_models(client):
    assert client.get("/sdapi/v1/realesrgan-models").json() == [
        {"name": "compact-x2", "path": "compact-x2.safetensors", "scale": 2},
        {"name": "sub/compact-x4", "path": "sub/compact-x4.pth", "scale": 4},
    ]  # notes.safetensors is no upscaler; the names are what upscaler_1 takes (the same as /upscalers')
    usable = {row["name"] for row in client.get("/sdapi/v1/upscalers").json()}
    assert usable >= {"compact-x2", "sub/compact-x4"}


def test_realesrgan_models_empty_without_an_upscaler_dir():
    with _client(ServeConfig(model="demo", device="cpu")) as c:
        assert c.get("/sdapi/v1/realesrgan-models").json() == []


# --- /cmd-flags -----------------------------------------------------------------------------------------------------

def test_cmd_flags_show_the_config_but_never_the_password_or_paths(auth_client, upscaler_dir):
    answer = auth_client.get("/sdapi/v1/cmd-flags", auth=AUTH)
    assert answer.json() == {"api": True, "listen": True, "server_name": "0.0.0.0", "port": 7861,
                             "cors_allow_origins": "http://app.example", "timeout_keep_alive": 5,
                             "api_server_stop": False}
    assert AUTH[1] not in answer.text and str(upscaler_dir) not in answer.text


@pytest.mark.parametrize("host, listen", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                          ("127.0.0.2", False), ("0.0.0.0", True), ("", True), ("::", True),
                                          ("192.168.1.5", True), ("studio.lan", True)])
def test_cmd_flags_listen_is_whether_other_machines_can_connect(host, listen):
    flags = cmd_flags(ServeConfig(host=host))
    assert flags["listen"] is listen and flags["server_name"] == host
    assert flags["port"] == 7860 and flags["cors_allow_origins"] is None


# --- /memory --------------------------------------------------------------------------------------------------------

def _meminfo_bytes(name: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(name)


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads /proc (Linux)")
def test_memory_reports_this_machine_and_process(client):
    before = _rss()
    answer = client.get("/sdapi/v1/memory").json()
    after = _rss()
    assert set(answer) == {"ram", "cuda"}
    ram = answer["ram"]
    assert set(ram) == {"free", "used", "total"}
    assert ram["total"] == _meminfo_bytes("MemTotal")
    assert 0 < ram["free"] <= ram["total"]
    assert 0.5 * before <= ram["used"] <= 2 * after  # the TestClient's app runs in this process
    assert answer["cuda"] == {"error": "unavailable"}  # device "cpu": as A1111 without CUDA


def test_ram_memory_reads_meminfo_and_statm(tmp_path):
    meminfo, statm = tmp_path / "meminfo", tmp_path / "statm"
    meminfo.write_text("MemTotal:        1000 kB\nMemFree:          100 kB\nMemAvailable:     250 kB\n")
    statm.write_text("900 25 10 1 0 30 0\n")
    page = os.sysconf("SC_PAGE_SIZE")
    assert ram_memory(meminfo, statm) == {"free": 250 * 1024, "used": 25 * page, "total": 1000 * 1024}
    missing = ram_memory(tmp_path / "none", statm)
    assert list(missing) == ["error"] and missing["error"].startswith("FileNotFoundError")
    meminfo.write_text("MemTotal:        1000 kB\n")  # a kernel before 3.14 has no MemAvailable
    assert ram_memory(meminfo, statm) == {"error": "KeyError: 'MemAvailable'"}


def test_cuda_memory_unavailable_off_cuda():
    assert cuda_memory(torch.device("cpu")) == {"error": "unavailable"}
    assert cuda_memory(torch.device("meta")) == {"error": "unavailable"}


def test_cuda_memory_shape_from_torch_figures(monkeypatch):
    """A1111's "cuda" object from torch.cuda's figures (stood in for here, so this runs without a GPU)."""
    stats = {"allocated_bytes.all.current": 10, "allocated_bytes.all.peak": 11, "reserved_bytes.all.current": 20,
             "reserved_bytes.all.peak": 21, "active_bytes.all.current": 30, "active_bytes.all.peak": 31,
             "inactive_split_bytes.all.current": 40, "inactive_split_bytes.all.peak": 41, "num_alloc_retries": 2,
             "num_ooms": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (300, 1000))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: stats)
    assert cuda_memory(torch.device("cuda", 1)) == {
        "system": {"free": 300, "used": 700, "total": 1000}, "active": {"current": 30, "peak": 31},
        "allocated": {"current": 10, "peak": 11}, "reserved": {"current": 20, "peak": 21},
        "inactive": {"current": 40, "peak": 41}, "events": {"retries": 2, "oom": 1}}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device: {})  # nothing allocated yet
    assert cuda_memory(torch.device("cuda"))["allocated"] == {"current": 0, "peak": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_on_cuda():
    device = torch.device("cuda")
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)  # 64 MiB held while measured
    answer = cuda_memory(device)
    free, total = torch.cuda.mem_get_info(device)
    assert set(answer) == {"system", "active", "allocated", "reserved", "inactive", "events"}
    assert answer["system"]["total"] == total
    assert answer["system"]["free"] + answer["system"]["used"] == total
    assert answer["allocated"]["current"] >= x.numel() and answer["allocated"]["peak"] >= x.numel()
    assert answer["reserved"]["current"] >= answer["allocated"]["current"]
    assert set(answer["events"]) == {"retries", "oom"}
    del x


# --- /extra-batch-images --------------------------------------------------------------------------------------------

def test_extra_batch_images_upscales_each_image(client, upscaler_dir):
    sources = [_noise(24, 20), _noise(16, 16), _noise(12, 36)]
    body = {"imageList": [{"data": _png_b64(im, PARAMETERS if i == 0 else None), "name": f"{i}.png"}
                          for i, im in enumerate(sources)], "upscaler_1": "compact-x2", "upscaling_resize": 2}
    answer = client.post("/sdapi/v1/extra-batch-images", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert set(result) == {"html_info", "images"}
    assert result["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: compact-x2</p>"
    model = upscalers.load_upscaler(upscaler_dir / "compact-x2.safetensors")
    assert len(result["images"]) == len(sources)
    outputs = [_decoded(b64) for b64 in result["images"]]
    assert [out.size for out in outputs] == [(48, 40), (32, 32), (24, 72)]
    for source, out in zip(sources, outputs):
        assert out.tobytes() == upscalers.upscale(source, 2, model).tobytes()
    assert _decoded(result["images"][0]).info["parameters"] == PARAMETERS  # the source's generation parameters
    assert "parameters" not in _decoded(result["images"][1]).info
    single = client.post("/sdapi/v1/extra-single-image",
                         json={"image": body["imageList"][0]["data"], "upscaler_1": "compact-x2"}).json()
    assert single == {"html_info": result["html_info"], "image": result["images"][0]}  # one code path


def test_extra_batch_images_by_lanczos_and_without_upscaler(client):
    sources = [_noise(16, 16), _noise(24, 40)]
    image_list = [{"data": _png_b64(im), "name": "x"} for im in sources]
    result = client.post("/sdapi/v1/extra-batch-images",
                         json={"imageList": image_list, "upscaler_1": "Lanczos", "upscaling_resize": 1.5}).json()
    assert [_decoded(b64).size for b64 in result["images"]] == [(24, 24), (32, 56)]  # A1111's: down to 8s
    unchanged = client.post("/sdapi/v1/extra-batch-images", json={"imageList": image_list}).json()  # "None"
    assert unchanged["html_info"] == "<p></p>"
    assert [_decoded(b64).convert("RGB").tobytes() for b64 in unchanged["images"]] == [s.tobytes() for s in sources]
    assert client.post("/sdapi/v1/extra-batch-images", json={"imageList": []}).json() == {"html_info": "<p></p>",
                                                                                          "images": []}


def test_extra_batch_images_cap(client):
    one = {"data": _png_b64(_noise(4, 4)), "name": "a.png"}
    at_cap = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [one] * sdapi.MAX_EXTRAS_IMAGES})
    assert at_cap.status_code == 200 and len(at_cap.json()["images"]) == sdapi.MAX_EXTRAS_IMAGES
    over = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [one] * (sdapi.MAX_EXTRAS_IMAGES + 1)})
    assert over.status_code == 422
    detail = over.json()["detail"]
    assert detail.startswith("imageList: ") and f"at most {sdapi.MAX_EXTRAS_IMAGES} items" in detail
    assert f"not {sdapi.MAX_EXTRAS_IMAGES + 1}" in detail


@pytest.mark.parametrize("image_list, fields, message", [
    (["good", "not base64!"], {}, r"^imageList\[1\]\.data: not valid base64"),
    (["good", "good", "big"], {"upscaler_1": "Nearest", "upscaling_resize": 4},
     r"^imageList\[2\]\.data: upscaled size 320x320 = 102,400 is over the limit of 65,536 \(set with --max-pixels\)"),
    (["good"], {"upscaler_1": "4x-missing"}, "upscaler_1 '4x-missing' is not one of: None, Lanczos, Nearest, "
                                             "compact-x2, notes, sub/compact-x4$"),
    (["good"], {"gfpgan_visibility": 0.5}, "face restoration is not supported"),
    (["good"], {"resize_mode": 1}, r"resize_mode 1 .* is not supported"),
])
def test_extra_batch_images_refused_naming_the_image(client, image_list, fields, message):
    data = {"good": _png_b64(_noise(8, 8)), "big": _png_b64(_noise(80, 80))}
    body = {"imageList": [{"data": data.get(x, x), "name": "x.png"} for x in image_list], **fields}
    answer = client.post("/sdapi/v1/extra-batch-images", json=body)
    assert answer.status_code == 422
    assert re.search(message, answer.json()["detail"]), answer.json()


def test_extras_job_stops_between_images(monkeypatch):
    """An interrupt stops the batch before its next image and answers with those done (A1111's batch loop);
    job_no counts the images for /progress."""
    req = sdapi.ExtrasBatchImagesRequest(imageList=[], upscaler_1="Nearest", upscaling_resize=2)
    pictures = [_noise(4, 4)] * 3
    job = Job("extras", run=None, job_count=3)
    assert len(sdapi.extras(job, req, pictures, "Nearest")["images"]) == 3 and job.job_no == 2
    job = Job("extras", run=None, job_count=3)
    monkeypatch.setattr(sdapi, "upscaled_png", lambda image, scale, upscaler, info: job.stop() or "png")
    assert sdapi.extras(job, req, pictures, "Nearest")["images"] == ["png"]


# --- auth -----------------------------------------------------------------------------------------------------------

NEW_ROUTES = [("GET", "/internal/ping"), ("POST", "/sdapi/v1/extra-batch-images")] + [
    ("GET", f"/sdapi/v1/{r}") for r in ("cmd-flags", "memory", "face-restorers", "hypernetworks", "extensions",
                                        "realesrgan-models", "script-info")]


@pytest.mark.parametrize("method, path", NEW_ROUTES)
def test_api_auth_on_the_new_routes(auth_client, method, path):
    body = {"imageList": [{"data": _png_b64(_noise(4, 4)), "name": "a.png"}]} if method == "POST" else None
    for auth in (None, (AUTH[0], "wrong"), ("someone", AUTH[1])):
        refused = auth_client.request(method, path, json=body, auth=auth)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic"), auth
    assert auth_client.request(method, path, json=body, auth=AUTH).status_code == 200
