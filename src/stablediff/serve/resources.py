"""What `stablediff serve` lists besides models, in AUTOMATIC1111's shapes: LoRAs (--lora-dir), textual-inversion
embeddings (--embeddings-dir), VAE files (--vae-dir), prompt styles (--styles-file), the latent upscale modes and
the memory in use (/memory); and the look-ups that turn a name a client sends (sd_vae, styles) into what the job
uses.

Folders are read on every request, so a file dropped in shows at once (the refresh routes have nothing to do).
Files are named relative to their folder, never by the server's paths, and a link that leads out of its folder is
left out, as in worker.scan_models.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .. import embeddings, lora, weights
from ..styles import Style
from .worker import ClientError

log = logging.getLogger("stablediff.serve.resources")

# A1111's names for hires fix's latent upscaling (this server offers no hires fix; clients read the list)
LATENT_UPSCALE_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                        "Latent (nearest)", "Latent (nearest-exact)")
VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt")
OWN_VAE = ("Automatic", "None")  # A1111's sd_vae values for the model's own VAE


def files_in(folder: Path | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Path relative to `folder` (posix) -> resolved path of the files with those suffixes under it, sorted;
    hidden files and folders and links out of the folder left out; none for a missing folder."""
    if folder is None or not Path(folder).is_dir():
        return {}
    root = Path(folder).resolve()
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if name.lower().endswith(suffixes) and not name.startswith(".") and root in path.resolve().parents:
                found[path.relative_to(root).as_posix()] = path.resolve()
    return dict(sorted(found.items()))


# --- LoRAs ----------------------------------------------------------------------------------------------------------

def safetensors_metadata(path: Path) -> dict:
    """A .safetensors file's __metadata__, values that hold a JSON object decoded (as A1111 lists them); {} for
    other files and unreadable headers."""
    return {k: _json_object(v) for k, v in weights.safetensors_metadata(path).items()}


def _json_object(value):
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def lora_list(folder: Path | None) -> list[dict]:
    """A1111's /loras: name (the file's stem, what <lora:NAME:w> takes), alias (the same: tags resolve file names
    only, so A1111's alias from ss_output_name would name nothing here), path (relative to --lora-dir), metadata."""
    return [{"name": path.stem, "alias": path.stem, "path": rel, "metadata": safetensors_metadata(path)}
            for rel, path in files_in(folder, lora.EXTENSIONS).items()]


# --- textual-inversion embeddings -----------------------------------------------------------------------------------

def embedding_info(path: Path) -> dict:
    """A1111's fields of one embedding: shape (vector width) and vectors from the file; the training facts A1111
    reads from its own .pt files (step, sd_checkpoint, sd_checkpoint_name) are not kept, so null."""
    try:
        _, vectors = embeddings.read_embedding(path)
        shape, count = vectors.shape[1], vectors.shape[0]
    except embeddings.EmbeddingError:
        shape = count = None
    return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": shape, "vectors": count}


def embedding_list(loaded: dict[str, Path], folder: Path) -> dict:
    """A1111's /embeddings: `loaded` (trigger word -> file, as the model loaded them) and the files of the folder
    it left out (another model's width, unreadable) as `skipped`."""
    try:
        found = embeddings.find_embeddings(folder)
    except embeddings.EmbeddingError as e:  # two files of one trigger word: the model loaded none of the folder
        log.warning("embeddings: %s", e)
        found = {}
    return {"loaded": {word: embedding_info(path) for word, path in loaded.items()},
            "skipped": {word: embedding_info(path) for word, path in found.items() if word not in loaded}}


# --- VAEs -----------------------------------------------------------------------------------------------------------

def vae_files(folder: Path | None) -> dict[str, Path]:
    """File name -> file of the VAEs under --vae-dir (A1111 names a VAE by its file name; of two in different
    subfolders, the first in sorted order)."""
    found = {}
    for path in files_in(folder, VAE_SUFFIXES).values():
        found.setdefault(path.name, path)
    return found


def vae_list(folder: Path | None) -> list[dict]:
    """A1111's /sd-vae: model_name (what sd_vae takes) and filename (relative to --vae-dir)."""
    root = Path(folder).resolve() if folder is not None else None
    return [{"model_name": name, "filename": path.relative_to(root).as_posix()}
            for name, path in vae_files(folder).items()]


def vae_source(name: str, folder: Path | None) -> Path | None:
    """The VAE file an sd_vae value names; None for the model's own ("Automatic", "None"). ClientError (422)
    listing the choices for another name."""
    if name in OWN_VAE:
        return None
    found = vae_files(folder)
    if name not in found:
        raise ClientError(422, f"sd_vae {name!r} is not one of: {weights.few([*OWN_VAE, *found], 8)} "
                               f"(GET /sdapi/v1/sd-vae)")
    return found[name]


# --- prompt styles --------------------------------------------------------------------------------------------------

def style_list(styles: dict[str, Style]) -> list[dict]:
    """A1111's /prompt-styles: name, prompt, negative_prompt of each style, in the file's order."""
    return [style._asdict() for style in styles.values()]


def chosen_styles(names: list[str], styles: dict[str, Style]) -> list[Style]:
    """The styles a request names, in its order; ClientError (422) naming the first unknown one."""
    for name in names:
        if name not in styles:
            have = weights.few(list(styles), 8) if styles else "none: the server has no --styles-file"
            raise ClientError(422, f"styles: no style named {name!r} (styles: {have})")
    return [styles[name] for name in names]


# --- memory (/memory) -----------------------------------------------------------------------------------------------

def ram_memory(meminfo: Path = Path("/proc/meminfo"), statm: Path = Path("/proc/self/statm")) -> dict:
    """A1111's /memory "ram", in bytes: total (the machine's MemTotal), used (this server process's resident
    memory, which is what A1111 reports as used) and free (MemAvailable: what the system can still give without
    swapping; A1111 reports total - used, which counts every other process's memory as free). Read from /proc, so
    Linux only: elsewhere {"error": ...}, as A1111 answers when it cannot read them."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        total, free = (int(fields[name].split()[0]) * 1024 for name in ("MemTotal", "MemAvailable"))  # "N kB"
        used = int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident pages
    except (OSError, KeyError, IndexError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"free": free, "used": used, "total": total}


def cuda_memory(device) -> dict:
    """A1111's /memory "cuda" for a torch.device: the GPU's free/used/total bytes ("system", every process's use)
    and this process's allocator counters (current and peak bytes; allocation retries and out-of-memory events).
    {"error": "unavailable"} when the server does not run on a CUDA device, as A1111 answers without CUDA."""
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)  # {} before the first allocation

    def counter(name: str) -> dict:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {"system": {"free": free, "used": total - free, "total": total}, "active": counter("active_bytes"),
            "allocated": counter("allocated_bytes"), "reserved": counter("reserved_bytes"),
            "inactive": counter("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}
