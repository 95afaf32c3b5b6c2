"""The AUTOMATIC1111 routes beyond generation (embeddings, loras, sd-vae, prompt-styles, latent-upscale-modes, the
refresh routes, skip) and the request fields that go with them (styles, sd_vae, booleans, scripts), on a real
uvicorn server with the tiny random model and an add-on folder of each kind.

The assertions of A1111's own API tests (its test/test_utils.py, test_txt2img.py, test_img2img.py) that concern
these routes and fields are ported in the tests marked "A1111's test_...".
"""

from __future__ import annotations

import base64
import io
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import TINY_VAE, diffusers_vae  # noqa: E402
from test_lora import write_embeddings  # noqa: E402
from test_server import _uvicorn  # noqa: E402
from stablediff.params import GenerationParams  # noqa: E402
from stablediff.pipeline import Cancelled, StableDiffusion  # noqa: E402
from stablediff.serve.resources import LATENT_UPSCALE_MODES  # noqa: E402
from stablediff.serve.sdapi import run_iterations  # noqa: E402
from stablediff.serve.server import ServeConfig, create_app  # noqa: E402
from stablediff.serve.worker import Job  # noqa: E402
from stablediff.styles import Style, apply_styles, merge_prompts, read_styles  # noqa: E402

STYLES_CSV = 'name,prompt,negative_prompt\nink,"{prompt}, ink drawing",blurry\nwarm,warm light,\n"a, b",,"x"\n'
SMALL = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):  # conftest's, for every test here
    yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """loras/, embeddings/ (four usable files and one 768 wide), vaes/ (a VAE unlike the model's) and styles.csv."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("addons")
    loras = root / "loras"
    (loras / "sub").mkdir(parents=True)
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4, 3, 3)}, str(loras / "shiny.safetensors"),
              metadata={"ss_output_name": "shiny-v2", "ss_tag_frequency": json.dumps({"cats": {"cat": 3}})})
    torch.save({"lora_unet_conv_in.alpha": torch.tensor(1.0)}, loras / "sub" / "old.pt")
    (loras / "notes.txt").write_text("not a LoRA")
    (loras / "out.safetensors").symlink_to(root / "elsewhere.safetensors")  # leads out: never listed
    save_file({"x": torch.zeros(1)}, str(root / "elsewhere.safetensors"))
    write_embeddings(root / "embeddings", torch.randn(3, 32, generator=torch.Generator().manual_seed(1)))
    save_file({"emb_params": torch.ones(1, 768)}, str(root / "embeddings" / "wide.safetensors"))
    (root / "vaes" / "sub").mkdir(parents=True)
    vae = diffusers_vae(TINY_VAE, seed=11)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / "vaes" / "sub" / "other.safetensors"))
    (root / "styles.csv").write_text(STYLES_CSV)
    return root


@pytest.fixture(scope="module")
def app(tiny_model_dir, folders, tmp_path_factory):
    return create_app(ServeConfig(model=str(tiny_model_dir), lora_dir=folders / "loras",
                                  embeddings_dir=folders / "embeddings", vae_dir=folders / "vaes",
                                  styles_file=folders / "styles.csv", device="cpu",
                                  output_dir=tmp_path_factory.mktemp("out")))


@pytest.fixture(scope="module")
def port(app):
    with _uvicorn(app) as port:
        yield port


def _get(port, path):
    r = httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/{path}", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _post(port, path, payload=None):
    return httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/{path}", json=payload, timeout=120)


def _generate(port, path="txt2img", **fields):
    r = _post(port, path, {**SMALL, **fields})
    assert r.status_code == 200, r.text
    body = r.json()
    return body, json.loads(body["info"])


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- the lists ----------------------------------------------------------------------------------------------------

def test_embeddings_loaded_and_skipped(port):
    got = _get(port, "embeddings")
    entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32, "vectors": 3}
    assert got["loaded"] == {word: entry for word in ("inkstyle", "oldstyle", "watercolor", "<cat-toy>")}
    assert got["skipped"] == {"wide": {**entry, "shape": 768, "vectors": 1}}  # SD 2.x's width: not this model's


def test_loras_listed_with_metadata_inside_the_folder_only(port):
    assert _get(port, "loras") == [
        {"name": "shiny", "alias": "shiny", "path": "shiny.safetensors",
         "metadata": {"ss_output_name": "shiny-v2", "ss_tag_frequency": {"cats": {"cat": 3}}}},
        {"name": "old", "alias": "old", "path": "sub/old.pt", "metadata": {}}]


def test_sd_vae_styles_and_latent_upscale_modes(port):
    assert _get(port, "sd-vae") == [{"model_name": "other.safetensors", "filename": "sub/other.safetensors"}]
    assert _get(port, "prompt-styles") == [{"name": "ink", "prompt": "{prompt}, ink drawing", "negative_prompt": "blurry"},
                                           {"name": "warm", "prompt": "warm light", "negative_prompt": ""},
                                           {"name": "a, b", "prompt": "", "negative_prompt": "x"}]
    assert [m["name"] for m in _get(port, "latent-upscale-modes")] == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)"] == list(LATENT_UPSCALE_MODES)
    assert _get(port, "options")["sd_vae"] == "Automatic"


@pytest.mark.parametrize("url", ["samplers", "upscalers", "sd-models", "prompt-styles", "embeddings"])
def test_a1111_get_api_url(port, url):
    """A1111's test_utils.py test_get_api_url, for the routes this server has (it lacks cmd-flags, hypernetworks,
    face-restorers and realesrgan-models)."""
    _get(port, url)


def test_refresh_routes_see_new_files(port, folders):
    from safetensors.torch import save_file

    for route in ("refresh-checkpoints", "refresh-loras", "refresh-vae"):
        r = _post(port, route)
        assert r.status_code == 200 and r.json() is None
    save_file({"x": torch.zeros(1)}, str(folders / "loras" / "new.safetensors"))
    save_file({"emb_params": torch.ones(2, 32)}, str(folders / "embeddings" / "fresh.safetensors"))
    try:
        assert "new" in [x["name"] for x in _get(port, "loras")]
        assert "fresh" in _get(port, "embeddings")["skipped"]  # in the folder, not yet in the model
        assert _post(port, "refresh-embeddings").status_code == 200
        assert _get(port, "embeddings")["loaded"]["fresh"]["vectors"] == 2
    finally:
        (folders / "loras" / "new.safetensors").unlink()
        (folders / "embeddings" / "fresh.safetensors").unlink()
        assert _post(port, "refresh-embeddings").status_code == 200


# --- styles -------------------------------------------------------------------------------------------------------

def test_merge_prompts_follows_a1111():
    assert merge_prompts("{prompt}, ink drawing", "a cat") == "a cat, ink drawing"
    assert merge_prompts("({prompt}) and {prompt}", "x") == "(x) and x"
    assert merge_prompts(" warm light ", " a cat ") == "a cat, warm light"  # both stripped, joined by ", "
    assert merge_prompts("warm light", "") == "warm light" and merge_prompts("", "a cat") == "a cat"
    assert merge_prompts("{prompt}", "") == ""
    ink, warm = Style("ink", "{prompt}, ink", "blurry"), Style("warm", "warm", "")
    assert apply_styles("cat", "ugly", [ink, warm]) == ("cat, ink, warm", "ugly, blurry")
    assert apply_styles("cat", "ugly", [warm, ink]) == ("cat, warm, ink", "ugly, blurry")


def test_read_styles_formats_and_errors(tmp_path):
    old = tmp_path / "old.csv"  # A1111's first format: name,text; written by Excel with a BOM
    old.write_text("\ufeffname, text\nsharp, sharp focus\n,ignored\n", encoding="utf-8")
    assert read_styles(old) == {"sharp": Style("sharp", "sharp focus", "")}
    bad = tmp_path / "bad.csv"
    bad.write_text("title,body\nx,y\n")
    with pytest.raises(ValueError, match="bad.csv: a styles file starts with the header name,prompt"):
        read_styles(bad)
    with pytest.raises(ValueError, match="missing.csv: cannot read"):
        read_styles(tmp_path / "missing.csv")


def test_styles_applied_to_the_prompts_and_infotext(port):
    body, info = _generate(port, prompt="a cat", negative_prompt="ugly", styles=["ink", "warm"])
    styled = "a cat, ink drawing, warm light"
    assert info["prompt"] == styled and info["all_prompts"] == [styled]
    assert info["negative_prompt"] == "ugly, blurry" and info["styles"] == ["ink", "warm"]
    assert info["infotexts"][0].startswith(f"{styled}\nNegative prompt: ugly, blurry\n")
    assert body["parameters"]["prompt"] == "a cat" and body["parameters"]["styles"] == ["ink", "warm"]
    plain, plain_info = _generate(port, prompt=styled, negative_prompt="ugly, blurry")
    assert np.array_equal(_pixels(body["images"][0]), _pixels(plain["images"][0]))
    assert plain_info["infotexts"] == info["infotexts"]
    r = _post(port, "txt2img", {**SMALL, "styles": ["ink", "nope"]})
    assert r.status_code == 422 and "no style named 'nope'" in r.json()["detail"]


# --- sd_vae -------------------------------------------------------------------------------------------------------

def test_sd_vae_override_and_option(port, tiny_model_dir, folders):
    vae_file = folders / "vaes" / "sub" / "other.safetensors"
    own, own_info = _generate(port, prompt="a cat")
    other, info = _generate(port, prompt="a cat", override_settings={"sd_vae": "other.safetensors"})
    assert "VAE: other.safetensors" in info["infotexts"][0] and info["sd_vae_name"] == "other.safetensors"
    assert "VAE" not in own_info["infotexts"][0] and own_info["sd_vae_name"] is None
    pipe = StableDiffusion.from_pretrained(tiny_model_dir)
    pipe.load_vae(vae_file)
    ref = pipe("a cat", steps=2, seed=5, width=64, height=64, sampler="Euler", rng="gpu")
    assert np.array_equal(_pixels(other["images"][0]), np.asarray(ref.images[0]))
    assert info["infotexts"] == ref.infotexts and info["sd_vae_hash"] == pipe.vae_hash
    again, again_info = _generate(port, prompt="a cat")  # the override was for that request only
    assert np.array_equal(_pixels(again["images"][0]), _pixels(own["images"][0]))
    assert again_info["infotexts"] == own_info["infotexts"]

    assert _post(port, "options", {"sd_vae": "other.safetensors"}).status_code == 200
    try:
        assert _get(port, "options")["sd_vae"] == "other.safetensors"
        chosen, _ = _generate(port, prompt="a cat")
        assert np.array_equal(_pixels(chosen["images"][0]), _pixels(other["images"][0]))
        _, none_info = _generate(port, prompt="a cat", override_settings={"sd_vae": "None"})
        assert none_info["infotexts"] == own_info["infotexts"]
    finally:
        assert _post(port, "options", {"sd_vae": "Automatic"}).status_code == 200
    for payload in ({"sd_vae": "nope.safetensors"}, {"sd_vae": "../vaes/sub/other.safetensors"}):
        r = _post(port, "options", payload)
        assert r.status_code == 422 and "is not one of: Automatic, None, other.safetensors" in r.json()["detail"]
        r = _post(port, "txt2img", {**SMALL, "override_settings": payload})
        assert r.status_code == 422 and repr(payload["sd_vae"]) in r.json()["detail"]
    assert _get(port, "options")["sd_vae"] == "Automatic"


# --- booleans, nulls and scripts ----------------------------------------------------------------------------------

def _init_and_mask() -> tuple[str, str]:
    y, x = np.mgrid[0:64, 0:64]
    init = Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return _b64(init), _b64(mask)


def a1111_img2img_request() -> dict:
    """A1111's test_img2img.py simple_img2img_request (its basic test image replaced by ours)."""
    init, _ = _init_and_mask()
    return {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64,
            "include_init_images": False, "init_images": [init], "inpaint_full_res": False,
            "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False, "mask": None,
            "mask_blur": 4, "n_iter": 1, "negative_prompt": "", "override_settings": {}, "prompt": "example prompt",
            "resize_mode": 0, "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0,
            "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3,
            "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64}


def test_a1111_img2img_tests(port):
    """A1111's test_img2img.py: simple, masked and inverted-mask requests pass; its sd upscale script request is
    refused here (no scripts), naming the script."""
    _, mask = _init_and_mask()
    request = a1111_img2img_request()
    assert _post(port, "img2img", request).status_code == 200
    assert _post(port, "img2img", {**request, "mask": mask}).status_code == 200
    assert _post(port, "img2img", {**request, "mask": mask, "inpainting_mask_invert": True}).status_code == 200
    r = _post(port, "img2img", {**request, "script_name": "sd upscale", "script_args": ["", 8, "Lanczos", 2.0]})
    assert r.status_code == 422 and "script 'sd upscale' is not available" in r.json()["detail"]


def test_img2img_resizes_init_and_mask_by_resize_mode(port):
    """A1111 brings the init image and mask to width x height by resize_mode (0 just resize, 1 crop and resize,
    2 resize and fill). An 80x64 init image and mask asked at 64x64 was refused (422: the mask was compared with
    the init image already resized); each mode now gives the image that the same request gives with the init image
    brought to 64x64 that way beforehand, and mode 3 (latent upscale) is refused naming it."""
    from stablediff.images import resize_init

    y, x = np.mgrid[0:64, 0:80]
    init = Image.fromarray(np.stack([x * 3, y * 4, (x + y) * 2], -1).astype(np.uint8))
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (8, 16, 48, 48))
    base = {**SMALL, "prompt": "a boat", "denoising_strength": 0.6}
    results = {}
    for mode in (0, 1, 2):
        body, _ = _generate(port, "img2img", **base, init_images=[_b64(init)], resize_mode=mode)
        ref, _ = _generate(port, "img2img", **base, init_images=[_b64(resize_init(init, 64, 64, mode))])
        results[mode] = _pixels(body["images"][0])
        assert np.array_equal(results[mode], _pixels(ref["images"][0])), mode
        masked = _post(port, "img2img", {**base, "init_images": [_b64(init)], "mask": _b64(mask), "resize_mode": mode})
        assert masked.status_code == 200, masked.text
    assert not np.array_equal(results[0], results[1]) and not np.array_equal(results[1], results[2])
    r = _post(port, "img2img", {**base, "init_images": [_b64(init)], "resize_mode": 3})
    assert r.status_code == 422 and "resize_mode 3 is not one of 0 (Just resize)" in r.text, r.text


