"""Making features: run the encoders over a data split once and write them to a cache.

Shared by ``mlc extract`` and by ``mlc submit`` (which makes the test split's features with the
recipe the run's training cache was made with). Flow per split: read the records -> fingerprint
records + image bytes -> if a finished cache with the same identity exists, do nothing -> otherwise
encode the rows chunk by chunk (images decoded in DataLoader workers, whole batches on the engine's
lanes) and commit each chunk, so a killed or failed run resumes where it stopped. Under torchrun each rank encodes
every WORLD_SIZE-th chunk and rank 0 assembles the file.

The pieces live by job: ``recipe`` (what a cache is and its name), ``encode`` (the options, the job and
the chunked encode loop); this module decides whether a cache is up to date (reuse or refuse), writes
its identity, and builds the encoders and their engine. Stages import all of it from here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__
from .atomic import check_writable, lock
from .backends import Engine, engine
from .cache import CacheMeta, CacheWriter, read_meta
from .data import DataDir, fingerprint
from .device import is_main, rank, world_size
from .encode import Hints, Job, encode_chunks, encode_images, encode_texts, submit_texts
from .encoders import NONE, ImageEncoder, TextEncoder
from .errors import MismatchError, MlcError, OutputError
from .identity import EncoderId
from .images import check_images
from .log import get
from .options import LoaderOptions
from .quantize import calibration_pixels
from .recipe import Recipe, cache_path, fit_to_data, safe_name
from .records import Record

__all__ = [  # the names stages make features with (some defined in recipe and encode)
    "Hints", "Job", "LoaderOptions", "Recipe", "build_cache", "cache_meta", "cache_path", "encode_images",
    "encode_texts", "encoders_and_engine", "fit_to_data", "safe_name", "submit_texts", "up_to_date", "write_cache",
]

logger = get(__name__)


def cache_meta(job: Job, image: ImageEncoder | None, text: TextEncoder | None, records: list[Record], eng: Engine,
          skipped: list[tuple[str, str]]) -> CacheMeta:
    r = job.recipe
    labels = job.data.label_space()
    return CacheMeta(
        split=job.split, image=EncoderId.of(image, r.image_cut, r.precision),
        text=EncoderId.of(text, r.text_cut, r.precision), views=r.views, label_ids=labels.ids,
        label_names=labels.names, num_records=len(records),
        data_fingerprint=fingerprint(records, job.data.image_dir if image is not None else None),
        source_run=str(Path(r.from_run).resolve()) if r.from_run else None,
        mlc_version=__version__, created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        extra={"recipe": r.to_dict(), "backend": eng.backends, "skipped": [list(x) for x in skipped]},
    )


def up_to_date(job: Job, meta: CacheMeta) -> bool:
    """The one reuse policy of a cache: True when the target already holds these features (``meta``'s identity);
    MismatchError naming the difference when it holds others (or is no readable cache), unless ``job.overwrite``
    (False: it is rebuilt)."""
    if not job.target.exists():
        return False
    try:
        old = read_meta(job.target)
    except MlcError as e:
        if not job.overwrite:
            raise
        logger.info(f"replacing {job.target}: {e}")
        return False
    diffs = old.differences(meta, ("the cache", "these options"))
    if not diffs:
        return True
    skipped = old.extra.get("skipped") or []
    if skipped and not job.skip_bad_images and not job.overwrite:
        raise MismatchError(
            f"{job.target} was extracted with --skip-bad-images and lacks {len(skipped)} {job.split} image(s): "
            + ", ".join(f"{i} ({why})" for i, why in skipped[:5])
            + job.hints.skipped)
    if not job.overwrite:
        raise MismatchError(f"{job.target} exists but holds different features (" + "; ".join(diffs[:4])
                            + "). " + job.hints.different)
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
    if skipped:
        logger.warning(f"skipped {len(skipped)} bad images in {job.split}: "
                       + ", ".join(f"{i} ({why})" for i, why in skipped))
    return kept, skipped


def build_cache(job: Job, image: ImageEncoder | None, text: TextEncoder | None, eng: Engine,
                device: torch.device) -> Path:
    """Encode one split into its cache file (or find it already done), running the encoders through
    ``eng``. Returns the cache path (``write_cache``)."""
    records, skipped = _records(job)
    meta = cache_meta(job, image, text, records, eng, skipped)

    def fill(writer: CacheWriter, chunks: list[int]) -> None:
        encode_chunks(job, writer, chunks, records, image, text, eng, device)

    return write_cache(job, meta, records, fill)


Fill = Callable[[CacheWriter, list[int]], None]  # commits the given chunks of the writer's rows


def write_cache(job: Job, meta: CacheMeta, records: list[Record], fill: Fill) -> Path:
    """The one way a cache is made (extract, submit, crossfit): reuse ``job.target`` when it holds ``meta``'s
    features (``up_to_date``: else refused, or rebuilt with ``job.overwrite``), otherwise ``fill`` the chunks
    still pending (a killed run resumes) and assemble the file. Returns the cache path. One process at a time
    writes a cache: a second stops at once. An up-to-date cache on read-only storage is used as it is: reading it
    needs no lock."""
    try:
        check_writable(job.target.parent)
        read_only = False
    except OutputError:
        if not job.target.is_file():
            raise  # nothing to read there: stop before the work
        read_only = True
    if read_only:
        if not up_to_date(job, meta):  # MismatchError naming the difference, as with a writable folder
            check_writable(job.target.parent)  # the OutputError naming the read-only folder
        if is_main():
            logger.info(f"{job.target}: up to date ({meta.num_records} rows, same encoders and data; read-only)")
        return job.target
    with lock(job.target, f"the cache {job.target}") if is_main() else contextlib.nullcontext():
        if up_to_date(job, meta):
            if is_main():
                # chunks of some earlier, unfinished run: stale now (the lock says no one else writes them)
                shutil.rmtree(f"{job.target}.partial", ignore_errors=True)
                logger.info(f"{job.target}: up to date ({meta.num_records} rows, same encoders and data); "
                            "nothing to do")
            return job.target
        labels = job.data.label_space().multi_hot([r.labels or () for r in records]) if job.split == "train" \
            else None
        # Batches never straddle chunks, so a chunk commits as soon as its last batch is done.
        chunk_rows = -(-job.chunk_rows // job.loader.encode_batch) * job.loader.encode_batch
        writer = CacheWriter(job.target, meta, [r.image_id for r in records], labels, chunk_rows)
        mine = [c for c in writer.pending() if c % world_size() == rank()]
        if writer.resumed:
            logger.info(f"{job.target}: resuming, {writer.resumed} of {writer.num_chunks} chunks already done")
        if mine:
            fill(writer, mine)
        if world_size() > 1:
            torch.distributed.barrier()
        if is_main():
            writer.finalize()
            logger.info(f"wrote {job.target} ({len(records)} rows, {job.recipe.views} view(s))")
        if world_size() > 1:
            torch.distributed.barrier()
    return job.target


def encoders_and_engine(recipe: Recipe, loader: LoaderOptions, device: torch.device, verified: Path | None = None,
                        data: DataDir | None = None) -> tuple[ImageEncoder | None, TextEncoder | None, Engine]:
    """The recipe's encoders (``verified`` as in Recipe.encoders) and the forward functions of the backend
    ``loader`` asks for (ONNX graphs exported to / reused from ``loader.onnx_dir``) in the recipe's precision
    (int8 calibrated on ``data``'s images)."""
    image, text = recipe.encoders(verified)
    eng = engine(image, text, backend=loader.backend, device=device, image_cut=recipe.image_cut,
                 text_cut=recipe.text_cut, onnx_dir=loader.onnx_dir, precision=recipe.precision,
                 calibration=None if data is None or image is None else lambda n: calibration_pixels(data, image, n),
                 log=logger.info)
    return image, text, eng
