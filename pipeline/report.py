"""``mlc report``: one HTML page with plots that shows where a trained run is weak.

Reads a run folder (layout in :mod:`pipeline.runs`) and writes ``run_dir/report/``::

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

Plots use matplotlib's object API (``Figure`` + its Agg canvas), never pyplot: no GUI backend, no
global figure registry, and nothing changed for a caller that uses pyplot itself.
"""

from __future__ import annotations

import csv
import html
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, ticker
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .atomic import atomic_path, write_text
from .errors import DataError, MlcError
from .labels import COCO18, LabelSpace
from .metrics import average_precision_per_class, per_class, samples_f1
from .thresholds import apply_thresholds

MODEL_LIMIT_BYTES = 100 * 10**6  # the competition's limit on a prediction model (decimal MB)
DPI = 110
PLOT_FILES: dict[str, str] = {
    "per_class_f1": "per_class_f1.png",
    "pr_curves": "pr_curves.png",
    "f1_vs_threshold": "f1_vs_threshold.png",
    "training_curves": "training_curves.png",
    "label_distribution": "label_distribution.png",
    "label_confusion": "label_confusion.png",
}
# What Run.load reads to predict from cached features (plus the head-*.safetensors weights).
PREDICT_JSON = ("config.json", "cache.json", "head.json", "thresholds.json")
_SWEEP = np.linspace(0.0, 1.0, 101)  # thresholds for the F1-vs-threshold curves
_ZOOM_POINTS = 4.0  # the samples-F1 curves show the top 4 points below the tuned value


@dataclass
class ReportData:
    """Everything a report shows, loaded and checked. Matrices are (N, C) in ``labels`` column order."""

    run_dir: Path
    labels: LabelSpace
    image_ids: np.ndarray  # (N,) str
    scores: np.ndarray  # (N, C) float64 held-out probabilities
    y_true: np.ndarray  # (N, C) bool
    thresholds: np.ndarray  # (C,) float64 decision thresholds
    threshold_mode: str
    history: list[list[dict[str, Any]]]  # one list of epoch dicts per fold; [] when unknown
    metrics: dict[str, Any]
    config: dict[str, Any] | None
    test_pred: np.ndarray | None  # (M, C) bool predictions on test, from a submission CSV
    test_source: Path | None
    notes: list[str] = field(default_factory=list)  # what was missing or assumed


# ----------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MlcError(f"{path}: cannot read JSON ({e})") from e


