"""Run folders: everything needed to predict later, readable without pickle.

    runs/NAME/
      config.json          the stage's frozen config (kind: "head" | "finetune")
      cache.json           the cache the head was trained on: "contract" (encoders, weights hashes,
                           preprocessing, labels: what a test cache must match) and "extract" (the
                           extract config, so `mlc submit` can encode the test split the same way)
      head.json            head constructor arguments (heads.create_head(**head.json))
      head-0.safetensors   head weights; one file per fold when trained with --folds K
      thresholds.json      label ids, mode, global threshold, per-class thresholds
      metrics.json         validation metrics (F1 at 0.5 / global / per-class thresholds, mAP…)
      history.json         per-epoch training curves
      val_scores.npz       held-out scores + labels (for `mlc report`)
      train.log            what was printed
    and, for a finetuned run, image_encoder.safetensors + text_encoder/ (HF folder).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_json
from .cache import CacheMeta, check_compatible
from .errors import MlcError
from .heads import create_head, predict_proba
from .labels import LabelSpace
from .thresholds import apply_thresholds

# Cache fields a run depends on: features from any other encoder/weights/preprocessing/labels
# would be silently wrong, so they are compared before a run reads a cache.
CACHE_CONTRACT = ("image_encoder", "text_encoder", "image_weights_hash", "text_weights_hash",
                  "image_preprocess", "text_preprocess", "image_dim", "text_dim", "label_ids")


def save_state(module: torch.nn.Module, path: Path) -> None:
    """Atomic safetensors write of a module's weights (contiguous CPU copies)."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def cache_record(meta: CacheMeta) -> dict[str, Any]:
    """What a run remembers of its training cache (run/cache.json)."""
    d = meta.to_dict()
    return {"contract": {k: d[k] for k in CACHE_CONTRACT}, "extract": meta.extra.get("extract_config", {})}


@dataclass
class Run:
    """A trained head (or finetuned model) loaded from its folder, ready to score cached features."""

    path: Path
    config: dict[str, Any]
    cache: dict[str, Any]
    head_config: dict[str, Any]
    heads: list[torch.nn.Module]
    thresholds: np.ndarray
    labels: LabelSpace

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Run:
        path = Path(path)
        need = ["config.json", "cache.json", "head.json", "thresholds.json"]
        missing = [n for n in need if not (path / n).is_file()]
        if not path.is_dir() or missing:
            raise MlcError(f"{path}: not an mlc run folder (missing {', '.join(missing) or 'the folder'})")
        config, cache, head_cfg, th = (json.loads((path / n).read_text()) for n in need)
        files = sorted(path.glob("head-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
        if not files:
            raise MlcError(f"{path}: no head-*.safetensors weights")
        heads = []
        for f in files:
            head = create_head(**head_cfg)
            head.load_state_dict(load_file(str(f)))
            heads.append(head.eval())
        labels = LabelSpace.from_ids(th["label_ids"])
        return cls(path, config, cache, head_cfg, heads, np.asarray(th["per_class"], np.float32), labels)

    def check_cache(self, meta: CacheMeta) -> None:
        """Refuse features from other encoders, weights, preprocessing or label vocabulary."""
        check_compatible(meta, self.cache["contract"], what=f"the cache {meta.split!r} for run {self.path}")

    def scores(self, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        """image (N, V, Di), text (N, Dt) -> probabilities (N, C), averaged over views and fold heads."""
        img, txt = torch.from_numpy(image), torch.from_numpy(text)
        return (sum(predict_proba(h, img, txt) for h in self.heads) / len(self.heads)).numpy()

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Scores -> (N, C) 0/1 with the tuned thresholds; every image gets at least one label."""
        return apply_thresholds(scores, self.thresholds, at_least_one=True)


def write_run_files(path: Path, *, config: dict, cache: dict, head_config: dict, heads: list[torch.nn.Module],
                    thresholds: dict, metrics: dict, history: list[dict] | dict,
                    val_ids: list[str], val_scores: np.ndarray, val_labels: np.ndarray) -> None:
    """Write every file of a run folder (each one atomically)."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("head-*.safetensors"):
        stale.unlink()
    for i, head in enumerate(heads):
        save_state(head, path / f"head-{i}.safetensors")
    write_json(path / "config.json", config)
    write_json(path / "cache.json", cache)
    write_json(path / "head.json", head_config)
    write_json(path / "thresholds.json", thresholds)
    write_json(path / "metrics.json", metrics)
    write_json(path / "history.json", history)
    with atomic_path(path / "val_scores.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, image_ids=np.asarray(val_ids, dtype=str), scores=val_scores.astype(np.float32),
                 labels=val_labels.astype(np.uint8))


def head_size_bytes(path: Path) -> int:
    """Bytes needed to predict from cached features (head weights + JSON)."""
    return sum(f.stat().st_size for f in path.iterdir()
               if f.suffix in {".safetensors", ".json"} and f.name.startswith(("head", "thresholds")))
