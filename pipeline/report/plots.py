"""The report's figures, drawn with matplotlib's object API (``Figure`` + its Agg canvas), never pyplot:
no GUI backend, no global figure registry, and nothing changed for a caller that uses pyplot itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps, ticker
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..atomic import atomic_path
from ..metrics import SWEEP, class_f1_sweep, per_class, pr_curve, samples_f1_sweep
from ..thresholds import apply_thresholds
from .data import Analysis, ReportData, confusion_matrix

DPI = 110
_ZOOM_POINTS = 4.0  # the samples-F1 curves show the top 4 points below the tuned value


def save_png(fig: Figure, path: Path) -> None:
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
        txt = (f"{a.f1[j]:4.2f}  {a.precision[j]:4.2f}  {a.recall[j]:4.2f}  {a.support[j]:7d}  {d.threshold_text(j):>4}"
               if a.support[j] > 0 else "no positives held out")
        ax.text(1.02, yi, txt, **mono)
    ax.legend([Patch(facecolor="0.75", edgecolor="0.3"), Line2D([], [], color="black", marker="|", ls="", ms=12)],
              ["F1 of the run's decisions", "F1 at threshold 0.5"], loc="upper right", fontsize=9, framealpha=0.95)
    ax.set_title(f"Per-class F1 on held-out images, weakest first (held-out samples-F1 {a.samples_f1:.4f} "
                 "with the run's decision rule)", fontsize=11, loc="left")
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
        on = sj >= 0.5
        if on.any():
            ax.scatter((on & yj).sum() / yj.sum(), (on & yj).sum() / on.sum(), marker="o", s=34, facecolors="none",
                       edgecolors="black", zorder=4)
        if a.y_pred[:, j].any():  # where the run's own decisions (its rule, at least one label a photo) operate
            ax.scatter(a.recall[j], a.precision[j], marker="*", s=120, color="tab:red", zorder=5)
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
    fig.suptitle("Precision-recall per class, weakest F1 first.   red star: the run's decisions,   "
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
        ax.plot(SWEEP, cls_f1[j], color="tab:blue", lw=1.4)
        if d.reads_thresholds:
            ax.axvline(d.thresholds[j], color="tab:red", lw=1.3)
        ax.axvline(0.5, color="black", lw=0.9, ls="--")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8.5)
        # samples-F1 moves by a point or two, so it is drawn zoomed: its change in points, mapped onto
        # this panel's height (a secondary axis on the right column gives the scale; no twin axes,
        # which would double the cost of drawing the figure)
        ax.plot(SWEEP, _points_to_y(100 * (smp_f1[j] - a.samples_f1)), color="tab:orange", lw=1.2)
        if k % cols == cols - 1 or k == len(a.order) - 1:
            sec = ax.secondary_yaxis("right", functions=(_y_to_points, _points_to_y))
            sec.set_yticks([0, -_ZOOM_POINTS / 2, -_ZOOM_POINTS])
            sec.tick_params(labelsize=8.5, colors="tab:orange")
        _panel_title(ax, d.labels.names[j] + (f"   thr {d.thresholds[j]:.2f}" if d.reads_thresholds else ""))
    ax0 = axes[0]
    ax0.set_xlim(0, 1)
    ax0.set_ylim(0, _Y_TOP)
    ax0.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "", "0.5", "", "1"])
    ax0.set_yticks([0, 0.25, 0.5, 0.75, 1], ["0", "", "0.5", "", "1"])
    handles = [Line2D([], [], color="tab:blue", lw=1.4), Line2D([], [], color="tab:red", lw=1.3),
               Line2D([], [], color="black", lw=0.9, ls="--"), Line2D([], [], color="tab:orange", lw=1.2)]
    names = ["class F1 (left axis)", "tuned threshold", "0.5",
             "samples-F1 change in points when only this class's threshold moves (right axis)"]
    if not d.reads_thresholds:  # no red line drawn: no key for it
        del handles[1], names[1]
    fig.legend(handles, names,
               loc="lower center", ncols=4, fontsize=9.5, frameon=False, bbox_to_anchor=(0.5, 0.0))
    w, h = fig.get_size_inches()
    fig.text(0.5, 0.55 / h, "threshold of this class", ha="center", fontsize=10.5)
    fig.text(0.15 / w, 0.5, "class F1", rotation=90, va="center", fontsize=10.5, color="tab:blue")
    fig.text(1 - 0.15 / w, 0.5, "samples-F1 change (points)", rotation=-90, va="center", fontsize=10.5,
             color="tab:orange")
    rule = "" if d.reads_thresholds else (f";  the run's rule ({d.decision.rule}) reads no thresholds: this is what "
                                          "one would do" if d.decision else "")
    fig.suptitle(f"F1 against each class's threshold (weakest F1 first){rule}", fontsize=11.5)
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
