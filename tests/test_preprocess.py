"""preprocess.py: model-free ControlNet preprocessors against OpenCV (the extension's own calls, where cv2 installs:
pip install opencv-python-headless, which needs only numpy) and against hand-made images with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stablediff import preprocess as P


def scene(height=96, width=128, seed=0) -> np.ndarray:
    """Smooth shading, a disc, a bar and noise, different in each channel: edges of all directions and strengths."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), np.float32)
    image[..., 0] = 120 + 80 * np.sin(xx / 7.0) * np.cos(yy / 9.0)
    image[..., 1] = np.where((xx - 60) ** 2 + (yy - 45) ** 2 < 25 ** 2, 200, 40)
    image[..., 2] = np.where((xx > 15) & (xx < 50) & (yy > 10) & (yy < 80), 230, 90) + 20 * np.sin((xx + yy) / 4.0)
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def rectangle() -> np.ndarray:
    """32x32 black with a white square on rows and columns 8..23."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = 255
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


# --- canny ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("low, high", [(100, 200), (50, 100), (10, 150), (0, 0), (30.7, 90.2), (200, 100)])
@pytest.mark.parametrize("kind", ["colour", "gray", "noise"])
def test_canny_matches_opencv(kind, low, high):
    cv2 = pytest.importorskip("cv2")
    image = {"colour": scene(), "gray": np.repeat(scene()[..., 1:2], 3, axis=2),
             "noise": np.random.default_rng(1).integers(100, 140, (40, 56, 3), dtype=np.uint8)}[kind]
    ours = P.canny_edges(image, low, high)
    theirs = cv2.Canny(image, low, high) > 0
    assert theirs.any()
    assert (ours != theirs).mean() == 0.0  # bit-exact: 0 % of pixels differ


def test_canny_rectangle_edges_lie_on_its_border():
    edges = P.canny_edges(rectangle(), 100, 200)
    # Sobel sees the step on both sides; the tie goes to the first pixel along the gradient: outside on the
    # left/top (row or column 7), inside on the right/bottom (row or column 23)
    assert edges[9:22, 7].all() and edges[9:22, 23].all() and edges[7, 9:22].all() and edges[23, 9:22].all()
    ring = np.zeros_like(edges)
    ring[7:24, 7:24] = True
    ring[9:22, 9:22] = False
    assert not (edges & ~ring).any()
    assert not edges[9:22, 8].any() and not edges[9:22, 24].any()


def test_canny_thresholds_gate_the_step_height():
    # a step of 40 gives an L1 magnitude of 4 * 40 = 160: an edge when high < 160, none when low >= 160
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 40
    assert P.canny_edges(image, 100, 159)[:, 7].all()
    assert not P.canny_edges(image, 160, 200).any()


def test_canny_image_is_white_on_black_rgb_of_the_same_size():
    out = P.canny(Image.fromarray(rectangle()))
    assert out.mode == "RGB" and out.size == (32, 32)
    assert set(np.unique(pixels(out))) == {0, 255}
    assert (pixels(out)[..., 0] == P.canny_edges(rectangle(), 100, 200) * 255).all()


# --- blur, xdog, line art ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma, integer_input, size", [(0.5, False, 5), (5.0, False, 41), (6.0, False, 49),
                                                        (0.5, True, 5), (9.0, True, 55), (64.0, True, 385)])
def test_gaussian_kernel_size_is_opencvs(sigma, integer_input, size):
    assert P.gaussian_kernel_size(sigma, integer_input) == size


@pytest.mark.parametrize("sigma", [0.5, 5.0, 6.0])
def test_gaussian_blur_matches_opencv_float(sigma):
    cv2 = pytest.importorskip("cv2")
    image = scene().astype(np.float32)
    np.testing.assert_allclose(P.gaussian_blur(image, sigma), cv2.GaussianBlur(image, (0, 0), sigma), atol=1e-3)


@pytest.mark.parametrize("sigma", [0.5, 9.0])
def test_blur_gaussian_matches_opencv_within_one_level(sigma):
    cv2 = pytest.importorskip("cv2")
    image = scene()
    diff = np.abs(pixels(P.blur_gaussian(Image.fromarray(image), sigma)) - cv2.GaussianBlur(image, (0, 0), sigma))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.1  # OpenCV blurs 8-bit images in fixed point


def test_blur_keeps_a_constant_image():
    image = Image.new("RGB", (20, 12), (10, 200, 77))
    assert (pixels(P.blur_gaussian(image, 3.0)) == [10, 200, 77]).all()


@pytest.mark.parametrize("xdog_threshold", [1, 32, 64])
def test_scribble_xdog_matches_the_extension_formula(xdog_threshold):
    cv2 = pytest.importorskip("cv2")
    x = scene().astype(np.float32)
    dog = (255 - np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2))
    dog = dog.clip(0, 255).astype(np.uint8)
    expected = (2 * (255 - dog.astype(np.int64)) > xdog_threshold) * 255  # in int: no uint8 wrap
    out = pixels(P.scribble_xdog(Image.fromarray(scene()), xdog_threshold))
    assert (out == expected[..., None]).all()


def test_scribble_xdog_keeps_the_middle_of_a_thick_dark_stroke():
    image = np.full((40, 40, 3), 255, np.uint8)
    image[:, 17:23] = 0  # darker than its surroundings by more than 128: the extension's uint8 doubling drops it
    out = pixels(P.scribble_xdog(Image.fromarray(image)))[..., 0]
    assert (out[:, 17:23] == 255).all() and (out[:, :12] == 0).all() and (out[:, 28:] == 0).all()


def test_lineart_standard_matches_the_extension_formula():
    cv2 = pytest.importorskip("cv2")
    x = scene().astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    intensity = intensity / max(16, np.median(intensity[intensity > 8])) * 127
    expected = intensity.clip(0, 255).astype(np.uint8)
    out = pixels(P.lineart_standard(Image.fromarray(scene())))
    assert (out == expected[..., None]).all()


def test_lineart_standard_of_a_blank_page_is_black_and_of_a_line_is_a_white_line():
    assert pixels(P.lineart_standard(Image.new("RGB", (24, 24), "white"))).max() == 0
    page = np.full((48, 48, 3), 255, np.uint8)
    page[:, 24] = 0
    out = pixels(P.lineart_standard(Image.fromarray(page)))[..., 0]
    assert (out[:, 24] == 127).all() and out[:, :20].max() == 0  # the median stroke is scaled to 127


# --- threshold, invert, none ------------------------------------------------------------------------------------

def test_threshold_needs_every_channel_above():
    row = np.array([[[200, 200, 200], [200, 100, 200], [128, 128, 128], [127, 255, 255]]], np.uint8)
    assert pixels(P.threshold(Image.fromarray(row)))[0, :, 0].tolist() == [255, 0, 255, 0]
    assert pixels(P.threshold(Image.fromarray(row), 99))[0, :, 0].tolist() == [255, 255, 255, 255]


def test_invert_and_transparency_over_white():
    image = Image.fromarray(np.array([[[0, 10, 255], [200, 100, 50]]], np.uint8))
    assert pixels(P.invert(image)).tolist() == [[[255, 245, 0], [55, 155, 205]]]
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))  # a transparent sheet is white paper: inverted, black
    assert pixels(P.invert(clear)).max() == 0


def test_none_passes_a_ready_map_through():
    depth = Image.fromarray(scene())
    assert (pixels(P.none(depth)) == scene()).all()


# --- tile -------------------------------------------------------------------------------------------------------

def test_tile_resample_averages_blocks():
    image = np.array([[0, 2, 10, 20], [4, 6, 30, 40], [1, 1, 0, 0], [1, 2, 0, 255]], np.uint8)
    out = P.tile_resample(Image.fromarray(np.repeat(image[..., None], 3, axis=2)), 2.0)
    assert out.size == (2, 2)
    assert pixels(out)[..., 0].tolist() == [[3, 25], [1, 64]]  # 12/4, 100/4, 5/4 -> 1, 255/4 = 63.75 -> 64


def test_tile_resample_below_1_1_is_unchanged():
    image = Image.fromarray(scene())
    assert P.tile_resample(image, 1.05).size == image.size and (pixels(P.tile_resample(image)) == scene()).all()


@pytest.mark.parametrize("rate", [2.0, 3.0, 1.5, 2.7])
def test_tile_resample_matches_opencv_inter_area(rate):
    cv2 = pytest.importorskip("cv2")
    image = scene()
    height, width = image.shape[:2]
    expected = cv2.resize(image, (int(width / rate), int(height / rate)), interpolation=cv2.INTER_AREA)
    diff = np.abs(pixels(P.tile_resample(Image.fromarray(image), rate)) - expected)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # OpenCV rounds in fixed point


# --- inpaint ----------------------------------------------------------------------------------------------------

def test_inpaint_puts_the_mask_in_alpha_and_the_hint_sets_masked_pixels_to_minus_one():
    image = Image.fromarray(np.array([[[255, 0, 51], [102, 204, 0], [0, 0, 0]]], np.uint8))
    mask = Image.fromarray(np.array([[255, 128, 127]], np.uint8))
    out = P.run("inpaint_only", image, mask=mask)
    assert out.mode == "RGBA" and pixels(out)[0, :, 3].tolist() == [255, 128, 127]
    hint = P.inpaint_hint(out)
    assert hint.dtype == np.float32 and hint.shape == (1, 3, 3)
    np.testing.assert_allclose(hint[0], [[-1, -1, -1], [-1, -1, -1], [0, 0, 0]])  # 128/255 > 0.5 >= 127/255
    np.testing.assert_allclose(P.inpaint_hint(P.inpaint(image, Image.new("L", (3, 1))))[0, 1], [0.4, 0.8, 0.0])


def test_inpaint_errors():
    with pytest.raises(ValueError, match="mode RGB"):
        P.inpaint(Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        P.inpaint(Image.new("RGB", (4, 4)), Image.new("L", (2, 2)))
    with pytest.raises(TypeError, match="ndarray"):
        P.inpaint(Image.new("RGB", (4, 4)), np.zeros((4, 4)))


# --- registry ---------------------------------------------------------------------------------------------------

def test_registry_names_and_aliases():
    assert P.PREPROCESSORS["invert (from white bg & black line)"] is P.invert
    assert P.PREPROCESSORS["lineart_standard (from white bg & black line)"] is P.lineart_standard
    assert P.PREPROCESSORS["inpaint_global_harmonious"] is P.PREPROCESSORS["inpaint_only"] is P.inpaint
    assert {"none", "canny", "threshold", "scribble_xdog", "tile_resample", "blur_gaussian"} <= set(P.PREPROCESSORS)


def test_run_passes_parameters():
    image = Image.fromarray(scene())
    assert (pixels(P.run("canny", image, low_threshold=50, high_threshold=100))
            == pixels(P.canny(image, 50, 100))).all()
    assert (pixels(P.run("canny", image)) == pixels(P.canny(image, 100, 200))).all()


@pytest.mark.parametrize("name, params, message", [
    ("sobel", {}, "unknown preprocessor 'sobel'; known: blur_gaussian, canny"),
    ("canny", {"high_threshold": 300}, r"canny high_threshold=300 is not a number in \[0, 256\]"),
    ("threshold", {"binarization_threshold": -1}, r"number in \[0, 255\]"),
    ("scribble_xdog", {"xdog_threshold": 0}, r"number in \[1, 64\]"),
    ("tile_resample", {"down_sampling_rate": 9.0}, r"number in \[1.0, 8.0\]"),
    ("blur_gaussian", {"sigma": "9"}, "sigma='9'"),
    ("canny", {"thr_a": 100}, "takes no parameter 'thr_a'; it takes: low_threshold, high_threshold"),
    ("invert", {"low_threshold": 1}, "it takes: none"),
])
def test_run_rejects_bad_names_and_parameters(name, params, message):
    with pytest.raises(ValueError, match=message):
        P.run(name, Image.new("RGB", (8, 8)), **params)


def test_run_checks_parameters_before_the_image():
    with pytest.raises(ValueError, match="not a number in"):
        P.run("canny", None, low_threshold=-5)
    with pytest.raises(TypeError, match="needs a PIL image"):
        P.run("canny", np.zeros((4, 4, 3), np.uint8))


# --- fit --------------------------------------------------------------------------------------------------------

def columns_map(width=100, height=50) -> Image.Image:
    """Column x coloured by x // 10: ten colours, which the extension resizes with nearest neighbour."""
    index = np.repeat((np.arange(width) // 10)[None, :], height, axis=0)
    return Image.fromarray(np.stack([index * 20, 255 - index * 20, index * 7], axis=2).astype(np.uint8))


def test_fit_just_resize_stretches():
    out = P.fit(columns_map(), 64, 48, "Just Resize")
    assert out.size == (64, 48)
    assert (pixels(out) == pixels(columns_map().resize((64, 48), Image.Resampling.NEAREST))).all()


def test_fit_crop_and_resize_scales_to_cover_and_crops_the_middle():
    out = P.fit(columns_map(), 64, 64, "Crop and Resize")
    # scale max(64/50, 64/100) = 1.28 -> 128x64, then columns (128 - 64) // 2 = 32 .. 95
    scaled = pixels(columns_map().resize((128, 64), Image.Resampling.NEAREST))
    assert out.size == (64, 64) and (pixels(out) == scaled[:, 32:96]).all()
    assert pixels(out)[0, 0, 0] == (int(32.5 / 1.28) // 10) * 20  # source column 25: colour 2


@pytest.mark.parametrize("height, top, bottom", [(64, 16, 16), (65, 16, 17)])
def test_fit_resize_and_fill_pads_with_the_border_median(height, top, bottom):
    image = np.zeros((50, 100, 3), np.uint8)
    image[:] = (10, 20, 30)
    image[20:30, 40:60] = (200, 0, 0)
    out = pixels(P.fit(Image.fromarray(image), 64, height, "Resize and Fill"))
    # scale min(64/100, height/50) = 0.64 -> 64x32, padded top and bottom
    assert out.shape == (height, 64, 3)
    assert (out[:top] == [10, 20, 30]).all() and (out[height - bottom:] == [10, 20, 30]).all()
    assert (out[top + 12:top + 20, 28:36] != [10, 20, 30]).any(axis=2).all()  # the red patch, scaled into the middle


def test_fit_mode_by_index_and_inpaint_fill_is_masked():
    rgba = P.inpaint(Image.fromarray(scene(50, 100)), Image.new("L", (100, 50), 0))
    out = P.fit(rgba, 64, 64, 2)
    alpha = pixels(out)[..., 3]
    assert out.mode == "RGBA" and (alpha[:16] == 255).all() and (alpha[16:48] == 0).all() and (alpha[48:] == 255).all()


def test_fit_shrinks_with_area_averaging():
    image = np.zeros((4, 4, 3), np.uint8)
    image[::2, ::2] = 201
    image[1::2, 1::2] = 201  # a checkerboard: two colours, not a segmentation map, not black and white
    assert (pixels(P.fit(Image.fromarray(image), 2, 2, "Just Resize")) == 101).all()  # 402 / 4 = 100.5 -> 101


def test_fit_keeps_an_edge_map_black_and_white():
    edges = P.canny(Image.fromarray(scene()))
    out = pixels(P.fit(edges, 200, 150, "Just Resize"))
    assert set(np.unique(out)) == {0, 255} and (out[..., 0] == out[..., 2]).all()
    gray = pixels(edges.resize((200, 150), Image.Resampling.BICUBIC)).mean(axis=2).clip(0, 255).astype(np.uint8)
    assert (out[..., 0] == (gray > P.otsu_threshold(gray)) * 255).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_otsu_threshold_matches_opencv(seed):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(seed)
    gray = np.concatenate([rng.integers(0, 90, 700), rng.normal(170, 25, 300).clip(0, 255)]).astype(np.uint8)
    assert P.otsu_threshold(gray) == cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]


def test_otsu_threshold_of_two_levels_is_the_lower():
    assert P.otsu_threshold(np.array([10] * 100 + [200] * 50, np.uint8)) == 10


@pytest.mark.parametrize("mode, size, message", [("Inner Fit", (8, 8), "unknown resize mode 'Inner Fit'"),
                                                 (3, (8, 8), "unknown resize mode 3"),
                                                 ("Just Resize", (0, 8), "fit size 0x8")])
def test_fit_errors(mode, size, message):
    with pytest.raises(ValueError, match=message):
        P.fit(Image.new("RGB", (8, 8)), *size, mode)
