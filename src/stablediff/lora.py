"""LoRA: low-rank weight deltas merged into the model's own weights.

A LoRA holds, for some Linear/Conv2d layers of the U-Net and the text encoder, two thin matrices `up` (out, r) and
`down` (r, in[, kh, kw]) and optionally a scalar `alpha`. Applied at multiplier m:

    W <- W + m * (alpha / r) * up @ down        (alpha missing or 0: alpha / r = 1)

computed in float32 and cast to the weight's dtype once, so sampling runs with no extra matmuls. `LoraSet` keeps a
copy of every weight it touched and makes the applied set exactly what is asked, restoring weights bit-exactly.

The file layouts people have, all read through the two tables below (`_PREFIXES`, `_SUFFIXES`):
  kohya / A1111   lora_unet_<module path, dots as _>.lora_down.weight / .lora_up.weight / .alpha,
                  lora_te_text_model_encoder_layers_0_self_attn_q_proj...; the U-Net path in diffusers naming
                  (down_blocks_0_attentions_0_...) or the original one (input_blocks_1_1_..., through keymap.py's
                  key table); 3x3 conv LoRA (LoCon) included
  diffusers/PEFT  unet.<module path>.lora_A.weight / .lora_B.weight, text_encoder.<module path>...
  older diffusers unet.<path>.lora.down.weight / .lora.up.weight, and the attention-processor files
                  (unet.<path>.attn1.processor.to_q_lora.down.weight, text_encoder....self_attn.to_q_lora...)
Flattened names are matched against the model's real module names (`name.replace('.', '_')`), never guessed.
A key that fits no table row or names no layer of this model is an error that lists it.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from . import images, keymap, weights
from .prompts import check_multiplier

__all__ = ["LoraError", "LoraDelta", "Lora", "LoraSet", "resolve", "read_lora", "lora_hash", "format_hashes",
           "EXTENSIONS"]

EXTENSIONS = (".safetensors", ".pt", ".ckpt")


class LoraError(ValueError):
    """A LoRA that cannot be found or used, said in one line naming the tag or the file."""


# ----------------------------------------------------------------------------------------------------------------
# Finding a LoRA by name, inside its folder only

def _tag(name: str) -> str:
    return f"<lora:{name}>"


def _inside(path: Path, root: Path) -> bool:
    """True when `path`, all links followed, is inside `root` (itself resolved)."""
    try:
        return path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):  # dangling or looping links
        return False


def resolve(name: str, directory) -> Path:
    """The LoRA file `name` names inside `directory`: NAME.safetensors/.pt/.ckpt, NAME itself when it has one of
    those extensions, or a file of that name in a subfolder (when exactly one). Names come from prompt tags, so
    '..', absolute paths and links leading out of the folder are refused. Missing -> LoraError naming the tag.
    The messages name files by their place inside the folder, never the folder's own path: a server sends them
    to whoever wrote the tag."""
    name, root = str(name), Path(directory)
    if not _is_relative_name(name):
        raise LoraError(f"{_tag(name)}: refused: a LoRA is named by its file name inside the LoRA folder ('..', "
                        f"absolute paths and drive letters are not allowed)")
    if not root.is_dir():
        raise LoraError(f"{_tag(name)}: the LoRA folder does not exist (set it with --lora-dir)")
    found = _find(name, root)
    if found is None:
        raise LoraError(f"{_tag(name)}: no LoRA named {name!r} in the LoRA folder ({_close_names(name, root)})")
    if not _inside(found, root.resolve()):
        raise LoraError(f"{_tag(name)}: refused: {found.relative_to(root).as_posix()} leads outside the LoRA "
                        f"folder (a link?)")
    return found


def _is_relative_name(name: str) -> bool:
    """Not empty, no NUL, no '..' part, not absolute (either slash, or a drive letter)."""
    refused = (not name.strip(), "\x00" in name, ".." in name.replace("\\", "/").split("/"), os.path.isabs(name),
               name.startswith(("/", "\\")), re.match(r"[A-Za-z]:", name) is not None)
    return not any(refused)


def _file_names(name: str) -> list[str]:
    """NAME itself when it has a LoRA extension, else NAME with each extension, in EXTENSIONS order."""
    return [name] if name.endswith(EXTENSIONS) else [name + ext for ext in EXTENSIONS]


def _is_file(path: Path) -> bool:
    return path.is_file() or path.is_symlink()  # a link that leads nowhere too: refused later, not missing


def _find(name: str, root: Path) -> Path | None:
    """The file in the folder itself, first extension first; else, for a name without a folder, the one file of
    that name in a subfolder."""
    here = [root / n for n in _file_names(name) if _is_file(root / n)]
    if not here and "/" not in name:
        here = _in_subfolders(name, root)
    return here[0] if here else None


def _in_subfolders(name: str, root: Path) -> list[Path]:
    """Files of that name anywhere under the folder (A1111 finds LoRAs in subfolders by file name); more than
    one -> LoraError listing them."""
    names = set(_file_names(name))
    found = sorted(p for p in root.rglob("*") if p.name in names and _is_file(p))
    if len(found) > 1:
        inside = [p.relative_to(root).as_posix() for p in found]
        raise LoraError(f"{_tag(name)}: ambiguous: {weights.few(inside, 3)}; name it with its subfolder, e.g. "
                        f"<lora:{inside[0].rsplit('.', 1)[0]}:1>")
    return found


def _close_names(name: str, root: Path) -> str:
    """At most three names in the folder close to `name` (difflib), for the 'no such LoRA' message: a hint at a
    typo, not a listing of a server's whole folder."""
    have = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*")
            if p.suffix in EXTENSIONS and p.is_file()]
    close = difflib.get_close_matches(name, have, n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else "no similar names there"


# ----------------------------------------------------------------------------------------------------------------
# The key tables: which component a key belongs to and how its module path is written; what role a tensor plays

# key prefix -> component; the module path after it is written with dots (diffusers) or with _ (kohya)
_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "unet.": "unet", "text_encoder.": "text_encoder"}
# key suffix -> role (longest suffix wins)
_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",  # kohya
             ".lora_A.weight": "down", ".lora_B.weight": "up",  # PEFT
             ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers LoRACompatible layers
             ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
             "_lora.down.weight": "down", "_lora.up.weight": "up"}  # diffusers attention processors
