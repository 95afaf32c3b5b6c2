"""Reading Stable Diffusion 1.x weights in every layout users have, into one naming.

A checkpoint is a diffusers folder (unet/, vae/, text_encoder/, each config.json + weights: safetensors or .bin,
variants such as fp16, sharded files, the VAE attention names of diffusers before 0.14), a single original-layout
file (renamed through `keymap.py`'s key table, its configs inferred from shapes), or a Hub id (only the files a
pipeline needs are downloaded). `load_checkpoint` checks every key and shape against what the config builds and
returns a `Checkpoint`; `load_into` loads a state dict into a module built on the meta device.

Files are read without running code: safetensors are memory-mapped (copy-on-write, nothing is read until used),
and pickled `.ckpt/.pt/.bin` files go through an unpickler that only rebuilds tensors and a few containers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import mmap
import os
import pickle
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import CLIPTextConfig, UNetConfig, VAEConfig, read_json, show
from .keymap import (PREFIXES, CheckpointError, check_widths, diffusers_vae_keys, family_error, rename_keys,
                     standalone_vae, text_keys, unet_table, vae_table, detect, infer_text_config, infer_unet_config,
                     infer_vae_config, split_original, to_original)
from .malloc import c_library
from .params import HUB_ID, WEIGHT_SUFFIXES
from .schedule import NoiseSchedule

# CheckpointError and to_original live in keymap.py and are re-exported here for the code that imports them from us
__all__ = ["CheckpointError", "Checkpoint", "read_state_dict", "read_component", "load_checkpoint", "load_into",
           "to_original", "VAEWeights", "load_vae"]


# ----------------------------------------------------------------------------------------------------------------
# Reading files

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound; SD 1.5's header is about 100 KB


def safetensors_header(f, path: Path, size: int) -> tuple[dict, int]:
    """The JSON header of an open .safetensors file and where the data starts. Its length is bounded before it is
    read, and deep nesting (the parser's RecursionError) is refused like any other corrupt header."""
    n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
    if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n:,}, file {size:,} "
                              f"bytes, a header has at most {MAX_HEADER_BYTES:,})")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def _whole(v) -> bool:
    """A size or offset torch can hold: an int (not a bool, not a float) in 0..2**63-1."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _safetensors_entry(path: Path, name: str, info, data_bytes: int) -> tuple[torch.dtype, list[int], int, int]:
    """One header entry -> (dtype, shape, begin, end), checked: a known dtype, a shape of whole numbers >= 0, and
    offsets inside the data that hold exactly dtype x shape bytes. CheckpointError naming the file and key."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{path}: corrupt safetensors header (entry {show(name)}: {show(info)})")
    dtype = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    shape, offsets = info["shape"], info["data_offsets"]
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {show(name)} has dtype {show(info['dtype'])}, which stablediff "
                              f"does not read")
    if not isinstance(shape, list) or not all(map(_whole, shape)):
        raise CheckpointError(f"{path}: tensor {show(name)} has shape {show(shape)}, not a list of whole numbers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_whole, offsets)):
        raise CheckpointError(f"{path}: tensor {show(name)} has data_offsets {show(offsets)}, not two whole "
                              f"numbers >= 0")
    (b, e), nbytes = offsets, math.prod(shape) * dtype.itemsize
    if not b <= e <= data_bytes or e - b != nbytes:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file (tensor {show(name)}: "
                              f"{str(dtype).removeprefix('torch.')} {shape} is {nbytes:,} bytes, its data_offsets "
                              f"{b}..{e}, the data {data_bytes:,} bytes); download it again")
    return dtype, shape, b, e


def _check_overlaps(path: Path, spans: dict[str, tuple[int, int]]) -> None:
    """No two tensors may share bytes: a weight written in place (a merged LoRA) must not change another."""
    ordered = sorted((b, e, name) for name, (b, e) in spans.items() if e > b)
    for (_, end, first), (begin, _, second) in zip(ordered, ordered[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensors {show(first)} and {show(second)} "
                                  f"overlap in the file)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors are views of a copy-on-write mmap of the file: no read until touched, no copy unless written.
    The whole header is checked before any tensor is made."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, start = safetensors_header(f, path, size)
        entries = {name: _safetensors_entry(path, name, info, size - start)
                   for name, info in header.items() if name != "__metadata__"}
        _check_overlaps(path, {name: (b, e) for name, (_, _, b, e) in entries.items()})
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, (dtype, shape, b, e) in entries.items():
        if e == b:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (start + b) % dtype.itemsize:  # misaligned: one copy for this tensor only
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=e - b, offset=start + b)
            out[name] = raw.clone().view(dtype).view(shape)
        else:
            out[name] = torch.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=start + b).view(shape)
    return out


class _LightningCallbackStub:
    """Inert stand-in for Lightning's ModelCheckpoint class, which training checkpoints pickle as a key of their
    `callbacks` entry. Nothing of Lightning is imported or run."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _LightningCallbackStub,
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"): _LightningCallbackStub,
}


class _Refused(pickle.UnpicklingError):
    pass


class WeightsUnpickler(pickle.Unpickler):
    """Resolves only tensors, storages (torch resolves those before asking us), dtypes and the globals above;
    anything else is refused when named, before it can be called."""

    def find_class(self, module, name):
        obj = _ALLOWED_GLOBALS.get((module, name))
        if obj is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj


def read_pickle(path: Path, device, unpickler: type[pickle.Unpickler] = WeightsUnpickler):
    """A pickled torch file through `unpickler` (ours, or a subclass allowing a few more inert globals)."""
    # torch.load takes a "pickle module": this one has only the restricted unpickler in it
    module = types.ModuleType("stablediff_restricted_pickle")
    module.Unpickler = unpickler
    module.load = lambda f, **kw: unpickler(f, **kw).load()
    try:
        # weights_only=False only because torch's own allow-list cannot take our unpickler: the restricted
        # pickle module given refuses every global that is not a tensor/storage rebuild before anything runs
        return torch.load(path, map_location=device, pickle_module=module, weights_only=False,
                          mmap=zipfile.is_zipfile(path))
    except _Refused as e:
        raise CheckpointError(f"{path}: refused to load: its pickle asks for {e}, which is code, not weights; "
                              f"only tensors are read from .ckpt/.pt/.bin files (use a .safetensors file "
                              f"from a source you trust)") from None
    except Exception as e:  # zip, pickle and storage errors of a damaged file
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint, truncated or corrupt? "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def read_state_dict(path, *, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors or pickled torch file (`state_dict` unwrapped), read without running code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        sd = read_safetensors(path)
        return sd if str(device) == "cpu" else {k: v.to(device) for k, v in sd.items()}
    obj = read_pickle(path, device)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(obj, dict) else {}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors (a {type(obj).__name__}); expected a state dict of weights")
    return sd


# ----------------------------------------------------------------------------------------------------------------
# Checking a state dict against what a config (or a module) expects

def few(items: list[str], n: int = 3) -> str:
    """The first n items and how many there are in all, for an error message that must stay one line."""
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _validate(sd: dict, expected: dict, *, where: str, component: str, strict=False, name=lambda k: k) -> list[str]:
    """Missing keys, wrong shapes or weights that are not floating point (an int or bool tensor where a weight
    belongs is a broken or hostile file, not something to cast) -> CheckpointError; unexpected keys are removed
    from `sd` and returned (or, with strict, an error too)."""
    missing = [name(k) for k in expected if k not in sd]
    wrong = [f"{name(k)} {tuple(sd[k].shape)} (expected {tuple(expected[k])})"
             for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    integral = [f"{name(k)} {str(sd[k].dtype).removeprefix('torch.')}"
                for k in expected if k in sd and not sd[k].is_floating_point()]
    unexpected = [k for k in sd if k not in expected]
    if missing or wrong or integral or (strict and unexpected):
        bits = [f"missing {few(missing)}" if missing else "", f"wrong shape {few(wrong)}" if wrong else "",
                f"not floating point {few(integral)}" if integral else "",
                f"unexpected {few(unexpected)}" if strict and unexpected else ""]
        raise CheckpointError(f"{where}: {component} weights do not fit the model: " + "; ".join(b for b in bits if b))
    for k in unexpected:
        del sd[k]
    return unexpected


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed memory mappings (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and parts[1].startswith("r"):
            a, b = parts[0].split("-")
            out.append((int(a, 16), int(b, 16)))
    return out


def _in_mappings(t: torch.Tensor, maps: list[tuple[int, int]]) -> bool:
    """Whether a tensor's memory lies in one of `maps` (`_file_mappings`: the memory-mapped .safetensors)."""
    return t.device.type == "cpu" and t.numel() > 0 and any(a <= t.data_ptr() < b for a, b in maps)


def _mapped(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The module's CPU parameters whose memory lies in a file mapping."""
    maps = _file_mappings()
    return [p for p in module.parameters() if _in_mappings(p, maps)]


def _drop_pages(libc, start: int, nbytes: int) -> int:
    """MADV_DONTNEED the whole pages inside [start, start + nbytes) of a clean file mapping; the bytes dropped."""
    page = mmap.PAGESIZE
    a, b = -(-start // page) * page, (start + nbytes) // page * page
    return b - a if libc is not None and b > a and libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4) == 0 \
        else 0


def release(module: torch.nn.Module) -> int:
    """Drop a CPU module's memory-mapped weights from this process's resident memory (MADV_DONTNEED) and return the
    bytes released. The file stays in the page cache, and the pages come back on the next use: the pipeline
    releases the text encoder after encoding, the U-Net before the VAE decode and the VAE after it, so the peak
    resident memory holds one of them at a time. Only weights never written in place are released (a tensor
    version of 0: a written page of the copy-on-write mapping holds the only copy of the change, e.g. a merged
    LoRA)."""
    libc = c_library()
    return sum(_drop_pages(libc, p.data_ptr(), p.nbytes) for p in _mapped(module)
               if not p.is_inference() and not p._version)


def load_into(module: torch.nn.Module, state_dict, *, path="", component="", device=None, dtype=None,
              channels_last=False) -> None:
    """Load into a module built on the meta device (no random init): strict keys, shapes checked first. With a
    device, dtype or channels_last, the weights are put there first (`converted`)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    _validate(dict(state_dict), expected, where=path or "state dict", component=component or type(module).__name__,
              strict=True)
    module.load_state_dict(converted(state_dict, device=device, dtype=dtype, channels_last=channels_last),
                           strict=True, assign=True)


def converted(state_dict: dict, *, device=None, dtype=None, channels_last=False) -> dict[str, torch.Tensor]:
    """The tensors of `state_dict` on `device`, floating-point ones in `dtype` and, with channels_last, 4-D ones
    channels-last: bit for bit and stride for stride what `module.to(device, dtype)` and then
    `module.to(memory_format=torch.channels_last)` would make, but made one tensor at a time. A memory-mapped
    source leaves resident memory (`release`'s MADV_DONTNEED) as soon as its copy is made, so a float32 file loaded
    as bfloat16 holds the bfloat16 weights and one float32 tensor, not the float32 weights besides (which stayed
    resident as long as any tensor of the file, a float32 VAE say, was in use). Tensors already as asked are
    passed through, still mapped."""
    libc, maps = c_library(), _file_mappings()
    out = {}
    for k, t in state_dict.items():
        c = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        if channels_last and c.dim() == 4:  # a second, bfloat16 copy: faster than converting and permuting at once
            c = c.to(memory_format=torch.channels_last)  # as Module.to (contiguous() would keep a 1x1's strides)
        if c is not t and _in_mappings(t, maps) and not t.is_inference() and not t._version:
            _drop_pages(libc, t.data_ptr(), t.nbytes)
        out[k] = c
    return out


# ----------------------------------------------------------------------------------------------------------------
# Whole checkpoints: a diffusers folder, a single file, or a Hub id

@dataclass
class Checkpoint:
    path: str
    layout: str  # "diffusers" | "single-file"
    family: str  # "sd1"
    unet_config: UNetConfig
    vae_config: VAEConfig
    text_config: CLIPTextConfig
    unet: dict[str, torch.Tensor] = field(repr=False)
    vae: dict[str, torch.Tensor] = field(repr=False)
    text_encoder: dict[str, torch.Tensor] = field(repr=False)
    scheduler_config: dict | None = None
    tokenizer_dir: Path | None = None
    unused: list[str] = field(default_factory=list, repr=False)


_WHAT = {"unet": "U-Net", "vae": "VAE", "text_encoder": "text encoder"}
# component -> (config class, weight file stems in order of preference)
_FOLDER = {"unet": (UNetConfig, ("diffusion_pytorch_model",)), "vae": (VAEConfig, ("diffusion_pytorch_model",)),
           "text_encoder": (CLIPTextConfig, ("model", "pytorch_model"))}


@functools.lru_cache(maxsize=16)  # a config's shapes do not change; loading the same model again costs nothing
def expected_shapes(component: str, config) -> types.MappingProxyType:
    """Every key and shape the model of `config` has, from the model itself built on the meta device (no
    allocation, and no second copy of the architecture's arithmetic): what a file is checked against."""
    from .clip import CLIPTextModel
    from .unet import UNet
    from .vae import AutoencoderKL

    with torch.device("meta"):
        module = {"unet": UNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[component](config)
    return types.MappingProxyType({k: tuple(v.shape) for k, v in module.state_dict().items()})  # cached: read-only


def _single_file(path: Path, use_ema: bool) -> Checkpoint:
    where = str(path)
    sd = read_state_dict(path)
    family = detect(sd, where)
    parts = split_original(sd, use_ema=use_ema, path=where)
    unused = list(parts.pop("unused"))
    for comp, sub in parts.items():
        if not sub:
            raise CheckpointError(f"{where}: has no {_WHAT[comp]} weights ({PREFIXES[comp]}*); stablediff needs a "
                                  f"whole SD 1.x checkpoint (U-Net, VAE and text encoder) or a diffusers folder")
    configs = {"unet": infer_unet_config(parts["unet"], path=where), "vae": infer_vae_config(parts["vae"], path=where),
               "text_encoder": infer_text_config(parts["text_encoder"], path=where)}
    tables = {"unet": unet_table(configs["unet"]), "vae": vae_table(configs["vae"]), "text_encoder": []}
    for comp, sub in parts.items():
        def original_name(k, comp=comp):  # report keys as the file names them
            return PREFIXES[comp] + next(iter(rename_keys({k: None}, tables[comp], to_ours=False)[0]), k)
        left = _validate(sub, expected_shapes(comp, configs[comp]), where=where, component=_WHAT[comp],
                         name=original_name)
        unused += [original_name(k) for k in left]
    return Checkpoint(str(path), "single-file", family, configs["unet"], configs["vae"], configs["text_encoder"],
                      parts["unet"], parts["vae"], parts["text_encoder"], unused=unused)


def _with_variant(name: str, variant: str | None) -> str:
    head, ext = name.rsplit(".", 1)  # model.safetensors -> model.fp16.safetensors; x.index.json -> x.index.fp16.json
    return f"{head}.{variant}.{ext}" if variant else name


def _pick_weights(names, stems, variant: str | None, where) -> str:
    """The one weights file (or shard index) of a diffusers component folder: safetensors before .bin; with no
    variant asked, a variant's files when they are the only ones there."""
    names = set(names)

    def candidates(v):
        return [_with_variant(f"{s}{ext}{index}", v) for ext in (".safetensors", ".bin") for s in stems
                for index in ("", ".index.json")]

    found = [n for n in candidates(variant) if n in names]
    others = {}
    if not found and variant is None:  # e.g. only diffusion_pytorch_model.fp16.safetensors
        tokens = {t for n in names for s in stems if n.startswith(s + ".") for t in n[len(s) + 1:].split(".")}
        others = {v: hits for v in tokens if (hits := [n for n in candidates(v) if n in names])}
        if len(others) == 1:
            return others.popitem()[1][0]
    if not found:
        pick = f"; pass variant= one of {sorted(others)}" if others else ""
        raise CheckpointError(f"{where}: no {variant + ' ' if variant else ''}weights file (looked for "
                              f"{few(candidates(variant))}; the folder has {few(sorted(names)) or 'nothing'}){pick}")
    return found[0]


def read_json_object(path: Path) -> dict:
    """A JSON object file (config.read_json's bounds) or a CheckpointError naming it."""
    try:
        d = read_json(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object (a {type(d).__name__})")
    return d


def _shard_files(index: Path) -> list[str]:
    """The shard files a `*.index.json` names ({"weight_map": {key: file}}): plain names in its own folder, since
    a path leading elsewhere would read any file of the machine as weights."""
    weight_map = read_json_object(index).get("weight_map")
    files = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else None
    if not files or not all(isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..") for f in files):
        raise CheckpointError(f"{index}: not a shard index (expected \"weight_map\": {{key: file name in "
                              f"{index.parent.name}/}}, found {show(weight_map)})")
    return files


def read_component(folder, stems, *, variant=None) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights of one diffusers component folder (unet/, safety_checker/, ...): the file `_pick_weights` chooses
    among `stems`, or every shard its index names, read into one state dict. Returns (the file chosen, the tensors)."""
    folder = Path(folder)
    name = _pick_weights([p.name for p in folder.iterdir()], stems, variant, folder)
    sharded = name.endswith(".json")  # an index: {"weight_map": {key: shard file}}
    files = _shard_files(folder / name) if sharded else [name]
    sd = {}
    for f in files:
        sd.update(read_state_dict(folder / f))
    return folder / name, sd


def _scheduler(root: Path) -> dict | None:
    """scheduler/scheduler_config.json, checked here as a NoiseSchedule (whose `betas` allocate
    num_train_timesteps floats) so that a bad one fails with the other configs, before any weights are read."""
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    d = read_json_object(path)
    try:
        NoiseSchedule.from_config(d, source=str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return d


def _folder(root: Path, variant: str | None) -> Checkpoint:
    index = root / "model_index.json"
    if not index.is_file() and not (root / "unet").is_dir():
        raise CheckpointError(f"{root}: not a diffusers folder (no model_index.json, no unet/); pass a diffusers "
                              f"folder or a single .safetensors/.ckpt file")
    pipeline = read_json_object(index).get("_class_name", "") if index.is_file() else ""
    if "XL" in pipeline:
        raise family_error(str(root), "SDXL", f"model_index.json: {pipeline}")
    configs, weights, unused = {}, {}, []
    for comp, (config_class, _) in _FOLDER.items():  # all configs first: the family shows there
        config_file = root / comp / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{root / comp}: no config.json; a diffusers folder has unet/, vae/ and "
                                  f"text_encoder/, each with config.json and weights")
        d = read_json_object(config_file)
        try:  # range-checked here, before any weights are read or module built
            configs[comp] = config_class.from_dict(d.get("text_config", d), source=str(config_file))
        except (ValueError, TypeError) as e:
            raise CheckpointError(str(e)) from None
    check_widths(str(root), configs["unet"].cross_attention_dim, configs["text_encoder"].hidden_size,
                  "unet/config.json cross_attention_dim")
    scheduler_config = _scheduler(root)
    for comp, (_, stems) in _FOLDER.items():
        path, sd = read_component(root / comp, stems, variant=variant)
        if comp == "text_encoder":
            sd, dropped = text_keys(sd)
        else:
            sd, dropped = diffusers_vae_keys(sd) if comp == "vae" else sd, []
        left = _validate(sd, expected_shapes(comp, configs[comp]), where=str(path), component=_WHAT[comp])
        unused += [f"{comp}/{k}" for k in dropped + left]
        weights[comp] = sd
    return Checkpoint(str(root), "diffusers", "sd1", configs["unet"], configs["vae"], configs["text_encoder"],
                      weights["unet"], weights["vae"], weights["text_encoder"], scheduler_config=scheduler_config,
                      tokenizer_dir=root / "tokenizer" if (root / "tokenizer").is_dir() else None, unused=unused)




def _hub_cache() -> str:
    """Read at call time (huggingface_hub reads HF_HOME once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                                     "huggingface")
    return os.path.join(home, "hub")


def _hub_patterns(files: list[str], variant, repo_id) -> list[str]:
    """Only what a pipeline needs: configs, tokenizer, one weights format per component (no safety checker)."""
    patterns = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*"]
    for comp, (_, stems) in _FOLDER.items():
        if f"{comp}/config.json" not in files:
            raise CheckpointError(f"{repo_id}: no {comp}/config.json; not a diffusers Stable Diffusion repository")
        names = [f[len(comp) + 1:] for f in files if f.startswith(comp + "/") and f.count("/") == 1]
        name = _pick_weights(names, stems, variant, f"{repo_id}/{comp}")
        patterns += [f"{comp}/config.json", f"{comp}/{name}"]
        if name.endswith(".json"):  # sharded: the shards are named after the file the index describes
            patterns.append(f"{comp}/{name.split('.')[0]}-*")
    return patterns


def _from_hub(repo_id: str, variant) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    cache = _hub_cache()
    hint = ("pass a local path instead: a diffusers folder (load_checkpoint('/path/to/stable-diffusion-v1-5')) "
            "or a single .safetensors/.ckpt file")
    try:  # the local cache first, and only if it holds everything we need
        local = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
        _hub_patterns([p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()], variant, repo_id)
        return local
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(f"{repo_id}: no such local file or folder, and not in the Hugging Face cache ({cache}) "
                              f"while HF_HUB_OFFLINE is set; {hint}")
    try:
        info = HfApi().model_info(repo_id, timeout=10)  # one request, no retries: fails fast when offline
        patterns = _hub_patterns([f.rfilename for f in info.siblings or []], variant, repo_id)
        return Path(snapshot_download(repo_id, revision=info.sha, cache_dir=cache, allow_patterns=patterns,
                                      etag_timeout=10))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{repo_id}: no such local file or folder, and the Hugging Face Hub did not give it "
                              f"({type(e).__name__}: {str(e)[:160]}); {hint}") from None


# ----------------------------------------------------------------------------------------------------------------
# A separate VAE: one file as people download it, or a diffusers VAE folder

@dataclass
class VAEWeights:
    path: str  # as given
    weights_file: Path  # the file whose sha256 the infotext's "VAE hash" is
    config: VAEConfig
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    unused: list[str] = field(default_factory=list, repr=False)


def load_vae(source, *, like: VAEConfig) -> VAEWeights:
    """A VAE to use instead of a model's own, whose VAE config is `like`: a single .safetensors/.ckpt/.pt file
    (keymap.standalone_vae's layouts), a diffusers VAE folder (config.json + weights: a model's vae/ or a VAE
    repository), or a diffusers model folder (its vae/). A single file carries no config: its sizes come from its
    shapes, the rest (scaling_factor, sample_size) from `like`. A VAE whose latents differ from the model's (channels,
    downscale factor or scaling factor: SDXL's, SD3's, ...) is refused in one line naming it; an SDXL VAE in a
    single file has SD 1.x's shapes and no config, so nothing tells it apart."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{source}: no such VAE file or folder")
    if path.is_dir():
        weights_file, config, sd = _vae_folder(path)
        unused, table = [], []
    else:
        sd, unused = standalone_vae(read_state_dict(path), str(path))
        config = infer_vae_config(sd, path=str(path))
        config = dataclasses.replace(config, scaling_factor=like.scaling_factor, sample_size=like.sample_size)
        weights_file, table = path, vae_table(config)

    def name(k):  # report keys as the file names them (a folder's are ours)
        return next(iter(rename_keys({k: None}, table, to_ours=False)[0]), k)

    unused += _validate(sd, expected_shapes("vae", config), where=str(weights_file), component="VAE", name=name)
    _check_vae_fits(str(path), config, like)
    return VAEWeights(str(path), weights_file, config, sd, unused)


def class_config(folder: Path, class_name: str, expected: str) -> tuple[Path, dict]:
    """(folder/config.json, its contents), refused with one line when it is missing (`expected` says what to pass
    instead) or names another diffusers class than `class_name`."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: no config.json; pass {expected}")
    d = read_json_object(config_file)
    if d.get("_class_name", class_name) != class_name:
        raise CheckpointError(f"{config_file}: _class_name {show(d['_class_name'])}, expected {class_name}")
    return config_file, d


def safetensors_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's __metadata__ (text to text); {} for other files and for unreadable headers."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    try:
        with open(path, "rb") as f:
            header, _ = safetensors_header(f, Path(path), Path(path).stat().st_size)
    except (OSError, CheckpointError):
        return {}
    meta = header.get("__metadata__")
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _vae_folder(path: Path) -> tuple[Path, VAEConfig, dict[str, torch.Tensor]]:
    """(weights file, config, weights in our naming) of a diffusers VAE folder, or of a model folder's vae/."""
    folder = path / "vae" if not (path / "config.json").is_file() and (path / "vae").is_dir() else path
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{path}: not a VAE folder (no config.json, no vae/); pass a .safetensors/.ckpt VAE "
                              f"file, a diffusers VAE folder or a diffusers model folder")
    config_file, d = class_config(folder, "AutoencoderKL", "a VAE")
    try:
        config = VAEConfig.from_dict(d, source=str(config_file))
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from None
    weights_file, sd = read_component(folder, _FOLDER["vae"][1])
    return weights_file, config, diffusers_vae_keys(sd)


def _check_vae_fits(where: str, config: VAEConfig, like: VAEConfig) -> None:
    """The VAE must make the latents the U-Net was trained on: channels, downscale factor and scale."""
    if config.latent_channels != like.latent_channels:
        raise CheckpointError(f"{where}: a VAE with {config.latent_channels} latent channels (SD3 and Flux have 16) "
                              f"does not fit this model's {like.latent_channels}; use a Stable Diffusion 1.x VAE")
    if (config.downscale, config.in_channels, config.out_channels) != (like.downscale, like.in_channels,
                                                                         like.out_channels):
        raise CheckpointError(f"{where}: a VAE with downscale factor {config.downscale} and {config.in_channels}/"
                              f"{config.out_channels} image channels does not fit this model's {like.downscale} and "
                              f"{like.in_channels}/{like.out_channels}")
    if config.scaling_factor != like.scaling_factor:
        guess = " (SDXL's)" if config.scaling_factor == 0.13025 else ""
        raise CheckpointError(f"{where}: VAE scaling_factor {config.scaling_factor}{guess} does not fit this "
                              f"model's {like.scaling_factor}; use a Stable Diffusion 1.x VAE")


def load_checkpoint(source, *, variant=None, use_ema=False) -> Checkpoint:
    """A diffusers folder, a single .safetensors/.ckpt/.pt file, or a Hub id -> state dicts in our naming + configs.
    `variant` applies to diffusers folders (e.g. "fp16"), `use_ema` to single files holding model_ema.* weights."""
    path = Path(source).expanduser()
    if not path.exists():
        weights_file = str(source).lower().endswith(WEIGHT_SUFFIXES)
        if isinstance(source, str) and HUB_ID.fullmatch(source) and not weights_file:
            return _folder(_from_hub(source, variant), variant)
        raise CheckpointError(f"{source}: no such file or directory")
    return _folder(path, variant) if path.is_dir() else _single_file(path, use_ema)