def test_a_mask_of_another_aspect_ratio_is_refused_before_queueing(port, app, monkeypatch):
    """422 naming both sizes, from the route: no job is made (it had been refused on the worker, after waiting in
    the queue behind every job before it)."""
    from stablediff.serve import server

    made = []
    monkeypatch.setattr(server, "Job", lambda *a, **kw: made.append(a) or pytest.fail("queued"))
    init, _ = _init_and_mask()
    r = _post(port, "img2img", {**SMALL, "init_images": [init], "mask": _b64(Image.new("L", (64, 32), 255))})
    assert r.status_code == 422 and "mask 64x32 does not have the aspect ratio of the init image 64x64" in r.text
    assert not made
    r = _post(port, "img2img", {**SMALL, "init_images": [init, _b64(Image.new("RGB", (64, 32)))], "batch_size": 2,
                                "mask": _b64(Image.new("L", (32, 32), 255))})
    assert r.status_code == 422 and "init image 64x32" in r.text and not made


def test_img2img_noise_multiplier_field_and_option(port):
    """A1111's initial_noise_multiplier, as a request field or its option (override_settings): the same image,
    "Noise multiplier: 0.9" in the infotext; another image than 1's."""
    init, _ = _init_and_mask()
    base = {**SMALL, "prompt": "a boat", "init_images": [init], "denoising_strength": 0.6}
    field, info = _generate(port, "img2img", **base, initial_noise_multiplier=0.9)
    option, _ = _generate(port, "img2img", **base, override_settings={"initial_noise_multiplier": 0.9})
    plain, plain_info = _generate(port, "img2img", **base)
    assert np.array_equal(_pixels(field["images"][0]), _pixels(option["images"][0]))
    assert not np.array_equal(_pixels(field["images"][0]), _pixels(plain["images"][0]))
    assert "Noise multiplier: 0.9" in info["infotexts"][0] and "Noise multiplier" not in plain_info["infotexts"][0]
    r = _post(port, "img2img", {**base, "initial_noise_multiplier": 3})
    assert r.status_code == 422 and "initial_noise_multiplier" in r.text


