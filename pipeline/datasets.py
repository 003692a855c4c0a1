"""torch Datasets over a data folder's records or a cache's rows, for extraction and finetuning.

Image faults are *returned* by ``__getitem__`` and raised in the main process, because an exception
inside a DataLoader worker loses its type and message on the way back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .cache import CacheReader
from .data import DataDir
from .errors import ImageError
from .records import Record

Fault = tuple[str, str]  # (path, what is wrong)


class CacheDataset(torch.utils.data.Dataset):
    """Streams rows from the cache (for activation caches too big to hold in memory)."""

    def __init__(self, reader: CacheReader, names: tuple[str, ...], rows: np.ndarray | None,
                 with_labels: bool) -> None:
        self.reader = reader
        self.names = names
        self.rows = np.arange(len(reader)) if rows is None else np.asarray(rows)
        self.with_labels = with_labels and reader.has("labels")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[i])
        item = {name: torch.from_numpy(np.asarray(self.reader.array(name, slice(row, row + 1))[0]))
                for name in self.names}
        if self.with_labels:
            item["labels"] = torch.from_numpy(self.reader.array("labels", slice(row, row + 1))[0].astype(np.float32))
        item["row"] = torch.tensor(row)
        return item


class ImageViews(torch.utils.data.Dataset):
    """Row i's image decoded into its V views: (i, (V, 3, H, W) tensor, fault or None), with whatever
    ``transforms`` give (uint8 ``ImagePreprocess.pixels`` in extraction). ``draft``: the shorter side big
    JPEGs may be decoded down to (see ``data.load_image``)."""

    def __init__(self, data: DataDir, records: Sequence[Record], transforms: Sequence[Callable],
                 draft: int | None = None) -> None:
        self.data, self.records, self.transforms, self.draft = data, records, transforms, draft

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, Fault | None]:
        try:
            img = self.data.image(self.records[i].image_id, self.draft)
        except ImageError as exc:
            return i, torch.zeros(0), (exc.path, exc.fault)
        return i, torch.stack([t(img) for t in self.transforms]), None


def collate_views(batch: list) -> tuple[list[int], torch.Tensor | None, list[Fault]]:
    """ImageViews items -> (row indices, (B, V, 3, H, W) or None if any image failed, faults)."""
    idx = [b[0] for b in batch]
    errors = [b[2] for b in batch if b[2] is not None]
    return idx, (None if errors else torch.stack([b[1] for b in batch])), errors


class ImageCaptionRows(torch.utils.data.Dataset):
    """(pixels (3, H, W), caption, labels (C,), row) from the data folder, decoded in workers."""

    def __init__(self, data: DataDir, records: list[Record], transform: Callable, labels: np.ndarray) -> None:
        self.data, self.records, self.transform, self.labels = data, records, transform, labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple:
        r = self.records[i]
        try:
            img = self.data.image(r.image_id)
        except ImageError as exc:
            return None, (exc.path, exc.fault), None, i
        return self.transform(img), r.caption, torch.from_numpy(self.labels[i]), i


class CaptionCollate:
    """Stacks ImageCaptionRows items and tokenises their captions (in the worker)."""

    def __init__(self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
        self.tokenize = tokenize

    def __call__(self, batch: list[tuple]) -> dict[str, Any]:
        bad = [b[1] for b in batch if b[0] is None]
        if bad:
            return {"error": bad[0]}
        tok = self.tokenize([b[1] for b in batch])
        return {"pixels": torch.stack([b[0] for b in batch]), "input_ids": tok["input_ids"],
                "attention_mask": tok["attention_mask"], "labels": torch.stack([b[2] for b in batch]).float(),
                "rows": torch.tensor([b[3] for b in batch])}


class TrunkRows(torch.utils.data.Dataset):
    """Cached trunk activations: one random image view per draw (train) or view 0 (eval)."""

    def __init__(self, reader: CacheReader, rows: np.ndarray, train: bool, seed: int) -> None:
        self.inner = reader.dataset(["image_trunk", "text_trunk", "text_mask"], rows)
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.inner[i]
        views = item["image_trunk"].shape[0]
        v = 0
        if self.train and views > 1:
            # Deterministic in (seed, epoch, row): resumed and uninterrupted runs draw the same views.
            v = int(np.random.default_rng((self.seed, self.epoch, int(item["row"]))).integers(views))
        return {"pixels": item["image_trunk"][v].float(), "input_ids": item["text_trunk"].float(),
                "attention_mask": item["text_mask"].long(), "labels": item["labels"], "rows": item["row"]}


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch to ``device``; raise the image fault a worker reported, with its name."""
    if "error" in batch:
        path, fault = batch["error"]
        raise ImageError(path, fault)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
