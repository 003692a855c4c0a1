"""Making features: run the encoders over a data split once and write them to a cache.

Shared by ``mlc extract`` and by ``mlc submit`` (which makes the test split's features with the
recipe the run's training cache was made with). Flow per split: read the records -> fingerprint
records + image bytes -> if a finished cache with the same identity exists, do nothing -> otherwise
encode the rows chunk by chunk (images decoded in DataLoader workers, overlapped with the model)
and commit each chunk, so a killed run resumes where it stopped. Under torchrun each rank encodes
every WORLD_SIZE-th chunk and rank 0 assembles the file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .cache import CacheMeta, CacheWriter, read_meta
from .config import Config, opt, require
from .data import DataDir, check_images, fingerprint
from .datasets import ImageViews, collate_views
from .device import autocast, is_main, rank, world_size
from .encoders import ImageEncoder, TextEncoder, create_image_encoder, create_text_encoder, load_encoder
from .errors import ImageError, MismatchError, MlcError
from .labels import COCO18
from .records import Record
from .runs import RunDir


@dataclass(frozen=True, kw_only=True)
class LoaderOptions(Config):
    """How encoders run over images: shared by every stage that encodes without training."""

    PANEL: ClassVar[str] = "Encoding"

    batch_size: int = opt(32, "Images per forward pass.")
    workers: int = opt(2, "DataLoader worker processes decoding JPEGs.")
    device: str = opt("auto", "auto (CUDA when available), cpu, cuda or cuda:N.")

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.batch_size >= 1, "--batch-size must be at least 1"),
                 (self.workers >= 0, "--workers must be 0 or more")])


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
        if self.image_cut:
            parts.append(f"img-{self.image_cut}")
        if self.text_cut:
            parts.append(f"txt-{self.text_cut}")
        if self.views > 1:
            parts.append(f"v{self.views}")
        return "_".join(parts) or None

    def encoders(self) -> tuple[ImageEncoder, TextEncoder]:
        """Pretrained (or explicit local) weights, a finetuned run's encoders, or seeded random init."""
        if self.from_run is not None:
            run = RunDir(Path(self.from_run))
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
            image = create_image_encoder(self.image_encoder, weights=self.image_weights,
                                         random_init=self.random_init, seed=seed)
            text = create_text_encoder(self.text_encoder, weights=self.text_weights, random_init=self.random_init,
                                       seed=seed)
        for enc, cut in ((image, self.image_cut), (text, self.text_cut)):
            if cut is not None and cut not in enc.cuts:
                raise enc.no_cut(cut)
        return image, text  # type: ignore[return-value]


def cache_path(out_dir: Path, data_dir: Path, split: str, recipe: Recipe) -> Path:
    """``<out_dir>/<data folder name>/<split>__<image>__<text>[__<tag>].h5``."""
    tag = recipe.tag()
    name = f"{split}__{recipe.image_encoder}__{recipe.text_encoder}" + (f"__{tag}" if tag else "")
    return Path(out_dir) / Path(data_dir).resolve().name / f"{name}.h5"


@dataclass(frozen=True)
class Job:
    """One split to encode: what (recipe, records) and how (loader, chunking, device)."""

    recipe: Recipe
    data: DataDir
    split: str
    target: Path
    loader: LoaderOptions
    chunk_rows: int = 256
    skip_bad_images: bool = False
    overwrite: bool = False


def _meta(job: Job, image: ImageEncoder, text: TextEncoder, records: list[Record]) -> CacheMeta:
    r = job.recipe
    return CacheMeta(
        split=job.split, image_encoder=image.name, text_encoder=text.name,
        image_weights=image.weights_source, image_weights_hash=image.weights_hash,
        text_weights=text.weights_source, text_weights_hash=text.weights_hash,
        random_init=image.random_init or text.random_init, image_preprocess=image.preprocess.to_dict(),
        text_preprocess=text.preprocess.to_dict(), views=r.views, image_dim=image.dim, text_dim=text.dim,
        label_ids=COCO18.ids, label_names=COCO18.names,
        data_fingerprint=fingerprint(records, job.data.image_dir), num_records=len(records),
        image_cut=r.image_cut, text_cut=r.text_cut,
        source_run=str(Path(r.from_run).resolve()) if r.from_run else None,
        mlc_version=__version__, created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        extra={"recipe": r.to_dict()},
    )


def _up_to_date(job: Job, meta: CacheMeta) -> bool:
    """True when the target already holds these features; MismatchError when it holds others."""
    if not job.target.exists():
        return False
    try:
        old = read_meta(job.target)
    except MlcError:
        if job.overwrite:
            return False
        raise
    if not old.differences(meta):
        return True
    if not job.overwrite:
        raise MismatchError(f"{job.target} exists but holds different features ("
                            + "; ".join(old.differences(meta)[:4])
                            + "). Pass --overwrite to replace it, or --out-dir to write elsewhere.")
    return False