def test_sizes_not_multiples_of_8_round_down_as_a1111(port):
    """A1111 makes height // 8 x width // 8 latents, so width 100 gives a 96-pixel image (it had been a 422 here);
    img2img likewise (where A1111 itself fails to match the init latents' size)."""
    body, info = _generate(port, "txt2img", **{**SMALL, "width": 100, "height": 71})
    assert _pixels(body["images"][0]).shape == (64, 96, 3) and "Size: 96x64" in info["infotexts"][0]
    init, _ = _init_and_mask()
    body, _ = _generate(port, "img2img", **{**SMALL, "width": 70, "height": 70}, init_images=[init])
    assert _pixels(body["images"][0]).shape == (64, 64, 3)


def test_img2img_takes_a_batch_of_init_images(port):
    """A1111's img2img takes up to batch_size init images, one for each image of the batch (which then has as many
    images); image k is the request with init image k alone and seed + k; more init images than batch_size: 422."""
    a, _ = _init_and_mask()
    y, x = np.mgrid[0:64, 0:64]
    b = _b64(Image.fromarray(np.stack([255 - x * 4, y * 2, x * 3], -1).astype(np.uint8)))
    base = {**SMALL, "prompt": "a boat", "denoising_strength": 0.6}
    body, info = _generate(port, "img2img", **base, init_images=[a, b], batch_size=4)
    assert len(body["images"]) == 2 and info["all_seeds"] == [5, 6] and info["batch_size"] == 2
    for k, image in enumerate((a, b)):
        alone, _ = _generate(port, "img2img", **{**base, "seed": 5 + k}, init_images=[image])
        assert np.abs(_pixels(body["images"][k]).astype(int) - _pixels(alone["images"][0])).max() <= 1, k
    r = _post(port, "img2img", {**base, "init_images": [a, b, a], "batch_size": 2})
    assert r.status_code == 422 and "init_images: 3 images for batch_size 2" in r.text, r.text


