"""Pseudo-labels for ``mlc run --quality best --pseudo-label``: self-training on the unlabelled (test) rows, kept
out-of-fold-safe.

Round one is the best run's members (K-fold fit-head runs). Round two refits each member with, beside fold k's
labelled training rows, the unlabelled rows its round-one *fold-k* heads are confident about, labelled by them:

- **Fold-safe.** Fold k's pseudo-labels come only from round-one heads that never saw fold k's held-out rows: the
  fold-k heads of the members that share the round-two member's folds (the same rows and seed give the same
  ``kfold`` partition; a member of another seed has other folds, so it teaches only its own seed's members). They
  are blended with weights fitted (greedy ensemble selection, as the blend) on the out-of-fold rows *outside* fold
  k. Pseudo rows only ever join a fold's training side; they are never held out or scored, so round two's held-out
  scores, blend weights and decision rule stay as honest as round one's.
- **Confident rows, hard labels.** A row is kept when every class's teacher probability is ≥ c or ≤ 1 - c
  (``confidence`` c, default 0.75) and at least one class is ≥ c (a labelled row always has a label; an empty
  pseudo row would only teach "nothing"); its targets are 0/1. Whole rows rather than a per-(row, class) loss
  mask: the training loop, the sampler and every loss take rows of 0/1 labels unchanged, and a row the teacher
  is unsure of in one class is likely a hard photo in the others too. Hard rather than soft targets: soft ones
  would copy the teacher's calibration into the student, and the kept rows are those whose soft targets are
  nearly hard anyway. Pseudo rows weigh as much as labelled ones (no extra knob): the confidence decides how many.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import CacheReader
from .ensemble import greedy_weights, mix
from .errors import MlcError
from .fused import load_joined, plan_parts
from .heads import predict_proba
from .log import get
from .runs import RunDir
from .splits import kfold

DEFAULT_CONFIDENCE = 0.75  # bench/pseudo.py: 0.75 and 0.9 within 0.0004 of each other; 0.75 keeps 2/3 of the rows

logger = get(__name__)


@dataclass(frozen=True)
class Unlabelled:
    """Rows without labels, laid out as fit-head lays out the same caches' features: ids, image (U, V, Di), text
    (U, Dt)."""

    ids: list[str]
    image: torch.Tensor
    text: torch.Tensor

    @classmethod
    def load(cls, paths: Sequence[Path], rows: np.ndarray | None = None) -> Unlabelled:
        """The caches at ``paths`` (any split) fused as fit-head fuses them; ``rows``: these rows only."""
        readers = [CacheReader(p) for p in paths]
        ids, image, text = load_joined(readers, plan_parts([r.meta for r in readers]))
        if rows is not None:
            ids, image, text = [ids[i] for i in rows], image[rows], text[rows]
        return cls(list(ids), torch.from_numpy(image), torch.from_numpy(text))

    def join(self, other: Unlabelled) -> Unlabelled:
        """These rows, then ``other``'s (the same features)."""
        clash = set(self.ids) & set(other.ids)
        if clash:
            raise MlcError(f"unlabelled rows given twice: {sorted(clash)[:3]}")
        return Unlabelled(self.ids + other.ids, torch.cat([self.image, other.image]), torch.cat([self.text,
                                                                                                 other.text]))


