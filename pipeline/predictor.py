"""A trained model as one object that labels new photos and captions: the run's (or an export's) encoders,
heads, thresholds and labels. Shared by ``mlc predict`` and ``mlc export``; no cache, no fingerprint.

A run's features come from one or more caches (``features.json``): each entry is a *branch* with its own
encoders, and the head reads the branches' image features side by side, then their text features, as
``fused.load_joined`` did when the head was trained.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import schemas
from .backends import Engine, engine
from .encoders import ImageEncoder, TextEncoder, load_encoder
from .errors import MlcError
from .features import Recipe, encode_texts
from .fused import Part
from .heads import HEADS, ensemble_proba
from .labels import LabelSpace
from .runs import RunDir, check_listing, load_head, read_json
from .thresholds import apply_thresholds

EXPORT_FILE = "export.json"
EXPORT_FORMAT = 1


@dataclass
class Branch:
    """One features entry: its encoders (None where the head does not read that modality) and engine."""

    image: ImageEncoder | None
    text: TextEncoder | None
    eng: Engine


@dataclass
class Predictor:
    """Encoders + heads + thresholds + labels."""

    source: Path
    branches: list[Branch]
    heads: list[torch.nn.Module]
    head_config: dict[str, Any]
    thresholds: np.ndarray
    labels: LabelSpace

    @property
    def needs_images(self) -> bool:
        return any(b.image is not None for b in self.branches)

    @property
    def needs_captions(self) -> bool:
        return any(b.text is not None for b in self.branches)

    @property
    def draft(self) -> int | None:
        """The JPEG draft size the first image encoder allows (see data.load_image)."""
        return next((b.image.preprocess.draft_size() for b in self.branches if b.image is not None), None)

    def features(self, images: Sequence[Image.Image] | None, captions: Sequence[str],
                 batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """image (N, 1, sum Di) and text (N, sum Dt) float32, in the order the head was trained on; the
        encoders run ``batch_size`` rows at a time."""
        n = len(captions) if images is None else len(images)
        img_parts = [np.zeros((n, 1, 0), np.float32)]
        txt_parts = [np.zeros((n, 0), np.float32)]
        for b in self.branches:
            with b.eng.pool() as pool:  # batches spread over the engine's lanes
                if b.image is not None:
                    if images is None:
                        raise MlcError(f"{self.source}: this model reads images; give photos")
                    pixels = torch.stack([b.image.preprocess.pixels(0)(im) for im in images])  # (N, 3, H, W) uint8
                    out = pool.map(b.eng.image, [pixels[s:s + batch_size] for s in range(0, n, batch_size)])
                    img_parts.append(np.concatenate([o["image"] for o in out]).astype(np.float32)[:, None, :])
                if b.text is not None:
                    txt = encode_texts(b.text, b.eng.text, list(captions), batch_size, pool=pool)["text"]
                    txt_parts.append(txt.astype(np.float32))
        return np.concatenate(img_parts, axis=-1), np.concatenate(txt_parts, axis=-1)

    def probabilities(self, images: Sequence[Image.Image] | None, captions: Sequence[str],
                      batch_size: int = 32) -> np.ndarray:
        """(N, C): the fold heads' mean probability of each label."""
        return ensemble_proba(self.heads, *self.features(images, captions, batch_size))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) 0/1 with the tuned thresholds; at least one label per row, as submissions have."""
        return apply_thresholds(probs, self.thresholds, at_least_one=True)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def load(path: str | Path, *, backend: str = "auto", device: torch.device | None = None,
         onnx_dir: Path | None = None) -> Predictor:
    """A run folder (fit-head or finetune) or a folder `mlc export` wrote."""
    path = Path(path)
    device = device or torch.device("cpu")
    if (path / EXPORT_FILE).is_file():
        return _from_export(path, backend, device, onnx_dir)
    run = RunDir(path).load()
    branches = []
    for entry in run.features:
        part = Part.of(entry)
        image, text = Recipe.from_dict(entry["recipe"], str(run.dir.features)).encoders(run.path)
        branches.append(_branch(image if part.image else None, text if part.text else None, backend, device,
                                onnx_dir))
    return Predictor(path, branches, run.heads, run.head_config, run.thresholds, run.labels)


def _branch(image: ImageEncoder | None, text: TextEncoder | None, backend: str, device: torch.device,
            onnx_dir: Path | None) -> Branch:
    eng = engine(image, text, backend=backend, device=device, image_cut=None, text_cut=None, onnx_dir=onnx_dir,
                 log=_log)
    return Branch(image, text, eng)


def _from_export(path: Path, backend: str, device: torch.device, onnx_dir: Path | None) -> Predictor:
    meta = read_json(path / EXPORT_FILE, "the export folder")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != EXPORT_FORMAT:
        raise MlcError(f"{path}: export format {fmt!r}; this mlc reads format {EXPORT_FORMAT}")
    meta = schemas.export(meta, path / EXPORT_FILE, tuple(HEADS))
    check_listing(path, meta["files"], (EXPORT_FILE,), "export the run again")
    branches = []
    for b in meta["branches"]:
        image = load_encoder(path / b["image"]).float() if b.get("image") else None
        text = load_encoder(path / b["text"]).float() if b.get("text") else None
        branches.append(_branch(image, text, backend, device, onnx_dir))  # type: ignore[arg-type]
    heads = [load_head(path / name, meta["head"]) for name in meta["heads"]]
    labels = LabelSpace(tuple(meta["label_ids"]), tuple(meta["label_names"]))
    return Predictor(path, branches, heads, meta["head"], np.asarray(meta["thresholds"], np.float32), labels)
