"""Run folders: the one module that knows their layout. Everything needed to predict later, no pickle.

    runs/NAME/
      manifest.json        written last: format version, kind, every file with its size and sha256
      config.json          the stage's frozen config
      features.json        what the head reads: one entry per cache, its contract (encoders, weights
                           hashes, preprocessing, dims, labels: what a test cache must match) and its
                           recipe (how its features are made, so `mlc submit` makes test features alike)
      head.json            head constructor arguments (heads.create_head(**head.json))
      head-K.safetensors   head weights; one file per fold with --folds K
      thresholds.json      label ids and names, mode, global threshold, per-class thresholds
      metrics.json         held-out metrics (F1 at 0.5 / global / per-class thresholds, mAP, ...)
      history.json         per-epoch training curves (a list per fold)
      val_scores.npz       held-out scores + labels (for `mlc report`)
      train.log            what was printed
      encoders/image/, encoders/text/    finetuned encoders (Encoder.save folders)
      checkpoints/         finetune's best.pt / last.pt (training state, not part of the manifest)
      submission.csv, report/            written later by `mlc submit` / `mlc report`
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from . import __version__
from .atomic import atomic_path, write_json, write_safetensors, write_text
from .cache import CacheMeta
from .errors import MismatchError, MlcError
from .heads import create_head, predict_proba
from .labels import LabelSpace
from .thresholds import apply_thresholds

RUN_FORMAT = 2  # 1: mlc 0.1 (cache.json, image_encoder.safetensors, text_encoder/); no manifest


@dataclass(frozen=True)
class Contract:
    """What features a head was trained on: a cache (or encoders) must match every field to feed it."""

    image_encoder: str
    text_encoder: str
    image_weights_hash: str
    text_weights_hash: str
    image_preprocess: dict[str, Any]
    text_preprocess: dict[str, Any]
    image_dim: int
    text_dim: int
    label_ids: tuple[int, ...]

    @classmethod
    def of_cache(cls, meta: CacheMeta) -> Contract:
        d = meta.to_dict()
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    @classmethod
    def of_encoders(cls, image: Any, text: Any, labels: LabelSpace) -> Contract:
        return cls(image.name, text.name, image.weights_hash, text.weights_hash, image.preprocess.to_dict(),
                   text.preprocess.to_dict(), image.dim, text.dim, labels.ids)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contract:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in fields(self)}))

    def check(self, found: Contract | CacheMeta, what: str) -> None:
        """Refuse features from other encoders, weights, preprocessing or label vocabulary."""
        theirs = (found if isinstance(found, Contract) else Contract.of_cache(found)).to_dict()
        mine = self.to_dict()
        diffs = [f"{k}: the run has {v!r}, it has {theirs[k]!r}" for k, v in mine.items() if theirs[k] != v]
        if diffs:
            raise MismatchError(f"{what} does not match the run: " + "; ".join(diffs))


@dataclass
class RunFiles:
    """Everything a stage writes into a run folder, at once."""

    kind: str  # "head" | "finetune"
    config: dict[str, Any]
    features: list[dict[str, Any]]  # [{"contract": Contract.to_dict(), "recipe": {...}}]
    heads: list[torch.nn.Module]
    thresholds: dict[str, Any]
    metrics: dict[str, Any]
    history: list[Any]
    val_ids: list[str]
    val_scores: np.ndarray
    val_labels: np.ndarray
    log: list[str]
    encoders: tuple[Any, Any] | None = None  # finetuned (image, text)
    extra_json: dict[str, Any] | None = None  # e.g. grid.json


@dataclass
class Run:
    """A trained head (or finetuned model) loaded from its folder, ready to score cached features."""

    dir: RunDir
    kind: str
    config: dict[str, Any]
    features: list[dict[str, Any]]
    head_config: dict[str, Any]
    heads: list[torch.nn.Module]
    thresholds: np.ndarray
    labels: LabelSpace

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def contract(self) -> Contract:
        return Contract.from_dict(self.features[0]["contract"])

    @property
    def recipe(self) -> dict[str, Any]:
        return self.features[0]["recipe"]

    def check_cache(self, meta: CacheMeta) -> None:
        self.contract.check(meta, what=f"the {meta.split} cache for run {self.path}")

    def scores(self, image: np.ndarray, text: np.ndarray) -> np.ndarray:
        """image (N, V, Di), text (N, Dt) -> probabilities (N, C), averaged over views and fold heads."""
        img, txt = torch.from_numpy(image), torch.from_numpy(text)
        return (sum(predict_proba(h, img, txt) for h in self.heads) / len(self.heads)).numpy()

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Scores -> (N, C) 0/1 with the tuned thresholds; every image gets at least one label."""
        return apply_thresholds(scores, self.thresholds, at_least_one=True)


