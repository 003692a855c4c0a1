"""The report's HTML page: headline numbers, "where the model is weak", the plots, sizes, config."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..runs import RunDir
from .data import Analysis, ReportData

MODEL_LIMIT_BYTES = 100 * 10**6  # the competition's limit on a prediction model (decimal MB)


def size_summary(run: RunDir) -> dict[str, Any]:
    """Bytes needed to predict: the head files alone, and with finetuned encoders when present."""
    head_files = run.predict_files()
    head = sum(f.stat().st_size for f in head_files)
    enc_dirs = [run.encoder_dir(k) for k in ("image", "text")] if run.has_encoders() else []
    enc = sum(f.stat().st_size for d in enc_dirs for f in d.rglob("*") if f.is_file())
    return {"head_files": [f.name for f in head_files], "head_bytes": head,
            "encoder_files": [f"{d.relative_to(run.path)}/" for d in enc_dirs],
            "encoder_bytes": enc if enc_dirs else None, "total_bytes": head + enc}


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
        (f"samples-F1 of the submitted decision rule ({mode}; scored on rows its choice did not see)",
         _fmt_num(m.get("samples_f1"))),
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
    rows += _decision_rows(m)
    rows = [r for r in rows if r[1] != "—"]  # metrics.json absent or older: leave its rows out
    if "best_epochs" in m:
        rows.append(("best epoch(s)", _fmt_num(m["best_epochs"])))
    if "seconds" in m:
        rows.append(("training time", f"{_fmt_num(m['seconds'], 1)} s"))
    return rows


def _decision_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    """Every decision rule's cross-fitted score (the chosen one marked), and the baselines with their verdict."""
    rows = []
    dec, base = m.get("decision"), m.get("baselines")
    if isinstance(dec, dict):
        how = "forced by --decision" if dec.get("forced") else "chosen: best cross-fitted score"
        for rule, f1 in dec.get("candidates", {}).items():
            mark = f"  ← {how}" if rule == dec.get("rule") else ""
            rows.append((f"decision rule {rule} (cross-fitted)", _fmt_num(f1) + mark))
    if isinstance(base, dict):
        rows.append(("baseline: constant answer, the same label set for every image", _fmt_num(base.get("constant"))))
        rows.append(("baseline: label priors", _fmt_num(base.get("priors"))))
        rows.append(("verdict", "beats both baselines clearly" if base.get("beaten") else
                     f"WARNING: {base.get('verdict')}"))
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
                   f"threshold {d.threshold_text(j)}: {why}.")
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
    "per_class_f1": "Bars: F1 of each class with the run's decision rule and at least one label a photo (exactly "
                    "what a submission predicts), weakest first; black tick: F1 at 0.5. Columns on the right: "
                    "precision, recall, held-out positives, threshold (a dash: the rule reads none).",
    "pr_curves": "Precision against recall as the class's threshold moves. The red star is where the run's own "
                 "decisions operate (its rule, at least one label a photo), the open circle is threshold 0.5. "
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
             d.threshold_text(j, 3)) for j in a.order]
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
    sz = size_summary(d.run)
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
                    " This run holds no encoder weights: the pretrained encoders it runs on  "
                    "come from installed packages and are not counted here (features.json names them).") + "</p>")
    if d.config is not None:
        parts.append("<details><summary>config.json</summary><pre>"
                     + esc(json.dumps(d.config, indent=2, sort_keys=True, default=str)) + "</pre></details>")
    if d.test_source is not None:
        parts.append(f"<p class=cap>Test predictions: {esc(str(d.test_source))} ({len(d.test_pred)} rows).</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