def _load_val_scores(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not path.is_file():
        raise MlcError(f"{path}: missing; the report needs the run's held-out scores (val_scores.npz)")
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
    return ids.astype(str), scores.astype(np.float64), labels > 0


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
    """A submission CSV (``ImageID,Labels``; labels space-separated ids) -> (M, C) bool."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise MlcError(f"{path}: cannot read ({e})") from e
    rows = list(csv.reader(text.splitlines()))
    if not rows or [h.strip() for h in rows[0][:2]] != ["ImageID", "Labels"]:
        raise DataError(str(path), 1, "expected the header ImageID,Labels")
    col = {lid: j for j, lid in enumerate(labels.ids)}
    pred = np.zeros((len(rows) - 1, len(labels)), dtype=bool)
    kept = 0
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise DataError(str(path), line, "expected ImageID,Labels")
        for tok in row[1].split():
            try:
                pred[kept, col[int(tok)]] = True
            except (ValueError, KeyError):
                raise DataError(str(path), line, f"label {tok!r} is not one of the run's label ids") from None
        kept += 1
    if kept == 0:
        raise DataError(str(path), None, "no prediction rows")
    return pred[:kept]


def load_report_data(run_dir: Path, *, test_predictions: Path | None = None) -> ReportData:
    """Read and check a run folder's report inputs; only ``val_scores.npz`` is required."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MlcError(f"{run_dir}: no such run folder")
    ids, scores, y_true = _load_val_scores(run_dir / "val_scores.npz")
    c = scores.shape[1]
    notes: list[str] = []

    th_path = run_dir / "thresholds.json"
    if th_path.is_file():
        th = _read_json(th_path)
        labels = LabelSpace.from_ids(th.get("label_ids") or (COCO18.ids if c == len(COCO18) else range(c)))
        thresholds = np.asarray(th.get("per_class") or [th.get("global", 0.5)] * c, dtype=np.float64)
        mode = str(th.get("mode", "?"))
    else:
        notes.append("thresholds.json is missing: every class uses 0.5.")
        labels = COCO18 if c == len(COCO18) else LabelSpace.from_ids(range(c))
        thresholds, mode = np.full(c, 0.5), "fixed (assumed)"
    if len(labels) != c or thresholds.shape != (c,):
        raise MlcError(f"{th_path}: {len(labels)} label ids and {thresholds.size} thresholds for {c} score columns")

    hist_path = run_dir / "history.json"
    history = _normalise_history(_read_json(hist_path), hist_path) if hist_path.is_file() else []
    if not history:
        notes.append("history.json is missing or empty: no training curves.")
    metrics = _read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    if not metrics:
        notes.append("metrics.json is missing: no cross-fitted headline numbers.")
    config = _read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else None

    if test_predictions is not None:
        test_source: Path | None = Path(test_predictions)
        if not test_source.is_file():
            raise MlcError(f"{test_source}: test predictions file not found")
    else:
        test_source = run_dir / "submission.csv" if (run_dir / "submission.csv").is_file() else None
    test_pred = read_predictions(test_source, labels) if test_source is not None else None
    return ReportData(run_dir, labels, ids, scores, y_true, thresholds, mode, history,
                      metrics if isinstance(metrics, dict) else {}, config, test_pred, test_source, notes)


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
    y_pred = apply_thresholds(d.scores, d.thresholds, at_least_one=True) > 0
    pc = per_class(d.y_true, y_pred)
    ap = average_precision_per_class(d.y_true, d.scores)
    key = np.where(pc["support"] > 0, pc["f1"], np.inf)
    order = np.argsort(key, kind="stable")
    missed = (d.y_true & ~y_pred).astype(np.int64)  # (N, C)
    spurious = (y_pred & ~d.y_true).astype(np.int64)
    swaps = missed.T @ spurious  # (C, C); diagonal is 0 since a label cannot be both
    return Analysis(y_pred, pc["precision"], pc["recall"], pc["f1"], pc["support"], ap, order, swaps,
                    samples_f1(d.y_true, y_pred))


def pr_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of one class at every distinct score cut, from (0, 1) on; as sklearn's
    ``precision_recall_curve`` (without importing sklearn, which costs seconds)."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]  # last row of each tie group
    tp = np.cumsum(y_sorted)[ends]
    precision = tp / (ends + 1)
    recall = tp / max(y_sorted.sum(), 1.0)
    return np.r_[1.0, precision], np.r_[0.0, recall]


def class_f1_sweep(y: np.ndarray, s: np.ndarray, grid: np.ndarray = _SWEEP) -> np.ndarray:
    """(C, G) F1 of each class alone when it is predicted at ``score >= grid[g]``."""
    on = s[:, :, None] >= grid[None, None, :]  # (N, C, G)
    tp = (on & y[:, :, None]).sum(0)
    denom = y.sum(0)[:, None] + on.sum(0)
    return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)


def samples_f1_sweep(y: np.ndarray, s: np.ndarray, thr: np.ndarray, grid: np.ndarray = _SWEEP) -> np.ndarray:
    """(C, G) samples-F1 when class j's threshold is ``grid[g]`` and every other class keeps ``thr``.

    Exact for ``apply_thresholds(..., at_least_one=True)``: a row left empty gets the label with the
    largest margin (first column on ties), which may be j or the best of the other columns.
    """
    n, c = s.shape
    margin = s - thr[None, :]  # (N, C)
    n_true = y.sum(1)[:, None]  # (N, 1)
    rows = np.arange(n)
    out = np.empty((c, grid.size))
    for j in range(c):
        others = np.arange(c) != j
        m_o, on_o, y_o = margin[:, others], margin[:, others] >= 0, y[:, others]
        p_o, tp_o = on_o.sum(1)[:, None], (on_o & y_o).sum(1)[:, None]
        if m_o.shape[1]:
            arg = m_o.argmax(1)
            best, y_best = m_o[rows, arg][:, None], y_o[rows, arg][:, None]
            col_best = np.flatnonzero(others)[arg][:, None]  # real column index, for the tie rule
        else:
            best, y_best, col_best = np.full((n, 1), -np.inf), np.zeros((n, 1), bool), np.full((n, 1), c)
        mj = s[:, j, None] - grid[None, :]  # (N, G)
        on_j = mj >= 0
        empty = (p_o == 0) & ~on_j
        force_j = empty & ((mj > best) | ((mj == best) & (j < col_best)))
        force_o = empty & ~force_j
        pick_j = on_j | force_j
        tp = tp_o + (pick_j & y[:, j, None]) + (force_o & y_best)
        denom = n_true + p_o + pick_j + force_o
        out[j] = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0).mean(0)
    return out


