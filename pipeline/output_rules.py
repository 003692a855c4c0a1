"""Two rules of ``atomic.claim_output`` that need no state: an output name the file system can hold (with mlc's
temporary name beside it), and the run or export folder a path lies inside (which no other writer may touch)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from .errors import OutputError

# the longest name mlc makes beside an output: ".NAME.PID.RANDOM.staging" (a pid has at most 7 digits)
_STAGING_EXTRA = len(".x.1234567.01234567.staging") - 1  # atomic._temp_name's form, the largest pid


def check_name(target: str | os.PathLike[str]) -> None:
    """OutputError when the output's file name, with the staging prefix mlc writes beside it, or its whole
    path, is longer than the file system allows (the write would fail late, with a bare errno)."""
    path = Path(target).expanduser().absolute()
    name_max, path_max = 255, 4096
    parent = next((p for p in path.parents if os.path.isdir(p)), None)  # os.path: False on ENAMETOOLONG
    with contextlib.suppress(OSError, ValueError, TypeError):
        name_max = os.pathconf(parent or "/", "PC_NAME_MAX")
        path_max = os.pathconf(parent or "/", "PC_PATH_MAX")
    for part in path.parts[1:]:
        if len(os.fsencode(part)) > name_max:
            raise OutputError(str(target)[:80] + "...", f"the name {part[:40]!r}... is {len(os.fsencode(part))} bytes "
                              f"long; the file system allows {name_max}: choose a shorter output path")
    if len(os.fsencode(path.name)) + _STAGING_EXTRA > name_max:
        raise OutputError(str(target), f"the name {path.name[:40]!r}... is {len(os.fsencode(path.name))} bytes long; "
                          f"with the {_STAGING_EXTRA} bytes of mlc's temporary name beside it, more than the file "
                          f"system's {name_max}: choose a shorter output name")
    if len(os.fsencode(str(path))) + _STAGING_EXTRA > path_max:
        raise OutputError(str(target)[:80] + "...", f"the path is {len(os.fsencode(str(path)))} bytes long; the file "
                          f"system allows {path_max}: choose a shorter output path")


MANIFESTS = ("manifest.json", "export.json")  # the file a run folder / an export lists what it holds in


def mlc_folder(path: Path) -> Path | None:
    """The run or export folder ``path`` lies inside (the nearest folder above it holding a manifest that lists
    its files), or None: writing into one would break it (its manifest no longer matches)."""
    for folder in path.parents:
        for name in MANIFESTS:
            manifest = folder / name
            if manifest.is_file() and manifest.stat().st_size < (16 << 20):
                with contextlib.suppress(OSError, ValueError):
                    d = json.loads(manifest.read_text(encoding="utf-8"))
                    if isinstance(d, dict) and isinstance(d.get("files"), dict):
                        return folder
    return None
