"""Decision rules: (N, C) probabilities -> (N, C) 0/1 label sets, chosen by mlc's own cross-fitted scores.

Pure numpy. A rule is registered in :data:`RULES` as a self-describing :class:`RuleSpec` (name, help,
the parameters it tunes), in the style of the encoder and head registries, so ``--decision``'s help is
generated from the registry. ``fit_rule(name, y, probs)`` tunes a rule on labelled rows and returns a
:class:`Decision` (the rule's name plus its tuned parameters, JSON-ready) that ``apply``\\ s to new rows.

Rules side by side:

- ``fixed``: label j where p_j >= 0.5.
- ``global``: one threshold for every label, tuned for samples-F1 (thresholds.tune_global, exact).
- ``per-class``: one threshold per label, coordinate ascent from the global one (thresholds.tune_per_class).
- ``expected-f1``: for each image, the label set that maximises *that image's* expected F1 if its labels
  were independent with the given probabilities (Jansche 2007; Ye et al. 2012; Dembczynski et al.'s GFM).
  Under independence the optimum is a top-k of the probabilities, with k chosen per image; E[F1] of each
  top-k is exact via Poisson-binomial distributions of the true labels inside and outside the top k.
  Nothing is tuned; it trusts the probabilities' calibration.
- ``expected-f1-calibrated``: the same, after one logit-affine calibration sigmoid(a * logit(p) + b)
  fitted on the tuning rows (log-loss), for heads whose loss (asymmetric loss) bends the probabilities.

Every rule gives each image at least one label (the competition scores every image). :func:`choose`
scores every candidate *cross-fitted* (tuned on K-1 folds, scored on the fold it did not see), picks the
best, and reports the chosen procedure's own score on rows the choice did not see (nested folds), so the
printed number is not the optimistic maximum. :func:`decide` is the one numpy function that applies a
saved decision; the export's client carries a copy of its source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .metrics import samples_f1_per_image
from .thresholds import tune_global, tune_per_class

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


def decide(probs: np.ndarray, decision: dict) -> np.ndarray:
    """(N, C) probabilities + a saved decision (``Decision.to_dict()``, export.json's ``decision``) -> (N, C) uint8.

    Numpy only, so an exported model's client can carry it. Threshold rules: label j where p_j >= t_j, and an
    image with none gets the label of largest p_j - t_j. Expected-F1 rules: calibrate if a calibration is given,
    then the expected-F1 top-k per image.
    """
    p = np.asarray(probs, dtype=np.float64)
    if decision["rule"].startswith("expected-f1"):
        if decision.get("calibration"):
            a, b = decision["calibration"]
            z = np.log(np.clip(p, 1e-7, 1 - 1e-7)) - np.log1p(-np.clip(p, 1e-7, 1 - 1e-7))
            p = 0.5 + 0.5 * np.tanh(0.5 * (a * z + b))  # the logistic function, without overflow
        return expected_f1_sets(p)
    margin = p - np.asarray(decision["thresholds"], dtype=np.float64)
    chosen = margin >= 0
    if chosen.size:
        chosen[np.arange(len(p)), margin.argmax(1)] = True
    return chosen.astype(np.uint8)


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


@dataclass(frozen=True)
class Decision:
    """A fitted rule: its registry name and tuned parameters. ``thresholds`` (C,) are every rule's; the
    expected-F1 rules do not read them (0.5 there, so an old client that applies thresholds stays sane)."""

    rule: str
    thresholds: tuple[float, ...]
    calibration: tuple[float, float] | None = None

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) probabilities -> (N, C) uint8 decisions."""
        return decide(probs, self.to_dict())

    @property
    def reads_thresholds(self) -> bool:
        """Whether ``apply`` reads ``thresholds``: the expected-F1 rules choose a top-k per image instead."""
        return not self.rule.startswith("expected-f1")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "thresholds": [float(t) for t in self.thresholds]}
        if self.calibration is not None:
            out["calibration"] = [float(x) for x in self.calibration]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        if d.get("rule") not in RULES:
            raise ValueError(f"unknown decision rule {d.get('rule')!r}; known: {', '.join(RULES)}")
        cal = d.get("calibration")
        return cls(d["rule"], tuple(float(t) for t in d["thresholds"]), tuple(cal) if cal else None)


@dataclass(frozen=True)
class RuleSpec:
    """One registered rule: ``fit(y, probs) -> Decision`` and the words that describe it."""

    name: str
    help: str
    tuned: tuple[str, ...]  # what fitting sets, for --help and the report
    fit: Callable[[np.ndarray, np.ndarray], Decision] = field(repr=False)


