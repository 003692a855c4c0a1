"""Making features: run the encoders over a data split once and write them to a cache.

Shared by ``mlc extract`` and by ``mlc submit`` (which makes the test split's features with the
recipe the run's training cache was made with). Flow per split: read the records -> fingerprint
records + image bytes -> if a finished cache with the same identity exists, do nothing -> otherwise
encode the rows chunk by chunk (images decoded in DataLoader workers, whole batches on the engine's
lanes) and commit each chunk, so a killed or failed run resumes where it stopped. Under torchrun each rank encodes
every WORLD_SIZE-th chunk and rank 0 assembles the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import re
import shutil
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

from . import __version__
from .atomic import check_writable, lock
from .backends import Engine, engine
from .cache import CacheMeta, CacheWriter, read_meta
from .data import DataDir, DataOptions, check_images, fingerprint
from .datasets import ImageViews, collate_views
from .device import is_main, rank, world_size
from .encoders import NONE, ImageEncoder, TextEncoder, create_image_encoder, create_text_encoder, load_encoder
from .errors import ImageError, MismatchError, MlcError
from .options import LoaderOptions  # noqa: F401 (the stages import it from here)
from .quantize import calibration_pixels
from .records import Record
from .runs import RunDir


@dataclass(frozen=True)
class Recipe:
    """How a cache's features are made. Stored in the cache and in every run that reads it, so the
    test split can be encoded exactly like the training split."""

    image_encoder: str
    text_encoder: str
    image_weights: str | None = None
    text_weights: str | None = None
    random_init: bool = False
    from_run: str | None = None  # take both encoders from a finetuned run folder
    views: int = 1
    image_cut: str | None = None
    text_cut: str | None = None
    text_pooling: str | None = None
    data: dict[str, Any] | None = None  # the data folder's layout (DataOptions), so test.csv reads alike
    precision: str = "fp32"  # resolved: fp32, bf16, fp16 (CUDA) or int8
    crossfit: str | None = None  # made by `mlc crossfit` (K fold models, not kept): its id

    def __post_init__(self) -> None:
        if self.views < 1:
            raise MlcError("--views must be at least 1")
        if self.from_run is not None and (self.image_weights or self.text_weights or self.random_init):
            raise MlcError("--from-run takes the encoders from the run; do not combine it with "
                           "--image-weights, --text-weights or --random-init")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown or not {"image_encoder", "text_encoder"} <= set(d):
            raise MlcError(f"{where}: not a feature recipe (unknown keys {unknown}, or no encoder names)")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def tag(self) -> str | None:
        """What tells caches of the same encoder pair apart: finetuned weights, cuts, views."""
        parts = []
        if self.from_run is not None:
            parts.append(f"run-{Path(self.from_run).resolve().name}")
        elif self.random_init:
            parts.append("random")
        elif self.image_weights or self.text_weights:
            parts.append("custom")
        if self.crossfit:
            parts.append(f"crossfit-{self.crossfit}")
        if self.image_cut:
            parts.append(f"img-{self.image_cut}")
        if self.text_cut:
            parts.append(f"txt-{self.text_cut}")
        if self.views > 1:
            parts.append(f"v{self.views}")
        if self.text_pooling:
            parts.append(f"pool-{self.text_pooling}")
        if self.precision != "fp32":
            parts.append(self.precision)
        return "_".join(parts) or None

    def data_options(self) -> DataOptions:
        return DataOptions(**(self.data or {}))

    def encoders(self, verified: Path | None = None) -> tuple[ImageEncoder | None, TextEncoder | None]:
        """Pretrained (or explicit local) weights, a finetuned run's encoders, or seeded random init; None
        for a modality the recipe has no encoder for ('none'). ``verified``: a run folder the caller has
        just verified (RunDir.load), not hashed again when it is the one the encoders come from."""
        if self.crossfit is not None:
            raise MlcError(f"features cross-fitted by `mlc crossfit` ({self.crossfit}) come from {self.text_encoder} "
                           "fold models that are not kept: only the train and test caches crossfit wrote hold "
                           "them; predict and export need a run over encoders that exist")
        if self.from_run is not None:
            run = RunDir(Path(self.from_run))
            if verified is None or Path(verified).resolve() != run.path.resolve():
                run.verify()
            if not run.has_encoders():
                raise MlcError(f"{run.path}: not a finetuned run folder (needs encoders/image and encoders/text, "
                               "written by `mlc finetune`)")
            image, text = load_encoder(run.encoder_dir("image")), load_encoder(run.encoder_dir("text"))
            if (image.name, text.name) != (self.image_encoder, self.text_encoder):
                raise MismatchError(f"{run.path} holds {image.name} + {text.name}, not "
                                    f"{self.image_encoder} + {self.text_encoder}")
        else:
            # Random init is seeded so a rerun builds the same weights (same hash): resumable and reusable.
            seed = 0 if self.random_init else None
            image = None if self.image_encoder == NONE else create_image_encoder(
                self.image_encoder, weights=self.image_weights, random_init=self.random_init, seed=seed)
            text = None if self.text_encoder == NONE else create_text_encoder(
                self.text_encoder, weights=self.text_weights, random_init=self.random_init, seed=seed,
                pooling=self.text_pooling)
        for enc, cut in ((image, self.image_cut), (text, self.text_cut)):
            if cut is not None and (enc is None or cut not in enc.cuts):
                raise MlcError(f"--{'image' if enc is image else 'text'}-cut {cut}: no encoder to cut") if enc is None \
                    else enc.no_cut(cut)
        return image, text


def safe_name(name: str) -> str:
    """An encoder name as a file name part: ``timm:convnext_tiny`` -> ``timm-convnext_tiny-<hash>`` (the hash of
    the full name keeps names that differ only in dropped characters apart)."""
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "-", name).strip("-")[-60:]
    return safe if safe == name else f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def fit_to_data(recipe: Recipe, data: DataDir) -> Recipe:
    """The recipe with the data folder's layout, and without an encoder for a modality the data lacks (said)."""
    changes: dict[str, Any] = {"data": data.options.recorded()}
    if not data.options.images and recipe.image_encoder != NONE:
        changes["image_encoder"] = NONE
        if is_main():
            print("note: --no-images: a text-only dataset; no image features", file=sys.stderr)
    if not data.has_captions("train" if data.has("train") else "test") and recipe.text_encoder != NONE:
        changes["text_encoder"] = NONE
        if is_main():
            print(f"note: no {data.options.caption_col!r} column: an image-only dataset; no caption features",
                  file=sys.stderr)
    return dataclasses.replace(recipe, **changes)