def test_a1111_txt2img_tests(port):
    """A1111's test_txt2img.py simple_txt2img_request and its variations pass, hires fix included."""
    request = {"batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0,
               "firstphase_height": 0, "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "",
               "prompt": "example prompt", "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0,
               "s_tmin": 0, "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1,
               "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1, "subseed_strength": 0,
               "tiling": False, "width": 64}
    variations = [{}, {"negative_prompt": "example negative prompt"},
                  # A1111's prompt also has ((emphasis)), (emphasis1:1.1): on a random-weight text encoder the
                  # emphasis' mean restore divides by about 0 (tests/test_prompts.py checks emphasis itself)
                  {"prompt": "emphasis, emphasis1, [to:1], [from::2], [from:to:0.3], [alt|alt1]"},
                  {"height": 128}, {"sampler_index": "PLMS"}, {"sampler_index": "DDIM"}, {"sampler_index": "UniPC"},
                  {"n_iter": 2}, {"batch_size": 2}]
    for change in variations:
        r = _post(port, "txt2img", {**request, **change})
        assert r.status_code == 200, (change, r.text)
    # A1111's hires variation: a denoising strength of 0 leaves the second pass nothing to do (422 naming it)
    answer = _post(port, "txt2img", {**request, "enable_hr": True})
    assert answer.status_code == 422 and "strength 0" in answer.text, answer.text
    assert _post(port, "txt2img", {**request, "enable_hr": True, "denoising_strength": 0.5, "hr_scale": 1.5,
                                   "hr_second_pass_steps": 2}).status_code == 200