@dataclass(frozen=True)
class RunDir:
    """The layout of one run folder; every path of it is spelled here and only here."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    manifest = property(lambda self: self / "manifest.json")
    config = property(lambda self: self / "config.json")
    features = property(lambda self: self / "features.json")
    head = property(lambda self: self / "head.json")
    thresholds = property(lambda self: self / "thresholds.json")
    metrics = property(lambda self: self / "metrics.json")
    history = property(lambda self: self / "history.json")
    val_scores = property(lambda self: self / "val_scores.npz")
    log = property(lambda self: self / "train.log")
    grid = property(lambda self: self / "grid.json")
    checkpoints = property(lambda self: self / "checkpoints")
    submission = property(lambda self: self / "submission.csv")
    report = property(lambda self: self / "report")

    def head_weights(self, k: int) -> Path:
        return self / f"head-{k}.safetensors"

    def encoder_dir(self, kind: str) -> Path:
        return self.path / "encoders" / kind

    def predict_files(self) -> list[Path]:
        """What predicting from cached features needs: head weights and the JSON that rebuilds them."""
        heads = sorted(self.path.glob("head-*.safetensors"))
        return heads + [p for p in (self.config, self.features, self.head, self.thresholds) if p.is_file()]

    def has_encoders(self) -> bool:
        return all((self.encoder_dir(k) / "encoder.json").is_file() for k in ("image", "text"))

    # ------------------------------------------------------------------------------------ writing

    def write(self, files: RunFiles) -> None:
        """Write every file of the run (each atomically), then the manifest."""
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob("head-*.safetensors"):
            stale.unlink()
        for k, head in enumerate(files.heads):
            write_safetensors(self.head_weights(k), head)
        if files.encoders is not None:
            for kind, enc in zip(("image", "text"), files.encoders, strict=True):
                _save_encoder(enc, self.encoder_dir(kind))
        write_json(self.config, {"kind": files.kind, **files.config})
        write_json(self.features, files.features)
        write_json(self.head, files.heads[0].config())
        write_json(self.thresholds, files.thresholds)
        write_json(self.metrics, files.metrics)
        write_json(self.history, files.history)
        if files.extra_json:
            for name, obj in files.extra_json.items():
                write_json(self / name, obj)
        with atomic_path(self.val_scores) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, image_ids=np.asarray(files.val_ids, dtype=str), scores=files.val_scores.astype(np.float32),
                     labels=files.val_labels.astype(np.uint8))
        write_text(self.log, "\n".join(files.log) + "\n")
        self._write_manifest(files.kind)

    def _write_manifest(self, kind: str) -> None:
        listed = sorted(p for p in self.path.rglob("*") if p.is_file() and self._in_manifest(p))
        write_json(self.manifest, {"format": RUN_FORMAT, "kind": kind, "mlc_version": __version__,
                                   "files": {str(p.relative_to(self.path)): {"bytes": p.stat().st_size,
                                                                            "sha256": _sha256(p)}
                                             for p in listed}})

    def _in_manifest(self, p: Path) -> bool:
        rel = p.relative_to(self.path).parts
        return rel[0] not in ("checkpoints", "report", "manifest.json", "submission.csv") \
            and not rel[-1].startswith(".")

    # ------------------------------------------------------------------------------------ reading

    def check_format(self) -> dict[str, Any]:
        """The manifest; MlcError for a folder that is no run, or a run of another format."""
        if not self.path.is_dir():
            raise MlcError(f"{self.path}: not an mlc run folder (missing the folder)")
        if not self.manifest.is_file():
            if (self / "cache.json").is_file():
                raise MlcError(f"{self.path}: written by an older mlc (run format 1); this mlc reads run format "
                               f"{RUN_FORMAT}. Refit it (mlc fit-head / mlc finetune) to use it here.")
            raise MlcError(f"{self.path}: not an mlc run folder (missing manifest.json)")
        manifest = self.read_json("manifest.json")
        if manifest.get("format") != RUN_FORMAT:
            raise MlcError(f"{self.path}: run format {manifest.get('format')!r}; this mlc reads format {RUN_FORMAT}")
        return manifest

    def read_json(self, name: str) -> Any:
        path = self / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MlcError(f"{path}: missing from the run folder") from None
        except (OSError, ValueError) as e:
            raise MlcError(f"{path}: cannot read JSON ({e})") from e

    def load(self) -> Run:
        """The run's head(s), thresholds and contract, ready to predict."""
        manifest = self.check_format()
        config, features, head_cfg, th = (self.read_json(n) for n in
                                          ("config.json", "features.json", "head.json", "thresholds.json"))
        files = sorted(self.path.glob("head-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
        if not files:
            raise MlcError(f"{self.path}: no head-*.safetensors weights")
        heads = []
        for f in files:
            head = create_head(**head_cfg)
            head.load_state_dict(load_file(str(f)))
            heads.append(head.eval())
        labels = LabelSpace(tuple(th["label_ids"]), tuple(th["label_names"]))
        return Run(self, manifest["kind"], config, features, head_cfg, heads,
                   np.asarray(th["per_class"], np.float32), labels)


def _save_encoder(encoder: Any, target: Path) -> None:
    """Encoder.save into a sibling folder, then swapped in: never a half-written encoder folder."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    encoder.save(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def feature_entry(contract: Contract, recipe: dict[str, Any]) -> dict[str, Any]:
    """One entry of features.json."""
    return {"contract": contract.to_dict(), "recipe": recipe}

