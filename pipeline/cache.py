"""The feature cache: the only module that imports h5py.

One HDF5 file per data split and encoder pair. Layout (N records, V image views, C classes):

    image_ids     (N,)            utf-8 strings, in CSV order
    image         (N, V, Di)      float16 pooled image embeddings; view 0 = evaluation transform
    text          (N, Dt)         float16 pooled caption embeddings
    labels        (N, C)          uint8 multi-hot, only for labelled splits
    image_trunk   (N, V, *S)      optional: frozen activations at an image trunk cut (float16)
    text_trunk    (N, T, Ht)      optional: token states at a text trunk cut (float16), with
    text_mask     (N, T)          its attention mask (uint8)

    attrs["meta"]  JSON of CacheMeta: encoders, weights hashes, preprocessing, labels, data fingerprint…

Writing is crash-safe and resumable: rows are committed in chunks, each chunk an ``.npz`` written
atomically into ``<target>.partial/``; only when every chunk is there is the HDF5 file assembled
under a temp name and renamed to ``<target>``. So ``kill -9`` at any moment loses at most the chunk
in flight, and an unfinished cache never looks finished. HDF5 itself is not crash-safe, which is
why partial results never live inside an HDF5 file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .atomic import atomic_path, clean_stale, ensure_dir, write_json

# CacheMeta and its checks need no h5py, so they live in cache_meta; check_compatible is re-exported
# because callers (finetune, tests) import it from here.
from .cache_meta import CACHE_FORMAT, CacheMeta, _digest, check_compatible  # noqa: F401
from .errors import MlcError, OutputError


def read_meta(path: str | os.PathLike[str]) -> CacheMeta:
    """Read a finished cache's metadata; a clear error for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        hint = " (an unfinished extraction is there: rerun `mlc extract` to finish it)" if Path(
            f"{path}.partial"
        ).exists() else ""
        raise MlcError(f"{path}: no such cache file{hint}")
    try:
        with h5py.File(path, "r") as f:
            text = f.attrs["meta"]
            digest = f.attrs.get("meta_sha256")
            d = json.loads(text)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise MlcError(f"{path}: not an mlc feature cache, or a damaged one ({str(exc).splitlines()[0]}); "
                       "extract again with --overwrite to replace it") from exc
    if not isinstance(d, dict):
        raise MlcError(f"{path}: its metadata is not an object; extract again with --overwrite to replace it")
    if d.get("format", 1) != CACHE_FORMAT:
        why = ": photos decoded before EXIF orientation was applied" if d.get("format", 1) == 2 else ""
        raise MlcError(f"{path}: written by another mlc (cache format {d.get('format', 1)}{why}); this mlc reads "
                       f"format {CACHE_FORMAT}. Extract again with --overwrite to rebuild it.")
    if digest != _digest(text):
        raise MlcError(f"{path}: meta: does not match its checksum (meta_sha256): edited or damaged; extract "
                       "again with --overwrite to rebuild it")
    return CacheMeta.from_dict(d)