def test_inpainting_mask_invert_takes_booleans_and_0_1(port):
    init, mask = _init_and_mask()
    base = {**SMALL, "prompt": "a boat", "init_images": [init], "mask": mask, "denoising_strength": 0.6}
    images = {}
    for value in (True, 1, False, 0):
        body, info = _generate(port, "img2img", **base, inpainting_mask_invert=value)
        images[value if isinstance(value, bool) else f"int{value}"] = _pixels(body["images"][0])
    assert np.array_equal(images[True], images["int1"]) and np.array_equal(images[False], images["int0"])
    assert not np.array_equal(images[True], images[False])
    # inverted equals the inverted mask sent as it is, and says so in the infotext as A1111 does
    flipped = _b64(ImageOps.invert(Image.open(io.BytesIO(base64.b64decode(mask))).convert("L")))
    body, _ = _generate(port, "img2img", **{**base, "mask": flipped})
    assert np.array_equal(_pixels(body["images"][0]), images[True])
    _, info = _generate(port, "img2img", **base, inpainting_mask_invert=True)
    assert "Mask mode: Inpaint not masked" in info["infotexts"][0]
    for bad in (2, -1, 0.5, "yes"):
        r = _post(port, "img2img", {**base, "inpainting_mask_invert": bad})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "inpainting_mask_invert", bad