def build_cache(job: Job, image: ImageEncoder, text: TextEncoder, device: torch.device) -> Path:
    """Encode one split into its cache file (or find it already done). Returns the cache path."""
    records = job.data.records(job.split)
    if job.skip_bad_images:
        records, skipped = check_images(job.data, records, skip_bad=True)
        if skipped and is_main():
            print(f"skipped {len(skipped)} bad images in {job.split}: "
                  + ", ".join(f"{i} ({why})" for i, why in skipped), file=sys.stderr)
    meta = _meta(job, image, text, records)
    if _up_to_date(job, meta):
        if is_main():
            print(f"{job.target}: up to date ({meta.num_records} rows, same encoders and data); nothing to do")
        return job.target
    labels = COCO18.multi_hot([r.labels or () for r in records]) if job.split == "train" else None
    # Batches never straddle chunks, so a chunk commits as soon as its last batch is done.
    chunk_rows = -(-job.chunk_rows // job.loader.batch_size) * job.loader.batch_size
    writer = CacheWriter(job.target, meta, [r.image_id for r in records], labels, chunk_rows)
    mine = [c for c in writer.pending() if c % world_size() == rank()]
    if writer.resumed and is_main():
        print(f"{job.target}: resuming, {writer.resumed} of {writer.num_chunks} chunks already done")
    if mine:
        _encode_chunks(job, writer, mine, records, image, text, device)
    if world_size() > 1:
        torch.distributed.barrier()
    if is_main():
        writer.finalize()
        print(f"wrote {job.target} ({len(records)} rows, {job.recipe.views} view(s))")
    if world_size() > 1:
        torch.distributed.barrier()
    return job.target


@torch.inference_mode()
def encode_texts(text: TextEncoder, captions: Sequence[str], batch_size: int, device: torch.device,
                 cut: str | None = None, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Pooled caption embeddings (N, Dt); with a cut also token states (N, T, H) and mask (N, T).

    Captions are sorted by length and batched so each batch pads only to its own longest caption.
    """
    enc = text.tokenize(list(captions))
    lengths = enc["attention_mask"].sum(1)
    order = torch.argsort(lengths, descending=True)
    pooled = np.zeros((len(captions), text.dim), dtype=np.float16)
    states = mask = None
    for s in range(0, len(captions), batch_size):
        rows = order[s:s + batch_size]
        t = int(lengths[rows].max())
        ids = enc["input_ids"][rows, :t].to(device)
        att = enc["attention_mask"][rows, :t].to(device)
        with autocast(device):
            if cut is None:
                out = text(ids, att)
            else:
                h = text.forward_trunk(ids, att, cut)  # (B, t, H)
                out = text.forward_top(h, att, cut)
                if states is None:
                    states = np.zeros((len(captions), pad_to, h.shape[-1]), dtype=np.float16)
                    mask = np.zeros((len(captions), pad_to), dtype=np.uint8)
                states[rows.numpy(), :t] = h.float().cpu().numpy()
                mask[rows.numpy(), :t] = att.cpu().numpy()
        pooled[rows.numpy()] = out.float().cpu().numpy()
    result = {"text": pooled}
    if states is not None:
        result["text_trunk"], result["text_mask"] = states, mask
    return result


@torch.inference_mode()
def encode_images(image: ImageEncoder, views: torch.Tensor, device: torch.device,
                  cut: str | None = None) -> dict[str, np.ndarray]:
    """(B, V, 3, H, W) -> image (B, V, Di) and, with a cut, image_trunk (B, V, *S)."""
    b, v = views.shape[:2]
    x = views.flatten(0, 1).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with autocast(device):
        if cut is None:
            feats, trunk = image(x), None
        else:
            trunk = image.forward_trunk(x, cut)
            feats = image.forward_top(trunk, cut)
    out = {"image": feats.float().cpu().numpy().astype(np.float16).reshape(b, v, -1)}
    if trunk is not None:
        out["image_trunk"] = trunk.float().cpu().numpy().astype(np.float16).reshape(b, v, *trunk.shape[1:])
    return out


def _batches(loader: torch.utils.data.DataLoader, rows: list[int]) -> Iterator[tuple[list[int], torch.Tensor]]:
    for idx, views, errors in loader:
        if errors:
            path, fault = errors[0]
            raise ImageError(path, f"{fault} (pass --skip-bad-images to leave such images out)")
        yield [rows[i] for i in idx], views


def _encode_chunks(job: Job, writer: CacheWriter, chunks: list[int], records: list[Record],
                   image: ImageEncoder, text: TextEncoder, device: torch.device) -> None:
    rows = [r for c in chunks for r in range(*writer.bounds(c))]
    r, opts = job.recipe, job.loader
    transforms = [image.preprocess.transform(v) for v in range(r.views)]
    loader = torch.utils.data.DataLoader(
        ImageViews(job.data, [records[i] for i in rows], transforms), batch_size=opts.batch_size, shuffle=False,
        num_workers=opts.workers, collate_fn=collate_views, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if opts.workers else None)
    pad_to = None
    if r.text_cut is not None:
        # One token length for the whole split so text_trunk rows stack into one dataset.
        pad_to = int(text.tokenize([rec.caption for rec in records])["attention_mask"].sum(1).max())
    bar = tqdm(total=len(rows), unit="img", desc=f"extract {job.split}", disable=not is_main(),
               dynamic_ncols=True, file=sys.stderr)
    try:
        buffer: dict[str, list[np.ndarray]] = {}
        batches = _batches(loader, rows)
        for chunk in chunks:
            start, stop = writer.bounds(chunk)
            while sum(len(a) for a in buffer.get("image", [])) < stop - start:
                _, views = next(batches)
                for k, v in encode_images(image, views, device, r.image_cut).items():
                    buffer.setdefault(k, []).append(v)
                bar.update(len(views))
            arrays = {k: np.concatenate(v) for k, v in buffer.items()}
            buffer = {}
            arrays.update(encode_texts(text, [rec.caption for rec in records[start:stop]], opts.batch_size * 2,
                                       device, r.text_cut, pad_to))
            writer.commit(chunk, arrays)
    finally:
        bar.close()  # end the bar's line, so an error prints on a line of its own


def prepare_encoders(image: ImageEncoder, text: TextEncoder, device: torch.device) -> None:
    """Move both encoders to ``device`` in eval mode; the image encoder channels_last (faster convolutions)."""
    image.to(device).eval()
    text.to(device).eval()
    image.to(memory_format=torch.channels_last)
