"""Held-out scores -> the numbers a run reports and the thresholds it predicts with.

Honest figures: the tuned-threshold F1 reported is *cross-fitted*: the held-out rows are cut in
two halves, thresholds tuned on one half are scored on the other and vice versa. The thresholds
saved for prediction are tuned on all held-out rows. Shared by ``fit-head`` and ``finetune``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .baselines import MARGIN, baselines, verdict
from .decision import choose
from .metrics import (
    as_binary,
    average_precision_per_class,
    macro_f1,
    mean_average_precision,
    micro_f1,
    per_class,
    samples_f1,
)
from .splits import train_val_split
from .thresholds import apply_thresholds, tune_global, tune_per_class

THRESHOLD_MODES = ("per-class", "global", "fixed")  # the threshold rules of fit_thresholds


def fit_thresholds(y: np.ndarray, scores: np.ndarray, mode: str) -> np.ndarray:
    """(C,) thresholds for ``mode``: fixed 0.5, one global value, or per class from the global one."""
    c = y.shape[1]
    if mode == "fixed":
        return np.full(c, 0.5, np.float32)
    g = tune_global(y, scores)
    if mode == "global":
        return np.full(c, g, np.float32)
    return np.asarray(tune_per_class(y, scores, init=np.full(c, g)), np.float32)


def cross_fitted_f1(y: np.ndarray, scores: np.ndarray, mode: str, seed: int) -> float:
    """Samples-F1 with thresholds tuned on one half of the rows and scored on the other (both ways)."""
    if mode == "fixed":
        return samples_f1(y, apply_thresholds(scores, 0.5))
    a, b = train_val_split(y, 0.5, seed)
    f1s, n = 0.0, 0
    for tune, score in ((a, b), (b, a)):
        t = fit_thresholds(y[tune], scores[tune], mode)
        f1s += samples_f1(y[score], apply_thresholds(scores[score], t)) * len(score)
        n += len(score)
    return f1s / n


def evaluate(y: np.ndarray, scores: np.ndarray, decision: str, seed: int) -> tuple[dict, dict]:
    """Held-out (y, scores) -> (metrics, thresholds.json's content), both JSON-ready.

    Every decision rule (decision.RULES) is scored cross-fitted on the held-out rows and the best is chosen
    (``decision`` "auto"), or ``decision`` names the rule. ``samples_f1`` is the chosen procedure's score on
    rows the choice did not see (nested folds), not the best candidate's. The baselines (constant answer,
    label priors) are scored on the same rows. The chosen rule is tuned on all held-out rows for prediction.
    """
    choice = choose(y, scores, force=None if decision == "auto" else decision, seed=seed)
    cand = choice.scores
    base = baselines(y, seed=seed)
    note = verdict(choice.selected_score, base)
    metrics = {
        "samples_f1": choice.selected_score,
        "samples_f1_at_0.5": cand.get("fixed", samples_f1(y, apply_thresholds(scores, 0.5))),
        "samples_f1_global": cand.get("global"),
        "samples_f1_per_class": cand.get("per-class"),
        "threshold_mode": choice.rule,
        "decision": choice.to_dict(),
        "baselines": {**base, "margin": MARGIN, "beaten": note is None, "verdict": note},
        "held_out_rows": int(len(y)),
        "note": "decision rules scored cross-fitted: each tuned on 4/5 of the held-out rows and scored on the "
                "fifth; samples_f1 is the choice of rule itself scored on rows it did not see (nested)",
    }
    t_final = np.asarray(choice.decision.thresholds)
    # a rule that does not read thresholds (expected-F1) is summarised by its own decisions, per class too
    decided = None if choice.decision.reads_thresholds else choice.decision.apply(scores)
    metrics["detail_with_final_thresholds_in_sample"] = summarize(y, scores, t_final, y_pred=decided)
    thresholds = {"mode": choice.rule, "global": float(tune_global(y, scores)), "per_class": t_final.tolist(),
                  "decision": choice.decision.to_dict()}
    return to_jsonable(metrics), thresholds


def _json_float(x: float) -> float | None:
    """NaN -> None, so metrics.json stays strict JSON."""
    return None if math.isnan(x) else float(x)


def summarize(y_true: np.ndarray, scores: np.ndarray, thresholds: float | np.ndarray, *, at_least_one: bool = True,
              names: Sequence[str] | None = None, y_pred: np.ndarray | None = None) -> dict[str, Any]:
    """Every metric for one (y_true, scores, thresholds) triple, as a JSON-ready dict (metrics.json).

    Predictions are ``apply_thresholds(scores, thresholds, at_least_one=at_least_one)``, exactly what
    a submission would contain, or ``y_pred`` when given (a rule that does not decide by thresholds: its
    per-class ``threshold`` entries are then None). Per-class entries are lists in column order; ``ap`` is
    None for a class with no positives (it is left out of ``mAP``).
    """
    by_threshold = y_pred is None
    if y_pred is None:
        y_pred = apply_thresholds(scores, thresholds, at_least_one=at_least_one)
    t = as_binary(y_true, "y_true")
    pc = per_class(t, y_pred)
    ap = average_precision_per_class(t, scores)
    c = t.shape[1]
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (c,))
    if names is not None and len(names) != c:
        raise ValueError(f"{len(names)} names for {c} classes")
    out: dict[str, Any] = {
        "n_images": int(t.shape[0]),
        "at_least_one": bool(at_least_one),
        "samples_f1": _json_float(samples_f1(t, y_pred)),
        "micro_f1": _json_float(micro_f1(t, y_pred)),
        "macro_f1": _json_float(macro_f1(t, y_pred)),
        "mAP": _json_float(mean_average_precision(t, scores)),
        "mean_true_labels": _json_float(float(t.sum(1).mean()) if t.size else float("nan")),
        "mean_pred_labels": _json_float(float(y_pred.sum(1).mean()) if y_pred.size else float("nan")),
        "per_class": {
            "threshold": [float(x) if by_threshold else None for x in thr],
            "precision": [float(x) for x in pc["precision"]],
            "recall": [float(x) for x in pc["recall"]],
            "f1": [float(x) for x in pc["f1"]],
            "support": [int(x) for x in pc["support"]],
            "ap": [_json_float(float(x)) for x in ap],
        },
    }
    if names is not None:
        out["per_class"]["name"] = [str(n) for n in names]
    return out


def to_jsonable(obj: Any) -> Any:
    """numpy scalars/arrays inside dicts and lists -> plain Python, for json.dumps."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