def _fixed(y: np.ndarray, probs: np.ndarray) -> Decision:
    return Decision("fixed", (0.5,) * probs.shape[1])


def _global(y: np.ndarray, probs: np.ndarray) -> Decision:
    return Decision("global", (float(tune_global(y, probs)),) * probs.shape[1])


def _per_class(y: np.ndarray, probs: np.ndarray) -> Decision:
    g = tune_global(y, probs)
    t = tune_per_class(y, probs, init=np.full(probs.shape[1], g))
    return Decision("per-class", tuple(float(x) for x in t))


def _expected_f1(y: np.ndarray, probs: np.ndarray) -> Decision:
    return Decision("expected-f1", (0.5,) * probs.shape[1])


def _expected_f1_calibrated(y: np.ndarray, probs: np.ndarray) -> Decision:
    return Decision("expected-f1-calibrated", (0.5,) * probs.shape[1], fit_calibration(y, probs))


RULES: dict[str, RuleSpec] = {s.name: s for s in (
    RuleSpec("fixed", "label j where its probability is at least 0.5", (), _fixed),
    RuleSpec("global", "one threshold for every label, tuned for samples-F1", ("threshold",), _global),
    RuleSpec("per-class", "one threshold per label, tuned for samples-F1 from the global one", ("thresholds",),
             _per_class),
    RuleSpec("expected-f1", "per image, the top-k labels with the highest expected F1 (labels taken as "
             "independent; nothing tuned)", (), _expected_f1),
    RuleSpec("expected-f1-calibrated", "expected-f1 after one logit-affine calibration of the probabilities "
             "fitted on the tuning rows", ("calibration",), _expected_f1_calibrated),
)}


def rules_help() -> str:
    """One line per rule, for --decision's help."""
    return "; ".join(f"{s.name}: {s.help}" for s in RULES.values())


