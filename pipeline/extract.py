"""Stage 1, ``mlc extract``: encode every image and caption once and cache the embeddings.

Flow per data split: read the CSV records -> fingerprint records + image bytes -> if a finished
cache with the same identity exists, do nothing -> otherwise encode the rows chunk by chunk
(images decoded in DataLoader workers, overlapped with the model) and commit each chunk, so a
killed run resumes where it stopped. Under torchrun each rank encodes every WORLD_SIZE-th chunk
and rank 0 assembles the file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .cache import CacheMeta, CacheReader, CacheWriter, read_meta
from .data import DataDir, Record, check_images, fingerprint, load_image
from .device import autocast, distributed, is_main, rank, world_size
from .encoders import (
    IMAGE_ENCODERS,
    PRESETS,
    TEXT_ENCODERS,
    ImageEncoder,
    TextEncoder,
    create_image_encoder,
    create_text_encoder,
)
from .errors import ImageError, MismatchError, MlcError
from .labels import COCO18

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ExtractConfig:
    """What ``mlc extract`` does; written (as JSON) into the cache's metadata ``extra`` field."""

    data_dir: Path
    image_encoder: str = "resnet50"
    text_encoder: str = "bert-base-uncased"
    splits: tuple[str, ...] = SPLITS
    image_weights: str | None = None
    text_weights: str | None = None
    random_init: bool = False
    from_run: Path | None = None
    views: int = 1
    batch_size: int = 32
    workers: int = 2
    device: str = "auto"
    out_dir: Path = Path("cache")
    chunk_rows: int = 256
    skip_bad_images: bool = False
    image_cut: str | None = None
    text_cut: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.image_encoder not in IMAGE_ENCODERS:
            raise MlcError(f"unknown image encoder {self.image_encoder!r}; known: {sorted(IMAGE_ENCODERS)}")
        if self.text_encoder not in TEXT_ENCODERS:
            raise MlcError(f"unknown text encoder {self.text_encoder!r}; known: {sorted(TEXT_ENCODERS)}")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise MlcError(f"--split must be among {SPLITS}, got {list(self.splits)}")
        for name in ("views", "batch_size", "chunk_rows"):
            if getattr(self, name) < 1:
                raise MlcError(f"--{name.replace('_', '-')} must be at least 1")
        if self.workers < 0:
            raise MlcError("--workers must be 0 or more")
        if self.chunk_rows % self.batch_size:
            # Batches never straddle chunks, so a chunk commits as soon as its last batch is done.
            object.__setattr__(self, "chunk_rows", -(-self.chunk_rows // self.batch_size) * self.batch_size)
        if self.from_run is not None and (self.image_weights or self.text_weights or self.random_init):
            raise MlcError("--from-run takes the encoders from the run; do not combine it with "
                           "--image-weights, --text-weights or --random-init")

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def resolve_encoders(preset: str | None, image_encoder: str | None, text_encoder: str | None) -> tuple[str, str]:
    """A preset gives both names; an explicit --image-encoder/--text-encoder overrides its half."""
    if preset is not None and preset not in PRESETS:
        raise MlcError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    img, txt = PRESETS[preset or "seed"]
    return image_encoder or img, text_encoder or txt


def cache_path(out_dir: Path, data_dir: Path, split: str, image_encoder: str, text_encoder: str,
               tag: str | None = None) -> Path:
    """``cache/<data folder name>/<split>__<image>__<text>[__<tag>].h5``."""
    name = f"{split}__{image_encoder}__{text_encoder}" + (f"__{tag}" if tag else "")
    return Path(out_dir) / Path(data_dir).resolve().name / f"{name}.h5"


def cache_tag(cfg: ExtractConfig) -> str | None:
    """Distinguish caches of the same encoder pair: finetuned weights, trunk cuts, views."""
    parts = []
    if cfg.from_run is not None:
        parts.append(f"run-{Path(cfg.from_run).resolve().name}")
    elif cfg.random_init:
        parts.append("random")
    elif cfg.image_weights or cfg.text_weights:
        parts.append("custom")
    if cfg.image_cut:
        parts.append(f"img-{cfg.image_cut}")
    if cfg.text_cut:
        parts.append(f"txt-{cfg.text_cut}")
    if cfg.views > 1:
        parts.append(f"v{cfg.views}")
    return "_".join(parts) or None


def load_encoders(cfg: ExtractConfig) -> tuple[ImageEncoder, TextEncoder]:
    """Pretrained (or explicit local) weights, a finetuned run's encoders, or --random-init."""
    image_weights, text_weights = cfg.image_weights, cfg.text_weights
    if cfg.from_run is not None:
        run = Path(cfg.from_run)
        image_weights = str(run / "image_encoder.safetensors")
        text_weights = str(run / "text_encoder")
        if not Path(image_weights).is_file() or not Path(text_weights).is_dir():
            raise MlcError(f"{run}: not a finetuned run folder (needs image_encoder.safetensors and "
                           "text_encoder/, written by `mlc finetune`)")
    # Random init is seeded so a rerun builds the same weights (same hash): resumable and reusable.
    seed = 0 if cfg.random_init else None
    image = create_image_encoder(cfg.image_encoder, weights=image_weights, random_init=cfg.random_init, seed=seed)
    text = create_text_encoder(cfg.text_encoder, weights=text_weights, random_init=cfg.random_init, seed=seed)
    for enc, cut in ((image, cfg.image_cut), (text, cfg.text_cut)):
        if cut is not None and cut not in enc.cuts:
            raise MlcError(f"{enc.name} has no trunk cut {cut!r}; known: {list(enc.cuts)}")
    return image, text


class _ImageRows(torch.utils.data.Dataset):
    """Decodes one row's image into its V views: (V, 3, H, W). Faults are returned, not raised,
    because an exception inside a DataLoader worker loses its type and message on the way back."""

    def __init__(self, data: DataDir, records: Sequence[Record], transforms: Sequence) -> None:
        self.data, self.records, self.transforms = data, records, transforms

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, tuple[str, str] | None]:
        try:
            img = load_image(self.data.image_path(self.records[i].image_id))
        except ImageError as exc:
            return i, torch.zeros(0), (exc.path, exc.fault)
        return i, torch.stack([t(img) for t in self.transforms]), None


def _collate(batch: list) -> tuple[list[int], torch.Tensor | None, list[tuple[str, str]]]:
    idx = [b[0] for b in batch]
    errors = [b[2] for b in batch if b[2] is not None]
    return idx, (None if errors else torch.stack([b[1] for b in batch])), errors


@torch.inference_mode()
def _encode_texts(text: TextEncoder, captions: Sequence[str], batch_size: int, device: torch.device,
                  cut: str | None, pad_to: int | None) -> dict[str, np.ndarray]:
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
def _encode_images(image: ImageEncoder, views: torch.Tensor, device: torch.device,
                   cut: str | None) -> dict[str, np.ndarray]:
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


def _rows_of(chunks: Sequence[int], writer: CacheWriter) -> list[int]:
    return [r for c in chunks for r in range(*writer.bounds(c))]


def _batches(loader: torch.utils.data.DataLoader, rows: list[int]) -> Iterator[tuple[list[int], torch.Tensor]]:
    for idx, views, errors in loader:
        if errors:
            path, fault = errors[0]
            raise ImageError(path, f"{fault} (pass --skip-bad-images to leave such images out)")
        yield [rows[i] for i in idx], views


def extract_split(cfg: ExtractConfig, split: str, image: ImageEncoder, text: TextEncoder,
                  device: torch.device) -> Path:
    """Encode one split into its cache file (or find it already done). Returns the cache path."""
    data = DataDir.open(cfg.data_dir)
    records = data.records(split)
    if cfg.skip_bad_images:
        records, skipped = check_images(data, records, skip_bad=True)
        if skipped and is_main():
            print(f"skipped {len(skipped)} bad images in {split}: "
                  + ", ".join(f"{i} ({why})" for i, why in skipped), file=sys.stderr)
    labelled = split == "train"
    target = cache_path(cfg.out_dir, cfg.data_dir, split, cfg.image_encoder, cfg.text_encoder, cache_tag(cfg))
    meta = CacheMeta(
        split=split, image_encoder=image.name, text_encoder=text.name,
        image_weights=image.weights_source, image_weights_hash=image.weights_hash,
        text_weights=text.weights_source, text_weights_hash=text.weights_hash,
        random_init=image.random_init or text.random_init, image_preprocess=image.preprocess.to_dict(),
        text_preprocess=text.preprocess.to_dict(), views=cfg.views, image_dim=image.dim, text_dim=text.dim,
        label_ids=COCO18.ids, label_names=COCO18.names,
        data_fingerprint=fingerprint(records, data.image_dir), num_records=len(records),
        image_cut=cfg.image_cut, text_cut=cfg.text_cut,
        source_run=str(Path(cfg.from_run).resolve()) if cfg.from_run else None,
        mlc_version=__version__, created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        extra={"extract_config": cfg.to_dict()},
    )
    if target.exists():
        old = read_meta(target)
        if not old.differences(meta):
            if is_main():
                print(f"{target}: up to date ({old.num_records} rows, same encoders and data); nothing to do")
            return target
        if not cfg.overwrite:
            raise MismatchError(
                f"{target} exists but holds different features ("
                + "; ".join(old.differences(meta)[:4])
                + "). Pass --overwrite to replace it, or --out-dir to write elsewhere.")
    labels = COCO18.multi_hot([r.labels or () for r in records]) if labelled else None
    writer = CacheWriter(target, meta, [r.image_id for r in records], labels, cfg.chunk_rows)
    mine = [c for c in writer.pending() if c % world_size() == rank()]
    if writer.resumed and is_main():
        print(f"{target}: resuming, {writer.resumed} of {writer.num_chunks} chunks already done")

    if mine:
        _encode_chunks(cfg, writer, mine, data, records, image, text, device)
    if world_size() > 1:
        torch.distributed.barrier()
    if is_main():
        writer.finalize()
        print(f"wrote {target} ({len(records)} rows, {cfg.views} view(s))")
    if world_size() > 1:
        torch.distributed.barrier()
    return target


def _encode_chunks(cfg: ExtractConfig, writer: CacheWriter, chunks: list[int], data: DataDir,
                   records: list[Record], image: ImageEncoder, text: TextEncoder, device: torch.device) -> None:
    rows = _rows_of(chunks, writer)
    transforms = [image.preprocess.transform(v) for v in range(cfg.views)]
    loader = torch.utils.data.DataLoader(
        _ImageRows(data, [records[r] for r in rows], transforms),
        batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if cfg.workers else None,
    )
    pad_to = None
    if cfg.text_cut is not None:
        # One token length for the whole split so text_trunk rows stack into one dataset.
        pad_to = int(text.tokenize([r.caption for r in records])["attention_mask"].sum(1).max())
    bar = tqdm(total=len(rows), unit="img", desc=f"extract {writer.meta.split}", disable=not is_main(),
               dynamic_ncols=True, file=sys.stderr)
    try:
        buffer: dict[str, list[np.ndarray]] = {}
        batches = _batches(loader, rows)
        for chunk in chunks:
            start, stop = writer.bounds(chunk)
            while sum(len(a) for a in buffer.get("image", [])) < stop - start:
                _, views = next(batches)
                for k, v in _encode_images(image, views, device, cfg.image_cut).items():
                    buffer.setdefault(k, []).append(v)
                bar.update(len(views))
            arrays = {k: np.concatenate(v) for k, v in buffer.items()}
            buffer = {}
            arrays.update(_encode_texts(text, [r.caption for r in records[start:stop]], cfg.batch_size * 2,
                                        device, cfg.text_cut, pad_to))
            writer.commit(chunk, arrays)
    finally:
        bar.close()  # end the bar's line, so an error prints on a line of its own


def extract(cfg: ExtractConfig) -> list[Path]:
    """Run stage 1 for every requested split; returns the cache paths (existing ones reused)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with distributed(cfg.device) as device:
        image, text = load_encoders(cfg)
        image.to(device).eval()
        text.to(device).eval()
        image.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU alike
        paths = [extract_split(cfg, split, image, text, device) for split in cfg.splits]
    return paths


def open_cache(path: str | os.PathLike[str]) -> CacheReader:
    """Convenience re-export for library users: ``mlc.extract.open_cache(path).array("image")``."""
    return CacheReader(path)
