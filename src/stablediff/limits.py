"""Bounds on the work one command or request may ask for, checked before a model is loaded or a step runs.

A typo (`--batch-size 10000`) or a hostile request (4096x4096, 1000 steps, 1600 images, a 10 MB prompt) must be
refused in milliseconds with the flag that raises the bound, not found out after hours or a MemoryError. The
defaults are above anything AUTOMATIC1111's web UI lets a user ask for in one go (2048x2048, 150 steps, batch
size 8 x batch count 100) so that no ordinary 512x512 workload meets them; a server operator (`stablediff serve
--max-...`) or a CLI user (the same flags) sets others.

The cost model:
- pixels of one image (width x height): the U-Net's and the VAE's activations grow with it;
- pixels in one U-Net batch (batch size x pixels): what one U-Net call holds in memory at once;
- images in the whole command or request (prompts x batch size x batch count);
- work: images x steps x pixels, counted in steps of a 512x512 image, which is what the time grows with;
- prompt length in CLIP tokens, and in characters before anything is tokenized (tokenizing is linear in the text).

Nothing here imports torch: the CLI and the server check before the heavy imports.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

UNIT_PIXELS = 512 * 512  # work is counted in steps of one 512x512 image
CHARS_PER_TOKEN = 20  # a prompt longer than this many characters per allowed token is refused untokenized
NATIVE_SIZE = 512  # what a width or height left out counts as: SD 1.x's native size. The loaded model decides the
# real default (64 for `--model demo`), but limits are checked before a model is loaded, and 512 never
# under-counts an SD 1.x checkpoint.
LONG_PIECE_BYTES = 64  # a longer run of letters is counted as one token a byte, not run through BPE


class LimitError(ValueError):
    """A request over one of the limits; the message names the value, the limit and the flag that sets it."""

    def __init__(self, what: str, value: float, limit: float, flag: str):
        super().__init__(f"{what} {value:,} is over the limit of {limit:,} (set with {flag})")
        self.what, self.value, self.limit, self.flag = what, value, limit, flag


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 2048 * 2048  # width x height of one image
    max_batch_pixels: int = 16 * 512 * 512  # batch size x width x height: one U-Net call
    max_steps: int = 500  # sampler steps of one image (and of a hires pass)
    max_images: int = 800  # images in one command or request
    max_work: int = 800 * 150  # images x steps x pixels / (512 x 512)
    max_prompt_tokens: int = 1000  # CLIP tokens of one prompt or negative prompt (75 make one chunk)

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of a field: max_batch_pixels -> --max-batch-pixels."""
        return "--" + name.replace("_", "-")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.flag(f.name)} {value!r} must be a whole number >= 1")

    def check(self, name: str, what: str, value: float) -> None:
        """Refuse `value` over the field `name`; `what` says what it counts."""
        limit = getattr(self, name)
        if value > limit:
            raise LimitError(what, value, limit, self.flag(name))

    def check_work(self, *, width: int, height: int, steps: int, batch_size: int = 1, images: int = 1) -> None:
        """Refuse a run of `images` images (in U-Net batches of `batch_size`) of width x height over `steps`."""
        pixels = width * height
        self.check("max_pixels", f"image size {width}x{height} =", pixels)
        self.check("max_steps", "steps", steps)
        self.check("max_batch_pixels", f"batch size {batch_size} x {width}x{height} =", batch_size * pixels)
        self.check("max_images", "images", images)
        work = -(-images * steps * pixels // UNIT_PIXELS)
        self.check("max_work", f"work ({images} images x {steps} steps x {width}x{height}) =", work)

    def check_prompt(self, text: str, name: str = "prompt", tokens: bool = True) -> None:
        """Refuse a prompt over max_prompt_tokens: first by its length in characters (no tokenizing a 10 MB text),
        then, unless `tokens` is False, by its tokens (count_tokens)."""
        max_chars = self.max_prompt_tokens * CHARS_PER_TOKEN
        if len(text) > max_chars:
            raise LimitError(f"{name} length in characters", len(text), max_chars,
                             self.flag("max_prompt_tokens") + f", {CHARS_PER_TOKEN} characters a token")
        if tokens:
            self.check("max_prompt_tokens", f"{name} length in tokens", count_tokens(text))


@functools.lru_cache(maxsize=256)  # a batch's rows share their negative prompt
def count_tokens(text: str) -> int:
    """CLIP tokens of a prompt with BOS and EOS, as many as the text encoder is given or more: emphasis brackets,
    weights and <lora:...> tags count too. Each BREAK counts as the 75 tokens of the chunk it ends ("a BREAK " x
    480 would be 480 chunks, each a text-encoder call and 77 more tokens in every cross-attention). A piece (a run
    of letters or of punctuation) over LONG_PIECE_BYTES UTF-8 bytes, which no word is, counts as one token a byte
    (BPE never makes more) and is not run through BPE, whose time grows with the square of a piece's length."""
    from .prompts import BREAK_WORD
    from .tokenizer import PIECES, normalize

    tokenizer, count = _tokenizer(), 2 + 75 * len(BREAK_WORD.findall(text))
    for piece in PIECES.findall(normalize(text)):
        size = len(piece.encode("utf-8"))
        count += size if size > LONG_PIECE_BYTES else len(tokenizer.encode(piece, add_special_tokens=False))
    return count


@functools.cache
def _tokenizer():
    from .tokenizer import CLIPTokenizer

    return CLIPTokenizer()  # the bundled vocabulary, which every SD 1.x model uses