# -------------------------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _grid(n: int, *, cols: int = 6, panel: tuple[float, float] = (2.6, 2.2), gap: float = 0.35,
          bottom: float = 0.7, right: float = 0.45) -> tuple[Figure, list[Any]]:
    """A rows x cols grid of shared-axis panels with a fixed layout (inches).

    Constrained layout costs seconds on 18-36 axes; fixed margins, explicit ticks and titles with an
    explicit ``y`` (no auto-placement) keep a grid figure under a second.
    """
    rows, cols = max(1, -(-n // cols)), min(cols, max(n, 1))
    left, top = 0.75, 0.85
    w = left + right + cols * panel[0] + (cols - 1) * gap
    h = top + bottom + rows * panel[1] + (rows - 1) * 0.55
    fig = Figure(figsize=(w, h))
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h,
                        wspace=gap / panel[0], hspace=0.55 / panel[1])
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[max(n - cols, 0):n]:  # bottom panel of each column, also when the last row is short
        ax.xaxis.set_tick_params(labelbottom=True)
    return fig, axes[:n]


def plot_per_class_f1(d: ReportData, a: Analysis) -> Figure:
    """Horizontal bars of per-class F1 at the tuned thresholds, weakest on top, with P / R / support."""
    names = d.labels.names
    order = a.order
    c = len(order)
    fig = Figure(figsize=(11, 0.36 * c + 1.6), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.1)  # breathing room after the monospace columns
    ax = fig.add_subplot()
    y = np.arange(c)
    f1 = a.f1[order]
    cmap = colormaps["RdYlGn"]
    colors = [cmap(0.1 + 0.8 * v) if a.support[j] > 0 else (0.8, 0.8, 0.8, 1) for v, j in zip(f1, order, strict=True)]
    ax.barh(y, f1, color=colors, edgecolor="0.3", linewidth=0.5)
    f1_05 = per_class(d.y_true, apply_thresholds(d.scores, 0.5, at_least_one=True))["f1"][order]
    ax.scatter(f1_05, y, marker="|", s=160, color="black", zorder=3)
    ax.set_yticks(y, [names[j] for j in order])
    ax.invert_yaxis()  # weakest class at the top
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 on held-out images")
    ax.grid(axis="x", alpha=0.3)
    tr = ax.get_yaxis_transform()  # x in axes fraction, y in data
    mono = dict(transform=tr, fontsize=9, family="monospace", va="center")
    ax.text(1.02, -0.9, f"{'F1':>4}  {'P':>4}  {'R':>4}  {'support':>7}  {'thr':>4}", weight="bold", **mono)
    for yi, j in zip(y, order, strict=True):
        txt = (f"{a.f1[j]:4.2f}  {a.precision[j]:4.2f}  {a.recall[j]:4.2f}  {a.support[j]:7d}  {d.thresholds[j]:4.2f}"
               if a.support[j] > 0 else "no positives held out")
        ax.text(1.02, yi, txt, **mono)
    ax.legend([Patch(facecolor="0.75", edgecolor="0.3"), Line2D([], [], color="black", marker="|", ls="", ms=12)],
              ["F1 at the run's thresholds", "F1 at threshold 0.5"], loc="upper right", fontsize=9, framealpha=0.95)
    ax.set_title(f"Per-class F1 on held-out images, weakest first (held-out samples-F1 {a.samples_f1:.4f} "
                 "at these thresholds)", fontsize=11, loc="left")
    return fig


def _panel_title(ax: Any, text: str) -> None:
    ax.set_title(text, fontsize=9.5, y=1.0, pad=4)  # explicit y: no costly auto-placement


def plot_pr_curves(d: ReportData, a: Analysis) -> Figure:
    """One precision-recall panel per class (weakest first), tuned and 0.5 operating points marked."""
    fig, axes = _grid(len(a.order))
    for ax, j in zip(axes, a.order, strict=True):
        name = d.labels.names[j]
        yj, sj = d.y_true[:, j], d.scores[:, j]
        ax.grid(alpha=0.3)
        if a.support[j] == 0:
            _panel_title(ax, f"{name}: no positives")
            continue
        prec, rec = pr_curve(yj, sj)
        ax.plot(rec, prec, color="tab:blue", lw=1.4)
        ax.axhline(yj.mean(), color="0.6", lw=0.9, ls=":")  # a random ranking's precision
        for t, style in ((d.thresholds[j], dict(marker="*", s=120, color="tab:red", zorder=4)),
                         (0.5, dict(marker="o", s=34, facecolors="none", edgecolors="black", zorder=4))):
            on = sj >= t
            if on.any():
                ax.scatter((on & yj).sum() / yj.sum(), (on & yj).sum() / on.sum(), **style)
        _panel_title(ax, f"{name}  AP {a.ap[j]:.2f}  n={a.support[j]}")
    ax0 = axes[0]
    ax0.set_xlim(-0.02, 1.02)
    ax0.set_ylim(-0.02, 1.05)
    ax0.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "", "0.5", "", "1"])
    ax0.set_yticks([0, 0.25, 0.5, 0.75, 1], ["0", "", "0.5", "", "1"])
    for ax in axes:
        ax.tick_params(labelsize=8.5)
    fig.supxlabel("recall", y=0.02)
    fig.supylabel("precision", x=0.01)
    fig.suptitle("Precision-recall per class, weakest F1 first.   red star: tuned threshold,   "
                 "open circle: 0.5,   dotted: share of images with the label", fontsize=11.5)
    return fig


