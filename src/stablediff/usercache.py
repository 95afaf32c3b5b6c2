"""Small JSON files under the user's cache directory ($XDG_CACHE_HOME/stablediff, else ~/.cache/stablediff): model
file hashes (images.py) and the kernel choices per machine (tuning.py). A file that is missing, unreadable or not a
JSON object reads as empty, and one that cannot be written is skipped: either only costs recomputing what it held.
Writes go to a temporary file in the same folder, then replace the file at once, so that a reader in another
process never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def path(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stablediff" / name


def read(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write(file: Path, data: dict) -> None:
    """Replaces `file` with `data` as JSON; an OSError (read-only home, full disk) is left to the caller."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.stem}-", suffix=".json", dir=file.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
