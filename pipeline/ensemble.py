"""Blending members' out-of-fold probabilities (``mlc run --quality best``): pure numpy, no torch.

The weights are non-negative and sum to 1, found by greedy ensemble selection with replacement (Caruana et al.
2004): start from the member of lowest log-loss, then repeatedly add the member whose addition lowers the blend's
log-loss most. Log-loss, not samples-F1, drives the search: it is smooth, needs no threshold tuning per step, and
F1's thresholds are tuned afterwards on the blend anyway. The blend's own score is cross-fitted: the weights are
fitted on K-1 folds of the out-of-fold rows and applied to the K-th, so every blended row comes from weights that
never saw it; its thresholds are then tuned and scored cross-fitted like any member's (``evaluation.evaluate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .evaluation import evaluate
from .splits import kfold

EPS = 1e-6


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``p`` (N, C) against 0/1 ``y`` (N, C)."""
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def greedy_weights(probs: Sequence[np.ndarray], y: np.ndarray, steps: int = 25) -> np.ndarray:
    """(M,) non-negative weights summing to 1 over the members' probabilities (each (N, C)): ensemble selection
    with replacement, ``steps`` picks, stopping early when no pick lowers the log-loss."""
    m = len(probs)
    losses = [log_loss(y, p) for p in probs]
    counts = np.zeros(m)
    counts[int(np.argmin(losses))] = 1
    blend, best = probs[int(np.argmin(losses))].astype(np.float64), min(losses)
    for _ in range(steps - 1):
        n = counts.sum()
        trial = [log_loss(y, (blend * n + p) / (n + 1)) for p in probs]
        j = int(np.argmin(trial))
        if trial[j] >= best - 1e-9:
            break
        counts[j] += 1
        blend, best = (blend * n + probs[j]) / (n + 1), trial[j]
    return counts / counts.sum()


def mix(probs: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The weighted sum of the members' probabilities."""
    return np.sum([w * p for w, p in zip(weights, probs, strict=True) if w > 0], axis=0)


def cross_fitted_blend(probs: Sequence[np.ndarray], y: np.ndarray, folds: int = 5, seed: int = 0,
                       parts: Sequence[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """(N, C) blended probabilities where each row's weights were fitted on the other folds' rows only (``parts``:
    the folds as (fit rows, blended rows); stratified k folds of ``y`` by default)."""
    out = np.zeros_like(probs[0], dtype=np.float64)
    for tr, va in parts if parts is not None else kfold(y, folds, seed):
        w = greedy_weights([p[tr] for p in probs], y[tr])
        out[va] = mix([p[va] for p in probs], w)
    return out


@dataclass(frozen=True)
class Blend:
    """What the blend decided: the weights (one-hot on the best member when blending did not win), the blended
    held-out probabilities (cross-fitted), each member's score and the blend's, all on the same rows."""

    weights: np.ndarray
    scores: np.ndarray  # (N, C): cross-fitted blend, or the best member's own out-of-fold probabilities
    metrics: dict[str, Any]
    thresholds: dict[str, Any]
    member_f1: list[float]
    blend_f1: float
    blended: bool  # False: a member alone scored at least as well as the cross-fitted blend

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        return {"weights": {n: float(w) for n, w in zip(names, self.weights, strict=True)},
                "member_samples_f1": {n: f for n, f in zip(names, self.member_f1, strict=True)},
                "blend_samples_f1": self.blend_f1, "blended": self.blended,
                "samples_f1": self.metrics["samples_f1"]}


def choose(probs: Sequence[np.ndarray], y: np.ndarray, mode: str = "auto", seed: int = 0,
           folds: int = 5) -> Blend:
    """Blend the members' out-of-fold probabilities, or keep the best member: whichever scores higher cross-fitted
    on these rows (so the result is never worse than its best member here). ``mode``: the decision rule
    (evaluation.evaluate: "auto" chooses one by cross-fitted score, for each member and for the blend). Weights for
    prediction are fitted on all the rows."""
    y = np.asarray(y, np.float64)
    member = [evaluate(y, p, mode, seed) for p in probs]
    member_f1 = [float(m["samples_f1"]) for m, _ in member]
    best = int(np.argmax(member_f1))
    if len(probs) == 1:
        return Blend(np.ones(1), probs[0], *member[0], member_f1, member_f1[0], False)
    crossed = cross_fitted_blend(probs, y, folds, seed)
    metrics, th = evaluate(y, crossed, mode, seed)
    blend_f1 = float(metrics["samples_f1"])
    if blend_f1 <= member_f1[best]:
        return Blend(np.eye(len(probs))[best], probs[best], *member[best], member_f1, blend_f1, False)
    return Blend(greedy_weights(probs, y), crossed, metrics, th, member_f1, blend_f1, True)