class CacheWriter:
    """Commit rows chunk by chunk (atomic .npz files), then assemble the HDF5 file once complete.

    Every chunk file carries the digest of the plan it was written for (its cache's identity, row ids
    and chunking); a chunk of any other plan, or one that cannot be read, is deleted, never adopted.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        meta: CacheMeta,
        image_ids: Sequence[str],
        labels: np.ndarray | None,
        chunk_rows: int = 512,
    ) -> None:
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be positive")
        if len(image_ids) != meta.num_records:
            raise ValueError("meta.num_records must equal the number of image ids")
        self.target = Path(target)
        self.meta = meta
        self.image_ids = list(image_ids)
        self.labels = labels
        self.chunk_rows = chunk_rows
        self.work = Path(f"{self.target}.partial")
        self.digest = hashlib.sha256(json.dumps(self._plan(), sort_keys=True).encode()).hexdigest()
        clean_stale(self.target.parent)
        clean_stale(self.work)
        self.resumed = self._prepare_work_dir()

    @property
    def num_chunks(self) -> int:
        return -(-len(self.image_ids) // self.chunk_rows)

    def bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, len(self.image_ids))

    def _chunk_path(self, chunk: int) -> Path:
        return self.work / f"chunk-{chunk:06d}.npz"

    def _plan(self) -> dict[str, Any]:
        return {"meta": self.meta.identity(), "chunk_rows": self.chunk_rows, "image_ids": self.image_ids}

    def _prepare_work_dir(self) -> int:
        """Keep the chunks of an interrupted run of this very plan; delete anything else. Returns chunks kept."""
        plan_file = self.work / "plan.json"
        same = False
        if plan_file.is_file():
            with contextlib.suppress(OSError, ValueError):
                same = json.loads(plan_file.read_text()).get("digest") == self.digest
        if not same and self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)
        ensure_dir(self.work)
        if not same:
            write_json(plan_file, {"digest": self.digest, **self._plan()})
            return 0
        for path in self.work.glob("chunk-*.npz"):
            if not self._belongs(path):
                path.unlink()
        return self.num_chunks - len(self.pending())

    def _belongs(self, path: Path) -> bool:
        """A chunk of this plan, readable, with the right number of rows."""
        try:
            chunk = int(path.stem.split("-")[1])
            with np.load(path, allow_pickle=False) as z:
                start, stop = self.bounds(chunk)
                return str(z["_plan"]) == self.digest and all(z[k].shape[0] == stop - start
                                                               for k in z.files if k != "_plan")
        except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile, EOFError):
            return False

    def pending(self) -> list[int]:
        """Chunks not yet committed, in order."""
        return [c for c in range(self.num_chunks) if not self._chunk_path(c).is_file()]

    def commit(self, chunk: int, arrays: dict[str, np.ndarray]) -> None:
        """Atomically store the rows of one chunk: each array has the chunk's rows on axis 0."""
        start, stop = self.bounds(chunk)
        for name, arr in arrays.items():
            if arr.shape[0] != stop - start:
                raise ValueError(f"chunk {chunk}: {name} has {arr.shape[0]} rows, expected {stop - start}")
        with atomic_path(self._chunk_path(chunk)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, _plan=np.asarray(self.digest), **arrays)

    def finalize(self) -> Path:
        """Assemble every chunk into the HDF5 file (under a temp name, then renamed) and clean up.

        HDF5 is not safe against a full disk: once a write fails with ENOSPC the library cannot even close
        the file, and the process dies of a segmentation fault at exit. So the free space is checked
        first, and the assembly runs in a forked child process: if HDF5 fails anyway, the child dies, this
        process reports it and the committed chunks stay (rerun after freeing space).
        """
        missing = self.pending()
        if missing:
            raise MlcError(f"{self.target}: {len(missing)} chunks are missing; cannot finalize")
        need = sum(p.stat().st_size for p in self.work.glob("chunk-*.npz")) * 1.05 + (1 << 20)
        free = shutil.disk_usage(self.target.parent).free
        if free < need:
            raise OutputError(str(self.target), f"not enough free space to assemble the cache (needs about "
                              f"{need / 1e6:.0f} MB, {free / 1e6:.0f} MB free); the encoded chunks are kept in "
                              f"{self.work}: free some space and rerun")
        _in_child(self._assemble, self.target)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.target

    def _assemble(self) -> None:
        n = len(self.image_ids)
        with atomic_path(self.target) as tmp, h5py.File(tmp, "w") as f:
            meta = json.dumps(self.meta.to_dict(), sort_keys=True)
            f.attrs["meta"] = meta
            f.attrs["meta_sha256"] = _digest(meta)  # HDF5's Fletcher-32 covers datasets, not attributes
            # Human-readable copies of the key facts (`h5ls -v` / h5dump show them).
            for key in ("split", "image_encoder", "text_encoder", "data_fingerprint", "mlc_version"):
                f.attrs[key] = str(getattr(self.meta, key))
            # Fixed-length UTF-8 bytes (not variable-length strings) so the Fletcher-32 checksum covers them.
            ids = np.array([i.encode("utf-8") for i in self.image_ids], dtype=bytes)
            f.create_dataset("image_ids", data=ids, chunks=True, fletcher32=True)
            if self.labels is not None:
                f.create_dataset("labels", data=self.labels.astype(np.uint8), chunks=True, fletcher32=True)
            datasets: dict[str, h5py.Dataset] = {}
            for chunk in range(self.num_chunks):
                start, stop = self.bounds(chunk)
                with np.load(self._chunk_path(chunk), allow_pickle=False) as z:
                    for name in z.files:
                        if name == "_plan":
                            continue
                        arr = z[name]
                        if name not in datasets:
                            # Chunked along rows, ~64 KiB a chunk: a random row read (a DataLoader
                            # streaming trunk activations of ~44 KB a row) then reads ~1 row, not 20+.
                            row_chunk = max(1, min(n, (1 << 16) // max(1, arr[0].nbytes)))
                            datasets[name] = f.create_dataset(
                                name, shape=(n, *arr.shape[1:]), dtype=arr.dtype,
                                chunks=(row_chunk, *arr.shape[1:]), fletcher32=True,
                            )
                        datasets[name][start:stop] = arr


def _in_child(fn: Any, target: Path) -> None:
    """Run ``fn`` in a forked process; an exception or a crash there becomes an error here."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child() -> None:
        # Its failures go back through the pipe; what HDF5 and h5py print on their way down (a dataset that
        # cannot be closed on a full disk: "Exception ignored in ... __dealloc__" tracebacks) is noise.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            fn()
            send.send(None)
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as text
            send.send(_io_reason(e))
            os._exit(1)  # no finalizers: h5py objects left half-closed must not run their __dealloc__

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    send.close()
    try:
        why = recv.recv()
    except EOFError:  # the child died before it could say why (a segfault in HDF5, a kill)
        why = None
    proc.join()
    if proc.exitcode == 0:
        return
    if why is None:
        why = f"the HDF5 writer died (exit code {proc.exitcode}; a full disk makes HDF5 crash)"
    raise OutputError(str(target), why)


def _io_reason(e: BaseException) -> str:
    """HDF5 reports a failed write as RuntimeError with 'errno = 28, error message = ...': keep the reason."""
    text = str(e)
    if isinstance(e, OutputError):
        return e.why
    m = re.search(r"error message = '([^']+)'", text)
    return m.group(1) if m else f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class CacheReader:
    """Read a finished cache. The HDF5 handle is opened lazily and reopened after fork (one per process)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def _h5(self) -> h5py.File:
        # h5py handles do not survive fork: DataLoader workers each open their own.
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            self._check_shapes(self._file)
        return self._file

    def _check_shapes(self, f: h5py.File) -> None:
        """Every dataset as large as the meta says (rows, views, dims, labels): never read past or short of it."""
        m = self.meta
        want = {"image_ids": (m.num_records,), "labels": (m.num_records, len(m.label_ids)),
                "image": (m.num_records, m.views, m.image_dim), "text": (m.num_records, m.text_dim)}
        for name, shape in want.items():
            if name in f and tuple(f[name].shape) != shape:
                raise MlcError(f"{self.path}: {name}: shape {tuple(f[name].shape)}, but its meta says {shape} "
                               "(rows, views, dims, labels); extract again with --overwrite")

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into spawn-started workers: never ship an open handle.
        return {**self.__dict__, "_file": None, "_pid": None}

    def __len__(self) -> int:
        return self.meta.num_records

    def has(self, name: str) -> bool:
        return name in self._h5()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._h5()[name].shape)

    @property
    def image_ids(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self.array("image_ids")]

    def labels(self) -> np.ndarray:
        if "labels" not in self._h5():
            raise MlcError(f"{self.path}: the {self.meta.split!r} split has no labels")
        return self.array("labels").astype(np.float32)

    def array(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """A dataset (or some of its rows, any order) as numpy, in its stored dtype. Damaged bytes fail
        the dataset's Fletcher-32 checksum: an MlcError naming the cache and the dataset."""
        if name not in self._h5():
            raise MlcError(f"{self.path}: the cache has no {name!r} dataset")
        ds = self._h5()[name]
        with self._reading(name):
            if rows is None:
                return ds[:]
            if isinstance(rows, slice):
                return ds[rows]
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size == 0:
                return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
            # h5py fancy indexing needs strictly increasing indices: read unique sorted rows, then
            # scatter back to the order (and repeats) asked for.
            uniq, inverse = np.unique(rows, return_inverse=True)
            return ds[uniq][inverse]

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        try:
            yield
        except (OSError, RuntimeError) as e:  # "data error detected by Fletcher32 checksum", a bad header
            raise MlcError(f"{self.path}: the {name!r} dataset is damaged ({str(e).splitlines()[0]}); extract "
                           "it again with --overwrite") from e

    def finite(self, name: str, values: np.ndarray, ids: Sequence[str]) -> np.ndarray:
        """``values`` (rows of dataset ``name``, image ids ``ids``), or an MlcError naming the rows that hold
        NaN or infinity."""
        flat = values.reshape(len(values), -1)
        step = max(1, (1 << 26) // max(1, flat.shape[1]))  # ~64 MB of booleans at a time (token maps: GBs at once)
        bad = np.concatenate([np.flatnonzero(~np.isfinite(flat[s:s + step]).all(1)) + s
                              for s in range(0, len(flat), step)] or [np.zeros(0, np.int64)])
        if bad.size:
            raise MlcError(f"{self.path}: {bad.size} row(s) of {name!r} hold NaN or infinite values (e.g. "
                           f"{', '.join(ids[i] for i in bad[:5])}); the cache is damaged: extract it again "
                           "with --overwrite")
        return values

    def dataset(self, names: Sequence[str], rows: np.ndarray | None = None,
                with_labels: bool = True) -> torch.utils.data.Dataset:
        """A torch Dataset over some rows; each item is a dict of float32 tensors (+ ``labels``)."""
        from .datasets import CacheDataset  # datasets builds on this module, so imported when used

        return CacheDataset(self, tuple(names), rows, with_labels)