def cache_path(out_dir: Path, data_dir: Path, split: str, recipe: Recipe) -> Path:
    """``<out_dir>/<data folder name>/<split>__<image>__<text>[__<tag>].h5``."""
    tag = recipe.tag()
    name = f"{split}__{safe_name(recipe.image_encoder)}__{safe_name(recipe.text_encoder)}" + (f"__{tag}" if tag else "")
    return Path(out_dir) / Path(data_dir).resolve().name / f"{name}.h5"


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
    command: str = "extract"  # whose options the error messages may suggest

    @property
    def elsewhere(self) -> str:
        return "--out-dir" if self.command == "extract" else "--cache-dir"


def _identity(enc: ImageEncoder | TextEncoder | None) -> dict[str, Any]:
    """What the cache records of one encoder (or of none)."""
    if enc is None:
        return {"encoder": NONE, "weights": "", "weights_hash": "", "random_init": False, "preprocess": {}, "dim": 0}
    return {"encoder": enc.name, "weights": enc.weights_source, "weights_hash": enc.weights_hash,
            "random_init": enc.random_init, "preprocess": enc.preprocess.to_dict(), "dim": enc.dim}


def _meta(job: Job, image: ImageEncoder | None, text: TextEncoder | None, records: list[Record], eng: Engine,
          skipped: list[tuple[str, str]]) -> CacheMeta:
    r = job.recipe
    i, t = _identity(image), _identity(text)
    labels = job.data.label_space()
    return CacheMeta(
        split=job.split, image_encoder=i["encoder"], text_encoder=t["encoder"],
        image_weights=i["weights"], image_weights_hash=i["weights_hash"],
        text_weights=t["weights"], text_weights_hash=t["weights_hash"],
        random_init=i["random_init"] or t["random_init"], image_preprocess=i["preprocess"],
        text_preprocess=t["preprocess"], views=r.views, image_dim=i["dim"], text_dim=t["dim"],
        label_ids=labels.ids, label_names=labels.names,
        data_fingerprint=fingerprint(records, job.data.image_dir if image is not None else None),
        num_records=len(records), image_cut=r.image_cut, text_cut=r.text_cut, precision=r.precision,
        source_run=str(Path(r.from_run).resolve()) if r.from_run else None,
        mlc_version=__version__, created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        extra={"recipe": r.to_dict(), "backend": eng.backends, "skipped": [list(x) for x in skipped]},
    )


def _up_to_date(job: Job, meta: CacheMeta) -> bool:
    """True when the target already holds these features; MismatchError when it holds others."""
    if not job.target.exists():
        return False
    try:
        old = read_meta(job.target)
    except MlcError as e:
        if not job.overwrite:
            raise
        if is_main():
            print(f"replacing {job.target}: {e}", file=sys.stderr)
        return False
    diffs = old.differences(meta)
    if not diffs:
        return True
    skipped = old.extra.get("skipped") or []
    if skipped and not job.skip_bad_images and not job.overwrite:
        raise MismatchError(
            f"{job.target} was extracted with --skip-bad-images and lacks {len(skipped)} {job.split} image(s): "
            + ", ".join(f"{i} ({why})" for i, why in skipped[:5])
            + (". A submission needs every test image: repair or replace those files, then run `mlc submit` "
               "again with --overwrite to encode the test split anew." if job.command == "submit" else
               ". Pass --skip-bad-images to reuse it, or --overwrite to encode every image anew."))
    if not job.overwrite:
        raise MismatchError(f"{job.target} exists but holds different features (" + "; ".join(diffs[:4])
                            + f"). Pass --overwrite to replace it, or {job.elsewhere} to write elsewhere.")
    return False