_Y_TOP = 1.02  # the F1 panels' y limit; the zoomed samples-F1 scale spans the same height
_PTS_LO, _PTS_HI = -_ZOOM_POINTS - 0.2, 0.6


def _points_to_y(p: np.ndarray) -> np.ndarray:
    return (np.asarray(p) - _PTS_LO) / (_PTS_HI - _PTS_LO) * _Y_TOP


def _y_to_points(y: np.ndarray) -> np.ndarray:
    return np.asarray(y) / _Y_TOP * (_PTS_HI - _PTS_LO) + _PTS_LO


def plot_f1_vs_threshold(d: ReportData, a: Analysis) -> Figure:
    """Small multiples: class F1 and samples-F1 against each class's threshold."""
    cls_f1 = class_f1_sweep(d.y_true, d.scores)
    smp_f1 = samples_f1_sweep(d.y_true, d.scores, d.thresholds)
    fig, axes = _grid(len(a.order), bottom=1.0, right=0.75)
    cols = min(6, len(a.order))
    for k, (ax, j) in enumerate(zip(axes, a.order, strict=True)):
        ax.plot(_SWEEP, cls_f1[j], color="tab:blue", lw=1.4)
        ax.axvline(d.thresholds[j], color="tab:red", lw=1.3)
        ax.axvline(0.5, color="black", lw=0.9, ls="--")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8.5)
        # samples-F1 moves by a point or two, so it is drawn zoomed: its change in points, mapped onto
        # this panel's height (a secondary axis on the right column gives the scale; no twin axes,
        # which would double the cost of drawing the figure)
        ax.plot(_SWEEP, _points_to_y(100 * (smp_f1[j] - a.samples_f1)), color="tab:orange", lw=1.2)
        if k % cols == cols - 1 or k == len(a.order) - 1:
            sec = ax.secondary_yaxis("right", functions=(_y_to_points, _points_to_y))
            sec.set_yticks([0, -_ZOOM_POINTS / 2, -_ZOOM_POINTS])
            sec.tick_params(labelsize=8.5, colors="tab:orange")
        _panel_title(ax, f"{d.labels.names[j]}   thr {d.thresholds[j]:.2f}")
    ax0 = axes[0]
    ax0.set_xlim(0, 1)
    ax0.set_ylim(0, _Y_TOP)
    ax0.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "", "0.5", "", "1"])
    ax0.set_yticks([0, 0.25, 0.5, 0.75, 1], ["0", "", "0.5", "", "1"])
    handles = [Line2D([], [], color="tab:blue", lw=1.4), Line2D([], [], color="tab:red", lw=1.3),
               Line2D([], [], color="black", lw=0.9, ls="--"), Line2D([], [], color="tab:orange", lw=1.2)]
    fig.legend(handles, ["class F1 (left axis)", "tuned threshold", "0.5",
                         "samples-F1 change in points when only this class's threshold moves (right axis)"],
               loc="lower center", ncols=4, fontsize=9.5, frameon=False, bbox_to_anchor=(0.5, 0.0))
    w, h = fig.get_size_inches()
    fig.text(0.5, 0.55 / h, "threshold of this class", ha="center", fontsize=10.5)
    fig.text(0.15 / w, 0.5, "class F1", rotation=90, va="center", fontsize=10.5, color="tab:blue")
    fig.text(1 - 0.15 / w, 0.5, "samples-F1 change (points)", rotation=-90, va="center", fontsize=10.5,
             color="tab:orange")
    fig.suptitle("F1 against each class's threshold (weakest F1 first)", fontsize=11.5)
    return fig


def _split_history_keys(history: list[list[dict[str, Any]]]) -> tuple[list[str], list[str]]:
    keys: list[str] = []
    for fold in history:
        for e in fold:
            keys += [k for k, v in e.items() if k not in keys and k != "epoch" and isinstance(v, int | float)
                     and not isinstance(v, bool)]
    loss = [k for k in keys if "loss" in k]
    quality = [k for k in keys if k not in loss and any(w in k.lower() for w in ("f1", "map", "ap", "acc"))]
    return loss, quality


