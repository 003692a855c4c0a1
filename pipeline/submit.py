"""``mlc submit``: the Kaggle submission CSV from a run folder and the test split.

The test split is encoded exactly as the run's training cache was (same encoders, weights,
preprocessing, views); a matching test cache is reused, otherwise it is extracted first.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .cache import CacheReader
from .data import DataDir
from .errors import MlcError
from .extract import ExtractConfig, extract
from .runs import Run


@dataclass(frozen=True)
class SubmitConfig:
    """Options of ``mlc submit``."""

    run: Path
    data_dir: Path
    out: Path | None = None
    cache_dir: Path = Path("cache")
    device: str = "auto"
    batch_size: int = 32
    workers: int = 2

    def __post_init__(self) -> None:
        for name in ("run", "data_dir", "cache_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))

    @property
    def target(self) -> Path:
        return self.out if self.out is not None else self.run / "submission.csv"


def test_extract_config(run: Run, cfg: SubmitConfig) -> ExtractConfig:
    """The training cache's extract config, pointed at this data folder's test split."""
    stored = dict(run.cache.get("extract") or {})
    if not stored:
        raise MlcError(f"{run.path}/cache.json does not say how its features were extracted")
    known = {f.name for f in dataclasses.fields(ExtractConfig)}
    stored = {k: v for k, v in stored.items() if k in known}
    stored.update(data_dir=cfg.data_dir, splits=("test",), out_dir=cfg.cache_dir, device=cfg.device,
                  batch_size=cfg.batch_size, workers=cfg.workers, overwrite=False, skip_bad_images=False,
                  chunk_rows=max(cfg.batch_size, 256))
    return ExtractConfig(**stored)


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


def submit(cfg: SubmitConfig) -> tuple[Path, str]:
    """Write the submission file atomically; return its path and a one-line summary."""
    run = Run.load(cfg.run)
    records = DataDir.open(cfg.data_dir).records("test")
    (cache_file,) = extract(test_extract_config(run, cfg))
    with CacheReader(cache_file) as reader:
        run.check_cache(reader.meta)
        ids = reader.image_ids
        check_ids([r.image_id for r in records], ids, str(cache_file))
        scores = run.scores(reader.array("image"), reader.array("text"))
    preds = run.predict(scores)
    lines = format_rows(ids, preds, run.labels.ids)
    check_ids([r.image_id for r in records], [ln.split(",", 1)[0] for ln in lines[1:]], "submission")
    target = cfg.target
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target, summary(run, preds)


def summary(run: Run, preds: np.ndarray) -> str:
    """Rows, labels per row, and the predicted label distribution against the held-out labels'."""
    held = np.load(run.path / "val_scores.npz")["labels"] if (run.path / "val_scores.npz").is_file() else None
    pred_freq = preds.mean(0)
    parts = [f"{len(preds)} rows, {preds.sum(1).mean():.2f} labels/row"]
    if held is not None:
        train_freq = held.mean(0)
        diff = pred_freq - train_freq
        worst = np.argsort(-np.abs(diff))[:3]
        parts.append("largest shifts vs training: " + ", ".join(
            f"{run.labels.names[j]} {100 * pred_freq[j]:.1f}% (train {100 * train_freq[j]:.1f}%)" for j in worst))
    return "; ".join(parts)


def main_print(path: Path, line: str) -> None:
    print(f"wrote {path}")
    print(line, file=sys.stderr)
