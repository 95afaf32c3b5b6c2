"""sd-webui-controlnet's API: alwayson_scripts.controlnet units in txt2img/img2img against the Python API with the
same controls.Control, the /controlnet/* routes' JSON, detect against preprocess.run, and a one-line 422 for each
bad input, on a real uvicorn server with the tiny random model and a tiny random ControlNet."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_api_routes import SMALL, _b64, _pixels  # noqa: E402
from test_controlnet_pipeline import control_image, random_controlnet  # noqa: E402
from test_server import _uvicorn  # noqa: E402
from stablediff import cli, preprocess  # noqa: E402
from stablediff.controlnet import ControlNetConfig, to_original  # noqa: E402
from stablediff.controls import Control  # noqa: E402
from stablediff.limits import Limits  # noqa: E402
from stablediff.pipeline import StableDiffusion  # noqa: E402
from stablediff.serve.controlnet_api import MODULES, module_params  # noqa: E402
from stablediff.serve.server import ServeConfig, create_app  # noqa: E402

CANNY = "control_v11p_sd15_canny"
LIMITS = Limits(max_images=3, max_pixels=128 * 128)  # small, so detect's bounds can be reached


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # conftest's, for every test here
    yield


def old_hash(path) -> str:
    """A1111's old model hash, by hand: sha256 of the 64 KiB at 1 MiB, 8 hex digits."""
    return hashlib.sha256(path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


@pytest.fixture(scope="module")
def cn_dir(tiny_reference, tmp_path_factory):
    """A --controlnet-dir: CANNY.safetensors (a random ControlNet of the tiny U-Net in the original layout), the
    same ControlNet as a diffusers folder, a 1.2 MB file for the hash, and entries that are not listed."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("controlnet")
    model = random_controlnet(tiny_reference.unet, 5)
    cfg = ControlNetConfig.from_dict(dict(model.config))
    save_file({k: v.contiguous() for k, v in to_original(model.state_dict(), cfg).items()},
              str(root / f"{CANNY}.safetensors"))
    model.save_pretrained(root / "folder_cn")
    (root / "big.pth").write_bytes(np.random.default_rng(0).bytes(1_200_000))
    (root / ".hidden.safetensors").write_bytes(b"x")
    (root / "notes.txt").write_text("not a model")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return StableDiffusion.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def port(tiny_model_dir, cn_dir, tmp_path_factory):
    app = create_app(ServeConfig(model=str(tiny_model_dir), controlnet_dir=cn_dir, device="cpu", limits=LIMITS,
                                 output_dir=tmp_path_factory.mktemp("out")))
    with _uvicorn(app) as port:
        yield port


def _post(port, path, payload):
    return httpx.post(f"http://127.0.0.1:{port}{path}", json=payload, timeout=120)


def _get(port, path):
    r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _generate(port, kind, units, **fields):
    r = _post(port, f"/sdapi/v1/{kind}", {**SMALL, "prompt": "a cat", **fields,
                                          "alwayson_scripts": {"ControlNet": {"args": units}}})
    assert r.status_code == 200, r.text
    return _pixels(r.json()["images"][0]), json.loads(r.json()["info"])


# --- generation ---------------------------------------------------------------------------------------------------

def test_txt2img_unit_makes_the_python_apis_image(port, pipe, cn_dir):
    hint = control_image(1)
    unit = {"module": "canny", "model": f"{CANNY} [{old_hash(cn_dir / f'{CANNY}.safetensors')}]", "weight": 0.7,
            "image": "data:image/png;base64," + _b64(hint), "resize_mode": "Scale to Fit (Inner Fit)",
            "threshold_a": 50, "threshold_b": 150, "guidance_end": 0.8, "control_mode": 1, "processor_res": 512,
            "pixel_perfect": True, "low_vram": True}
    got, info = _generate(port, "txt2img", [unit])
    control = Control(hint, cn_dir / f"{CANNY}.safetensors", weight=0.7, end=0.8, preprocessor="canny",
                      resize_mode="Crop and Resize", control_mode="My prompt is more important",
                      params={"low_threshold": 50, "high_threshold": 150})
    ref = pipe("a cat", steps=2, seed=5, width=64, height=64, sampler="Euler", rng="gpu", controls=[control])
    plain = pipe("a cat", steps=2, seed=5, width=64, height=64, sampler="Euler", rng="gpu")
    assert np.array_equal(got, np.asarray(ref.images[0]))
    assert not np.array_equal(got, np.asarray(plain.images[0]))
    assert info["infotexts"] == ref.infotexts
    assert (f'ControlNet 0: "Module: canny, Model: {CANNY}, Weight: 0.7, Resize Mode: Crop and Resize, Guidance '
            f'Start: 0, Guidance End: 0.8, Control Mode: My prompt is more important"') in info["infotexts"][0]


def test_img2img_unit_without_image_uses_the_init_image(port):
    init = _b64(control_image(3))
    unit = {"module": "invert", "model": "folder_cn", "weight": 0.9}
    base = {"init_images": [init], "denoising_strength": 0.8, "steps": 3}
    without, _ = _generate(port, "img2img", [unit], **base)
    given, _ = _generate(port, "img2img", [{**unit, "input_image": init}], **base)  # the extension's old key
    plain, _ = _generate(port, "img2img", [], **base)
    assert np.array_equal(without, given)
    assert not np.array_equal(without, plain)


def test_units_disabled_or_without_model_are_skipped(port):
    skipped = [{"enabled": False, "model": "nothing like it", "module": "unknown"},
               {"model": "None", "module": "canny"}]
    with_skipped, info = _generate(port, "txt2img", skipped)
    plain, _ = _generate(port, "txt2img", [])
    assert np.array_equal(with_skipped, plain) and "ControlNet" not in info["infotexts"][0]


def test_thresholds_map_onto_each_modules_sliders():
    assert module_params("canny", 50, 150) == {"low_threshold": 50, "high_threshold": 150}
    assert module_params("canny", -1, 120) == {"high_threshold": 120}  # -1: the default, as the extension
    assert module_params("threshold", 90, 64) == {"binarization_threshold": 90}
    assert module_params("scribble_xdog", 20, 64) == {"xdog_threshold": 20}
    assert module_params("blur_gaussian", 4.5, 64) == {"sigma": 4.5}
    assert module_params("tile_resample", 2.0, 64) == {"down_sampling_rate": 2.0}
    assert module_params("none", 64, 64) == module_params("invert", 64, 64) == {}


GOOD = {"module": "canny", "model": CANNY}


@pytest.mark.parametrize("kind, units, needle", [
    ("txt2img", [GOOD], "args[0]: no image; a txt2img unit needs one"),
    ("txt2img", [{**GOOD, "module": "depth_leres", "image": "x"}],
     "args[0].module: unknown module 'depth_leres'; known: none, canny, scribble_xdog"),
    ("txt2img", [{**GOOD, "model": "control_v11p_sd15_cany [d14c016b]"}],
     "args[0].model 'control_v11p_sd15_cany [d14c016b]' is not in --controlnet-dir; did you mean "
     "control_v11p_sd15_canny?"),
    ("txt2img", [{**GOOD, "model": "../controlnet/" + CANNY}], "is not in --controlnet-dir"),
    ("txt2img", [{**GOOD, "resize_mode": 3}], "args[0].resize_mode: 3 is not one of: Just Resize"),
    ("txt2img", [{**GOOD, "control_mode": "Prompt"}], "args[0].control_mode: 'Prompt' is not one of: Balanced"),
    ("txt2img", [{**GOOD, "weight": True}], "args[0].weight: a number is expected"),
    ("txt2img", [{**GOOD, "guidance_start": 1.5}], "args[0].guidance_start: Input should be less than or equal"),
    ("txt2img", [{**GOOD, "guidance_start": 0.9, "guidance_end": 0.2, "image": "{png}"}],
     "control start 0.9 and end 0.2 must satisfy"),
    ("txt2img", [{**GOOD, "threshold_a": 300, "image": "{png}"}],
     "canny low_threshold=300.0 is not a number in [0, 256]"),
    ("txt2img", [{**GOOD, "image": "not base64!"}], "args[0].image: not valid base64"),
    ("txt2img", [{**GOOD, "module": "inpaint_only", "image": "{png}"}], "module 'inpaint_only' needs a mask"),
    ("txt2img", [{**GOOD, "image": {"image": "{png}", "mask": "{small}"}, "module": "inpaint"}],
     "mask size (32, 32) differs from image size (64, 64)"),
    ("txt2img", [{**GOOD, "image": "{png}"}] * 4, "alwayson_scripts.controlnet: more than 3 units in use"),
    ("txt2img", "units", 'alwayson_scripts.controlnet: give {"args": [unit, ...]}'),
    ("img2img", [{**GOOD, "module": "blur"}], "args[0].module: unknown module 'blur'"),
])
def test_bad_units_get_a_one_line_422(port, cn_dir, kind, units, needle):
    png, small = _b64(control_image(1)), _b64(control_image(2, (32, 32)))
    units = json.loads(json.dumps(units).replace("{png}", png).replace("{small}", small))
    fields = {"init_images": [png]} if kind == "img2img" else {}
    r = _post(port, f"/sdapi/v1/{kind}", {**SMALL, **fields, "alwayson_scripts": {"controlnet": {"args": units}}})
    detail = r.json()["detail"]
    assert r.status_code == 422 and needle in detail and "\n" not in detail, detail
    assert str(cn_dir) not in detail


def test_other_always_on_scripts_are_still_refused(port):
    r = _post(port, "/sdapi/v1/txt2img", {**SMALL, "alwayson_scripts": {"ControlNet": {"args": []},
                                                                       "ADetailer": {"args": [False]}}})
    assert r.status_code == 422
    assert "always-on scripts 'ADetailer' are not available: this server runs only ControlNet's" in r.json()["detail"]


# --- the routes ---------------------------------------------------------------------------------------------------

def test_version_settings_and_scripts(port):
    assert _get(port, "/controlnet/version") == {"version": 2}
    assert _get(port, "/controlnet/settings") == {"control_net_unit_count": 3}
    assert _get(port, "/sdapi/v1/scripts") == {"txt2img": ["controlnet"], "img2img": ["controlnet"]}


def test_model_list_names_and_hashes(port, cn_dir):
    want = [f"big [{old_hash(cn_dir / 'big.pth')}]", f"{CANNY} [{old_hash(cn_dir / f'{CANNY}.safetensors')}]",
            f"folder_cn [{old_hash(cn_dir / 'folder_cn' / 'diffusion_pytorch_model.safetensors')}]"]
    assert _get(port, "/controlnet/model_list") == {"model_list": want}
    assert _get(port, "/controlnet/model_list?update=true") == {"model_list": want}
    assert want[0] == f"big [{hashlib.sha256((cn_dir / 'big.pth').read_bytes()[1048576:1114112]).hexdigest()[:8]}]"


def test_module_list_has_the_extensions_names_and_sliders(port):
    got = _get(port, "/controlnet/module_list")
    assert got["module_list"] == ["none", "canny", "scribble_xdog", "threshold", "lineart_standard", "tile_resample",
                                  "invert", "inpaint", "inpaint_only", "blur_gaussian"]
    assert got["module_detail"]["canny"] == {"model_free": False, "sliders": [
        None, {"name": "Low Threshold", "value": 100, "min": 0, "max": 256},
        {"name": "High Threshold", "value": 200, "min": 0, "max": 256}]}
    assert got["module_detail"]["tile_resample"]["sliders"][1] == {"name": "Down Sampling Rate", "value": 1.0,
                                                                   "min": 1.0, "max": 8.0}
    assert got["module_detail"]["none"] == {"model_free": False, "sliders": []}
    aliases = _get(port, "/controlnet/module_list?alias_names=true")
    assert aliases["module_list"][6] == "invert (from white bg & black line)"
    assert set(aliases["module_detail"]) == set(aliases["module_list"])
    # every name either list gives is one a unit takes, and every preprocessor of ours is listed
    assert set(MODULES) | set(MODULES.values()) == set(preprocess.PREPROCESSORS)


def test_detect_canny_is_preprocess_run(port):
    image = control_image(4, (48, 40))
    r = _post(port, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [_b64(image)],
                                           "controlnet_threshold_a": 60, "controlnet_threshold_b": 140})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == "Success" and len(r.json()["images"]) == 1
    want = preprocess.run("canny", image, low_threshold=60, high_threshold=140)
    assert np.array_equal(_pixels(r.json()["images"][0]), np.asarray(want))
    r = _post(port, "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [_b64(image)]})
    assert np.array_equal(_pixels(r.json()["images"][0]), np.asarray(preprocess.run("canny", image)))


def test_detect_inpaint_takes_the_masks(port):
    image, mask = control_image(5), Image.new("L", (64, 64), 0)
    mask.paste(255, (10, 10, 30, 40))
    r = _post(port, "/controlnet/detect", {"controlnet_module": "inpaint_only", "controlnet_masks": [_b64(mask)],
                                           "controlnet_input_images": [_b64(image)]})
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))) as got:  # RGBA: the mask in its alpha
        assert np.array_equal(np.asarray(got), np.asarray(preprocess.run("inpaint_only", image, mask=mask)))


@pytest.mark.parametrize("body, needle", [
    ({"controlnet_module": "depth"}, "controlnet_module: unknown module 'depth'; known: none, canny"),
    ({"controlnet_module": "canny"}, "controlnet_input_images: no image given"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["{png}"] * 4},
     "controlnet_input_images: images 4 is over the limit of 3"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["{big}"]},
     "image size 200x100 = 20,000 is over the limit of 16,384"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["{png}"], "controlnet_threshold_b": 999},
     "canny high_threshold=999.0 is not a number in [0, 256]"),
    ({"controlnet_module": "inpaint", "controlnet_input_images": ["{png}"]}, "needs a mask"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["{png}"], "controlnet_masks": ["{png}"] * 2},
     "controlnet_masks: 2 masks for 1 images"),
])
def test_bad_detect_requests_get_a_one_line_422(port, body, needle):
    png, big = _b64(control_image(1)), _b64(control_image(2, (200, 100)))
    body = json.loads(json.dumps(body).replace("{png}", png).replace("{big}", big))
    r = _post(port, "/controlnet/detect", body)
    detail = r.json()["detail"]
    assert r.status_code == 422 and needle in detail and "\n" not in detail, detail


def test_serve_refuses_a_missing_controlnet_dir(tmp_path, capsys):
    code = cli.main(["serve", "--controlnet-dir", str(tmp_path / "nope")])
    assert code == 2 and f"--controlnet-dir {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