def test_scripts_refused_by_name_nulls_and_empties_accepted(port):
    r = _post(port, "txt2img", {**SMALL, "alwayson_scripts": {"ControlNet": {"args": []}, "ADetailer": {"args": [False]}}})
    assert r.status_code == 422
    assert "always-on scripts 'ADetailer' are not available" in r.json()["detail"]  # ControlNet is served
    r = _post(port, "txt2img", {**SMALL, "script_name": "X/Y/Z plot"})
    assert r.status_code == 422 and "script 'X/Y/Z plot'" in r.json()["detail"]
    for fine in ({"script_name": "", "script_args": [], "alwayson_scripts": {}},
                 {"script_name": None, "alwayson_scripts": None, "styles": None, "override_settings": None},
                 {"some_extension_field": {"a": 1}}):
        assert _post(port, "txt2img", {**SMALL, **fine}).status_code == 200, fine


# --- skip ---------------------------------------------------------------------------------------------------------

class ScriptedPipe:
    """A pipeline whose generate runs `actions[call]` (a skip, a stop) as if during that call's steps."""

    def __init__(self, actions: dict):
        self.actions, self.seeds = actions, []

    def generate(self, params, *, init_image, mask_image, callback, cancel, upscaler_dir=None, controls=()):
        self.seeds.append(params.seed)
        self.actions.get(len(self.seeds) - 1, lambda: None)()
        if cancel.is_set():
            raise Cancelled("stopped within the steps")
        return SimpleNamespace(seed=params.seed)


@pytest.mark.parametrize("plan, ran, kept, interrupted", [
    ({}, [10, 11, 12], [10, 11, 12], False),
    ({0: "skip"}, [10, 11, 12], [11, 12], False),  # the skipped iteration is dropped, the next ones run
    ({0: "skip", 1: "skip"}, [10, 11, 12], [12], False),
    ({1: "stop"}, [10, 11], [10], True),
    ({0: "skip+stop"}, [10], [], True),  # a stop wins over a skip
    ({0: "stop+skip"}, [10], [], True),
])
def test_skip_drops_the_running_iteration_only(plan, ran, kept, interrupted):
    job = Job("txt2img", lambda job: None, job_count=3)
    do = {"skip": job.skip, "stop": job.stop, "skip+stop": lambda: (job.skip(), job.stop()),
          "stop+skip": lambda: (job.stop(), job.skip())}
    pipe = ScriptedPipe({i: do[name] for i, name in plan.items()})
    results, stopped = run_iterations(job, pipe, GenerationParams(seed=10), 3, None, None)
    assert pipe.seeds == ran and [r.seed for r in results] == kept and stopped is interrupted