@dataclass(frozen=True)
class PseudoRows:
    """Unlabelled rows with per-fold targets: fold k's head trains on ``rows`` ``keep[k]`` with ``targets[k]``
    ((len(keep[k]), C) 0/1) beside its labelled training rows."""

    rows: Unlabelled
    keep: list[np.ndarray]
    targets: list[np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What pseudo.json records: rows and labels kept per fold, of how many."""
        return {**self.info, "unlabelled_rows": len(self.rows.ids), "rows_kept": [len(k) for k in self.keep],
                "labels_kept": [int(t.sum()) for t in self.targets]}


def confident(p: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """(kept row indices, their 0/1 targets) of probabilities ``p`` (U, C): rows whose every class is ≥ c or
    ≤ 1 - c, with at least one ≥ c."""
    if not 0.5 < confidence < 1.0:
        raise MlcError(f"pseudo-label confidence must be in (0.5, 1), got {confidence}")
    pos, neg = p >= confidence, p <= 1 - confidence
    keep = np.flatnonzero((pos | neg).all(1) & pos.any(1))
    return keep, pos[keep].astype(np.float32)


def fold_teacher(oof: Sequence[np.ndarray], y: np.ndarray, parts: Sequence[tuple[np.ndarray, np.ndarray]],
                 fold_proba: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Fold k's teacher probabilities on the unlabelled rows: the members' fold-k heads (``fold_proba[m][k]``,
    (U, C)) blended with weights fitted on their out-of-fold probabilities ``oof[m]`` (N, C, rows as ``y``) on
    the rows outside fold k (``parts[k][0]``) only. Nothing in fold k's teacher saw fold k's held-out rows."""
    out = []
    for k, (tr, _) in enumerate(parts):
        w = greedy_weights([o[tr] for o in oof], y[tr]) if len(oof) > 1 else np.ones(1)
        out.append(mix([f[k] for f in fold_proba], w))
    return out


def held_out_in_order(run: RunDir, ids: Sequence[str], parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """A round-one member's out-of-fold probabilities in the order of ``ids``, after checking that its folds are
    ``parts`` (fit-head writes each fold's held-out rows in turn, sorted): else MlcError."""
    held = run.held_out()
    expected = [ids[i] for _, va in parts for i in va]
    if held.ids != expected:
        raise MlcError(f"{run.path}: its folds are not those of the rows and seed it is taught with; refit it")
    pos = {i: k for k, i in enumerate(held.ids)}
    return held.scores[[pos[i] for i in ids]]


@dataclass
class Teacher:
    """Round one as a teacher: ``members`` are (run folder, cache indices, seed) of round one; ``unlabelled(caches)``
    loads the unlabelled rows of those cache indices (fused as fit-head fuses them); ``source``: what names the
    unlabelled rows (recorded, and part of every student's key)."""

    members: Sequence[tuple[Path, tuple[int, ...], int]]
    unlabelled: Callable[[tuple[int, ...]], Unlabelled]
    folds: int
    confidence: float = DEFAULT_CONFIDENCE
    source: Sequence[str] = ()
    _made: dict[tuple[int, int], tuple[list[str], list[np.ndarray]]] = field(default_factory=dict)

    @classmethod
    def of(cls, members: Sequence[Any], out: Path, folds: int, unlabelled: Callable[[tuple[int, ...]], Unlabelled],
           confidence: float = DEFAULT_CONFIDENCE, source: Sequence[str] = ()) -> Teacher:
        """A best run's fitted round-one members (best.Member: name, caches, seed) in OUT/members as the teacher."""
        return cls([(Path(out) / "members" / m.name, tuple(m.caches), m.seed) for m in members], unlabelled, folds,
                   confidence, list(source))

    @staticmethod
    def recorded(run: RunDir) -> dict[str, Any] | None:
        """What a round-two member's pseudo-labels were made from (its pseudo.json less the counts; ``key``), or
        None."""
        try:
            info = run.read_json("pseudo.json")
        except MlcError:
            return None
        return {k: info.get(k) for k in ("teachers", "teacher_digest", "confidence", "unlabelled")}

    def teachers(self, seed: int) -> list[tuple[Path, tuple[int, ...], int]]:
        """The round-one members that share the folds of a member of ``seed`` (the same seed)."""
        same = [m for m in self.members if m[2] == seed]
        if not same:
            raise MlcError(f"no round-one member of seed {seed} to pseudo-label for its folds")
        return same

    def key(self, seed: int) -> dict[str, Any]:
        """What a student's pseudo-labels depend on: its teachers' manifests, the rule, the unlabelled rows."""
        digest = hashlib.sha256()
        for path, _, _ in self.teachers(seed):
            digest.update(RunDir(path).manifest.read_bytes())
        return {"teachers": [p.name for p, _, _ in self.teachers(seed)], "teacher_digest": digest.hexdigest(),
                "confidence": self.confidence, "unlabelled": list(self.source)}

    def fold_targets(self, seed: int, ids: Sequence[str], y: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
        """(unlabelled ids, per-fold teacher probabilities) for members of ``seed`` over labelled rows ``ids``,
        ``y``; made once per seed and rows."""
        made = (seed, hash(tuple(ids)))  # the folds are those of these rows in this order
        if made not in self._made:
            parts = kfold(y, self.folds, seed)  # fit-head's folds for these rows and this seed
            oof, fold_proba, order = [], [], None
            sets: dict[tuple[int, ...], Unlabelled] = {}  # teachers over the same caches read them once, here only:
            for path, caches, _ in self.teachers(seed):  # a test token map (GBs) is not held past this loop
                if caches not in sets:
                    sets[caches] = self.unlabelled(caches)
                run, rows = RunDir(path), sets[caches]
                oof.append(held_out_in_order(run, ids, parts))
                heads = run.load().heads
                if len(heads) != self.folds:
                    raise MlcError(f"{path}: {len(heads)} fold heads, not {self.folds}; refit it")
                order = order or rows.ids
                take = _positions(rows.ids, order, path)
                fold_proba.append([predict_proba(h, rows.image, rows.text).numpy()[take] for h in heads])
            self._made[made] = (order, fold_teacher(oof, np.asarray(y, np.float64), parts, fold_proba))
        return self._made[made]

    def rows(self, seed: int, caches: tuple[int, ...], ids: Sequence[str], y: np.ndarray) -> PseudoRows:
        """A student's pseudo rows: the unlabelled rows of its caches, with each fold's confident targets."""
        order, probs = self.fold_targets(seed, ids, y)
        rows = self.unlabelled(caches)
        take = np.array(_positions(rows.ids, order, "the unlabelled rows"))
        rows = Unlabelled(order, rows.image[take], rows.text[take])
        kept = [confident(p, self.confidence) for p in probs]
        return PseudoRows(rows, [k for k, _ in kept], [t for _, t in kept], self.key(seed))


def _positions(have: Sequence[str], wanted: Sequence[str], what: Any) -> list[int]:
    """Where each of ``wanted`` sits in ``have``: the unlabelled rows of two caches must be the same rows."""
    pos = {i: k for k, i in enumerate(have)}
    missing = [i for i in wanted if i not in pos]
    if missing or len(have) != len(wanted):
        raise MlcError(f"{what}: the unlabelled rows of its caches differ from the others' ({missing[:3]} ...); "
                       "extract every cache from the same test split")
    return [pos[i] for i in wanted]
