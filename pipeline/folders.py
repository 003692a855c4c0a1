"""Self-describing folders (run folders, exports): every file listed with its size and sha256, JSON read
strictly. Torch-free, so an exported model can be checked and loaded without torch."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import MlcError
from .reading import JSON_BYTES, read_text

# What is written into a run folder after the run, outside its manifest (members/: a best run's members, each a run
# folder of its own; run.json: the `mlc run` recipe that made it, for --config). runs.py and the torch-free
# leaderboard both read it here.
RUN_LATER = ("checkpoints", "members", "report", "submission.csv", "submission.json", "run.json")


def user_cache(name: str) -> Path:
    """mlc's per-user cache folder ``name`` (ONNX graphs, assembled weights): ``$MLC_HOME/NAME``, else
    ``$XDG_CACHE_HOME/mlc/NAME`` (``~/.cache/mlc/NAME``). Never under an output folder: every command and data
    folder shares it."""
    if os.environ.get("MLC_HOME"):
        return Path(os.environ["MLC_HOME"]).expanduser() / name
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mlc" / name


def read_json(path: Path, folder: str) -> Any:
    """A JSON file mlc wrote into ``folder`` (named in the message); NaN/Infinity refused, faults named."""
    try:
        return json.loads(read_text(path, limit=JSON_BYTES, what="JSON file"), parse_constant=_no_constants(path))
    except FileNotFoundError:
        raise MlcError(f"{path}: missing from {folder}") from None
    except (OSError, ValueError) as e:
        raise MlcError(f"{path}: cannot read JSON ({e})") from e


def _no_constants(path: Path) -> Any:
    def refuse(token: str) -> None:
        raise MlcError(f"{path}: holds {token}, which is not a number JSON allows")
    return refuse


def _listed(folder: Path, ignore: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).parts[0] not in ignore
                  and not p.name.startswith("."))


def listing(folder: Path, ignore: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, sha256}} of every file under ``folder`` (hidden ones and ``ignore`` aside)."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in _listed(folder, ignore)}


def check_listing(folder: Path, files: dict[str, Any], ignore: tuple[str, ...], fix: str) -> None:
    """``folder`` holds exactly ``files`` (a ``listing``), byte for byte; MlcError naming the first that is not."""
    for name, entry in files.items():
        path = folder / name
        if path.exists() and not path.is_file():
            raise MlcError(f"{path}: not a regular file (listed in the manifest as one); {fix}")
        if not path.is_file():
            raise MlcError(f"{path}: missing from the folder (listed in its manifest); {fix}")
        size = path.stat().st_size
        if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            what = f"{size} bytes instead of {entry['bytes']}" if size != entry["bytes"] else "its content changed"
            raise MlcError(f"{path}: not as it was written ({what}); {fix}")
    extra = [str(p.relative_to(folder)) for p in _listed(folder, ignore) if str(p.relative_to(folder)) not in files]
    if extra:
        raise MlcError(f"{folder / extra[0]}: not part of {folder} (not in its manifest); remove it "
                       f"({len(extra)} such file(s))")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()  # streams the file (Python 3.11)
