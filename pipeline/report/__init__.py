"""``mlc report``: one HTML page with plots that shows where a trained run is weak.

Reads a run folder (through :class:`pipeline.runs.RunDir`) and writes ``RUN/report/``::

    report.html               headline numbers, "where the model is weak", the plots, sizes, config
    per_class_f1.png          per-class F1 at the tuned thresholds, sorted, with P / R / support
    pr_curves.png             precision-recall curve per class, tuned operating point marked
    f1_vs_threshold.png       class F1 and samples-F1 against each class's threshold
    training_curves.png       loss and validation F1 per epoch (one line per fold)
    label_distribution.png    % of images per label: held-out truth vs predictions (needs a submission)
    label_confusion.png       which label is predicted instead of a missed true label

Every per-class number is computed here from ``val_scores.npz`` with the saved thresholds, i.e.
in-sample for the thresholds (they were tuned on these same rows): slightly optimistic, unlike the
cross-fitted samples-F1 in ``metrics.json`` shown at the top of the page.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import ensure_dir, write_text
from ..config import Config, opt
from ..errors import MlcError
from ..runs import RunDir
from .data import Analysis, ReportData, analyse, confusion_matrix, load_report_data, read_predictions
from .page import render_html, size_summary, weak_points
from .plots import (
    plot_f1_vs_threshold,
    plot_label_confusion,
    plot_label_distribution,
    plot_per_class_f1,
    plot_pr_curves,
    plot_training_curves,
    save_png,
)

__all__ = ["PLOT_FILES", "Analysis", "ReportConfig", "ReportData", "analyse", "confusion_matrix", "load_report_data",
           "make_report", "read_predictions", "size_summary", "weak_points"]

@dataclass(frozen=True, kw_only=True)
class ReportConfig(Config):
    """Options of ``mlc report``."""

    run: Path = opt(None, "A run folder from `mlc fit-head` or `mlc finetune`.", argument=True, required=True)


PLOT_FILES: dict[str, str] = {
    "per_class_f1": "per_class_f1.png",
    "pr_curves": "pr_curves.png",
    "f1_vs_threshold": "f1_vs_threshold.png",
    "training_curves": "training_curves.png",
    "label_distribution": "label_distribution.png",
    "label_confusion": "label_confusion.png",
}


def make_report(run_dir: Path, *, test_predictions: Path | None = None) -> Path:
    """Write ``run_dir/report/`` (PNG plots + report.html) and return the HTML path."""
    start = time.perf_counter()
    if not Path(run_dir).is_dir():
        raise MlcError(f"{run_dir}: no such run folder")
    with RunDir(run_dir).writing():
        return _make_report(Path(run_dir), test_predictions, start)


def _make_report(run_dir: Path, test_predictions: Path | None, start: float) -> Path:
    d = load_report_data(run_dir, test_predictions=test_predictions)
    a = analyse(d)
    out = d.run.report
    ensure_dir(out)
    makers = {
        "per_class_f1": lambda: plot_per_class_f1(d, a),
        "pr_curves": lambda: plot_pr_curves(d, a),
        "f1_vs_threshold": lambda: plot_f1_vs_threshold(d, a),
        "training_curves": (lambda: plot_training_curves(d)) if d.history else None,
        "label_distribution": (lambda: plot_label_distribution(d, a)) if d.test_pred is not None else None,
        "label_confusion": lambda: plot_label_confusion(d, a),
    }
    skipped = {"training_curves": "history.json is missing or empty.",
               "label_distribution": "no test predictions (run `mlc submit` to write submission.csv, "
                                     "or pass test_predictions)."}
    plots: dict[str, str | None] = {}
    for key, maker in makers.items():
        target = out / PLOT_FILES[key]
        if maker is None:
            target.unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
            plots[key] = skipped[key]
            continue
        save_png(maker(), target)
        plots[key] = PLOT_FILES[key]
    page = out / "report.html"
    write_text(page, render_html(d, a, plots, time.perf_counter() - start))
    return page
