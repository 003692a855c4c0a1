"""Run folders: the one module that knows their layout. Everything needed to predict later, no pickle.

    runs/NAME/
      manifest.json        written last: format version, kind, every file with its size and sha256
      config.json          the stage's frozen config
      features.json        what the head reads: one entry per cache, its contract (encoders, weights
                           hashes, preprocessing, dims, labels: what a test cache must match), its
                           recipe (how its features are made, so `mlc submit` makes test features alike)
                           and the fingerprint of the data they were made from
      head.json            head constructor arguments (heads.create_head(**head.json))
      head-K.safetensors   head weights; one file per fold with --folds K
      thresholds.json      label ids and names, mode, global threshold, per-class thresholds
      metrics.json         held-out metrics (F1 at 0.5 / global / per-class thresholds, mAP, ...)
      history.json         per-epoch training curves (a list per fold)
      val_scores.npz       held-out scores + labels (for `mlc report`)
      train.log            what was printed
      encoders/image/, encoders/text/    finetuned encoders (Encoder.save folders)
      checkpoints/         finetune's best.pt / last.pt (training state, not part of the manifest)
      members/NAME/        `mlc run --quality best`: each member's own run folder (not part of the manifest)
      submission.csv, report/            written later by `mlc submit` / `mlc report`
      submission.json      what submission.csv was made from (the run's manifest, the test caches' data)
      run.json             the `mlc run` options that made it (`mlc run --config RUN` replays them)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from . import __version__, schemas
from .atomic import (
    atomic_path,
    check_writable,
    claim_output,
    clean_stale,
    entries,
    lock,
    owned,
    staged,
    write_json,
    write_safetensors,
    write_text,
)
from .cache import CacheMeta
from .decision import Decision
from .errors import MlcError
from .folders import RUN_LATER, check_listing, listing, read_json
from .fused import Part
from .heads import HEADS, create_head
from .identity import Contract, FeatureEntry  # Contract lives in identity; re-exported here for callers
from .labels import LabelSpace

if TYPE_CHECKING:
    from .data import DataDir

RUN_FORMAT = 2  # 1: mlc 0.1 (cache.json, image_encoder.safetensors, text_encoder/); no manifest


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
    decision: Decision  # the rule predictions use (thresholds.json's, or its per-class thresholds before issue 26)

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def entries(self) -> list[FeatureEntry]:
        """features.json, typed: what the head reads from each cache."""
        return [FeatureEntry.from_dict(e) for e in self.features]

    @property
    def contract(self) -> Contract:
        return Contract.from_dict(self.entries[0].contract)

    def check_caches(self, metas: list[CacheMeta], paths: list[Any]) -> None:
        """Each cache against its features.json entry (same order)."""
        for entry, meta, path in zip(self.entries, metas, paths, strict=True):
            Contract.from_dict(entry.contract).check(meta, what=f"the {meta.split} cache {path}")


@dataclass(frozen=True)
class HeldOut:
    """val_scores.npz: the held-out rows' ids, scores (N, C) and 0/1 labels (N, C) bool."""

    ids: list[str]
    scores: np.ndarray
    labels: np.ndarray


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
    submission_info = property(lambda self: self / "submission.json")  # what submission.csv was made from
    report = property(lambda self: self / "report")

    def head_weights(self, k: int) -> Path:
        return self / f"head-{k}.safetensors"

    def encoder_dir(self, kind: str) -> Path:
        return self.path / "encoders" / kind

    def predict_files(self) -> list[Path]:
        """What predicting from cached features needs: head weights and the JSON that rebuilds them."""
        heads = sorted(self.path.glob("head-*.safetensors"))
        return heads + [p for p in (self.config, self.features, self.head, self.thresholds) if p.is_file()]

    def held_out_ids(self) -> set[str]:
        """The image ids the run's heads were scored on and never trained on (val_scores.npz)."""
        return set(self.held_out().ids)

    def held_out(self) -> HeldOut:
        """val_scores.npz, checked: ids (N,), scores (N, C) finite, labels (N, C); MlcError naming the fault."""
        path = self.val_scores
        if not path.is_file():
            raise MlcError(f"{path}: missing from the folder; the run's held-out scores (val_scores.npz)")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("image_ids", "scores", "labels") if k not in z.files]
                if missing:
                    raise MlcError(f"{path}: no array {', '.join(missing)}")
                ids, scores, labels = z["image_ids"], z["scores"], z["labels"]
        except (OSError, ValueError) as e:
            raise MlcError(f"{path}: cannot read ({e})") from e
        if scores.ndim != 2 or labels.shape != scores.shape or ids.shape != (scores.shape[0],):
            raise MlcError(f"{path}: inconsistent shapes: image_ids {ids.shape}, scores {scores.shape}, "
                           f"labels {labels.shape}")
        if scores.shape[0] == 0:
            raise MlcError(f"{path}: no held-out rows")
        if not np.isfinite(scores).all():
            raise MlcError(f"{path}: scores contain NaN or infinite values")
        return HeldOut([str(i) for i in ids], scores.astype(np.float64), labels > 0)

    def read_thresholds(self) -> dict[str, Any]:
        """thresholds.json, schema-checked."""
        return schemas.thresholds(self.read_json("thresholds.json"), self.thresholds)

    def read_metrics(self) -> dict[str, Any]:
        """metrics.json, schema-checked."""
        return schemas.metrics(self.read_json("metrics.json"), self.metrics)

    def read_config(self) -> dict[str, Any]:
        """config.json: an object (the stage's config)."""
        return schemas.config(self.read_json("config.json"), self.config)

    def has_encoders(self) -> bool:
        return all((self.encoder_dir(k) / "encoder.json").is_file() for k in ("image", "text"))

    # ------------------------------------------------------------------------------------ writing

    def claim(self, kind: str, *, inputs: tuple[Any, ...] | list[Any] = (), sealed: tuple[Any, ...] | list[Any] = (),
              force: bool = False, allow: tuple[Any, ...] | list[Any] = ()) -> RunDir:
        """This folder as the ``--out`` of a stage that writes a ``kind`` run, at its real path: a missing or empty
        folder, or an mlc run of that kind (``atomic.claim_output``); never one of ``inputs``/``sealed``; inside
        another run only if ``allow`` names it (a best run's member)."""
        return RunDir(claim_output(self.path, what=f"an mlc {kind} run folder", folder=True, inputs=inputs,
                                   sealed=sealed, force=force, allow=allow, ours=lambda p: RunDir(p).replaceable(kind)))

    def replaceable(self, kind: str) -> bool | list[str]:
        """True for an mlc run of ``kind`` holding nothing mlc did not write (or, for a finetune, only the checkpoints
        an interrupted one left for --resume): what a new run may replace. Else what ``owned`` says."""
        if kind == "finetune" and self.path.is_dir() and set(entries(self.path)) <= {"checkpoints"}:
            return True
        if kind == "head" and self.path.is_dir() and set(entries(self.path)) <= {"members"}:
            return True  # an interrupted `mlc run --quality best`: its members, no blend yet
        return owned(self.path, "manifest.json", kind, RUN_LATER)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold this run folder's lock (another writer stops at once), after proving its parent is writable
        and clearing what dead writers left beside it. Stages take it before any long work."""
        check_writable(self.path.parent)
        with lock(self.path, f"the run folder {self.path}"):
            clean_stale(self.path.parent)
            yield

    def write(self, files: RunFiles) -> None:
        """Write the whole run into a staging folder beside this one, manifest last, then swap it in: the
        previous run (with its submission and report, which belong to it) stays intact until the new one
        is complete. A finetune's checkpoints move over to the new folder. Call inside ``writing()``."""
        with staged(self.path, keep=("checkpoints", "members")) as folder:
            stage = RunDir(folder)
            stage._write_files(files)
            stage._write_manifest(files.kind)

    def _write_files(self, files: RunFiles) -> None:
        for k, head in enumerate(files.heads):
            write_safetensors(self.head_weights(k), head)
        if files.encoders is not None:
            for kind, enc in zip(("image", "text"), files.encoders, strict=True):
                enc.save(self.encoder_dir(kind))
        write_json(self.config, {"kind": files.kind, **files.config})
        write_json(self.features, files.features)
        write_json(self.head, files.heads[0].config())
        write_json(self.thresholds, files.thresholds)
        write_json(self.metrics, files.metrics)
        write_json(self.history, files.history)
        for name, obj in (files.extra_json or {}).items():
            write_json(self / name, obj)
        with atomic_path(self.val_scores) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, image_ids=np.asarray(files.val_ids, dtype=str), scores=files.val_scores.astype(np.float32),
                     labels=files.val_labels.astype(np.uint8))
        write_text(self.log, "\n".join(files.log) + "\n")

    def _write_manifest(self, kind: str) -> None:
        m = {"format": RUN_FORMAT, "kind": kind, "mlc_version": __version__,
             "files": listing(self.path, RUN_LATER + ("manifest.json",))}
        write_json(self.manifest, {**m, schemas.CHECKSUM: schemas.checksum(m)})

    # ------------------------------------------------------------------------------------ reading

    def verify(self) -> dict[str, Any]:
        """The manifest, after checking the folder against it: every listed file present with its size and
        sha256, nothing unlisted beside them. MlcError naming the first file that is not as written."""
        manifest = self.check_format()
        check_listing(self.path, manifest["files"], RUN_LATER + ("manifest.json",), "refit the run")
        return manifest

    def check_format(self) -> dict[str, Any]:
        """The manifest (checked); MlcError for a folder that is no run, or a run of another format."""
        if not self.path.is_dir():
            found = "it is a file, not a folder" if self.path.exists() else "no such folder"  # not "missing" a file
            raise MlcError(f"{self.path}: not an mlc run folder ({found})")
        if not self.manifest.is_file():
            if (self / "cache.json").is_file():
                raise MlcError(f"{self.path}: written by an older mlc (run format 1); this mlc reads run format "
                               f"{RUN_FORMAT}. Refit it (mlc fit-head / mlc finetune) to use it here.")
            raise MlcError(f"{self.path}: not an mlc run folder (missing manifest.json)")
        manifest = schemas.manifest(self.read_json("manifest.json"), self.manifest)
        if manifest["format"] != RUN_FORMAT:
            raise MlcError(f"{self.path}: run format {manifest['format']}; this mlc reads format {RUN_FORMAT}")
        return manifest

    def read_json(self, name: str) -> Any:
        return read_json(self / name, "the run folder")

    def load(self) -> Run:
        """The run's head(s), thresholds and contract, verified and ready to predict."""
        manifest = self.verify()
        features = schemas.features(self.read_json("features.json"), self.features)
        th = self.read_thresholds()
        head_cfg = schemas.head(self.read_json("head.json"), self.head, tuple(HEADS))
        config = self.read_config()
        contracts = [Contract.from_dict(e["contract"]) for e in features]
        _check_consistent(self, th, head_cfg, contracts, features)
        names = sorted((n for n in manifest["files"] if re.fullmatch(r"head-\d+\.safetensors", n)),
                       key=lambda n: int(n[5:-12]))
        if not names:
            raise MlcError(f"{self.path}: no head-*.safetensors weights in manifest.json")
        heads = [load_head(self / n, head_cfg) for n in names]
        labels = LabelSpace(tuple(th["label_ids"]), tuple(th["label_names"]))
        return Run(self, manifest["kind"], config, features, head_cfg, heads,
                   np.asarray(th["per_class"], np.float32), labels, saved_decision(th))