def test_skip_between_iterations_skips_nothing():
    job = Job("txt2img", lambda job: None, job_count=2)
    job.skip()  # before the first iteration: the image it meant is done
    pipe = ScriptedPipe({})
    results, stopped = run_iterations(job, pipe, GenerationParams(seed=3), 2, None, None)
    assert [r.seed for r in results] == [3, 4] and stopped is False


def test_skip_route_during_a_job(port, app):
    assert _post(port, "skip").json() == {}  # no job running: nothing to do
    worker, fired = app.state.worker, threading.Event()

    def skip_once(module, args):
        if not fired.is_set():
            fired.set()
            assert _post(port, "skip").json() == {}

    hook = worker.pipe.unet.mid_block.register_forward_pre_hook(skip_once)
    try:
        body, info = _generate(port, prompt="a cat", n_iter=3, seed=20)
    finally:
        hook.remove()
    assert fired.is_set() and len(body["images"]) == 2
    assert info["all_seeds"] == [21, 22] and info["interrupted"] is False
    plain, _ = _generate(port, prompt="a cat", seed=21)
    assert np.array_equal(_pixels(body["images"][0]), _pixels(plain["images"][0]))


# --- the CLI ------------------------------------------------------------------------------------------------------

def test_serve_flags_checked_before_loading(tmp_path, capsys):
    from stablediff.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--vae-dir", "v", "--styles-file", "s.csv", "--upscaler-dir", "u"])
    assert (str(args.vae_dir), str(args.styles_file), str(args.upscaler_dir)) == ("v", "s.csv", "u")
    out = ["--output-dir", str(tmp_path / "out")]
    assert main(["serve", *out, "--vae-dir", str(tmp_path / "no-vaes")]) == 2
    assert main(["serve", *out, "--upscaler-dir", str(tmp_path / "no-ups")]) == 2
    assert main(["serve", *out, "--model", "demo", "--styles-file", str(tmp_path / "no.csv")]) == 2
    err = capsys.readouterr().err
    assert "--vae-dir" in err and "no-vaes: no such folder" in err and "no-ups: no such folder" in err
    assert "no.csv: cannot read the styles file" in err


def test_eta_as_webuiapi_sends_it(port, tiny_model_dir):
    """webuiapi sends eta 1.0 (and s_churn 0, s_tmin 0, s_tmax 0, s_noise 1) with every request: A1111's DDIM
    takes it (stochastic DDIM, "Eta DDIM: 1.0"); without eta the eta_ddim option (0) applies; above 1 it is a
    422."""
    body = {**SMALL, "prompt": "a boat", "sampler_name": "DDIM", "steps": 3}
    sent, info = _generate(port, "txt2img", **body, eta=1.0, s_churn=0, s_tmin=0, s_tmax=0, s_noise=1)
    assert "Eta DDIM: 1.0" in info["infotexts"][0]
    plain, plain_info = _generate(port, "txt2img", **body)
    assert "Eta" not in plain_info["infotexts"][0]
    assert not np.array_equal(_pixels(sent["images"][0]), _pixels(plain["images"][0]))
    option, _ = _generate(port, "txt2img", **body, override_settings={"eta_ddim": 1.0})
    assert np.array_equal(_pixels(option["images"][0]), _pixels(sent["images"][0]))
    assert _get(port, "options")["eta_ddim"] == 0.0
    assert _post(port, "options", {"eta_ddim": 1.0}).status_code == 200
    try:  # the server's option, for later requests that send no eta
        later, _ = _generate(port, "txt2img", **body)
        assert np.array_equal(_pixels(later["images"][0]), _pixels(sent["images"][0]))
    finally:
        assert _post(port, "options", {"eta_ddim": 0.0}).status_code == 200
    want = StableDiffusion.from_pretrained(tiny_model_dir)("a boat", steps=3, width=64, height=64, seed=5,
                                                           sampler="DDIM", eta=1.0, rng="gpu")
    assert np.abs(_pixels(sent["images"][0]).astype(int) - np.asarray(want.images[0])).max() <= 1
    r = _post(port, "txt2img", {**body, "eta": 2})
    assert r.status_code == 422 and "eta" in r.text