def _records(job: Job) -> tuple[list[Record], list[tuple[str, str]]]:
    """The split's records, less the unusable images with --skip-bad-images (never all of them)."""
    records = job.data.records(job.split)
    if not job.skip_bad_images or job.recipe.image_encoder == NONE:
        return records, []
    kept, skipped = check_images(job.data, records, skip_bad=True)
    if not kept:
        raise MlcError(f"every image of {job.data.csv_path(job.split)} is missing or unreadable ({len(skipped)}, "
                       f"e.g. {skipped[0][0]}: {skipped[0][1]}); nothing to extract")
    if skipped and is_main():
        print(f"skipped {len(skipped)} bad images in {job.split}: "
              + ", ".join(f"{i} ({why})" for i, why in skipped), file=sys.stderr)
    return kept, skipped


def build_cache(job: Job, image: ImageEncoder | None, text: TextEncoder | None, eng: Engine,
                device: torch.device) -> Path:
    """Encode one split into its cache file (or find it already done), running the encoders through
    ``eng``. Returns the cache path. One process at a time writes a cache: a second stops at once."""
    check_writable(job.target.parent)
    records, skipped = _records(job)
    meta = _meta(job, image, text, records, eng, skipped)
    with lock(job.target, f"the cache {job.target}") if is_main() else contextlib.nullcontext():
        if _up_to_date(job, meta):
            if is_main():
                # chunks of some earlier, unfinished run: stale now (the lock says no one else writes them)
                shutil.rmtree(f"{job.target}.partial", ignore_errors=True)
                print(f"{job.target}: up to date ({meta.num_records} rows, same encoders and data); nothing to do")
            return job.target
        labels = job.data.label_space().multi_hot([r.labels or () for r in records]) if job.split == "train" \
            else None
        # Batches never straddle chunks, so a chunk commits as soon as its last batch is done.
        chunk_rows = -(-job.chunk_rows // job.loader.batch_size) * job.loader.batch_size
        writer = CacheWriter(job.target, meta, [r.image_id for r in records], labels, chunk_rows)
        mine = [c for c in writer.pending() if c % world_size() == rank()]
        if writer.resumed and is_main():
            print(f"{job.target}: resuming, {writer.resumed} of {writer.num_chunks} chunks already done")
        if mine:
            _encode_chunks(job, writer, mine, records, image, text, eng, device)
        if world_size() > 1:
            torch.distributed.barrier()
        if is_main():
            writer.finalize()
            print(f"wrote {job.target} ({len(records)} rows, {job.recipe.views} view(s))")
        if world_size() > 1:
            torch.distributed.barrier()
    return job.target


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
             command: str) -> Iterator[tuple[list[int], torch.Tensor]]:
    for idx, views, errors in loader:
        if errors:
            path, fault = errors[0]
            hint = ("every test image needs a prediction: repair or replace the file" if command == "submit"
                    else "pass --skip-bad-images to leave such images out")
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
        batch_size=opts.batch_size, shuffle=False, num_workers=opts.workers, collate_fn=collate_views,
        pin_memory=device.type == "cuda", persistent_workers=False, prefetch_factor=4 if opts.workers else None)
    return _batches(loader, rows, job.command)


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


def _encode_chunks(job: Job, writer: CacheWriter, chunks: list[int], records: list[Record],
                   image: ImageEncoder | None, text: TextEncoder | None, eng: Engine, device: torch.device) -> None:
    """Encode and commit ``chunks``. The main thread hands whole batches to the engine's lanes (2 per lane
    in flight at most) while the DataLoader workers decode ahead."""
    rows = [r for c in chunks for r in range(*writer.bounds(c))]
    batches = _image_batches(job, image, records, rows, device)
    pad_to, bs = None, job.loader.batch_size
    if job.recipe.text_cut is not None and text is not None:
        # One token length for the whole split so text_trunk rows stack into one dataset.
        pad_to = int(text.tokenize([rec.caption for rec in records])["attention_mask"].sum(1).max())
    bar = tqdm(total=len(rows), unit="img" if image is not None else "row", desc=f"extract {job.split}",
               disable=not is_main(), dynamic_ncols=True, file=sys.stderr)
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


def encoders_and_engine(recipe: Recipe, loader: LoaderOptions, device: torch.device, onnx_dir: Path,
                        verified: Path | None = None,
                        data: DataDir | None = None) -> tuple[ImageEncoder | None, TextEncoder | None, Engine]:
    """The recipe's encoders (``verified`` as in Recipe.encoders) and the forward functions of the backend
    ``loader`` asks for (ONNX graphs exported to / reused from ``onnx_dir``) in the recipe's precision (int8
    calibrated on ``data``'s images); progress notes on rank 0 only."""
    image, text = recipe.encoders(verified)
    eng = engine(image, text, backend=loader.backend, device=device, image_cut=recipe.image_cut,
                 text_cut=recipe.text_cut, onnx_dir=onnx_dir, precision=recipe.precision,
                 calibration=None if data is None or image is None else lambda: calibration_pixels(data, image),
                 log=lambda msg: print(msg, file=sys.stderr) if is_main() else None)
    return image, text, eng
