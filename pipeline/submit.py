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

from .atomic import OutputOptions, claim_output, write_json, write_text
from .cache import CacheReader
from .config import Config, group, opt, require
from .data import DataDir
from .device import distributed
from .errors import MlcError
from .features import Hints, Job, LoaderOptions, Recipe, build_cache, cache_path, encoders_and_engine
from .folders import sha256_file
from .fused import Part, load_joined
from .output_rules import is_submission
from .predictor import Predictor
from .runs import Run, RunDir, data_inputs

HINTS = Hints(bad_image="every test image needs a prediction: repair or replace the file",
              skipped=". A submission needs every test image: repair or replace those files, then run `mlc submit` "
                      "again with --overwrite to encode the test split anew.",
              different="Pass --overwrite to replace it, or --cache-dir to write elsewhere.")


@dataclass(frozen=True, kw_only=True)
class SubmitConfig(Config):
    """Options of ``mlc submit``."""

    run: Path = opt(None, "A run folder from `mlc fit-head` or `mlc finetune`.", argument=True, required=True)
    data_dir: Path = opt(None, "Data folder whose test.csv is predicted.", argument=True, required=True,
                         aliases=("--data",))
    out: Path | None = opt(None, "Submission file (default RUN/submission.csv): a new file, or a submission it "
                           "replaces.")
    cache_dir: Path = opt(Path("cache"), "Where the test cache is found or written.")
    overwrite: bool = opt(False, "Rebuild a test cache that holds other features (e.g. one extracted with "
                          "--skip-bad-images) instead of stopping.")
    output: OutputOptions = group(OutputOptions)
    loader: LoaderOptions = group(LoaderOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.run is not None, "give a run folder"), (self.data_dir is not None, "give the data folder")])

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


def _recipes(run: Run) -> list[Recipe]:
    return [Recipe.from_dict(entry.recipe, str(run.dir.features)) for entry in run.entries]


def _test_caches(run: Run, cfg: SubmitConfig) -> list[Path]:
    return [cache_path(cfg.cache_dir, cfg.data_dir, "test", recipe) for recipe in _recipes(run)]


def make_test_features(run: Run, cfg: SubmitConfig, data: DataDir) -> list[Path]:
    """The test split's cache for each of the run's feature recipes (made, or found already made)."""
    paths = []
    with distributed(cfg.loader.device) as device:
        for recipe, target in zip(_recipes(run), _test_caches(run, cfg), strict=True):
            if recipe.crossfit is not None:  # made with the train features by `mlc crossfit`: no encoders to run
                if not target.is_file():
                    raise MlcError(f"{target}: missing; the test features of a cross-fitted cache are written with "
                                   "its train features by `mlc crossfit` (rerun it with the same options)")
                paths.append(target)
                continue
            image, text, eng = encoders_and_engine(recipe, cfg.loader, device, run.path, data)
            job = Job(recipe, data, "test", target, cfg.loader, chunk_rows=max(cfg.loader.encode_batch, 512),
                      overwrite=cfg.overwrite, hints=HINTS)
            paths.append(build_cache(job, image, text, eng, device))
    return paths


def submit(cfg: SubmitConfig) -> tuple[Path, str]:
    """Write the submission file atomically; return its path and a one-line summary."""
    run = RunDir(cfg.run).load()
    data = DataDir.open(cfg.data_dir, _recipes(run)[0].data_options())  # test.csv is read as train.csv was
    # before encoding the test split: never the data, a cache or a file of the run (but its own submission.csv)
    target = claim_output(cfg.target, what="a submission file (ImageID,Labels)", folder=False, ours=is_submission,
                          inputs=data_inputs(data) + _test_caches(run, cfg), sealed=[run.path],
                          allow=[run.dir.submission], force=cfg.output.force)
    expected = [r.image_id for r in data.records("test")]
    caches = make_test_features(run, cfg, data)
    readers = [CacheReader(p) for p in caches]
    try:
        run.check_caches([r.meta for r in readers], caches)
        for r in readers:
            check_ids(expected, r.image_ids, str(r.path))
        parts = [Part.of(e) for e in run.entries]
        ids, image, text = load_joined(readers, parts)
        made_from = [{"cache": str(r.path), "data_fingerprint": r.meta.data_fingerprint} for r in readers]
    finally:
        for r in readers:
            r.close()
    model = Predictor.of_run(run)
    preds = model.decide(model.from_features(image, text))
    lines = format_rows(ids, preds, run.labels.ids)
    check_ids(expected, [ln.split(",", 1)[0] for ln in lines[1:]], "submission")
    own = target == run.dir.submission.resolve()
    with run.dir.writing() if own else contextlib.nullcontext():  # the run may not be swapped meanwhile
        write_text(target, "\n".join(lines) + "\n")
        if own:  # what it was made from, so `mlc run` knows when test.csv (or the run) changed since
            write_json(run.dir.submission_info, {"run_manifest": sha256_file(run.dir.manifest), "test": made_from})
    return cfg.target, summary(run, preds)


def summary(run: Run, preds: np.ndarray) -> str:
    """Rows, labels per row, and the predicted label distribution against the held-out labels'."""
    held = run.dir.held_out().labels if run.dir.val_scores.is_file() else None
    pred_freq = preds.mean(0)
    parts = [f"{len(preds)} rows, {preds.sum(1).mean():.2f} labels/row"]
    if held is not None:
        train_freq = held.mean(0)
        worst = np.argsort(-np.abs(pred_freq - train_freq))[:3]
        parts.append("largest shifts vs training: " + ", ".join(
            f"{run.labels.names[j]} {100 * pred_freq[j]:.1f}% (train {100 * train_freq[j]:.1f}%)" for j in worst))
    return "; ".join(parts)
