"""Rules of ``atomic.claim_output`` that need no state: an output that is a path to a file or folder (not a device,
a pipe or a process's standard stream), an output name the file system can hold (with mlc's temporary name beside
it), and the run or export folder a path lies inside (which no other writer may touch)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import OutputError
from .reading import kind
from .records import IMAGE_EXTENSIONS

# a process's open files by number: the standard streams (/dev/stdout -> /proc/self/fd/1) and /dev/fd/N
_STREAMS = re.compile(r"/(dev/(stdin|stdout|stderr|fd/\d+)|proc/(self|thread-self|\d+)/fd/\d+)")


def check_regular(target: str | os.PathLike[str], folder: bool, option: str = "--out") -> None:
    """OutputError naming ``option`` when the output is, or leads through links to, a device, a FIFO, a socket or
    a process's open file (``/dev/stdout``): mlc writes an output whole beside it, then renames it over, so an
    output must be the path of a regular file (or folder); renaming over a stream or a device would replace it."""
    given = os.path.abspath(os.path.expanduser(os.fspath(target)))
    hops, at = [given], given
    for _ in range(40):  # the link chain, as written (/dev/stdout -> /proc/self/fd/1 -> pipe:[...])
        try:
            at = os.path.normpath(os.path.join(os.path.dirname(at), os.readlink(at)))
        except (OSError, ValueError):
            break
        hops.append(at)
    what = None
    if any(_STREAMS.fullmatch(h) for h in hops):
        what = "a standard stream (a process's open file)"
    else:
        try:
            mode = os.stat(given).st_mode
        except (OSError, ValueError):
            mode = None
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            what = kind(mode)
    if what is not None:
        need = "a folder path" if folder else "a regular file path"
        raise OutputError(str(target), f"{option} must be {need}, and {target} is {what}; mlc writes an output whole, "
                          "to a temporary file renamed over it, never to a device, a pipe or a stream")

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


DATA_FILES = ("train.csv", "test.csv")  # what makes a folder a dataset
_HDF5 = b"\x89HDF\r\n\x1a\n"


def first_line(path: Path, limit: int = 4096) -> str:
    """The first line of a file (at most ``limit`` bytes), decoded leniently; "" when unreadable."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).split(b"\n", 1)[0].decode("utf-8", errors="replace").strip().lstrip("\ufeff")
    except OSError:
        return ""


# What each mlc command writes, recognised by its content: the command's own ``ours`` (it may replace its own
# kind) and ``mlc_kind`` (--force never replaces another command's) read these same functions.

def is_cache(path: Path) -> bool:
    """An HDF5 file (mlc extract writes its feature caches as HDF5)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(_HDF5)) == _HDF5
    except OSError:
        return False


def is_submission(path: Path) -> bool:
    """A file mlc submit wrote (its header)."""
    return first_line(path) == "ImageID,Labels"


def is_predictions(path: Path) -> bool:
    """A file mlc predict wrote, in any format (its first line); never "ImageID,Labels", which is a submission."""
    line = first_line(path)
    if line.startswith("path,labels,") or (line.startswith("photo ") and line.endswith(" labels (probability)")):
        return True
    try:
        return {"path", "labels"} <= set(json.loads(line))  # JSON lines: one object a line
    except (ValueError, TypeError):
        return False


def is_scores(path: Path) -> bool:
    """A JSON file mlc evaluate --out wrote."""
    with contextlib.suppress(ValueError, TypeError, OSError):
        if path.stat().st_size < (16 << 20):
            d = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(d, dict) and {"samples_f1", "per_class", "rows", "source"} <= set(d)
    return False


def is_runs_page(path: Path) -> bool:
    """The HTML page mlc runs --out wrote."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as fh:
            text = fh.read(1 << 16).decode("utf-8", errors="replace")
        return text.startswith("<!doctype html>") and "<h1>mlc runs</h1>" in text
    return False


def is_dataset_csv(path: Path) -> bool:
    """A data folder's labels CSV: named train.csv / test.csv, or headed ImageID then Labels or Caption (a
    submission is headed "ImageID,Labels" alone)."""
    line = first_line(path)
    return path.name in DATA_FILES or (line.startswith("ImageID,") and "Caption" in line)


KINDS: tuple[tuple[Callable[[Path], bool], str], ...] = (
    (is_cache, "an HDF5 feature cache (mlc extract writes them)"),
    (is_submission, "a submission (mlc submit)"),
    (is_predictions, "a predictions file (mlc predict)"),
    (is_runs_page, "a runs page (mlc runs --out)"),
    (is_scores, "a scores file (mlc evaluate --out)"),
    (is_dataset_csv, "a dataset's labels CSV"),
)


def mlc_kind(path: Path) -> str | None:
    """What mlc wrote (or reads as data) at ``path`` (a regular file), by its content, or None: a feature cache, a
    submission, predictions, evaluate's scores, a runs page, a dataset's CSV. ``--force`` replaces a foreign file,
    never one of these when the command writes another kind (the commands' own ``ours`` decide what is theirs)."""
    return next((what for recognise, what in KINDS if recognise(path)), None)


def check_kind(target: str | os.PathLike[str], path: Path, what: str, mine: object, folder: bool) -> None:
    """OutputError when the existing ``path`` is what another mlc command wrote (``mlc_kind``), or a folder holding
    a dataset (``dataset_in``), and not ``what`` this command writes: not even ``--force`` replaces
    another command's output or deletes a dataset (a data folder typed after --out by mistake). ``mine``: what the
    command's own recogniser said of ``path`` (True: its own kind)."""
    if mine is True:
        return
    if folder:
        data = dataset_in(path)
        if data is not None:
            raise OutputError(str(target), f"it holds a dataset ({data}); even --force never replaces a folder "
                              "holding a data folder's train.csv or test.csv, or photos: choose another output path")
        return
    other = mlc_kind(path)
    if other is not None:
        raise OutputError(str(target), f"it is {other}, which is not {what}; even --force never replaces what "
                          "another mlc command wrote, nor a dataset's CSV: choose another output path")



def dataset_in(folder: Path, limit: int = 1000) -> Path | None:
    """What makes ``folder`` data, or None: a data folder's CSV in it, in a folder directly inside it or beside it
    (``folder`` is a dataset's image folder), or a photo in it (the first ``limit`` entries looked at). mlc's own
    run and export folders hold none of these."""
    with contextlib.suppress(OSError):
        for place in (folder, folder.parent):
            for name in DATA_FILES:
                if (place / name).is_file():
                    return place / name
        for i, sub in enumerate(folder.iterdir()):
            if i >= limit:
                break
            if sub.suffix.lower() in IMAGE_EXTENSIONS:
                return sub
            for name in DATA_FILES:
                with contextlib.suppress(OSError):
                    if sub.is_dir() and (sub / name).is_file():
                        return sub / name
    return None