def plot_training_curves(d: ReportData) -> Figure:
    """Loss (left) and validation quality (right) per epoch; one colour per fold, best epoch marked."""
    loss_keys, quality_keys = _split_history_keys(d.history)
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    ax_l, ax_q = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    cmap = colormaps["tab10"]
    best = d.metrics.get("best_epochs") or []
    many = len(d.history) > 1
    # one fold: colour = metric; several folds: colour = fold, line style = metric (legend lists each once)
    for f, fold in enumerate(d.history):
        ep = np.array([e["epoch"] for e in fold], dtype=float)
        for ax, keys in ((ax_l, loss_keys), (ax_q, quality_keys)):
            for k_i, k in enumerate(keys):
                vals = np.array([e.get(k, np.nan) for e in fold], dtype=float)
                ax.plot(ep, vals, color=cmap(f % 10) if many else cmap(k_i), ls=styles[k_i % 4] if many else "-",
                        marker="o", ms=3, lw=1.4)
        if f < len(best) and quality_keys:
            b = [e for e in fold if e["epoch"] == best[f]]
            if b and quality_keys[0] in b[0]:
                ax_q.scatter([best[f]], [b[0][quality_keys[0]]], marker="*", s=170, zorder=5, edgecolors="black",
                             color=cmap(f % 10) if many else "tab:red", linewidths=0.5)
    star = Line2D([], [], marker="*", ms=12, ls="", color="tab:red" if not many else "0.6", mec="black", mew=0.5)
    for ax, keys, title, ylab in ((ax_l, loss_keys, "Loss per epoch", "loss"),
                                  (ax_q, quality_keys, "Validation quality per epoch", "score")):
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        if not keys:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="0.5")
            continue
        if many:
            handles = [Line2D([], [], color="0.3", ls=styles[i % 4]) for i in range(len(keys))]
            handles += [Line2D([], [], color=cmap(f % 10), lw=3) for f in range(len(d.history))]
            names = list(keys) + [f"fold {f + 1}" for f in range(len(d.history))]
        else:
            handles = [Line2D([], [], color=cmap(i), marker="o", ms=3) for i in range(len(keys))]
            names = list(keys)
        if ax is ax_q and best:
            handles, names = handles + [star], names + ["best epoch (weights kept)"]
        ax.legend(handles, names, fontsize=8.5, ncols=2 if many else 1,
                  loc="upper right" if ax is ax_l else "lower right")
    return fig


def plot_label_distribution(d: ReportData, a: Analysis) -> Figure:
    """% of images carrying each label: held-out truth, held-out predictions, test predictions."""
    if d.test_pred is None:
        raise ValueError("plot_label_distribution needs test predictions")
    c = len(d.labels)
    series = [("held-out truth (training labels)", d.y_true.mean(0), "tab:blue"),
              ("held-out predictions", a.y_pred.mean(0), "tab:cyan"),
              ("test predictions", d.test_pred.mean(0), "tab:orange")]
    order = np.argsort(-series[0][1], kind="stable")
    fig = Figure(figsize=(10, 0.45 * c + 1.6), layout="constrained")
    ax = fig.add_subplot()
    h = 0.27
    y = np.arange(c)
    for k, (label, freq, color) in enumerate(series):
        pct = 100 * freq[order]
        bars = ax.barh(y + (k - 1) * h, pct, height=h, color=color, label=label)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in pct], fontsize=7, padding=2)
    ax.set_yticks(y, [d.labels.names[j] for j in order])
    ax.invert_yaxis()
    ax.set_xlim(0, 100 * max(f.max() for _, f, _ in series) * 1.12 + 1)
    ax.set_xlabel("% of images with the label")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title(f"Label distribution: {len(d.y_true)} held-out images "
                 f"({d.y_true.sum(1).mean():.2f} labels each, predicted {a.y_pred.sum(1).mean():.2f}) vs "
                 f"{len(d.test_pred)} test images (predicted {d.test_pred.sum(1).mean():.2f})", fontsize=10.5)
    return fig


def confusion_matrix(d: ReportData, a: Analysis) -> np.ndarray:
    """(C, C) rates. Row i = held-out images truly labelled i. Diagonal: recall of i. Off-diagonal
    (i, j): fraction of those images where i was NOT predicted and j was predicted though not true,
    i.e. how often the model said j instead of i."""
    support = np.maximum(a.support, 1)[:, None]
    m = a.swaps / support
    np.fill_diagonal(m, a.recall)
    m[a.support == 0] = np.nan
    return m


