"""Upscalers (upscalers.py): random-weight RRDBNet and SRVGGNetCompact files in every key layout, .pth and
.safetensors, run against spandrel (the test-only oracle: pip install --no-deps spandrel einops); tiling; A1111's
sizing; refused files; `stablediff upscale` end to end."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import shutil
import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from stablediff import upscalers
from stablediff.cli import main
from stablediff.keymap import CheckpointError
from stablediff.upscalers import RRDBConfig, RRDBNet, SRVGGConfig, SRVGGNetCompact


def import_spandrel():
    """spandrel, or skip. Its package imports every architecture, and two it has (LaMa, RestoreFormer; not ours)
    import torchvision at import time: where torchvision is missing, inert stand-ins are put in sys.modules for
    the import only and taken out again."""
    pytest.importorskip("einops")
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        functional = types.ModuleType("torchvision.transforms.functional")
        functional.InterpolationMode = functional.rotate = functional.normalize = None
        stubs = {"torchvision": types.ModuleType("torchvision"),
                 "torchvision.transforms": types.ModuleType("torchvision.transforms"),
                 "torchvision.transforms.functional": functional}
    sys.modules.update(stubs)
    try:
        return pytest.importorskip("spandrel")
    finally:
        for name in stubs:
            del sys.modules[name]


def random_weights(module: torch.nn.Module, seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    """A state dict of the module's names and shapes (built on the meta device) with random values."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * std for k, v in module.state_dict().items()}


BSRGAN_NAMES = [(r"body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2."), (r"conv_body\.", "trunk_conv."),
                (r"conv_up(\d)\.", r"upconv\1."), (r"conv_hr\.", "HRconv.")]


def bsrgan_layout(sd: dict) -> dict:
    """Real-ESRGAN's names -> BSRGAN's (and the older ESRGAN repository's)."""
    out = {}
    for key, value in sd.items():
        for ours, theirs in BSRGAN_NAMES:
            key = re.sub("^" + ours, theirs, key)
        out[key] = value
    return out


def old_esrgan(seed: int) -> dict:
    """The original ESRGAN's `model.N` layout, made by spandrel's own module (its names are the oracle's)."""
    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    module = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=2, scale=4)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in module.state_dict().items()}


def compact(seed: int, scale: int = 4, convs: int = 2) -> dict:
    return random_weights(SRVGGNetCompact(SRVGGConfig(features=16, convs=convs, scale=scale)), seed, std=0.1)


X4 = RRDBConfig(features=16, blocks=2)
X2 = RRDBConfig(in_channels=12, features=16, blocks=2, unshuffle=2)
X1 = RRDBConfig(in_channels=48, features=16, blocks=1, unshuffle=4)

# (file name, state dict maker, wrapper key or None, expected config)
CASES = {
    "esrgan-old.pth": (lambda: old_esrgan(1), "params_ema", RRDBConfig(features=16, blocks=2)),
    "esrgan-old.safetensors": (lambda: old_esrgan(2), None, RRDBConfig(features=16, blocks=2)),
    "realesrgan-x4.safetensors": (lambda: random_weights(RRDBNet(X4), 3), None, X4),
    "realesrgan-x4.pth": (lambda: random_weights(RRDBNet(X4), 4), "params_ema", X4),
    "realesrgan-x2.pth": (lambda: random_weights(RRDBNet(X2), 5), "params", X2),
    "realesrgan-x1.safetensors": (lambda: random_weights(RRDBNet(X1), 6), None, X1),
    "bsrgan-x4.pth": (lambda: bsrgan_layout(random_weights(RRDBNet(X4), 7)), None, X4),
    "compact-x4.pth": (lambda: compact(8), "params_ema", SRVGGConfig(features=16, convs=2, scale=4)),
    "compact-x2.safetensors": (lambda: compact(9, scale=2), None, SRVGGConfig(features=16, convs=2, scale=2)),
}


