"""Running encoders over a split, chunk by chunk: the job (``Job``: one split to encode with the stage's
``LoaderOptions``, and the ``Hints`` its errors give) and the pipeline itself.

Images are decoded in DataLoader workers while the main thread hands whole batches to the engine's
lanes (``Engine.pool``); captions are length-sorted and batched so each batch pads only to its own
longest caption. Each chunk is committed to the ``CacheWriter`` as soon as its calls are done, in
order, so a killed or failed run keeps every chunk finished before the fault.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .backends import Engine
from .cache import CacheWriter
from .data import DataDir
from .datasets import ImageViews, collate_views
from .encoders import ImageEncoder, TextEncoder
from .errors import ImageError
from .log import progress_enabled
from .options import LoaderOptions
from .recipe import Recipe
from .records import Record


@dataclass(frozen=True)
class Hints:
    """What an encode job's errors suggest doing, in the words (and flags) of the stage that runs it."""

    bad_image: str = "repair or replace the file"  # after "<image>: <fault> (...)"
    skipped: str = ". Repair or replace those images, or replace the cache."  # after a cache that lacks images
    different: str = "Replace it, or write the cache elsewhere."  # after a cache that holds other features


@dataclass(frozen=True)
class Job:
    """One split to encode: what (recipe, records) and how (loader, chunking, device)."""

    recipe: Recipe
    data: DataDir
    split: str
    target: Path
    loader: LoaderOptions
    chunk_rows: int = 512
    skip_bad_images: bool = False
    overwrite: bool = False
    hints: Hints = Hints()  # what the errors suggest, in the stage's own flags


def encode_texts(text: TextEncoder, run: Callable[[torch.Tensor, torch.Tensor], dict[str, np.ndarray]],
                 captions: Sequence[str], batch_size: int, pad_to: int | None = None,
                 pool: Executor | None = None) -> dict[str, np.ndarray]:
    """Pooled caption embeddings (N, Dt) float16; with a cut also token states (N, pad_to, H) and mask (N, pad_to).

    Captions are sorted by length and batched so each batch pads only to its own longest caption. The
    batches run on ``pool`` (``Engine.pool``: one call per lane) or, without one, here, one by one.
    """
    return submit_texts(text, run, captions, batch_size, pad_to, pool.submit if pool else _now)[1]()


Submit = Callable[..., Future]


def _now(fn: Callable[..., Any], *args: Any) -> Future:
    """``Executor.submit`` that runs ``fn`` at once, in this thread."""
    fut: Future = Future()
    fut.set_result(fn(*args))
    return fut


def submit_texts(text: TextEncoder, run: Callable[[torch.Tensor, torch.Tensor], dict[str, np.ndarray]],
                 captions: Sequence[str], batch_size: int, pad_to: int | None,
                 submit: Submit) -> tuple[list[Future], Callable[[], dict[str, np.ndarray]]]:
    """``encode_texts`` with its forward calls handed to ``submit``: the calls, and what gathers their
    outputs once they are done."""
    enc = text.tokenize(list(captions))
    lengths = enc["attention_mask"].sum(1)
    order = torch.argsort(lengths, descending=True)
    parts = []  # (rows, tokens, mask (B, t)), one per call
    calls: list[Future] = []
    for s in range(0, len(captions), batch_size):
        rows = order[s:s + batch_size]
        t = int(lengths[rows].max())
        att = enc["attention_mask"][rows, :t]
        parts.append((rows.numpy(), t, att))
        calls.append(submit(run, enc["input_ids"][rows, :t], att))

    def gather() -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for (r, t, att), call in zip(parts, calls, strict=True):
            got = call.result()
            if not out:
                out["text"] = np.zeros((len(captions), got["text"].shape[-1]), dtype=np.float16)
                if "text_trunk" in got:
                    out["text_trunk"] = np.zeros((len(captions), pad_to, got["text_trunk"].shape[-1]), np.float16)
                    out["text_mask"] = np.zeros((len(captions), pad_to), dtype=np.uint8)
            out["text"][r] = got["text"]
            if "text_trunk" in got:
                out["text_trunk"][r, :t] = got["text_trunk"]
                out["text_mask"][r, :t] = att.numpy()
        return out
    return calls, gather


def encode_images(run: Callable[[torch.Tensor], dict[str, np.ndarray]], views: torch.Tensor) -> dict[str, np.ndarray]:
    """(B, V, 3, H, W) uint8 -> image (B, V, Di) and, with a cut, image_trunk (B, V, *S), float16."""
    b, v = views.shape[:2]
    got = run(views.flatten(0, 1))
    return {k: a.astype(np.float16).reshape(b, v, *a.shape[1:]) for k, a in got.items()}


def _batches(loader: torch.utils.data.DataLoader, rows: list[int],
             hint: str) -> Iterator[tuple[list[int], torch.Tensor]]:
    for idx, views, errors in loader:
        if errors:
            path, fault = errors[0]
            raise ImageError(path, f"{fault} ({hint})")
        yield [rows[i] for i in idx], views