def data_inputs(data: DataDir) -> list[Path]:
    """What a command reads from a data folder: its CSVs, labels file, image folder and the folder itself, which no
    output may be (and whose files --force never replaces)."""
    return [p for p in (data.csv_path("train"), data.csv_path("test"), data.labels_file, data.image_dir, data.root)
            if p is not None]


def load_head(path: Path, head_cfg: dict[str, Any]) -> torch.nn.Module:
    """A head built from ``head_cfg`` with the weights in ``path`` (float16 ones are cast), in eval mode."""
    try:
        head = create_head(**head_cfg)
    except (KeyError, TypeError, ValueError) as e:  # a field schemas.head does not check (a blend's members)
        raise MlcError(f"{path.parent}: its head's config does not build a {head_cfg.get('name')!r} head "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    try:
        head.load_state_dict(load_file(str(path)))  # copies into the float32 parameters, casting
    except Exception as e:  # SafetensorError, a shape mismatch, ...
        why = " ".join(str(e).split())[:300]  # one line: torch lists each mismatched key on a line of its own
        raise MlcError(f"{path}: cannot load the head's weights ({type(e).__name__}: {why})") from e
    return head.eval()



def saved_decision(th: dict[str, Any]) -> Decision:
    """thresholds.json's decision rule; a run written before rules were chosen applies its per-class thresholds."""
    if "decision" in th:
        return Decision.from_dict(th["decision"])
    return Decision("per-class", tuple(float(t) for t in th["per_class"]))


def _check_consistent(run: RunDir, th: dict[str, Any], head_cfg: dict[str, Any], contracts: list[Contract],
                      features: list[dict[str, Any]]) -> None:
    """thresholds.json, head.json and features.json must describe one model."""
    if [str(i) for i in th["label_ids"]] != [str(i) for i in contracts[0].label_ids]:
        raise MlcError(f"{run.thresholds}: label_ids {th['label_ids']} differ from the labels the features were "
                       f"made for ({list(contracts[0].label_ids)}, features.json)")
    if head_cfg["num_classes"] != len(th["label_ids"]):
        raise MlcError(f"{run.head}: num_classes {head_cfg['num_classes']} but {len(th['label_ids'])} labels")
    parts = [Part.of(FeatureEntry.from_dict(e)) for e in features]
    dims = (sum(c.image_dim for c, p in zip(contracts, parts, strict=True) if p.image),
            sum(c.text_dim for c, p in zip(contracts, parts, strict=True) if p.text))
    if (head_cfg["image_dim"], head_cfg["text_dim"]) != dims:
        raise MlcError(f"{run.head}: image_dim/text_dim {head_cfg['image_dim']}/{head_cfg['text_dim']} do not "
                       f"match the features' {dims[0]}/{dims[1]} (features.json)")


def feature_entry(contract: Contract, recipe: dict[str, Any], use: dict[str, bool] | None = None,
                  data_fingerprint: str | None = None) -> dict[str, Any]:
    """One entry of features.json (a ``FeatureEntry``): a cache's contract, its recipe, which of its features the
    head reads, and the fingerprint of the data it was made from (so a rerun sees that train.csv or its images
    changed)."""
    use = use or {"image": True, "text": True}
    return FeatureEntry(contract.to_dict(), recipe, use["image"], use["text"], data_fingerprint).to_dict()

