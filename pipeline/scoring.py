"""The torch side of a Predictor: a run's (or a safetensors export's) encoders and fold heads.

A run's features come from one or more caches (``features.json``): each entry is a *branch* with its own
encoders, and the head reads the branches' image features side by side, then their text features, as
``fused.load_joined`` did when the head was trained. ``mlc submit`` scores cached features
(``from_features``, no encoder loaded); ``mlc predict`` and ``mlc export`` load the encoders too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import schemas
from .backends import Engine, engine
from .device import select_device
from .encoders import ImageEncoder, TextEncoder, load_encoder
from .errors import MlcError
from .features import Recipe, encode_texts
from .heads import HEADS, ensemble_proba
from .log import get
from .runs import Run, load_head

logger = get(__name__)


@dataclass
class Branch:
    """One features entry: its encoders (None where the head does not read that modality) and engine."""

    image: ImageEncoder | None
    text: TextEncoder | None
    eng: Engine


@dataclass
class TorchScorer:
    """Fold heads (+ the encoders that feed them, when loaded): photos and captions -> probabilities."""

    heads: list[torch.nn.Module]
    head_config: dict[str, Any]
    branches: list[Branch]  # empty: heads only (scores cached features)

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

    def from_features(self, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        """image (N, V, Di), text (N, Dt) -> (N, C), averaged over views and fold heads."""
        return ensemble_proba(self.heads, image, text)

    def features(self, images: Sequence[Image.Image] | None, captions: Sequence[str],
                 batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """image (N, 1, sum Di) and text (N, sum Dt) float32, in the order the head was trained on; the
        encoders run ``batch_size`` rows at a time."""
        if not self.branches:
            raise MlcError("internal: this predictor was loaded for cached features; load it with encoders")
        n = len(captions) if images is None else len(images)
        img_parts = [np.zeros((n, 1, 0), np.float32)]
        txt_parts = [np.zeros((n, 0), np.float32)]
        for b in self.branches:
            with b.eng.pool() as pool:  # batches spread over the engine's lanes
                if b.image is not None:
                    assert images is not None  # Predictor checks that photos were given
                    pixels = torch.stack([b.image.preprocess.pixels(0)(im) for im in images])  # (N, 3, H, W) uint8
                    out = pool.map(b.eng.image, [pixels[s:s + batch_size] for s in range(0, n, batch_size)])
                    img_parts.append(np.concatenate([o["image"] for o in out]).astype(np.float32)[:, None, :])
                if b.text is not None:
                    txt = encode_texts(b.text, b.eng.text, list(captions), batch_size, pool=pool)["text"]
                    txt_parts.append(txt.astype(np.float32))
        return np.concatenate(img_parts, axis=-1), np.concatenate(txt_parts, axis=-1)

    def proba(self, images: Sequence[Image.Image] | None, captions: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(N, C): the fold heads' mean probability of each label."""
        return self.from_features(*self.features(images, captions, batch_size))


def _log(msg: str) -> None:
    logger.info(msg)


def _branch(image: ImageEncoder | None, text: TextEncoder | None, backend: str, device: Any,
            onnx_dir: Path | None) -> Branch:
    """``device``: a torch.device, a name (``select_device``: "auto", "cpu", "cuda:N") or None (the CPU)."""
    device = select_device(device) if isinstance(device, str) else (device or torch.device("cpu"))
    eng = engine(image, text, backend=backend, device=device, image_cut=None, text_cut=None, onnx_dir=onnx_dir,
                 log=_log)
    return Branch(image, text, eng)


def run_scorer(run: Run, *, encoders: bool, backend: str = "auto", device: Any = None,
               onnx_dir: Path | None = None) -> TorchScorer:
    """A run's heads, and (``encoders``) the encoders its features.json entries name, each on its engine."""
    branches = []
    for entry in run.entries if encoders else []:
        image, text = Recipe.from_dict(entry.recipe, str(run.dir.features)).encoders(run.path)
        branches.append(_branch(image if entry.image else None, text if entry.text else None, backend,
                                device, onnx_dir))
    return TorchScorer(run.heads, run.head_config, branches)


def export_scorer(path: Path, meta: dict[str, Any], *, backend: str = "auto", device: Any = None,
                  onnx_dir: Path | None = None) -> TorchScorer:
    """A safetensors export's encoders and heads (export.json ``branches`` and ``heads``, checked)."""
    head_cfg = schemas.head(meta["head"], path / "export.json", tuple(HEADS))
    branches = []
    for b in meta["branches"]:
        # read_export has checked every listed file's sha256, the encoders' among them
        image = load_encoder(path / b["image"], verified=True).float() if b.get("image") else None
        text = load_encoder(path / b["text"], verified=True).float() if b.get("text") else None
        branches.append(_branch(image, text, backend, device, onnx_dir))  # type: ignore[arg-type]
    dims = (sum(b.image.dim for b in branches if b.image is not None),
            sum(b.text.dim for b in branches if b.text is not None))
    if (head_cfg["image_dim"], head_cfg["text_dim"]) != dims:
        have = f"{head_cfg['image_dim']}/{head_cfg['text_dim']}"
        raise MlcError(f"{path / 'export.json'}: head.image_dim/text_dim: {have}, but the exported encoders give "
                       f"{dims[0]}/{dims[1]} features")
    heads = [load_head(path / name, head_cfg) for name in meta["heads"]]
    return TorchScorer(heads, head_cfg, branches)
