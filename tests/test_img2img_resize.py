"""A1111's img2img resize modes (images.resize_init) and how the server prepares an init image and mask
(sdapi.fitted_images): hand-computed pixels and sizes."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from stablediff.images import RESIZE_MODES, resize_init


def _columns(w: int, h: int) -> Image.Image:
    """An RGB image whose red channel is the column index and green the row index (distinct pixels)."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def test_just_resize_stretches():
    image = _columns(100, 50)
    out = resize_init(image, 64, 64, 0)
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((64, 64), Image.Resampling.LANCZOS)))
    assert resize_init(image, 100, 50, 2) is image  # already that size: untouched in every mode


def test_crop_and_resize_keeps_the_middle():
    # 100x50 to 64x64: scaled to cover, 128x64 (A1111: 100 * 64 // 50), then the middle 64 columns (32..95)
    image = _columns(100, 50)
    want = np.asarray(image.resize((128, 64), Image.Resampling.LANCZOS))[:, 32:96]
    assert np.array_equal(np.asarray(resize_init(image, 64, 64, 1)), want)
    # 50x100 to 64x48: scaled to the width, 64x128, rows 40..87 kept (48 // 2 - 128 // 2 = -40)
    tall = _columns(50, 100)
    want = np.asarray(tall.resize((64, 128), Image.Resampling.LANCZOS))[40:88]
    assert np.array_equal(np.asarray(resize_init(tall, 64, 48, 1)), want)
    # a floored side: 30x7 to 64x64 covers at 274x64 (30 * 64 // 7), columns 105..168
    odd = _columns(30, 7)
    want = np.asarray(odd.resize((274, 64), Image.Resampling.LANCZOS))[:, 105:169]
    assert np.array_equal(np.asarray(resize_init(odd, 64, 64, 1)), want)


def test_resize_and_fill_centres_and_stretches_the_edges():
    # 100x50 to 64x64: fitted 64x32 at rows 16..47; above and below, the top and bottom rows stretched
    image = Image.new("RGB", (100, 50), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 10))  # a red top
    image.paste((0, 255, 0), (0, 40, 100, 50))  # a green bottom
    out = np.asarray(resize_init(image, 64, 64, 2))
    fitted = np.asarray(image.resize((64, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(out[16:48], fitted)
    assert (out[:16] == (255, 0, 0)).all() and (out[48:] == (0, 255, 0)).all()
    # 50x100 to 64x64: fitted 32x64 at columns 16..47, the left and right columns stretched sideways
    side = Image.new("L", (50, 100), 100)
    side.paste(7, (0, 0, 10, 100))
    side.paste(250, (40, 0, 50, 100))
    out = np.asarray(resize_init(side, 64, 64, 2))
    assert out.shape == (64, 64)
    assert (out[:, :16] == 7).all() and (out[:, 48:] == 250).all() and (out[:, 26:36] == 100).all()
    # an odd band: 64x30 to 64x64 fits at 64x30, bands of 17 rows (32 - 15) above and below
    flat = Image.new("RGB", (64, 30), (9, 9, 9))
    out = np.asarray(resize_init(flat, 64, 64, 2))
    assert (out == 9).all()  # the bands cover every row: nothing is left black


def test_unknown_mode_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"resize mode 3 is not one of 0 \(Just resize\)"):
        resize_init(_columns(10, 10), 8, 8, 3)
    assert RESIZE_MODES == ("Just resize", "Crop and resize", "Resize and fill")


def test_server_hands_the_pipeline_unfitted_images_and_checks_the_mask():
    """The route leaves resizing and inverting to the pipeline (params.resize_mode, inpainting_mask_invert; A1111
    blurs the mask before resizing it) and only checks the mask's aspect ratio."""
    pytest.importorskip("fastapi")
    from stablediff.serve.sdapi import ClientError, fitted_images

    init = _columns(80, 64)
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (0, 0, 20, 64))  # the left quarter
    (got_init,), got_mask = fitted_images([init], mask)
    assert np.array_equal(np.asarray(got_init), np.asarray(init)) and np.array_equal(np.asarray(got_mask),
                                                                                      np.asarray(mask))
    _, half = fitted_images([init], mask.resize((40, 32), Image.Resampling.NEAREST))
    assert half.size == (40, 32)  # (the same aspect ratio: the pipeline brings it to the init image's size)
    with pytest.raises(ClientError, match="aspect ratio"):
        fitted_images([init], Image.new("L", (64, 64)))


def test_server_reads_masks_and_init_images_as_a1111():
    pytest.importorskip("fastapi")
    from stablediff.serve.sdapi import fitted_images

    # an RGBA mask with transparency: its alpha marks the area (over 128), whatever its colour
    alpha_mask = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    alpha_mask.paste((0, 0, 0, 200), (0, 0, 32, 64))
    alpha_mask.paste((255, 255, 255, 100), (32, 0, 64, 64))  # white but mostly transparent: kept
    _, m = fitted_images([_columns(64, 64)], alpha_mask)
    assert (np.asarray(m)[:, :32] == 255).all() and (np.asarray(m)[:, 32:] == 0).all()
    # an opaque RGBA mask is read by its gray, kept as it is (A1111 thresholds only an alpha mask)
    opaque = Image.new("RGBA", (64, 64), (129, 129, 129, 255))
    opaque.paste((128, 128, 128, 255), (0, 0, 32, 64))
    _, m = fitted_images([_columns(64, 64)], opaque)
    assert m.mode == "L" and (np.asarray(m)[:, :32] == 128).all() and (np.asarray(m)[:, 32:] == 129).all()
    # a transparent init image is flattened onto white (A1111's img2img background), not onto its hidden colour
    init = Image.new("RGBA", (64, 64), (10, 20, 30, 0))
    init.paste((200, 0, 0, 255), (0, 0, 32, 64))
    (flat,), _ = fitted_images([init], None)
    assert flat.mode == "RGB"
    assert (np.asarray(flat)[:, :32] == (200, 0, 0)).all() and (np.asarray(flat)[:, 32:] == 255).all()
