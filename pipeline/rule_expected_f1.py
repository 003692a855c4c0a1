"""The expected-F1 rules: for each image, the label set that maximises *that image's* expected F1 if its labels
were independent with the given probabilities (Jansche 2007; Ye et al. 2012; Dembczynski et al.'s GFM).

Under independence the optimum is a top-k of the probabilities, with k chosen per image; E[F1] of each top-k is
exact via Poisson-binomial distributions of the true labels inside and outside the top k (``expected_f1_sets``).
``expected-f1`` tunes nothing: it trusts the probabilities' calibration. ``expected-f1-calibrated`` first fits one
logit-affine calibration sigmoid(a * logit(p) + b) on the tuning rows (log-loss), for heads whose loss
(asymmetric loss) bends the probabilities. Ranks (decision.Rule.rank): expected-f1 is the simplest of all rules
(the decision that maximises each image's expected F1, the metric, given the probabilities, nothing tuned; 0.5 is
optimal for per-label accuracy, not F1); the calibration's two numbers rank it between one threshold and one per
label.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .decision import Decision, Rule, register

_CHUNK = 4096  # images per expected-F1 block: keeps the (rows, C+1, C+1) tables to a few MB


def expected_f1_sets(probs: np.ndarray) -> np.ndarray:
    """(N, C) probabilities -> (N, C) uint8: per image, the top-k maximising expected F1 (k >= 1).

    Labels are taken as independent Bernoulli(p_j). For the top-k set, TP ~ PoissonBinomial(top k) and the
    true labels outside it R ~ PoissonBinomial(the rest), independent, so E[F1] = sum_a,b P(TP=a) P(R=b)
    2a / (k + a + b) exactly. Both distributions for every k come from one prefix and one suffix pass.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    n, c = p.shape
    out = np.zeros((n, c), dtype=np.uint8)
    if n == 0 or c == 0:
        return out
    order = np.argsort(-p, axis=1, kind="stable")
    ab = np.arange(c + 1, dtype=np.float64)
    for s in range(0, n, _CHUNK):
        q = np.take_along_axis(p[s:s + _CHUNK], order[s:s + _CHUNK], axis=1)  # (m, C) descending
        m = q.shape[0]
        pre = np.zeros((c + 1, m, c + 1))  # pre[k, i, a] = P(a true labels among image i's top k)
        pre[0, :, 0] = 1.0
        for k in range(1, c + 1):
            qk = q[:, k - 1:k]
            pre[k] = pre[k - 1] * (1.0 - qk)
            pre[k, :, 1:] += pre[k - 1, :, :-1] * qk
        suf = np.zeros((c + 1, m, c + 1))  # suf[k, i, b] = P(b true labels among ranks k+1..C)
        suf[c, :, 0] = 1.0
        for k in range(c - 1, -1, -1):
            qk = q[:, k:k + 1]
            suf[k] = suf[k + 1] * (1.0 - qk)
            suf[k, :, 1:] += suf[k + 1, :, :-1] * qk
        ef1 = np.empty((m, c))
        for k in range(1, c + 1):
            w = 2.0 * ab[:, None] / (k + ab[:, None] + ab[None, :])  # (a, b) F1 of the top-k
            ef1[:, k - 1] = np.einsum("ia,ab,ib->i", pre[k], w, suf[k])
        best_k = ef1.argmax(1) + 1  # the smallest k among exact ties
        on = np.arange(c)[None, :] < best_k[:, None]  # (m, C) in sorted order
        np.put_along_axis(out[s:s + m], order[s:s + m], on.astype(np.uint8), axis=1)
    return out


def fit_calibration(y: np.ndarray, probs: np.ndarray, steps: int = 25) -> tuple[float, float]:
    """(a, b) minimising the log-loss of sigmoid(a * logit(p) + b) over every (image, label): Newton's method."""
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), 1e-7, 1 - 1e-7)
    z, t = np.log(p) - np.log1p(-p), np.asarray(y, dtype=np.float64).ravel()
    a, b = 1.0, 0.0
    for _ in range(steps):
        q = 0.5 + 0.5 * np.tanh(0.5 * (a * z + b))
        g = np.array([np.dot(q - t, z), np.sum(q - t)])
        w = q * (1.0 - q)
        h = np.array([[np.dot(w, z * z), np.dot(w, z)], [np.dot(w, z), w.sum()]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    return float(a), float(b)


def apply_expected_f1(probs, decision):
    """(N, C) probabilities -> (N, C) uint8: calibrate if the decision holds a calibration [a, b], then each
    image's expected-F1 top-k. Numpy only: the export's client carries this source."""
    p = np.asarray(probs, dtype=np.float64)
    if decision.get("calibration"):
        a, b = decision["calibration"]
        z = np.log(np.clip(p, 1e-7, 1 - 1e-7)) - np.log1p(-np.clip(p, 1e-7, 1 - 1e-7))
        p = 0.5 + 0.5 * np.tanh(0.5 * (a * z + b))  # the logistic function, without overflow
    return expected_f1_sets(p)


def _expected_f1(y: np.ndarray, probs: np.ndarray) -> Decision:
    return Decision("expected-f1", (0.5,) * probs.shape[1])


def _expected_f1_calibrated(y: np.ndarray, probs: np.ndarray) -> Decision:
    return Decision("expected-f1-calibrated", (0.5,) * probs.shape[1], fit_calibration(y, probs))


def _rule(name: str, summary: str, fit: Any, rank: int, tuned: tuple[str, ...]) -> Rule:
    return register(Rule(name, summary, fit, apply_expected_f1, rank, tuned,
                         client=(f"_CHUNK = {_CHUNK}", expected_f1_sets), reads_thresholds=False))


_rule("expected-f1", "per image, the top-k labels with the highest expected F1 (labels taken as independent; "
      "nothing tuned)", _expected_f1, 10, ())
_rule("expected-f1-calibrated", "expected-f1 after one logit-affine calibration of the probabilities fitted on the "
      "tuning rows", _expected_f1_calibrated, 40, ("calibration",))
