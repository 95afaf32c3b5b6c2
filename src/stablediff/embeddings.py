"""Textual-inversion embeddings: learned token vectors that a trigger word in the prompt stands for.

The file layouts people have, each giving one (n_vectors, width) tensor:
  A1111 .pt            a pickle of {"string_to_param": {"*": tensor}, "name": ..., "step": ...} (read through the
                       restricted unpickler: tensors and plain containers only, never code)
  A1111 .safetensors   {"emb_params": tensor}
  diffusers            learned_embeds.safetensors / .bin: {token: tensor of (width,) or (n, width)}
The trigger word is the file's stem, as in AUTOMATIC1111; for diffusers' fixed file name `learned_embeds.*` it is
the token stored in the file (e.g. "<cat-toy>").
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import images, weights

__all__ = ["EmbeddingError", "EXTENSIONS", "find_embeddings", "read_embedding", "load_embeddings", "embedding_hash"]

EXTENSIONS = (".pt", ".safetensors", ".bin")
MAX_VECTORS = 75  # the prompt tokens of one 77-position CLIP chunk (BOS and EOS take two): an embedding fits in one


class EmbeddingError(ValueError):
    """An embedding file that cannot be used, said in one line naming the file."""


class _ParameterDict(dict):
    """Inert stand-in for torch.nn.ParameterDict, which some older .pt embeddings pickle as `string_to_param`:
    only its parameters are kept; no torch.nn code runs."""

    def __setstate__(self, state):
        params = state.get("_parameters") if isinstance(state, dict) else None
        self.update(params or {})


# what a pickled ParameterDict needs beyond weights.py's tensors and containers: nothing that runs code
_EXTRA_GLOBALS = {("torch.nn.modules.container", "ParameterDict"): _ParameterDict,
                  ("builtins", "set"): set, ("__builtin__", "set"): set}


class _EmbeddingUnpickler(weights.WeightsUnpickler):
    def find_class(self, module, name):
        return _EXTRA_GLOBALS.get((module, name)) or super().find_class(module, name)


def _read(path: Path):
    """The file's top-level object: a dict of tensors for safetensors, whatever the pickle holds otherwise."""
    with open(path, "rb") as f:
        head = f.read(9)
    try:
        if path.suffix == ".safetensors" or head[8:9] == b"{":
            return weights.read_safetensors(path)
        return weights.read_pickle(path, "cpu", unpickler=_EmbeddingUnpickler)
    except weights.CheckpointError as e:
        raise EmbeddingError(str(e)) from None


def read_embedding(path) -> tuple[str, torch.Tensor]:
    """One embedding file -> (trigger word, float32 tensor (n_vectors, width))."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such embedding file")
    data = _read(path)
    token, what = path.stem, "a textual-inversion embedding"
    if isinstance(data, torch.Tensor):  # a bare tensor
        vec = data
    elif not isinstance(data, dict):
        vec = None
    elif "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path}: string_to_param holds {len(params) if isinstance(params, dict) else 0} "
                                 f"terms; an embedding file holds exactly one")
        vec = next(iter(params.values()))
    elif "clip_l" in data and "clip_g" in data:
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l + clip_g); stablediff runs SD 1.x, whose "
                             f"embeddings hold one tensor")
    elif len(data) == 1:  # A1111 .safetensors {"emb_params": ...} or diffusers {token: ...}
        key, vec = next(iter(data.items()))
        if key != "emb_params" and path.stem == "learned_embeds":
            token = str(key)
    else:
        vec, what = None, f"one tensor, but it holds {len(data)} entries ({', '.join(map(str, list(data)[:4]))}...)"
    if not isinstance(vec, torch.Tensor) or vec.ndim not in (1, 2) or vec.numel() == 0:
        got = type(vec).__name__ if not isinstance(vec, torch.Tensor) else f"a tensor of shape {tuple(vec.shape)}"
        raise EmbeddingError(f"{path}: not an embedding: expected {what}, found {got if vec is not None else 'none'}")
    return token, _usable(path, vec.detach().reshape(-1, vec.shape[-1]))


def _usable(path: Path, vec: torch.Tensor) -> torch.Tensor:
    """(n_vectors, width) -> a float32 copy, when it can stand in a prompt: floating point (an int or bool tensor
    is a broken file), 1..MAX_VECTORS vectors (more fit in no prompt chunk) and finite (NaN would reach every
    image whose prompt holds the trigger word)."""
    if not vec.is_floating_point():
        raise EmbeddingError(f"{path}: the embedding is {str(vec.dtype).removeprefix('torch.')}, not floating point")
    if len(vec) > MAX_VECTORS:
        raise EmbeddingError(f"{path}: the embedding has {len(vec)} vectors; one prompt chunk holds at most "
                             f"{MAX_VECTORS}")
    vec = vec.to(torch.float32, copy=True).contiguous()
    if not torch.isfinite(vec).all():
        raise EmbeddingError(f"{path}: the embedding holds NaN or infinite values")
    return vec


def find_embeddings(directory_or_files) -> dict[str, Path]:
    """Trigger word -> file, for a folder (searched with its subfolders; a missing folder has none) or a list of
    files. Two files with the same trigger word are an error naming both."""
    sources = [directory_or_files] if isinstance(directory_or_files, (str, Path)) else list(directory_or_files)
    files = []
    for src in map(Path, sources):
        if src.is_dir():
            files += sorted(p for p in src.rglob("*") if p.suffix in EXTENSIONS and p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(src).parts))
        elif src.is_file():
            files.append(src)
        elif len(sources) > 1 or src.suffix in EXTENSIONS:  # a named file that is not there
            raise EmbeddingError(f"{src}: no such embedding file")
    found: dict[str, Path] = {}
    for f in files:
        word = f.stem if f.stem != "learned_embeds" else _stored_token(f)
        if word in found:
            raise EmbeddingError(f"{f}: trigger word {word!r} is also {found[word]}'s; rename one of the files")
        found[word] = f
    return found


def _stored_token(path: Path) -> str:
    """The trigger word a diffusers `learned_embeds.*` file stores; its stem when the file is unusable, so that
    `load_embeddings` reports and skips it like any other bad file instead of the search failing."""
    try:
        return read_embedding(path)[0]
    except EmbeddingError:
        return path.stem


def load_embeddings(directory_or_files, *, width: int | None = None,
                    skipped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Trigger word -> (n_vectors, width) float32 tensor for every embedding in a folder or list of files.
    `width` (the text encoder's hidden size) is checked when given. Errors name the file; with a `skipped` list
    passed, unusable files (unreadable, another model's width, too many vectors, NaN) are recorded there (one line
    each) and left out instead of raising, so one bad file in a shared folder does not stop every generation."""
    out = {}
    for word, path in find_embeddings(directory_or_files).items():
        try:
            token, vec = read_embedding(path)
            if width is not None and vec.shape[-1] != width:
                raise EmbeddingError(f"{path}: embedding vectors are {vec.shape[-1]} wide but this model's text "
                                     f"encoder is {width} wide (an embedding for another base model, e.g. "
                                     f"{ {1024: 'SD 2.x', 1280: 'SDXL'}.get(vec.shape[-1], 'another model') }?)")
        except EmbeddingError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
            continue
        out[word] = vec
    return out


def embedding_hash(path) -> str:
    """A1111's `TI hashes` entry: the first 12 hex digits of the file's sha256 (use lora.format_hashes to join)."""
    return images.file_sha256(path)[:12]
