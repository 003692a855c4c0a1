"""Writing safely: atomic files, whole-folder swaps, locks, stale leftovers, clear errors.

* ``atomic_path``: write a sibling temp file, fsync, then rename over the target. A crash or Ctrl-C at
  any moment leaves either the old file or the new one, never half of one.
* ``swap_in``: a folder written beside its target replaces it in one step (``renameat2`` exchange on
  Linux), so a run folder is always the old one or the new one.
* ``lock``: one writer per cache file or run folder (``flock`` on a hidden lock file beside it).
* ``clean_stale``: temp files and staging folders left by processes that died are removed.
* Every ``OSError`` while writing becomes an ``OutputError`` naming the path: "cannot write PATH: No
  space left on device"; so does a writer's own error type (safetensors, torch) hiding one.
* ``claim_output``: the one output policy of every command that writes (``--out``): a missing or empty
  path, or an mlc output of the same kind, is written; anything else, or one of the command's own
  inputs, is refused naming the path (``--force`` replaces a foreign one, never an input).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .config import Config, opt
from .errors import BusyError, OutputError
from .output_rules import check_kind, check_name, check_regular, mlc_folder

_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(tmp|staging|old)$")


def _temp_name(target: Path, kind: str) -> str:
    """``.NAME.PID.RANDOM.KIND``: the pid tells ``clean_stale`` whether its writer is still alive."""
    return f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """mkdir -p, with an OutputError naming the folder when it cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(str(path), e) from e
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it replaces ``target``, on error it is removed.
    An OSError while writing (disk full, read-only folder) becomes an OutputError naming ``target``."""
    target = Path(target)
    ensure_dir(target.parent)
    tmp_path = target.parent / _temp_name(target, "tmp")
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # give the file the usual mode
        os.replace(tmp_path, target)
    except OSError as e:
        raise OutputError(str(target), e) from e
    except Exception as e:
        why = _hidden_os_error(e, target.parent)
        if why is None:
            raise
        raise OutputError(str(target), why) from e
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _hidden_os_error(exc: BaseException, folder: Path) -> OSError | None:
    """The OSError behind a writer's own exception type (safetensors' SafetensorError, torch's RuntimeError
    wrap it, some only in their message), or the state of ``folder`` when it is full or read-only."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    for code in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES):
        if os.strerror(code) in text or f"os error {code})" in text:
            return OSError(code, os.strerror(code))
    with contextlib.suppress(OSError):
        st = os.statvfs(folder)
        if st.f_flag & os.ST_RDONLY:
            return OSError(errno.EROFS, os.strerror(errno.EROFS))
        if st.f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike[str], obj: Any) -> None:
    # allow_nan=False: a NaN would be written as the non-JSON token NaN; better to fail loudly here
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def write_safetensors(target: str | os.PathLike[str], weights: Any) -> None:
    """A module's state dict (or a name -> tensor mapping) as safetensors: mlc's one weights writer.

    Tensors are copied to contiguous CPU memory first: channels_last weights are not contiguous.
    """
    from safetensors.torch import save

    state = weights.state_dict() if hasattr(weights, "state_dict") else weights
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # Serialised in memory, written by Python: a full disk is then an OSError (OutputError), where
    # safetensors' own file writer raises a SafetensorError that names no path.
    blob = save(tensors, metadata={"format": "pt"})  # "pt": what transformers expects
    with atomic_path(target) as tmp:
        tmp.write_bytes(blob)


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Make ``folder`` (and parents) and prove a file can be written there, before a long job starts."""
    folder = ensure_dir(folder)
    probe = folder / _temp_name(folder / "write-check", "tmp")
    try:
        probe.write_bytes(b"ok")
    except OSError as e:
        raise OutputError(str(folder), e) from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


# ------------------------------------------------------------------------------------------ outputs


@dataclass(frozen=True, kw_only=True)
class OutputOptions(Config):
    """How a command treats an output path that already exists (see ``claim_output``)."""

    PANEL: ClassVar[str] = "Output"

    force: bool = opt(False, "Replace --out even when it is not what this command writes (a foreign file, or a "
                      "folder that is no mlc output of this kind): what it holds is deleted. Never replaces one of "
                      "the command's inputs.")


def is_mlc_temp(name: str) -> bool:
    """A temp file, staging folder or lock file mlc leaves beside what it writes."""
    return bool(_STALE.match(name)) or (name.startswith(".") and name.endswith(".lock"))


def entries(folder: Path) -> list[str]:
    """The names in ``folder``, mlc's own temp and lock files aside."""
    return sorted(p.name for p in folder.iterdir() if not is_mlc_temp(p.name))