def write(path, sd: dict, wrapper: str | None = None):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save({wrapper: sd} if wrapper else sd, path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """name -> (path, the state dict as saved, expected config), each file written when first asked for (the
    original ESRGAN layout needs spandrel)."""
    folder, made = tmp_path_factory.mktemp("upscalers"), {}

    def get(name: str):
        if name not in made:
            make, wrapper, config = CASES[name]
            sd = make()
            made[name] = (write(folder / name, sd, wrapper), sd, config)
        return made[name]

    return get


@pytest.fixture(scope="module")
def image24x20():
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 20, 24, generator=g)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_spandrel(name, model_file, image24x20):
    spandrel = import_spandrel()
    path, sd, config = model_file(name)
    ours = upscalers.load_upscaler(path)
    assert ours.config == config
    oracle = spandrel.ModelLoader().load_from_state_dict(dict(sd))
    assert ours.scale == oracle.scale
    with torch.no_grad():
        expected = oracle.model.eval()(image24x20)
        got = ours(image24x20)
    assert got.shape == (1, 3, 20 * ours.scale, 24 * ours.scale)
    assert expected.abs().mean() > 1e-3  # a real signal, not all zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_tile_spans():
    # windows of 48 overlapping by at least 16; each keeps up to the middle of its overlaps
    assert upscalers.tile_spans(100, 48, 16) == [(0, 48, 0, 40), (32, 80, 40, 66), (52, 100, 66, 100)]
    # a pixel-unshuffling model's windows start on its grid (multiples of 4); the last one reaches the edge
    assert upscalers.tile_spans(101, 48, 16, align=4) == [(0, 48, 0, 40), (32, 80, 40, 66), (52, 101, 66, 101)]
    assert upscalers.tile_spans(40, 48, 16) == [(0, 40, 0, 40)]
    assert upscalers.tile_spans(100, 0, 16) == [(0, 100, 0, 100)]


@pytest.mark.parametrize("model, overlap", [
    (SRVGGNetCompact(SRVGGConfig(features=8, convs=2, scale=4)), 12),  # receptive field: 4 pixels
    (RRDBNet(RRDBConfig(features=8, blocks=1, growth=8)), 48),  # about 20 pixels
    (RRDBNet(RRDBConfig(in_channels=12, features=8, blocks=1, growth=8, unshuffle=2)), 88),  # about 40
], ids=["compact", "rrdb-x4", "rrdb-x2-unshuffle"])
def test_tiled_equals_untiled(model, overlap):
    """With half the overlap covering the receptive field, the tiles' output is the whole image's."""
    model.load_state_dict(random_weights(model, 11, std=0.1), assign=True)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 2 * overlap + 13, 2 * overlap + 7, generator=g)
    whole = upscalers.run_tiled(model.eval(), x, tile=0)
    tiled = upscalers.run_tiled(model, x, tile=overlap + 16, overlap=overlap)
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=0)
    narrow = upscalers.run_tiled(model, x, tile=12, overlap=2)
    assert (narrow - whole).abs().max() > 1e-4  # the check above can fail: too little context shows


@pytest.mark.parametrize("size, scale, expected", [((24, 20), 2, (48, 40)), ((25, 21), 1.5, (32, 24)),
                                                   ((100, 60), 1, (96, 56))])
def test_target_size_is_a1111s(size, scale, expected):
    assert upscalers.target_size(size, scale) == expected


def test_upscale_runs_a_model_again_then_resizes(model_file):
    """A1111's rule: a 2x model runs while its output is under the target (3 passes to 8x), then Lanczos."""
    model = upscalers.load_upscaler(model_file("compact-x2.safetensors")[0])
    image = Image.effect_noise((24, 20), 60).convert("RGB")
    passes = [image]
    for _ in range(3):
        passes.append(upscalers.to_image(model(upscalers.to_tensor(passes[-1]))))
    assert upscalers.upscale(image, 8, model).tobytes() == passes[3].tobytes()  # 192x160, no resize
    assert upscalers.upscale(image, 3, model).tobytes() == \
        passes[2].resize((72, 56), resample=Image.Resampling.LANCZOS).tobytes()
    nearest = image.resize((48, 40), Image.Resampling.NEAREST)
    assert upscalers.upscale(image, 2, "Nearest").tobytes() == nearest.tobytes()


def test_malicious_pth_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "4x-evil.pth"
    torch.save({"params_ema": {"conv_first.weight": Payload()}}, path)
    with pytest.raises(CheckpointError, match=r"4x-evil\.pth: refused to load: .*system"):
        upscalers.load_upscaler(path)
    assert not marker.exists()