def fit_rule(name: str, y: np.ndarray, probs: np.ndarray) -> Decision:
    """Tune rule ``name`` on labelled rows (y (N, C) 0/1, probs (N, C))."""
    if name not in RULES:
        raise ValueError(f"unknown decision rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name].fit(np.asarray(y), np.asarray(probs, dtype=np.float64))


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """(N,) fold of each row: a seeded shuffle dealt round-robin, so folds differ in size by at most one."""
    ids = np.empty(n, dtype=np.int64)
    ids[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return ids


def cross_fitted_predictions(y: np.ndarray, probs: np.ndarray, name: str, folds: int = 5,
                             seed: int = 0) -> np.ndarray:
    """(N, C) uint8: each row decided by rule ``name`` tuned on the other folds (in-sample below 4 rows)."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    n = len(y)
    k = min(folds, n // 2)
    if k < 2:
        return fit_rule(name, y, probs).apply(probs)
    fold = fold_ids(n, k, seed)
    out = np.zeros(probs.shape, dtype=np.uint8)
    for f in range(k):
        held = fold == f
        out[held] = fit_rule(name, y[~held], probs[~held]).apply(probs[held])
    return out


def cross_fitted_per_image(y: np.ndarray, probs: np.ndarray, names: Sequence[str] | None = None, folds: int = 5,
                           seed: int = 0) -> dict[str, np.ndarray]:
    """{rule: (N,) F1 of each row, decided by the rule tuned without its fold}."""
    return {name: samples_f1_per_image(y, cross_fitted_predictions(y, probs, name, folds, seed))
            for name in (names or list(RULES))}


def cross_fitted_scores(y: np.ndarray, probs: np.ndarray, names: Sequence[str] | None = None, folds: int = 5,
                        seed: int = 0) -> dict[str, float]:
    """{rule: samples-F1 over all rows, each row decided by the rule tuned without its fold}."""
    return {name: float(f1.mean()) for name, f1 in cross_fitted_per_image(y, probs, names, folds, seed).items()}


@dataclass(frozen=True)
class Choice:
    """The rule chosen, every candidate's cross-fitted score, and the choice's own score on unseen rows."""

    decision: Decision  # the chosen rule, tuned on all the rows
    scores: dict[str, float]  # cross-fitted samples-F1 of each candidate
    forced: bool  # the user named the rule (--decision); nothing was chosen
    selected_score: float  # choose-then-tune, scored on outer folds it never saw (== scores[rule] when forced)

    @property
    def rule(self) -> str:
        return self.decision.rule

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "forced": self.forced, "candidates": dict(self.scores),
                "selected_score": self.selected_score,
                "note": "candidates: samples-F1 with each rule tuned on the other folds of the held-out rows; "
                        "selected_score: the whole choose-then-tune procedure scored on outer folds it never saw"}


# Which rule wins when the scores cannot tell rules apart: the one that needs the least tuned from the data.
# expected-f1 first: it is the decision that maximises each image's expected F1 (the metric) given the
# probabilities, with nothing tuned; 0.5 is optimal for per-label accuracy, not F1. Then one threshold, a
# calibration (two numbers), and one threshold per label last, the most prone to fit the tuning rows' noise.
SIMPLEST_FIRST = ("expected-f1", "fixed", "global", "expected-f1-calibrated", "per-class")


def _best(per_image: dict[str, np.ndarray]) -> str:
    """The simplest rule whose cross-fitted score is within one standard error of the best's (Breiman's one-SE
    rule): the error of the paired per-image difference, so two rules that differ on a handful of images among
    thousands count as equal, and the one that tuned less from those rows is kept. Unlisted rules rank last."""
    means = {k: float(v.mean()) for k, v in per_image.items()}
    top = max(means, key=lambda k: means[k])
    n = len(per_image[top])

    def close(k: str) -> bool:
        diff = per_image[top] - per_image[k]
        return means[top] - means[k] <= (float(diff.std(ddof=1)) / np.sqrt(n) if n > 1 else 0.0) + 1e-12

    rank = {k: (SIMPLEST_FIRST.index(k) if k in SIMPLEST_FIRST else len(SIMPLEST_FIRST)) for k in per_image}
    return min((k for k in per_image if close(k)), key=lambda k: (rank[k], -means[k]))


def choose(y: np.ndarray, probs: np.ndarray, names: Sequence[str] | None = None, *, force: str | None = None,
           folds: int = 5, seed: int = 0) -> Choice:
    """Score every candidate cross-fitted, pick the best (or ``force``), tune it on all rows.

    ``selected_score`` is nested: for each outer fold the choice is made on the other folds alone (with their
    own inner cross-fit) and the chosen rule, tuned there, scores the outer fold.
    """
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    names = list(names or RULES)
    if force is not None:
        if force not in RULES:
            raise ValueError(f"unknown decision rule {force!r}; known: {', '.join(RULES)}")
        names = [force] if force not in names else names
    per_image = cross_fitted_per_image(y, probs, names, folds, seed)
    scores = {k: float(v.mean()) for k, v in per_image.items()}
    rule = force or _best(per_image)
    selected = scores[rule] if force else _nested_score(y, probs, names, folds, seed)
    return Choice(fit_rule(rule, y, probs), scores, force is not None, selected)


def select_nested(y: np.ndarray, candidates: Sequence[np.ndarray], seed: int = 0,
                  names: Sequence[str] | None = None) -> float:
    """samples-F1 of choosing among ``candidates`` (each (N, C) held-out probabilities of one config, same rows)
    and their rules, scored on rows the choice did not see: the rows are cut in two; on each half the config and
    rule with the best cross-fitted score (2 inner folds) are chosen, tuned there, and scored on the other half."""
    y = np.asarray(y)
    n = len(y)
    if n < 8:
        return float("nan")
    half = fold_ids(n, 2, seed + 2) == 0
    per_image = np.zeros(n)
    for pick in (half, ~half):
        best: tuple[float, int, str] = (-1.0, 0, "fixed")
        for i, probs in enumerate(candidates):
            inner = cross_fitted_per_image(y[pick], np.asarray(probs)[pick], names, 2, seed)
            rule = _best(inner)
            scores = {k: float(v.mean()) for k, v in inner.items()}
            if scores[rule] > best[0]:
                best = (scores[rule], i, rule)
        _, i, rule = best
        fitted = fit_rule(rule, y[pick], np.asarray(candidates[i])[pick])
        per_image[~pick] = samples_f1_per_image(y[~pick], fitted.apply(np.asarray(candidates[i])[~pick]))
    return float(per_image.mean())


def _nested_score(y: np.ndarray, probs: np.ndarray, names: list[str], folds: int, seed: int) -> float:
    n = len(y)
    k = min(folds, n // 4)
    if k < 2:  # too few rows to nest: the in-sample choice's cross-fitted score is all there is
        return max(cross_fitted_scores(y, probs, names, folds, seed).values())
    fold = fold_ids(n, k, seed + 1)
    per_image = np.zeros(n)
    for f in range(k):
        held = fold == f
        inner = cross_fitted_per_image(y[~held], probs[~held], names, min(folds, 3), seed)  # 3: seconds, not tens
        rule = fit_rule(_best(inner), y[~held], probs[~held])
        per_image[held] = samples_f1_per_image(y[held], rule.apply(probs[held]))
    return float(per_image.mean())
