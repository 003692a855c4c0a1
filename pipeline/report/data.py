"""What a report shows, loaded from a run folder (through ``RunDir``) and checked, plus derived numbers."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..decision import Decision
from ..errors import DataError, MlcError
from ..labels import LabelSpace
from ..metrics import average_precision_per_class, per_class, samples_f1
from ..reading import CSV_BYTES, read_text
from ..runs import RunDir, saved_decision
from ..thresholds import apply_thresholds


@dataclass
class ReportData:
    """Everything a report shows, loaded and checked. Matrices are (N, C) in ``labels`` column order."""

    run: RunDir
    labels: LabelSpace
    image_ids: np.ndarray  # (N,) str
    scores: np.ndarray  # (N, C) float64 held-out probabilities
    y_true: np.ndarray  # (N, C) bool
    thresholds: np.ndarray  # (C,) float64 decision thresholds
    threshold_mode: str
    history: list[list[dict[str, Any]]]  # one list of epoch dicts per fold; [] when unknown
    metrics: dict[str, Any]
    config: dict[str, Any]
    test_pred: np.ndarray | None  # (M, C) bool predictions on test, from a submission CSV
    test_source: Path | None
    notes: list[str] = field(default_factory=list)  # what was missing or assumed
    decision: Decision | None = None  # the run's decision rule (None: its per-class thresholds)

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def reads_thresholds(self) -> bool:
        """Whether the run's labels come from its per-class thresholds (not from a per-image expected-F1 rule)."""
        return self.decision is None or self.decision.reads_thresholds

    def threshold_text(self, j: int, digits: int = 2) -> str:
        """Class j's threshold as shown in the report, or a dash where the run's rule reads none."""
        return f"{self.thresholds[j]:.{digits}f}" if self.reads_thresholds else "-"


def _normalise_history(raw: Any, where: Path) -> list[list[dict[str, Any]]]:
    """history.json -> one list of epoch dicts per fold (a single run is one fold)."""
    if isinstance(raw, dict):  # column form {"train_loss": [...], ...}
        cols = {k: v for k, v in raw.items() if isinstance(v, list)}
        n = max((len(v) for v in cols.values()), default=0)
        raw = [{k: v[i] for k, v in cols.items() if i < len(v)} for i in range(n)]
    if not isinstance(raw, list):
        raise MlcError(f"{where}: expected a list of epochs or a list of per-fold lists")
    if raw and all(isinstance(f, list) for f in raw):
        folds = raw
    elif all(isinstance(e, dict) for e in raw):
        folds = [raw]
    else:
        raise MlcError(f"{where}: mixes epoch dicts and per-fold lists")
    out = []
    for fold in folds:
        epochs = [e for e in fold if isinstance(e, dict)]
        for i, e in enumerate(epochs):
            e.setdefault("epoch", i + 1)
        out.append(epochs)
    return [f for f in out if f]


def read_predictions(path: Path, labels: LabelSpace) -> np.ndarray:
    """A submission CSV (``ImageID,Labels``; labels space-separated) -> (M, C) bool."""
    try:
        text = read_text(path, limit=CSV_BYTES, what="submission CSV", encoding="utf-8-sig")
    except (OSError, ValueError) as e:
        raise MlcError(f"{path}: cannot read ({e})") from e
    rows = list(csv.reader(text.splitlines()))
    if not rows or [h.strip() for h in rows[0][:2]] != ["ImageID", "Labels"]:
        raise DataError(str(path), 1, "expected the header ImageID,Labels")
    pred = np.zeros((len(rows) - 1, len(labels)), dtype=bool)
    kept = 0
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DataError(str(path), line, "expected ImageID,Labels")
        for tok in row[1].split():
            try:
                pred[kept, labels.column(tok)] = True  # by the label's text: ids may be integers or words
            except KeyError:
                raise DataError(str(path), line, f"label {tok!r} is not one of the run's label ids") from None
        kept += 1
    if kept == 0:
        raise DataError(str(path), None, "no prediction rows")
    return pred[:kept]


def load_report_data(run_dir: Path, *, test_predictions: Path | None = None) -> ReportData:
    """Read and check a run folder's report inputs."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise MlcError(f"{run.path}: no such run folder")
    run.verify()
    held = run.held_out()
    ids, scores, y_true = np.asarray(held.ids), held.scores, held.labels
    c = scores.shape[1]
    th = run.read_thresholds()
    labels = LabelSpace(tuple(th["label_ids"]), tuple(th["label_names"]))
    thresholds = np.asarray(th["per_class"], dtype=np.float64)
    if len(labels) != c or thresholds.shape != (c,):
        raise MlcError(f"{run.thresholds}: {len(labels)} label ids and {thresholds.size} thresholds for {c} "
                       "score columns")
    history = _normalise_history(run.read_json("history.json"), run.history)
    notes = [] if history else ["history.json holds no epochs: no training curves."]
    if test_predictions is not None:
        test_source: Path | None = Path(test_predictions)
        if not test_source.is_file():
            raise MlcError(f"{test_source}: test predictions file not found")
    else:
        test_source = run.submission if run.submission.is_file() else None
    test_pred = read_predictions(test_source, labels) if test_source is not None else None
    return ReportData(run, labels, ids, scores, y_true, thresholds, str(th.get("mode", "?")), history,
                      run.read_metrics(), run.read_config(), test_pred, test_source, notes, saved_decision(th))


# ------------------------------------------------------------------------------------------ numbers


@dataclass
class Analysis:
    """Derived numbers: predictions at the saved thresholds and per-class quality."""

    y_pred: np.ndarray  # (N, C) bool, exactly what a submission would contain
    precision: np.ndarray  # (C,)
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray  # (C,) int, true positives in the held-out rows
    ap: np.ndarray  # (C,) NaN for a class with no positives
    order: np.ndarray  # class columns sorted by F1, weakest first (no-support classes last)
    swaps: np.ndarray  # (C, C) counts: true i missed while j predicted though not true
    samples_f1: float


def analyse(d: ReportData) -> Analysis:
    """Predictions with the run's thresholds (at least one label per image, like ``mlc submit``)."""
    y_pred = (d.decision.apply(d.scores) if d.decision else apply_thresholds(d.scores, d.thresholds)) > 0
    pc = per_class(d.y_true, y_pred)
    ap = average_precision_per_class(d.y_true, d.scores)
    key = np.where(pc["support"] > 0, pc["f1"], np.inf)
    order = np.argsort(key, kind="stable")
    missed = (d.y_true & ~y_pred).astype(np.int64)  # (N, C)
    spurious = (y_pred & ~d.y_true).astype(np.int64)
    swaps = missed.T @ spurious  # (C, C); diagonal is 0 since a label cannot be both
    return Analysis(y_pred, pc["precision"], pc["recall"], pc["f1"], pc["support"], ap, order, swaps,
                    samples_f1(d.y_true, y_pred))


def confusion_matrix(d: ReportData, a: Analysis) -> np.ndarray:
    """(C, C) rates. Row i = held-out images truly labelled i. Diagonal: recall of i. Off-diagonal
    (i, j): fraction of those images where i was NOT predicted and j was predicted though not true,
    i.e. how often the model said j instead of i."""
    support = np.maximum(a.support, 1)[:, None]
    m = a.swaps / support
    np.fill_diagonal(m, a.recall)
    m[a.support == 0] = np.nan
    return m