def test_unknown_file_refused(tmp_path):
    path = write(tmp_path / "vae.safetensors", {"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)})
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: not an upscaler stablediff knows .*decoder"):
        upscalers.load_upscaler(path)
    torch.save({"params_ema": "not weights"}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=r"empty\.pth: holds no tensors"):
        upscalers.load_upscaler(tmp_path / "empty.pth")


@pytest.mark.parametrize("sd, message", [
    ({k: torch.zeros(3) for k in ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_body.weight",
                                  "conv_last.weight")}, r"conv_first\.weight has shape \(3,\), not a convolution's"),
    ({"body.0.weight": torch.zeros(8, 3, 3, 3), "body.1.weight": torch.zeros(8), "body.2.bias": torch.zeros(48)},
     r"body\.2\.weight is missing"),
    ({"body.0.weight": torch.zeros(8, 0, 3, 3), "body.1.weight": torch.zeros(8),
      "body.2.weight": torch.zeros(7, 8, 3, 3)}, "SRVGGNetCompact whose last layer has 7 channels"),
], ids=["rrdb-1d", "srvgg-no-last-weight", "srvgg-7-channels"])
def test_malformed_refused(tmp_path, sd, message):
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: " + message):
        upscalers.load_upscaler(write(tmp_path / "odd.safetensors", sd))


def test_stray_block_refused(tmp_path, model_file):
    sd = dict(model_file("realesrgan-x4.safetensors")[1])
    sd["body.999999.rdb1.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"stray\.safetensors: body\.N keys skip numbers below 999999"):
        upscalers.load_upscaler(write(tmp_path / "stray.safetensors", sd))


def test_wrong_shapes_refused(tmp_path, model_file):
    sd = dict(model_file("realesrgan-x4.safetensors")[1])
    sd["conv_hr.weight"] = torch.zeros(16, 8, 3, 3)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*wrong shape conv_hr\.weight"):
        upscalers.load_upscaler(write(tmp_path / "bad.safetensors", sd))


# --- stablediff upscale ----------------------------------------------------------------------------------------

def test_cli_upscale(tmp_path, model_file, capsys):
    source = Image.effect_noise((24, 20), 60).convert("RGB")
    path = tmp_path / "in.png"
    from stablediff.images import png_bytes

    path.write_bytes(png_bytes(source, "a cat\nSteps: 5, Sampler: Euler, Seed: 42, Size: 24x20"))
    model = model_file("compact-x4.pth")[0]
    args = ["upscale", str(path), "--upscaler", str(model), "--scale", "2", "--output-dir", str(tmp_path / "out"),
            "--tile", "16", "--tile-overlap", "4"]
    assert main(args) == 0
    assert main(args) == 0  # never over the first file
    first, second = (tmp_path / "out" / name for name in ("00000-42.png", "00001-42.png"))
    assert capsys.readouterr().out.split() == [str(first), str(second)]
    with Image.open(first) as out:
        expected = upscalers.upscale(source, 2, upscalers.load_upscaler(model), tile=16, overlap=4)
        assert out.size == (48, 40) and out.convert("RGB").tobytes() == expected.tobytes()
        assert out.info["parameters"].startswith("a cat\n")
        assert out.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: compact-x4"
    assert main(["upscale", str(path), "--upscaler", "LANCZOS", "--scale", "1.5", "--output-dir",
                 str(tmp_path / "lz")]) == 0
    with Image.open(tmp_path / "lz" / "00000-42.png") as out:
        assert out.tobytes() == source.resize((32, 24), Image.Resampling.LANCZOS).tobytes()


@pytest.mark.parametrize("extra, message", [
    (["--scale", "0.5"], "--scale 0.5 is outside 1..8"),
    (["--scale", "nan"], "--scale nan is outside 1..8"),
    (["--max-pixels", "1000"], r"upscaled size 48x40 = 1,920 is over the limit of 1,000 \(set with --max-pixels\)"),
    (["--tile", "10"], "--tile 10 --tile-overlap 16: tile size 10 must be 0"),
    (["--upscaler", "missing.pth"], "--upscaler missing.pth: no such file"),
    (["--upscaler", "{bad}"], "--upscaler .*bad.safetensors: not an upscaler stablediff knows"),
    (["--image", "nothing.png"], "nothing.png: cannot read image"),
])
def test_cli_upscale_errors(tmp_path, capsys, extra, message):
    image = tmp_path / "in.png"
    Image.new("RGB", (24, 20)).save(image)
    bad = write(tmp_path / "bad.safetensors", {"x": torch.zeros(2)})
    args = {"--upscaler": "nearest", "--image": str(image)}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value.replace("{bad}", str(bad))
    image_arg = args.pop("--image")
    argv = ["upscale", image_arg, "--output-dir", str(tmp_path / "out"), *[x for kv in args.items() for x in kv]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stablediff: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- the server: /sdapi/v1/upscalers and /sdapi/v1/extra-single-image ------------------------------------------

@pytest.fixture(scope="module")
def client(model_file, tmp_path_factory):
    """The app with an upscaler folder (two models and a file that is no upscaler) and a stand-in for the SD model,
    which these routes never use; max_pixels 256x256."""
    fastapi_testclient = pytest.importorskip("fastapi.testclient")
    from stablediff.limits import Limits
    from stablediff.serve.server import ServeConfig, create_app

    folder = tmp_path_factory.mktemp("upscaler-dir")
    (folder / "sub").mkdir()
    shutil.copy(model_file("compact-x4.pth")[0], folder / "compact-x4.pth")
    shutil.copy(model_file("realesrgan-x2.pth")[0], folder / "sub" / "realesrgan-x2.pth")
    write(folder / "vae.safetensors", {"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)})
    stand_in = types.SimpleNamespace(weights_file=None, native_size=64, load_embeddings=lambda folder: [])
    config = ServeConfig(model="demo", upscaler_dir=folder, limits=Limits(max_pixels=256 * 256))
    with fastapi_testclient.TestClient(create_app(config, load=lambda entry: stand_in),
                                       base_url="http://127.0.0.1") as c:
        yield c


def test_upscalers_list(client):
    rows = client.get("/sdapi/v1/upscalers").json()
    assert rows == [
        {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4},
        {"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4},
        {"name": "Nearest", "model_name": None, "model_path": None, "model_url": None, "scale": 4},
        {"name": "compact-x4", "model_name": "SRVGG", "model_path": "compact-x4.pth", "model_url": None, "scale": 4},
        {"name": "sub/realesrgan-x2", "model_name": "ESRGAN", "model_path": "sub/realesrgan-x2.pth",
         "model_url": None, "scale": 2},
    ]  # vae.safetensors is no upscaler: left out


def png_b64(image: Image.Image, parameters: str | None = None) -> str:
    from stablediff.images import png_bytes

    return base64.b64encode(png_bytes(image, parameters) if parameters else _png(image)).decode()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_extra_single_image(client, model_file):
    source = Image.effect_noise((24, 20), 60).convert("RGB")
    body = {"image": png_b64(source, "a cat\nSteps: 5, Seed: 7, Size: 24x20"), "upscaler_1": "sub/realesrgan-x2",
            "upscaling_resize": 3}
    answer = client.post("/sdapi/v1/extra-single-image", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["html_info"] == "<p>Postprocess upscale by: 3, Postprocess upscaler: sub/realesrgan-x2</p>"
    model = upscalers.load_upscaler(model_file("realesrgan-x2.pth")[0])
    with Image.open(io.BytesIO(base64.b64decode(result["image"]))) as out:
        assert out.size == (72, 56)
        assert out.tobytes() == upscalers.upscale(source, 3, model).tobytes()
        assert out.info["parameters"].startswith("a cat\n")
    same = client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(source)}).json()  # upscaler_1 None
    with Image.open(io.BytesIO(base64.b64decode(same["image"]))) as out:
        assert out.size == (24, 20) and out.convert("RGB").tobytes() == source.tobytes()


@pytest.mark.parametrize("fields, message", [
    ({"upscaler_1": "4x-missing"}, "upscaler_1 '4x-missing' is not one of: None, Lanczos, Nearest, compact-x4, "
                                   "sub/realesrgan-x2, vae$"),
    ({"upscaler_1": "vae"}, r"^<upscaler-dir>/vae\.safetensors: not an upscaler stablediff knows"),  # no server path
    ({"upscaler_1": "Lanczos", "resize_mode": 1}, "resize_mode 1 .* is not supported"),
    ({"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, "face restoration is not supported"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 8, "image_size": (64, 40)},
     r"upscaled size 512x320 = 163,840 is over the limit of 65,536 \(set with --max-pixels\)"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 9}, "upscaling_resize: Input should be less than or equal to 8"),
])
def test_extra_single_image_refused(client, fields, message):
    size = fields.pop("image_size", (24, 20))
    answer = client.post("/sdapi/v1/extra-single-image",
                         json={"image": png_b64(Image.new("RGB", size)), **fields})
    assert answer.status_code == 422
    assert re.search(message, answer.json()["detail"]), answer.json()