def _image_batches(job: Job, image: ImageEncoder | None, records: list[Record], rows: list[int],
                   device: torch.device) -> Iterator[tuple[list[int], torch.Tensor]] | None:
    """Decoded uint8 views of ``rows``, batch by batch, from DataLoader workers; None without images."""
    if image is None:
        return None
    opts = job.loader
    transforms = [image.preprocess.pixels(v) for v in range(job.recipe.views)]  # uint8 from the workers
    loader = torch.utils.data.DataLoader(
        ImageViews(job.data, [records[i] for i in rows], transforms, image.preprocess.draft_size()),
        batch_size=opts.encode_batch, shuffle=False, num_workers=opts.workers, collate_fn=collate_views,
        pin_memory=device.type == "cuda", persistent_workers=False, prefetch_factor=4 if opts.workers else None)
    return _batches(loader, rows, job.hints.bad_image)


@dataclass
class _Chunk:
    """One chunk's forward calls (image batches in order, caption batches) and what gathers its captions."""

    index: int
    images: list[Future]
    texts: list[Future]
    gather: Callable[[], dict[str, np.ndarray]] | None

    def ok(self) -> bool:
        return all(f.done() and not f.cancelled() and f.exception() is None for f in self.images + self.texts)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: np.concatenate([f.result()[k] for f in self.images]) for k in self.images[0].result()} \
            if self.images else {}
        return out | (self.gather() if self.gather else {})


class _InFlight:
    """Forward calls running or queued on the engine's lanes, oldest first, and the chunks they belong to;
    a chunk is committed, in order, as soon as its calls are done."""

    def __init__(self, writer: CacheWriter, bar: tqdm) -> None:
        self.writer, self.bar = writer, bar
        self.calls: deque[tuple[Future, int]] = deque()  # (call, rows it adds to the progress bar)
        self.chunks: deque[_Chunk] = deque()

    def add(self, call: Future, rows: int) -> Future:
        self.calls.append((call, rows))
        return call

    def settle(self, limit: int) -> None:
        """Wait until at most ``limit`` calls are in flight, then commit every finished chunk."""
        while self.calls and (len(self.calls) > limit or self.calls[0][0].done()):
            call, rows = self.calls.popleft()
            call.result()  # a failed forward raises here
            self.bar.update(rows)
        self.commit_done()

    def commit_done(self) -> None:
        while self.chunks and self.chunks[0].ok():
            chunk = self.chunks.popleft()
            self.writer.commit(chunk.index, chunk.arrays())


def encode_chunks(job: Job, writer: CacheWriter, chunks: list[int], records: list[Record],
                   image: ImageEncoder | None, text: TextEncoder | None, eng: Engine, device: torch.device) -> None:
    """Encode and commit ``chunks``. The main thread hands whole batches to the engine's lanes (2 per lane
    in flight at most) while the DataLoader workers decode ahead."""
    rows = [r for c in chunks for r in range(*writer.bounds(c))]
    batches = _image_batches(job, image, records, rows, device)
    pad_to, bs = None, job.loader.encode_batch
    if job.recipe.text_cut is not None and text is not None:
        # One token length for the whole split so text_trunk rows stack into one dataset.
        pad_to = int(text.tokenize([rec.caption for rec in records])["attention_mask"].sum(1).max())
    bar = tqdm(total=len(rows), unit="img" if image is not None else "row", desc=f"extract {job.split}",
               disable=not progress_enabled(), dynamic_ncols=True, file=sys.stderr)
    pool, flight = eng.pool(), _InFlight(writer, bar)
    try:
        for chunk in chunks:
            start, stop = writer.bounds(chunk)
            images: list[Future] = []
            taken = 0
            while batches is not None and taken < stop - start:
                _, views = next(batches)
                images.append(flight.add(pool.submit(encode_images, eng.image, views), len(views)))
                taken += len(views)
                flight.settle(2 * eng.lanes)  # every lane fed, and no more decoded batches waiting than that
            texts, gather = [], None
            if text is not None:
                # Caption batches as large as image batches: shorter captions pad less (measured: 32 beat 64)
                texts, gather = submit_texts(text, eng.text, [rec.caption for rec in records[start:stop]], bs,
                                             pad_to, pool.submit)
                for i, call in enumerate(texts):  # call i: captions i*bs ... of the chunk
                    flight.add(call, 0 if image is not None else min(bs, stop - start - i * bs))
            flight.chunks.append(_Chunk(chunk, images, texts, gather))
            flight.settle(2 * eng.lanes)
        flight.settle(0)
    except BaseException:
        # A failed call, a bad image or Ctrl-C: let the running calls end and keep every chunk finished
        # before the fault (a rerun resumes from them); the first fault is the one reported.
        pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):
            flight.commit_done()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()  # end the bar's line, so an error prints on a line of its own