def plot_label_confusion(d: ReportData, a: Analysis) -> Figure:
    """Heatmap of :func:`confusion_matrix`: off-diagonal on its own colour scale, diagonal as text."""
    m = confusion_matrix(d, a)
    c = len(d.labels)
    off = m.copy()
    np.fill_diagonal(off, np.nan)
    vmax = max(float(np.nanmax(off)) if np.isfinite(off).any() else 0.0, 0.01)
    fig = Figure(figsize=(0.5 * c + 3.6, 0.5 * c + 1.8), layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["Reds"].with_extremes(bad="0.92")
    im = ax.imshow(off, cmap=cmap, norm=Normalize(0, vmax), aspect="equal")
    names = d.labels.names
    ax.set_xticks(np.arange(c), names, rotation=50, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(np.arange(c), [f"{names[i]} (n={a.support[i]})" for i in range(c)], fontsize=9)
    for i in range(c):
        for j in range(c):
            v = m[i, j]
            if i == j:
                if np.isfinite(v):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8.5, weight="bold",
                            color="tab:green" if v >= 0.7 else "tab:red")
            elif np.isfinite(v) and v >= 0.005:
                ax.text(j, i, f"{100 * v:.0f}" if v >= 0.095 else f"{100 * v:.1f}", ha="center", va="center",
                        fontsize=7, color="white" if v > 0.6 * vmax else "black")
    ax.set_xticks(np.arange(c + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(c + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", lw=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("predicted label j (not true in that image)")
    ax.set_ylabel("true label i (row: held-out images labelled i)")
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("fraction of images of i where i is missed and j is predicted instead")
    cb.ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
    ax.set_title("Which label is predicted instead of a missed true label (% of row's images)\n"
                 "diagonal (bold): recall of the row label", fontsize=10.5)
    return fig


# --------------------------------------------------------------------------------------------- page


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def size_summary(run_dir: Path) -> dict[str, Any]:
    """Bytes needed to predict: the head files alone, and with finetuned encoders when present."""
    head_files = sorted(run_dir.glob("head-*.safetensors")) + [run_dir / n for n in PREDICT_JSON
                                                              if (run_dir / n).is_file()]
    head = sum(f.stat().st_size for f in head_files)
    enc_files: list[Path] = []
    if (run_dir / "image_encoder.safetensors").is_file():
        enc_files.append(run_dir / "image_encoder.safetensors")
    if (run_dir / "text_encoder").is_dir():
        enc_files.append(run_dir / "text_encoder")
    enc = sum(_dir_bytes(p) if p.is_dir() else p.stat().st_size for p in enc_files)
    return {"head_files": [f.name for f in head_files], "head_bytes": head,
            "encoder_files": [f.name + ("/" if f.is_dir() else "") for f in enc_files],
            "encoder_bytes": enc if enc_files else None, "total_bytes": head + enc}


def _fmt_num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, list):
        return ", ".join(_fmt_num(x, digits) for x in v)
    return str(v)


def _mb(b: int) -> str:
    return f"{b / 1e6:.2f} MB"


def _headline_rows(d: ReportData, a: Analysis) -> list[tuple[str, str]]:
    m = d.metrics
    mode = m.get("threshold_mode", d.threshold_mode)
    rows = [
        (f"samples-F1 of the submitted thresholds ({mode})", _fmt_num(m.get("samples_f1"))),
        ("samples-F1 at 0.5", _fmt_num(m.get("samples_f1_at_0.5"))),
        ("samples-F1, one global threshold (cross-fitted)", _fmt_num(m.get("samples_f1_global"))),
        ("samples-F1, per-class thresholds (cross-fitted)", _fmt_num(m.get("samples_f1_per_class"))),
    ]
    detail = m.get("detail_with_final_thresholds_in_sample") or {}
    if isinstance(detail, dict) and detail.get("mAP") is not None:
        rows.append(("mAP (held-out)", _fmt_num(detail["mAP"])))
    rows += [
        ("samples-F1 recomputed here, saved thresholds, in-sample", f"{a.samples_f1:.4f}"),
        ("held-out images", str(len(d.y_true))),
        ("labels per image: true / predicted", f"{d.y_true.sum(1).mean():.2f} / {a.y_pred.sum(1).mean():.2f}"),
    ]
    rows = [r for r in rows if r[1] != "—"]  # metrics.json absent or older: leave its rows out
    if "best_epochs" in m:
        rows.append(("best epoch(s)", _fmt_num(m["best_epochs"])))
    if "seconds" in m:
        rows.append(("training time", f"{_fmt_num(m['seconds'], 1)} s"))
    return rows


def weak_points(d: ReportData, a: Analysis, k: int = 3) -> list[str]:
    """Plain-text findings (HTML-escaped): weakest classes, common swaps, most missed/spurious labels."""
    names = d.labels.names
    out = []
    weakest = [j for j in a.order if a.support[j] > 0][:k]
    for j in weakest:
        p, r = a.precision[j], a.recall[j]
        why = ("mostly <b>missed</b> (recall below precision)" if r < p - 0.05 else
               "mostly <b>spurious</b> (precision below recall)" if p < r - 0.05 else "misses and false alarms alike")
        out.append(f"<b>{html.escape(names[j])}</b>: F1 {a.f1[j]:.3f} on {a.support[j]} images "
                   f"({100 * a.support[j] / len(d.y_true):.1f}% of held-out), precision {p:.3f}, recall {r:.3f}, "
                   f"threshold {d.thresholds[j]:.2f}: {why}.")
    flat = np.argsort(-a.swaps, axis=None, kind="stable")[:5]
    pairs = [(int(i), int(j)) for i, j in zip(*np.unravel_index(flat, a.swaps.shape), strict=True)
             if a.swaps[i, j] > 0]
    if pairs:
        out.append("Most common swaps (true label missed, another predicted instead in the same image): " + "; ".join(
            f"{html.escape(names[i])} &rarr; {html.escape(names[j])} ({a.swaps[i, j]}&times;, "
            f"{100 * a.swaps[i, j] / max(a.support[i], 1):.1f}% of {html.escape(names[i])} images)" for i, j in pairs)
            + ".")
    fn = (d.y_true & ~a.y_pred).sum(0)
    fp = (a.y_pred & ~d.y_true).sum(0)
    out.append("Most missed labels (false negatives): " + ", ".join(
        f"{html.escape(names[j])} {fn[j]}" for j in np.argsort(-fn, kind="stable")[:3] if fn[j] > 0) + "; "
        "most spurious (false positives): " + ", ".join(
        f"{html.escape(names[j])} {fp[j]}" for j in np.argsort(-fp, kind="stable")[:3] if fp[j] > 0) + ".")
    absent = [names[j] for j in range(len(names)) if a.support[j] == 0]
    if absent:
        out.append("No held-out images carry " + ", ".join(f"<b>{html.escape(x)}</b>" for x in absent)
                   + ": not evaluated.")
    none_right = int((~(d.y_true & a.y_pred).any(1)).sum())
    out.append(f"{none_right} held-out images ({100 * none_right / len(d.y_true):.1f}%) get no correct label at all.")
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1250px;
color:#222;padding:0 1em;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ccc;padding:3px 9px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee} .note{color:#8a5a00;background:#fff7e0;padding:4px 8px}
.cap{color:#555;font-size:.92em;max-width:75em} pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:.85em}
"""

_CAPTIONS = {
    "per_class_f1": "Bars: F1 of each class with the saved thresholds and the at-least-one-label rule (exactly "
                    "what a submission predicts), weakest first; black tick: F1 at 0.5. Columns on the right: "
                    "precision, recall, held-out positives, threshold.",
    "pr_curves": "Precision against recall as the class's threshold moves. The red star is where the tuned "
                 "threshold operates (threshold alone, without the at-least-one rule), the open circle is 0.5. "
                 "A curve hugging the top right is a class the features separate well; a low curve is a "
                 "class that more threshold tuning cannot fix.",
    "f1_vs_threshold": "Blue: the class's own F1 as its threshold moves. Orange (right axis, zoomed): the "
                       "competition's samples-F1 when only this class's threshold moves, the others staying at "
                       "their tuned values; the tuner maximises this one, so the red line sits at its peak "
                       "rather than at the blue curve's. A flat top means the threshold is not critical.",
    "training_curves": "Per epoch: training loss (and validation loss when recorded) on the left, validation "
                       "F1 at threshold 0.5 on the right; the star marks the epoch whose weights were kept.",
    "label_distribution": "Share of images carrying each label. Held-out truth vs held-out predictions shows the "
                          "model's own bias; held-out predictions vs test predictions shows how the test set "
                          "differs (or the model behaves differently on it).",
    "label_confusion": "Row i: held-out images whose true labels include i. Diagonal (bold): recall of i. "
                       "Cell (i, j): % of those images where i was <b>not</b> predicted and j <b>was</b> "
                       "predicted although j is not a true label: the model said j instead of i. Rows need not "
                       "sum to 100% (an image can have several wrong labels, or none in place of a miss).",
}

_TITLES = {
    "per_class_f1": "Per-class F1", "pr_curves": "Precision-recall curves",
    "f1_vs_threshold": "F1 against threshold", "training_curves": "Training curves",
    "label_distribution": "Label distribution: training vs test", "label_confusion": "Label confusion",
}


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td class=n>{c}</td>" if i else f"<td>{c}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def render_html(d: ReportData, a: Analysis, plots: dict[str, str | None], seconds: float) -> str:
    """The page; ``plots`` maps plot key -> PNG file name (relative) or a note when it was skipped."""
    esc = html.escape
    name = d.run_dir.resolve().name
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mlc report: {esc(name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>mlc report: {esc(name)}</h1>",
             f"<p class=cap>{esc(str(d.run_dir.resolve()))}; {len(d.labels)} labels; threshold mode "
             f"<b>{esc(d.threshold_mode)}</b>. Page made in {seconds:.1f} s.</p>"]
    parts += [f"<p class=note>{esc(n)}</p>" for n in d.notes]
    parts.append("<h2>Headline</h2>" + _table([(esc(k), esc(v)) for k, v in _headline_rows(d, a)]))
    if d.metrics:
        parts.append("<p class=cap>Cross-fitted numbers (from metrics.json) are honest estimates: thresholds tuned "
                     "on one half of the held-out rows, scored on the other. Every other number on this page uses "
                     "the saved thresholds on the same rows they were tuned on, so it is a little optimistic.</p>")
    parts.append("<h2>Where the model is weak</h2><ul>" + "".join(f"<li>{w}</li>" for w in weak_points(d, a))
                 + "</ul>")
    rows = [(esc(d.labels.names[j]), str(d.labels.ids[j]), str(a.support[j]), f"{a.precision[j]:.3f}",
             f"{a.recall[j]:.3f}", f"{a.f1[j]:.3f}", "—" if np.isnan(a.ap[j]) else f"{a.ap[j]:.3f}",
             f"{d.thresholds[j]:.3f}") for j in a.order]
    parts.append("<details><summary>All classes (weakest first)</summary>"
                 + _table(rows, ["class", "id", "support", "precision", "recall", "F1", "AP", "threshold"])
                 + "</details>")
    for key, title in _TITLES.items():
        parts.append(f"<h2>{esc(title)}</h2>")
        src = plots.get(key)
        if src and src.endswith(".png"):
            parts.append(f"<p class=cap>{_CAPTIONS[key]}</p><img src='{esc(src)}' alt='{esc(title)}'>")
        else:
            parts.append(f"<p class=note>Skipped: {esc(src or 'no data')}</p>")
    sz = size_summary(d.run_dir)
    size_rows = [("head alone: " + ", ".join(sz["head_files"]), _mb(sz["head_bytes"]),
                  f"{100 * sz['head_bytes'] / MODEL_LIMIT_BYTES:.1f}%")]
    if sz["encoder_bytes"] is not None:
        size_rows.append(("head + finetuned encoders (" + ", ".join(sz["encoder_files"]) + ")",
                          _mb(sz["total_bytes"]), f"{100 * sz['total_bytes'] / MODEL_LIMIT_BYTES:.1f}%"))
    verdict = "within" if sz["total_bytes"] <= MODEL_LIMIT_BYTES else "<b>over</b>"
    parts.append("<h2>Size of what predicts</h2>"
                 + _table([(esc(r[0]), r[1], r[2]) for r in size_rows], ["files", "size", "of the 100 MB limit"])
                 + f"<p class=cap>{verdict} the competition's 100 MB limit for a prediction model "
                 "(1 MB = 10<sup>6</sup> bytes)."
                 + ("" if sz["encoder_bytes"] is not None else
                    " This run holds no encoder weights: the pretrained encoders it runs on (see cache.json) "
                    "come from installed packages and are not counted here.") + "</p>")
    if d.config is not None:
        parts.append("<details><summary>config.json</summary><pre>"
                     + esc(json.dumps(d.config, indent=2, sort_keys=True, default=str)) + "</pre></details>")
    if d.test_source is not None:
        parts.append(f"<p class=cap>Test predictions: {esc(str(d.test_source))} ({len(d.test_pred)} rows).</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def make_report(run_dir: Path, *, test_predictions: Path | None = None) -> Path:
    """Write ``run_dir/report/`` (PNG plots + report.html) and return the HTML path."""
    start = time.perf_counter()
    d = load_report_data(Path(run_dir), test_predictions=test_predictions)
    a = analyse(d)
    out = d.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
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
        _save(maker(), target)
        plots[key] = PLOT_FILES[key]
    page = out / "report.html"
    write_text(page, render_html(d, a, plots, time.perf_counter() - start))
    return page
