"""The command line's live preview: the image forming, written every N steps to one file (--preview-file).

The file is replaced atomically (a temporary file in the same folder, then a rename), so a viewer that reloads it
never reads half a PNG. It carries a PNG text chunk (MARK) saying it is ours; a file at that path without it is
someone else's and is never written over: `check_path` refuses it before the run, and each write looks again (a
file put there meanwhile stops the previews with a warning, not the run). A symbolic link is refused too: the
rename would replace the link itself.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

from PIL import Image

from . import images

MARK = ("stablediff", "live preview")  # (PNG text key, value) in every preview we write


def is_ours(path: Path) -> bool:
    """Whether `path` is a PNG holding MARK (only its header is read)."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get(MARK[0]) == MARK[1]
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def check_path(path: Path) -> None:
    """ValueError when `path` cannot take the preview: a folder, a link, or a file that is not a preview of ours."""
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; give the file itself")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name, e.g. {path / 'preview.png'}")
    if path.exists() and not is_ours(path):
        raise ValueError(f"{path} exists and is not a preview stablediff wrote; it is left alone: remove it or give "
                         "another file")


def write(path: Path, image: Image.Image) -> None:
    """`image` (MARK in a text chunk) to `path` atomically, through the temporary file a saved image is written to
    first (images.write_temp); ValueError where the path has become someone else's file, OSError where the folder
    cannot be written."""
    tmp = images.write_temp(path.parent, images.png_file(image, dict([MARK])))
    try:
        check_path(path)  # again: the run took a while
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PreviewWriter:
    """A pipeline callback (StepInfo) writing `render(latents)` of every `every`-th step's denoised estimate (the
    latents where a sampler gives none) of the batch's first image to `path`. The first failure to write is a
    warning and ends the previews; the generation goes on."""

    def __init__(self, path: Path, every: int, render: Callable):
        if every < 1:
            raise ValueError(f"preview every {every} steps: must be at least 1")
        self.path, self.every, self.render, self.failed = path, every, render, False

    def __call__(self, info) -> None:
        if self.failed or info.step % self.every:
            return
        latents = info.latents if info.denoised is None else info.denoised
        try:
            write(self.path, self.render(latents[:1])[0])
        except (OSError, ValueError) as e:
            self.failed = True
            warnings.warn(f"preview {self.path}: {e}; no more previews this run", stacklevel=2)