def owned(folder: Path, manifest: str, kind: str | None, later: tuple[str, ...] = ()) -> bool | list[str]:
    """True when ``folder`` is an mlc folder (of ``kind``, when given) and mlc wrote all it holds: each entry is
    listed in its ``manifest`` file (a ``folders.listing`` under "files"), is the manifest, or one of ``later`` (written
    after it). Else the entries mlc did not write, or [] when it is no such mlc folder at all."""
    try:
        m = json.loads((folder / manifest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or (kind is not None and m.get("kind") != kind):
        return []
    known = {Path(name).parts[0] for name in m["files"] if Path(name).parts} | {manifest, *later}
    return [name for name in entries(folder) if name not in known] or True


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def claim_output(target: str | os.PathLike[str], *, what: str, ours: Callable[[Path], bool | list[str]], folder: bool,
                 inputs: Iterable[str | os.PathLike[str]] = (), sealed: Iterable[str | os.PathLike[str]] = (),
                 allow: Iterable[str | os.PathLike[str]] = (), force: bool = False) -> Path:
    """The real path of ``target`` once it is proved safe to write (or replace whole), else OutputError naming it.

    Safe: missing, empty, or an existing output that ``ours`` recognises as ``what`` this command writes: True,
    or for a folder the list of its entries mlc did not write, which must be empty (``force`` waives this one
    condition, except inside a folder among ``inputs``: a data or image folder's files are never replaced).
    Never safe, even with ``force``: one of ``inputs`` or ``sealed``
    itself, or a folder holding one (replacing it would delete it), or a path inside a ``sealed`` folder (a
    run or export whose manifest an extra file would break) other than the paths in ``allow``, or anything
    but a regular file or folder (a FIFO, a device: renaming over it would replace it), or a name too long
    for the file system once mlc's staging prefix is added. Paths are compared resolved, so symlinks, ``..``
    and other spellings of one path are the same path. Finally the parent folder must be writable, so a
    read-only destination fails before the work.
    """
    check_regular(target, folder)
    check_name(target)
    path = Path(target).expanduser().resolve()
    sealed = [Path(s).expanduser().resolve() for s in sealed]
    allowed = {Path(a).expanduser().resolve() for a in allow}
    inputs = [Path(i).expanduser().resolve() for i in inputs]
    inside = next((src for src in inputs if src.is_dir() and _within(path, src) and path != src), None)
    if inside is not None and force:
        force = False  # --force never replaces what an input folder holds
        what = f"{what} (--force never replaces a file inside {inside}, which this command reads)"
    for src in inputs + sealed:
        if _within(src, path):
            how = "is" if src == path else "holds"
            raise OutputError(str(target), f"it {how} {src}, which this command reads; choose another output path")
    home = mlc_folder(path)
    if home is not None and (home in sealed or path in allowed):
        home = None  # sealed as an input already (or the one path the command may write there)
    if home is not None:
        sealed.append(home)  # every run or export is sealed, not only the one this command reads
    for src in sealed:
        if _within(path, src) and path not in allowed:
            what_it_is = "an mlc run or export" if src == home else "which this command reads"
            raise OutputError(str(target), f"it is inside {src}, {what_it_is} (an extra file would no longer match "
                              "its manifest); choose another output path")
    if path.exists():  # a regular file or folder: check_regular refused the rest
        if path.is_dir() != folder:
            raise OutputError(str(target), f"it is a {'file' if folder else 'folder'}; {what} goes there")
        names = entries(path) if folder else ([] if path.stat().st_size == 0 else [path.name])
        mine = ours(path) if names else True
        if names:
            check_kind(target, path, what, mine, folder)
        if mine is not True and not force:
            if mine:
                why = f"it is {what}, but also holds what mlc did not write ({_some(mine)})"
            else:
                why = f"it exists and is not {what} ({f'it holds {_some(names)}' if folder else 'another file'})"
            raise OutputError(str(target), f"{why}; mlc replaces only what it wrote: choose another output path, or "
                              "pass --force to replace it (deleting what it holds)")
    check_writable(path.parent)
    clean_stale(path.parent)  # temp files and staging folders of writers that died (a killed export's, ...)
    return path


def _some(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def clean_stale(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temp files and staging/old folders in ``folder`` whose writing process is dead."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _STALE.match(p.name)
        if m and not _alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
    return removed


def staging_dir(target: Path) -> Path:
    """A fresh folder beside ``target`` to write a whole new version of it into."""
    ensure_dir(target.parent)
    path = target.parent / _temp_name(target, "staging")
    ensure_dir(path)
    return path


@contextlib.contextmanager
def staged(target: Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """A staging folder beside ``target`` to write a whole new version of it into; swapped in (``swap_in``,
    with ``keep``) when the block ends without an error, removed in every case."""
    stage = staging_dir(target)
    try:
        yield stage
        swap_in(stage, target, keep)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # after a swap: gone already, or the old version's remains


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OutputError(str(b), OSError(err, os.strerror(err)))


def swap_in(staging: Path, target: Path, keep: tuple[str, ...] = ()) -> None:
    """Make the complete folder ``staging`` become ``target``; the previous ``target`` is deleted, except
    its entries named in ``keep``, which move into the new one.

    With an existing target the two are exchanged atomically where the OS can (a reader sees the old
    folder or the new one, never neither); elsewhere the old one is renamed aside first.
    """
    try:
        if not target.exists():
            os.replace(staging, target)
            return
        if _exchange(staging, target):
            old = staging  # now holds the previous version
        else:
            old = target.parent / _temp_name(target, "old")
            os.replace(target, old)
            os.replace(staging, target)
        for name in keep:
            if (old / name).exists() and not (target / name).exists():
                os.replace(old / name, target / name)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise OutputError(str(target), e) from e


def _holder_pid(fd: int) -> str:
    """The pid the lock holder wrote into the lock file. It writes it just after taking the lock, so a
    loser that arrives in between waits for it a moment rather than report an unknown holder."""
    for _ in range(40):
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.025)
    return "?"


@contextlib.contextmanager
def lock(target: str | os.PathLike[str], what: str = "", *, wait: bool = False) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``target`` (flock) while writing it; BusyError at once when another
    process holds it, or with ``wait`` block until it is free (short writes any process may share, such
    as an ONNX graph). The lock dies with its process, so a killed writer never blocks the next run."""
    target = Path(target)
    ensure_dir(target.parent)
    path = target.parent / f".{target.name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as e:
        raise OutputError(str(path), e) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            raise BusyError(f"another mlc process is writing {what or target} (pid {holder}); wait for it "
                            "to finish, or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # no stale pid for the next loser to report
    finally:
        os.close(fd)  # releases the flock
