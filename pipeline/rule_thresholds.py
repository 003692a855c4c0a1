"""The threshold rules: label j where p_j >= t_j (and an image with none gets its label of largest p_j - t_j).

``fixed`` (every t_j = 0.5), ``global`` (one threshold, tuned for samples-F1 exactly: thresholds.tune_global) and
``per-class`` (one per label, coordinate ascent from the global one: thresholds.tune_per_class). Ranks (the
one-SE choice's simplicity, decision.Rule.rank): 0.5 tunes nothing, one threshold is one number, one per label
is the most prone to fit the tuning rows' noise (last of all rules).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .decision import Decision, Rule, register
from .thresholds import tune_global, tune_per_class


def apply_thresholds(probs, decision):
    """(N, C) probabilities -> (N, C) uint8: label j where p_j >= thresholds[j]; an image with none gets the label
    of largest p_j - t_j. Numpy only: the export's client carries this source."""
    p = np.asarray(probs, dtype=np.float64)
    margin = p - np.asarray(decision["thresholds"], dtype=np.float64)
    chosen = margin >= 0
    if chosen.size:
        chosen[np.arange(len(p)), margin.argmax(1)] = True
    return chosen.astype(np.uint8)


def _fixed(y: np.ndarray, probs: np.ndarray) -> Decision:
    return Decision("fixed", (0.5,) * probs.shape[1])


def _global(y: np.ndarray, probs: np.ndarray) -> Decision:
    return Decision("global", (float(tune_global(y, probs)),) * probs.shape[1])


def _per_class(y: np.ndarray, probs: np.ndarray) -> Decision:
    g = tune_global(y, probs)
    t = tune_per_class(y, probs, init=np.full(probs.shape[1], g))
    return Decision("per-class", tuple(float(x) for x in t))


def _rule(name: str, summary: str, fit: Any, rank: int, tuned: tuple[str, ...]) -> Rule:
    return register(Rule(name, summary, fit, apply_thresholds, rank, tuned))


_rule("fixed", "label j where its probability is at least 0.5", _fixed, 20, ())
_rule("global", "one threshold for every label, tuned for samples-F1", _global, 30, ("threshold",))
_rule("per-class", "one threshold per label, tuned for samples-F1 from the global one", _per_class, 50,
      ("thresholds",))