def test_sigma_churn_and_noise_as_a1111_takes_them(port, tiny_model_dir):
    """s_churn (with s_tmin, s_tmax) changes A1111's Euler, Heun, DPM2 and s_noise those and its other ancestral
    and SDE samplers: the request's value runs (the same pixels as the Python call), an option set by POST /options
    or override_settings wins where it is not the default (as in A1111), samplers A1111 does not give them to
    ignore them, and a negative or non-finite value is a 422."""
    body = {**SMALL, "prompt": "a boat", "sampler_name": "Euler", "steps": 3}
    churned, info = _generate(port, "txt2img", **body, s_churn=2.0, s_noise=0.9)
    assert "Sigma churn: 2.0" in info["infotexts"][0] and "Sigma noise: 0.9" in info["infotexts"][0]
    plain, plain_info = _generate(port, "txt2img", **body, s_churn=0, s_tmin=0, s_tmax=0, s_noise=1)  # webuiapi's
    assert "Sigma" not in plain_info["infotexts"][0]
    assert not np.array_equal(_pixels(churned["images"][0]), _pixels(plain["images"][0]))
    want = StableDiffusion.from_pretrained(tiny_model_dir)("a boat", steps=3, width=64, height=64, seed=5,
                                                           sampler="Euler", s_churn=2.0, s_noise=0.9, rng="gpu")
    assert np.abs(_pixels(churned["images"][0]).astype(int) - np.asarray(want.images[0])).max() <= 1
    option, _ = _generate(port, "txt2img", **body, s_churn=0.1, s_noise=0.9, override_settings={"s_churn": 2.0})
    assert np.array_equal(_pixels(option["images"][0]), _pixels(churned["images"][0]))
    assert _get(port, "options")["s_churn"] == 0.0
    assert _post(port, "options", {"s_churn": 2.0, "s_noise": 0.9}).status_code == 200
    try:  # the server's options, for later requests
        later, _ = _generate(port, "txt2img", **body)
        assert np.array_equal(_pixels(later["images"][0]), _pixels(churned["images"][0]))
    finally:
        assert _post(port, "options", {"s_churn": 0.0, "s_noise": 1.0}).status_code == 200
    other, other_info = _generate(port, "txt2img", **{**body, "sampler_name": "DPM++ 2M"}, s_churn=2.0)
    same, _ = _generate(port, "txt2img", **{**body, "sampler_name": "DPM++ 2M"})
    assert np.array_equal(_pixels(other["images"][0]), _pixels(same["images"][0]))
    assert "Sigma" not in other_info["infotexts"][0]
    for name, value in (("s_churn", -1), ("s_noise", 11)):
        r = _post(port, "txt2img", {**body, name: value})
        assert r.status_code == 422 and name in r.text

def test_ngms_request_field_and_options(port, tiny_model_dir):
    """s_min_uncond (A1111's NGMS) from the request, else from the options; the same pixels as the Python call."""
    body = {**SMALL, "prompt": "a boat", "steps": 4}
    sent, info = _generate(port, "txt2img", **body, s_min_uncond=5.0)
    assert "NGMS: 5.0" in info["infotexts"][0]
    want = StableDiffusion.from_pretrained(tiny_model_dir)("a boat", steps=4, width=64, height=64, seed=5,
                                                           sampler="Euler", s_min_uncond=5.0, rng="gpu")
    assert np.abs(_pixels(sent["images"][0]).astype(int) - np.asarray(want.images[0])).max() <= 1
    assert _get(port, "options")["s_min_uncond"] == 0.0
    assert _post(port, "options", {"s_min_uncond": 5.0}).status_code == 200
    try:
        later, later_info = _generate(port, "txt2img", **body)
        assert np.array_equal(_pixels(later["images"][0]), _pixels(sent["images"][0]))
        off, off_info = _generate(port, "txt2img", **body, s_min_uncond=0)  # the request's 0 wins
        assert "NGMS" not in off_info["infotexts"][0]
    finally:
        assert _post(port, "options", {"s_min_uncond": 0.0}).status_code == 200
    r = _post(port, "txt2img", {**body, "s_min_uncond": -1})
    assert r.status_code == 422 and "s_min_uncond" in r.text