# attention-processor files name the layer by its processor slot (after "<attention>.processor." in the U-Net,
# "<attention>." in the text encoder); ours by the layer: component -> (separator, slot -> our layer)
_PROCESSOR_SLOTS = {"unet": (".processor.", {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}),
                    "text_encoder": (".", {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"})}
# keys of other model families, said as such rather than listed
_OTHER_FAMILIES = {"model.diffusion_model.": "a whole model checkpoint, not a LoRA",
                   "lora_te1_": "an SDXL LoRA", "lora_te2_": "an SDXL LoRA", "text_encoder_2.": "an SDXL LoRA",
                   "hada_": "a LyCORIS LoHa", "lokr_": "a LyCORIS LoKr", "oft_": "an OFT network",
                   "dora_scale": "a DoRA", "lora_magnitude_vector": "a DoRA",
                   "lora_mid": "a LyCORIS LoCon with Tucker decomposition", ".diff": "a full-weight difference network"}


def _layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _module_lookup(unet: nn.Module, text_encoder: nn.Module) -> dict[str, dict[str, str]]:
    """For each component: every way a file may write a layer's path -> our module name. The U-Net's layers also
    under their original (LDM) names, from keymap.py's key table; the text encoder's also without `text_model.`."""
    out = {}
    for comp, model in (("unet", unet), ("text_encoder", text_encoder)):
        names = list(_layers(model))
        spellings = [{n: n for n in names}]
        if comp == "unet":
            original, _ = keymap.rename_keys({f"{n}.weight": n for n in names}, keymap.unet_table(model.config),
                                         to_ours=False)
            spellings.append({k.rsplit(".", 1)[0]: n for k, n in original.items()})
        else:
            spellings.append({n.removeprefix("text_model."): n for n in names})
        lookup, clashes = {}, set()
        for table in spellings:
            for written, ours in table.items():
                for key in (written, written.replace(".", "_")):
                    if lookup.setdefault(key, ours) != ours:
                        clashes.add(key)
        for key in clashes:  # a spelling two layers share names neither
            del lookup[key]
        out[comp] = lookup
    return out


def _parse_key(key: str):
    """key -> (component, module path as written, role), or None when no table row fits."""
    prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
    suffix = max((s for s in _SUFFIXES if key.endswith(s)), key=len, default=None)
    if prefix is None or suffix is None or len(key) <= len(prefix) + len(suffix):
        return None
    comp, path = _PREFIXES[prefix], key[len(prefix):-len(suffix)]
    if suffix.startswith("_lora."):  # ...attn1.processor.to_q_lora.down.weight: the slot names the layer
        path = _processor_layer(comp, path)
    return None if path is None else (comp, path, _SUFFIXES[suffix])


def _processor_layer(comp: str, path: str) -> str | None:
    """"<attention>.processor.to_q" -> "<attention>.to_q" (text encoder: "<attention>.to_q" -> "<attention>.q_proj");
    None for a slot that is not in the table or has no attention path before it."""
    separator, slots = _PROCESSOR_SLOTS[comp]
    head, _, slot = path.rpartition(separator)
    if not head or slot not in slots:
        return None
    return f"{head}.{slots[slot]}"


# ----------------------------------------------------------------------------------------------------------------
# Reading a LoRA file into deltas in our naming

class LoraDelta(NamedTuple):
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    scale: float  # alpha / r

    def weight_delta(self, shape, device) -> torch.Tensor:
        """up @ down * scale in float32, shaped like the weight."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down).mul_(self.scale).reshape(shape)


@dataclass
class Lora:
    path: Path
    deltas: dict[str, LoraDelta] = field(repr=False)  # "unet.<module>.weight" / "text_encoder.<module>.weight"
    metadata: dict[str, str] = field(default_factory=dict, repr=False)  # a .safetensors file's __metadata__

    @functools.cached_property
    def hash(self) -> str:
        """A1111's short hash of the file (see `lora_hash`), computed once."""
        return lora_hash(self.path, self.metadata)


def _fits(shape: tuple, up: torch.Tensor, down: torch.Tensor) -> bool:
    """Do up (out, r[, 1, 1]) and down (r, in[, kh, kw]) make a delta of this weight's shape?"""
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or up.shape[0] != shape[0]:
        return False
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        return False
    if up.shape[1] != down.shape[0]:
        return False
    kernel, down_kernel = tuple(shape[2:]) or (1, 1), tuple(down.shape[2:]) or (1, 1)
    return kernel == down_kernel and down.shape[1] == shape[1]


def _check_pair(path: Path, up_key: str, up: torch.Tensor, down_key: str, down: torch.Tensor) -> None:
    """A pair must be floating point (int or bool weights are a broken file) and of rank >= 1: rank 0 has no
    delta, and alpha / rank would divide by zero."""
    for key, t in ((down_key, down), (up_key, up)):
        if not t.is_floating_point():
            raise LoraError(f"{path}: {key} is {str(t.dtype).removeprefix('torch.')}; LoRA weights are floating point")
    if down.ndim and down.shape[0] == 0:
        raise LoraError(f"{path}: {down_key} {tuple(down.shape)} has rank 0 (no rows); a LoRA layer has rank >= 1")


def read_lora(path, unet: nn.Module, text_encoder: nn.Module) -> Lora:
    """Parse a LoRA file (any layout above) into deltas for our layers, every key accounted for: unknown keys or
    layers, a missing half of a pair, or shapes that do not fit this model -> LoraError naming the file and keys."""
    path = Path(path)
    try:
        sd = weights.read_state_dict(path)
    except weights.CheckpointError as e:
        raise LoraError(str(e)) from None
    groups = _group_by_layer(path, sd, _module_lookup(unet, text_encoder))
    models = {"unet": unet, "text_encoder": text_encoder}
    deltas, wrong = {}, []
    for name, slot in groups.items():  # name: "unet.<module>.weight" / "text_encoder.<module>.weight"
        (up_key, up), (down_key, down) = _pair(path, slot)
        comp, param = name.split(".", 1)
        shape = tuple(models[comp].get_parameter(param).shape)
        if _fits(shape, up, down):
            deltas[name] = LoraDelta(up, down, _scale(path, slot))
        else:
            wrong.append(f"{down_key} {tuple(down.shape)} / {up_key} {tuple(up.shape)} for a weight of {shape}")
    if wrong:
        raise LoraError(f"{path}: does not fit this model (a LoRA for another base model, e.g. SD 2.x or SDXL?): "
                        f"{len(wrong)} layers have other shapes: {weights.few(wrong, 3)}")
    meta = weights.safetensors_metadata(path)
    return Lora(path, deltas, meta)


def _group_by_layer(path: Path, sd: dict, lookup: dict[str, dict[str, str]]) -> dict[str, dict[str, tuple]]:
    """"<component>.<our module>.weight" -> {role: (key, tensor)}. A key naming no layer of ours, or a second
    tensor for the same role -> LoraError."""
    groups, unknown = {}, []
    for key, tensor in sd.items():
        parsed = _parse_key(key)
        ours = parsed and lookup[parsed[0]].get(parsed[1])
        if not ours:
            unknown.append(key)
            continue
        comp, _, role = parsed
        slot = groups.setdefault(f"{comp}.{ours}.weight", {})
        if role in slot:
            raise LoraError(f"{path}: two tensors for the {role} of {comp}.{ours} (one is {key})")
        slot[role] = (key, tensor)
    if unknown:
        raise _unknown_keys_error(path, unknown, len(sd))
    return groups


def _unknown_keys_error(path: Path, unknown: list[str], total: int) -> LoraError:
    """The keys listed, and what kind of file they look like when a mark of another family gives it away."""
    family = next((what for mark, what in _OTHER_FAMILIES.items() if any(mark in k for k in unknown)), None)
    what = f"looks like {family}, which stablediff does not apply to SD 1.x; " if family else ""
    return LoraError(f"{path}: {what}{len(unknown)} of {total} keys name no layer of this model or are not a "
                     f"LoRA layout stablediff reads: {weights.few(sorted(unknown), 8)}")


def _pair(path: Path, slot: dict[str, tuple]) -> tuple[tuple, tuple]:
    """The (key, tensor) of the up and the down half of one layer, both there and usable (`_check_pair`)."""
    if "up" not in slot or "down" not in slot:
        have = ", ".join(k for k, _ in slot.values())
        raise LoraError(f"{path}: {have} has no matching {'up' if 'up' not in slot else 'down'} weight")
    up, down = slot["up"], slot["down"]
    _check_pair(path, *up, *down)
    return up, down


def _scale(path: Path, slot: dict[str, tuple]) -> float:
    """alpha / rank; 1 where the file has no alpha or alpha 0 (alpha stored as a tensor: its first value)."""
    alpha = float(slot["alpha"][1].float().reshape(-1)[0]) if "alpha" in slot else 0.0
    scale = alpha / slot["down"][1].shape[0] if alpha else 1.0
    if not math.isfinite(scale):
        raise LoraError(f"{path}: {slot['alpha'][0]} is {alpha}, not a finite number")
    return scale


# ----------------------------------------------------------------------------------------------------------------
# Applying a set of LoRAs to a model, exactly and reversibly

def _signature(path: Path) -> tuple:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class LoraSet:
    """The LoRAs merged into `unet` and `text_encoder` right now (`applied`: absolute path -> multiplier).

    `apply(wanted)` makes that set exactly `wanted`: every weight it changes is first copied (to the CPU, as
    AUTOMATIC1111 does), and recomputed as original + sum of the wanted deltas (in float32, in path order, then cast
    to the weight's dtype), so removing a LoRA or changing its multiplier gives bit-for-bit what applying the new
    set to the original weights gives, and `apply({})` restores the originals exactly."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        self.models = {"unet": unet, "text_encoder": text_encoder}
        self.applied: dict[Path, float] = {}
        self._loras: dict[Path, tuple[tuple, Lora]] = {}  # path -> (file signature, parsed)
        self._originals: dict[str, torch.Tensor] = {}  # "unet.<param>" -> the weight before any LoRA
        self._terms: dict[str, tuple] = {}  # "unet.<param>" -> ((path, multiplier, signature), ...) merged in now

    def lora(self, path) -> Lora:
        """The parsed file, reread when it changed on disk."""
        path = Path(path)
        if not path.is_file():
            raise LoraError(f"{path}: no such LoRA file")
        sig = _signature(path)
        cached = self._loras.get(path)
        if cached is None or cached[0] != sig:
            cached = self._loras[path] = (sig, read_lora(path, self.models["unet"], self.models["text_encoder"]))
        return cached[1]

    def apply(self, wanted: dict) -> None:
        """Multipliers outside +-MAX_MULTIPLIER are refused first; a merge whose weights overflow their dtype
        (or turn NaN) puts back the set applied before and raises, naming the file and the weight."""
        wanted = {Path(os.path.abspath(p)): float(m) for p, m in wanted.items()}
        for p, m in wanted.items():
            try:
                check_multiplier(m, str(p))
            except ValueError as e:
                raise LoraError(str(e)) from None
        loras = {p: self.lora(p) for p in sorted(wanted, key=str)}  # all read before any weight changes
        terms: dict[str, list] = {}
        for p, parsed in loras.items():
            if wanted[p] != 0:
                for name in parsed.deltas:
                    terms.setdefault(name, []).append((p, wanted[p], self._loras[p][0]))
        previous = self.applied
        try:
            self._merge(loras, terms)
        except LoraError:
            self.apply(previous)  # the weights merged so far go back to the set that was applied
            raise
        self.applied = dict(wanted)
        self._loras = {p: self._loras[p] for p in wanted}

    @torch.no_grad()
    def _merge(self, loras: dict[Path, Lora], terms: dict[str, list]) -> None:
        """Recompute every weight whose terms changed: original + sum of multiplier x delta, in float32."""
        for name in set(self._terms) | set(terms):
            new = tuple(terms.get(name, ()))
            if self._terms.get(name, ()) == new:
                continue
            comp, param_name = name.split(".", 1)
            param = self.models[comp].get_parameter(param_name)
            if name not in self._originals:
                self._originals[name] = param.detach().to("cpu", copy=True)
            original = self._originals[name]
            if not new:  # no LoRA touches it any more
                param.copy_(original)
                del self._originals[name], self._terms[name]
                continue
            w = original.to(param.device, torch.float32, copy=True)
            for p, m, _ in new:
                w.add_(loras[p].deltas[name].weight_delta(param.shape, param.device), alpha=m)
            _check_merged(w, param.dtype, name, new)
            param.copy_(w)
            self._terms[name] = new


def _check_merged(w: torch.Tensor, dtype: torch.dtype, name: str, terms: tuple) -> None:
    """A merged weight must be finite in the weight's own dtype: a huge multiplier x alpha / rank, or huge values
    in the file, would otherwise give inf/NaN weights and black images (NaN latents) much later."""
    low, high = (v.item() for v in torch.aminmax(w))  # NaN propagates to both
    largest = max(-low, high)
    if largest <= torch.finfo(dtype).max:
        return
    files = ", ".join(f"{p.name} at multiplier {m:g}" for p, m, _ in terms)
    what = "NaN" if math.isnan(largest) else f"{largest:.3g}, beyond {str(dtype).removeprefix('torch.')}"
    raise LoraError(f"{files}: the merged weight {name} would be {what}; lower the multiplier or check the file")


# ----------------------------------------------------------------------------------------------------------------
# Hashes for the infotext, as AUTOMATIC1111 writes them

def _addnet_hash(path: Path) -> str:
    """kohya's hash of a .safetensors file: sha256 of everything after the JSON header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def lora_hash(path, metadata: dict | None = None) -> str:
    """A1111's `Lora hashes` entry: the first 12 hex digits of the `sshs_model_hash` the trainer stored in the
    file's metadata, else of kohya's hash (sha256 after the header) for .safetensors, else of the file's sha256."""
    path = Path(path)
    meta = metadata if metadata is not None else weights.safetensors_metadata(path)
    full = meta.get("sshs_model_hash") or (_addnet_hash(path) if path.suffix == ".safetensors"
                                            else images.file_sha256(path))
    return full[:12]


def format_hashes(hashes: dict[str, str]) -> str:
    """{"name": "0123456789ab"} -> 'name: 0123456789ab, ...', the value of A1111's `Lora hashes` / `TI hashes`
    (names lose ':' and ',' as A1111 strips them; images.infotext quotes the whole value)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in hashes.items() if h)
