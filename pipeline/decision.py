"""Decision rules: (N, C) probabilities -> (N, C) 0/1 label sets, chosen by mlc's own cross-fitted scores.

Pure numpy. A rule is a self-describing :class:`Rule` registered in :data:`RULES` (pipeline/registries.py) by
the module that defines it: ``pipeline/rule_<family>.py`` (imported below, so adding one is that one file) or a
module ``$MLC_PLUGINS`` names. What a rule says of itself (summary, what fitting tunes, its simplicity rank,
the numpy source the export's client carries) reaches ``--decision``'s help, the ``auto`` choice, the run's
``decision`` and the export with no edit elsewhere. ``fit_rule(name, y, probs)`` tunes a rule on labelled rows
and returns a :class:`Decision` (the rule's name plus its tuned parameters, JSON-ready) that ``apply``\\ s to
new rows; :func:`decide` applies a saved one.

The rules of the package: ``fixed``, ``global`` and ``per-class`` thresholds (rule_thresholds.py);
``expected-f1`` and ``expected-f1-calibrated``, each image's label set of highest expected F1
(rule_expected_f1.py).

Every rule gives each image at least one label (the competition scores every image). :func:`choose`
scores every candidate *cross-fitted* (tuned on K-1 folds, scored on the fold it did not see), picks the
best, and reports the chosen procedure's own score on rows the choice did not see (nested folds), so the
printed number is not the optimistic maximum.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import samples_f1_per_image
from .registries import Registry, load_plugins

RULES: Registry[Rule] = Registry("decision rule", load=load_plugins)  # $MLC_PLUGINS may register rules


@dataclass(frozen=True)
class Decision:
    """A fitted rule: its registry name and tuned parameters. ``thresholds`` (C,) are every rule's; a rule that
    does not read them (the expected-F1 rules) stores 0.5s, so an old client that applies thresholds stays sane.
    ``params``: a registered rule's own tuned numbers (JSON-ready), kept in export.json's ``decision``."""

    rule: str
    thresholds: tuple[float, ...]
    calibration: tuple[float, float] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) probabilities -> (N, C) uint8 decisions."""
        return decide(probs, self.to_dict())

    @property
    def reads_thresholds(self) -> bool:
        """Whether ``apply`` reads ``thresholds`` (its rule's ``Rule.reads_thresholds``): the expected-F1 rules choose
        a top-k per image instead."""
        return RULES.get_entry(self.rule).reads_thresholds

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "thresholds": [float(t) for t in self.thresholds]}
        if self.calibration is not None:
            out["calibration"] = [float(x) for x in self.calibration]
        if self.params:
            out["params"] = dict(self.params)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        if d.get("rule") not in RULES:
            raise ValueError(f"unknown decision rule {d.get('rule')!r}; known: {', '.join(RULES)}")
        cal = d.get("calibration")
        return cls(d["rule"], tuple(float(t) for t in d["thresholds"]), tuple(cal) if cal else None,
                   dict(d.get("params") or {}))


@dataclass(frozen=True)
class Rule:
    """One decision rule, describing itself. ``fit(y, probs) -> Decision`` tunes it; ``apply(probs, decision)``
    (numpy only: ``decision`` is ``Decision.to_dict()`` as export.json holds it) decides. ``rank``: its
    simplicity, for the one-SE choice (lower: fewer numbers tuned from the rows, preferred when scores tie).
    ``client``: what the export's torch-free client.py carries besides ``apply`` (helper functions, whose source
    is copied, or source text), ``None`` when it cannot carry the rule (such a rule is refused by an ONNX export).
    ``reads_thresholds``: whether ``apply`` decides by the per-label thresholds (shown by ``mlc serve``)."""

    name: str
    summary: str
    fit: Callable[[np.ndarray, np.ndarray], Decision] = field(repr=False)
    apply: Callable[[np.ndarray, dict[str, Any]], np.ndarray] = field(repr=False)
    rank: int
    tuned: tuple[str, ...] = ()  # what fitting sets, for --help and the report
    client: tuple[Callable[..., Any] | str, ...] | None = ()
    reads_thresholds: bool = True

    @property
    def help(self) -> str:
        """The rule in words (export.json's ``decision.help``, ``--decision``'s help)."""
        return self.summary


def register(rule: Rule) -> Rule:
    """Add ``rule`` to :data:`RULES` (a name taken by another rule is refused: ValueError)."""
    return RULES.register()(rule)


def decide(probs: np.ndarray, decision: dict) -> np.ndarray:
    """(N, C) probabilities + a saved decision (``Decision.to_dict()``, export.json's ``decision``) -> (N, C) uint8,
    by the registered rule's ``apply`` (the function the export's client carries)."""
    rule = decision.get("rule")
    if rule not in RULES:
        raise ValueError(f"unknown decision rule {rule!r}; known: {', '.join(RULES)}")
    return RULES[rule].apply(probs, decision)


def rules_help() -> str:
    """One clause per rule, for --decision's help."""
    return "; ".join(f"{name}: {RULES[name].help}" for name in RULES.choices())


def decisions() -> tuple[str, ...]:
    """--decision's choices: auto (chosen by cross-fitted score) and every registered rule."""
    return ("auto", *RULES.choices())


def simplest_first() -> tuple[str, ...]:
    """The rules by simplicity (``Rule.rank``): which one the one-SE choice keeps when scores cannot tell them apart."""
    return tuple(sorted(RULES.choices(), key=lambda k: (RULES[k].rank, k)))


def client_source(name: str) -> str:
    """Numpy source that decides as rule ``name`` does, for the export's client: the rule's helpers, its ``apply``
    and ``apply_decision(probs, decision)``; ValueError when the rule declares none."""
    rule = RULES.get_entry(name)
    if rule.client is None:
        raise ValueError(f"decision rule {name!r} declares no numpy source for the export's client.py")
    parts = [p if isinstance(p, str) else inspect.getsource(p) for p in (*rule.client, rule.apply)]
    return ("\n\n".join(p.strip("\n") for p in parts) + "\n\n\ndef apply_decision(probs, decision):\n"
            f"    \"\"\"export.json's decision rule ({name}), as mlc's decision.decide applies it.\"\"\"\n"
            f"    return {rule.apply.__name__}(probs, decision)\n")


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


def _best(per_image: dict[str, np.ndarray]) -> str:
    """The simplest rule (lowest ``Rule.rank``) whose cross-fitted score is within one standard error of the best's
    (Breiman's one-SE rule): the error of the paired per-image difference, so two rules that differ on a handful of
    images among thousands count as equal, and the one that tuned less from those rows is kept. Unregistered
    names rank last."""
    means = {k: float(v.mean()) for k, v in per_image.items()}
    top = max(means, key=lambda k: means[k])
    n = len(per_image[top])

    def close(k: str) -> bool:
        diff = per_image[top] - per_image[k]
        return means[top] - means[k] <= (float(diff.std(ddof=1)) / np.sqrt(n) if n > 1 else 0.0) + 1e-12

    last = max((r.rank for r in RULES.values()), default=0) + 1
    rank = {k: RULES[k].rank if k in RULES else last for k in per_image}
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


def _import_rule_modules() -> None:
    """A rule family of its own module, ``pipeline/rule_<name>.py``, registers itself when imported: import them
    all, so adding one is that one file."""
    for path in sorted(Path(__file__).parent.glob("rule_*.py")):
        importlib.import_module(f"{__package__}.{path.stem}")


_import_rule_modules()  # last: those modules import Rule, Decision and register from here
