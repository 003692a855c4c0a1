"""``mlc submit``: the Kaggle submission CSV from a run folder and the test split.

The test split is encoded exactly as the run's training cache was (same recipe: encoders, weights,
preprocessing, views); a matching test cache is reused, otherwise it is made first.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import check_writable, write_text
from .cache import CacheReader
from .config import as_paths, opt, require
from .data import DataDir
from .device import distributed
from .errors import MlcError
from .features import Job, LoaderOptions, Recipe, build_cache, cache_path, encoders_and_engine
from .fused import Part, load_joined
from .runs import Run, RunDir


@dataclass(frozen=True, kw_only=True)
class SubmitConfig(LoaderOptions):
    """Options of ``mlc submit``."""

    run: Path = opt(None, "A run folder from `mlc fit-head` or `mlc finetune`.", argument=True, required=True)
    data_dir: Path = opt(None, "Data folder whose test.csv is predicted.", flag="--data", required=True)
    out: Path | None = opt(None, "Submission file (default RUN/submission.csv).")
    cache_dir: Path = opt(Path("cache"), "Where the test cache is found or written (and exported ONNX graphs, "
                          "in CACHE_DIR/onnx).")
    overwrite: bool = opt(False, "Replace a test cache that holds other features (e.g. one extracted with "
                          "--skip-bad-images) instead of stopping.")

    def __post_init__(self) -> None:
        super().__post_init__()
        as_paths(self, "run", "data_dir", "out", "cache_dir")
        require([(self.run is not None, "give a run folder"), (self.data_dir is not None, "give --data")])

    @property
    def target(self) -> Path:
        return self.out if self.out is not None else RunDir(self.run).submission


def format_rows(ids: list[str], preds: np.ndarray, label_ids: tuple[int, ...]) -> list[str]:
    """``ImageID,Labels`` lines; labels space-separated in ascending id order."""
    lines = ["ImageID,Labels"]
    for image_id, row in zip(ids, preds, strict=True):
        labels = sorted(label_ids[j] for j in np.flatnonzero(row))
        if not labels:
            raise MlcError(f"internal: no label predicted for {image_id}")
        lines.append(f"{image_id},{' '.join(map(str, labels))}")
    return lines


def check_ids(expected: list[str], got: list[str], where: str) -> None:
    """Every test ImageID exactly once, in the order of test.csv."""
    dupes = [i for i, n in Counter(got).items() if n > 1]
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if dupes or missing or extra or got != expected:
        raise MlcError(f"{where}: test ids do not match test.csv (missing {missing[:5]}, extra {extra[:5]}, "
                       f"duplicated {dupes[:5]}{', order differs' if not (missing or extra or dupes) else ''})")


def make_test_features(run: Run, cfg: SubmitConfig, data: DataDir) -> list[Path]:
    """The test split's cache for each of the run's feature recipes (made, or found already made)."""
    paths = []
    with distributed(cfg.device) as device:
        for entry in run.features:
            recipe = Recipe.from_dict(entry["recipe"], str(run.dir.features))
            if recipe.crossfit is not None:  # made with the train features by `mlc crossfit`: no encoders to run
                path = cache_path(cfg.cache_dir, cfg.data_dir, "test", recipe)
                if not path.is_file():
                    raise MlcError(f"{path}: missing; the test features of a cross-fitted cache are written with its "
                                   "train features by `mlc crossfit` (rerun it with the same options)")
                paths.append(path)
                continue
            image, text, eng = encoders_and_engine(recipe, cfg, device, cfg.cache_dir / "onnx", run.path, data)
            job = Job(recipe, data, "test", cache_path(cfg.cache_dir, cfg.data_dir, "test", recipe), cfg,
                      chunk_rows=max(cfg.batch_size, 512), overwrite=cfg.overwrite, command="submit")
            paths.append(build_cache(job, image, text, eng, device))
    return paths


def submit(cfg: SubmitConfig) -> tuple[Path, str]:
    """Write the submission file atomically; return its path and a one-line summary."""
    run = RunDir(cfg.run).load()
    check_writable(cfg.target.parent)  # before encoding the test split
    data = DataDir.open(cfg.data_dir, Recipe.from_dict(run.features[0]["recipe"], str(run.dir.features))
                        .data_options())  # test.csv is read as train.csv was
    expected = [r.image_id for r in data.records("test")]
    caches = make_test_features(run, cfg, data)
    readers = [CacheReader(p) for p in caches]
    try:
        run.check_caches([r.meta for r in readers], caches)
        for r in readers:
            check_ids(expected, r.image_ids, str(r.path))
        parts = [Part.of(e) for e in run.features]
        ids, image, text = load_joined(readers, parts)
    finally:
        for r in readers:
            r.close()
    preds = run.predict(run.scores(image, text))
    lines = format_rows(ids, preds, run.labels.ids)
    check_ids(expected, [ln.split(",", 1)[0] for ln in lines[1:]], "submission")
    inside = cfg.target.resolve().parent == run.path.resolve()
    with run.dir.writing() if inside else contextlib.nullcontext():  # the run may not be swapped meanwhile
        write_text(cfg.target, "\n".join(lines) + "\n")
    return cfg.target, summary(run, preds)


def summary(run: Run, preds: np.ndarray) -> str:
    """Rows, labels per row, and the predicted label distribution against the held-out labels'."""
    path = run.dir.val_scores
    held = np.load(path)["labels"] if path.is_file() else None
    pred_freq = preds.mean(0)
    parts = [f"{len(preds)} rows, {preds.sum(1).mean():.2f} labels/row"]
    if held is not None:
        train_freq = held.mean(0)
        worst = np.argsort(-np.abs(pred_freq - train_freq))[:3]
        parts.append("largest shifts vs training: " + ", ".join(
            f"{run.labels.names[j]} {100 * pred_freq[j]:.1f}% (train {100 * train_freq[j]:.1f}%)" for j in worst))
    return "; ".join(parts)
