"""``mlc run --quality best``: several members fitted over the cached features, blended on their out-of-fold
probabilities into one run folder that submits, predicts and exports like any run.

Members are ordinary fit-head runs in RUN/members/NAME (concat, sum and gated heads over the main cache, an extra
image or text encoder's cache and fused ones, more seeds, and the attention head over the main image encoder's
token maps, whose mean the pooled members then read inside the blend head: one graph), fitted likeliest-first and
each reused when already fitted with the same options over the same features. ``ensemble.choose`` weighs them
(non-negative weights, cross-fitted) or keeps the best member alone when blending does not win, and the run folder
itself holds one ``blend`` head (heads.BlendHead: every member's fold heads, their columns of the fused features and
their weights), the blend's cross-fitted held-out scores and thresholds, and ensemble.json (members, weights, each
one's score and the blend's).
``--time-limit`` stops adding members once the next one would not fit, and blends those already there.

Like workflow.py this module sits above the stages: it chains fit_head; no stage imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import OutputOptions
from .cache import CacheMeta, CacheReader, read_meta
from .ensemble import Blend, choose
from .errors import MlcError
from .fit_head import Features, FitHeadConfig, fit_head, sized
from .folders import sha256_file
from .fused import Part, _identity, plan_parts, token_dim
from .head_blend import BlendHead
from .heads import HEADS
from .heartbeat import announcer
from .log import get
from .pseudo import Teacher
from .runs import Contract, RunDir, RunFiles, feature_entry

logger = get(__name__)


@dataclass(frozen=True)
class Member:
    """One member: a fit-head run over some of the caches (indices into the run's cache list), trained with its
    head's registered recipe (heads: the attention head's), as `mlc run --head` trains it."""

    name: str
    caches: tuple[int, ...]
    head: str = "concat"
    seed: int = 0


def plan(n_caches: int = 1, *, tokens: int | None = None, texts: Sequence[int] = ()) -> list[Member]:
    """The members of a best run, cheapest and likeliest first, so a time limit cuts the least useful ones.

    Caches 0..n_caches-1 hold pooled image vectors (0: the main encoders', 1: an extra image encoder's); ``tokens``:
    the index of the main image encoder's token-map cache (the attention member); ``texts``: those of the caches of
    the main image encoder with an extra text encoder (each fused with cache 0: both captions' vectors)."""

    members = [Member("concat-a", (0,)), Member("gated-a", (0,), "gated"), Member("sum-a", (0,), "sum"),
               Member("concat-a-s1", (0,), seed=1)]
    if n_caches > 1:
        members[1:1] = [Member("concat-b", (1,)), Member("concat-ab", (0, 1))]
        members += [Member("gated-b", (1,), "gated"), Member("gated-ab", (0, 1), "gated")]
    for k, t in enumerate(texts):
        tag = "m" if k == 0 else f"m{k + 1}"
        members.insert(1, Member(f"concat-a{tag}", (0, t)))
        members.append(Member(f"gated-a{tag}", (0, t), "gated"))
    if tokens is not None:  # the most diverse member (where things are), but the slowest: second
        members.insert(1, Member("attention-a", (tokens,), "attention"))
    return members


_say = announcer(logger, "mlc run")


def _layout(union: Sequence[CacheMeta], parts: Sequence[Part], kind: str) -> dict[str, list[int]]:
    """Where each distinct encoder's ``kind`` features sit in the fused features of ``union``: {identity: [start,
    end)} (fit-head's layout: the caches' parts in order)."""
    where, off = {}, 0
    for m, part in zip(union, parts, strict=True):
        dim = m.image_dim if kind == "image" else m.text_dim
        if getattr(part, kind) and dim:
            where[_identity(m, kind)] = [off, off + dim]
            off += dim
    return where


def columns(union: Sequence[CacheMeta], member: Sequence[CacheMeta],
            parts: Sequence[Part] | None = None) -> dict[str, Any]:
    """Where a member's image and text features sit in the fused features of ``union`` (``parts``: what each
    cache feeds; default fit-head's layout: each distinct encoder once, images then texts), as [start, end) ranges
    in the member's own order. Over a token map a pooled member reads the map's mean ("image_input": "mean")."""
    parts = list(parts) if parts is not None else plan_parts(union)
    tok = token_dim(union, parts)
    owner = next((m for m, p in zip(union, parts, strict=True) if p.image and m.image_dim), None)
    out: dict[str, Any] = {"image_input": "features"}
    for kind in ("image", "text"):
        where, ranges = _layout(union, parts, kind), []
        for m, part in zip(member, plan_parts(member), strict=True):
            if not (getattr(part, kind) and (m.image_dim if kind == "image" else m.text_dim)):
                continue
            if kind == "image" and tok and not m.image_preprocess.get("token_dim"):
                if owner is None or m.image_encoder != owner.image_encoder or m.encoder("image").weights_hash != \
                        owner.encoder("image").weights_hash or m.image_dim != tok:
                    raise MlcError(f"a pooled member over {m.image_encoder} cannot read the mean of "
                                   f"{owner.image_encoder if owner else 'no'} token maps")
                ranges.append([0, tok])  # the map's mean over its positions is this encoder's pooled vector
                out["image_input"] = "mean"
            else:
                ranges.append(where[_identity(m, kind)])
        out[f"{kind}_ranges"] = ranges
    return out


@dataclass
class Budget:
    """--time-limit: whether another member fits in what is left, judged by the members fitted so far."""

    limit: float  # seconds; 0: none
    start: float
    spent: list[float]

    def left(self) -> float:
        return self.limit - (time.monotonic() - self.start) if self.limit else float("inf")

    def allows(self, fresh: bool, have: int) -> bool:
        """Whether to fit a member (``fresh``; a reused one costs nothing) when ``have`` are there already: the
        first always (a blend needs one), later ones while the mean member so far still fits in what is left."""
        if not fresh or not self.limit or not have:
            return True
        guess = float(np.mean(self.spent)) if self.spent else 0.0
        return self.left() > guess


def fit_members(members: Sequence[Member], caches: Sequence[Path], out: Path, *, folds: int, time_limit: float = 0.0,
                rows: np.ndarray | None = None, output: OutputOptions | None = None,
                decision: str = "auto", say: Callable[[str], None] = _say, quiet: bool = False,
                teacher: Teacher | None = None, **fit_options: Any) -> list[Member]:
    """Fit (or reuse) each member into OUT/members/NAME; returns the members that are there. ``rows``: fit on these
    rows of the caches only (benchmarks); ``decision``: fit-head's --decision; ``fit_options``: more of fit-head's
    options (e.g. epochs); ``quiet``: without fit-head's own lines (its folds and epochs: the progress within a
    member); ``teacher``: round two of --pseudo-label (each fold also trains on the rows round one's heads of that
    fold label confidently; pseudo.json in the member says which and how many)."""
    from .workflow import _up_to_date  # the one reuse rule of mlc run

    budget, done, loaded = Budget(time_limit, time.monotonic(), []), [], {}
    for i, m in enumerate(members):
        paths = [caches[c] for c in m.caches]
        run = RunDir(out / "members" / m.name)
        cfg = FitHeadConfig.build(caches=tuple(paths), out=run.path, folds=folds, head=m.head, seed=m.seed,
                                  decision=decision, output=output or OutputOptions(),
                                  **{**HEADS.about[m.head].recipe, **fit_options})
        cfg = sized(cfg, len(rows) if rows is not None else read_meta(paths[0]).num_records)  # as config.json holds it
        key = teacher.key(m.seed) if teacher is not None else None
        fresh = not _up_to_date(run, cfg.to_dict(), paths) or (key is not None and Teacher.recorded(run) != key)
        if not budget.allows(fresh, len(done)):
            say(f"time limit: {budget.left():.0f} s left, a member takes about {np.mean(budget.spent):.0f} s; "
                f"stopping at {len(done)} of {len(members)} members")
            break
        if fresh:
            t = time.monotonic()
            eta = f", about {np.mean(budget.spent) * (len(members) - i):.0f} s left" if budget.spent else ""
            say(f"member {i + 1}/{len(members)}: {m.name} ({m.head} over {', '.join(p.name for p in paths)}, "
                f"seed {m.seed}){eta}")
            if tuple(m.caches) not in loaded:
                readers = [CacheReader(p) for p in paths]
                # the subset replaces the whole set at once: a token map (GBs) is not held twice while fitting
                loaded[tuple(m.caches)] = (readers, Features.load(readers) if rows is None else
                               Features.load(readers).subset(rows))
            feats = loaded[tuple(m.caches)][1]
            pseudo = None if teacher is None else teacher.rows(m.seed, m.caches, feats.ids, feats.labels)
            if pseudo is not None:
                say(f"member {m.name}: pseudo-labelled rows per fold {pseudo.summary()['rows_kept']} of "
                    f"{len(pseudo.rows.ids)} unlabelled (confidence {teacher.confidence})")
            fit_head(cfg, loaded=loaded[tuple(m.caches)], quiet=quiet, member_of=out, pseudo=pseudo,
                     extra_json=None if pseudo is None else {"pseudo.json": pseudo.summary()})
            for k in [k for k in loaded if all(tuple(n.caches) != k for n in members[i + 1:])]:
                del loaded[k]  # memory: a token map's features (GBs) are not held past their last member
            budget.spent.append(time.monotonic() - t)
            say(f"member {m.name}: held-out samples-F1 {run.read_metrics()['samples_f1']:.4f} "
                f"({budget.spent[-1]:.0f} s)")
        else:
            say(f"member {i + 1}/{len(members)}: {m.name} up to date; not refitted")
        done.append(m)
    return done


def students(members: Sequence[Member]) -> list[Member]:
    """Round two of --pseudo-label: each member again, named NAME-pl, taught by round one."""
    return [dataclasses.replace(m, name=f"{m.name}-pl") for m in members]


def _aligned(runs: Sequence[RunDir]) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """The members' held-out ids (the first member's order), their probabilities on those rows, and the labels."""
    held = [r.held_out() for r in runs]
    ids = held[0].ids
    probs = []
    for r, h in zip(runs, held, strict=True):
        pos = {i: k for k, i in enumerate(h.ids)}
        if set(pos) != set(ids):
            raise MlcError(f"{r.path}: its held-out rows differ from {runs[0].path}'s; refit the members")
        probs.append(h.scores[[pos[i] for i in ids]])
    return ids, probs, held[0].labels


def _digest(runs: Sequence[RunDir], mode: str) -> str:
    return hashlib.sha256(json.dumps([mode, *[sha256_file(r.manifest) for r in runs]]).encode()).hexdigest()


def blend(members: Sequence[Member], caches: Sequence[Path], out: Path, *, mode: str = "auto", seed: int = 0,
          say: Callable[[str], None] = _say, rounds: dict[str, Sequence[str]] | None = None,
          pseudo: dict[str, Any] | None = None) -> dict[str, Any]:
    """Weigh the members (ensemble.choose) and write OUT as a run folder with one blend head; reused when its
    members and rule are unchanged. Returns ensemble.json's content. ``rounds``: named subsets of the members
    (--pseudo-label's round one and round two) whose own cross-fitted blend scores ensemble.json records beside
    ``pseudo`` (what the pseudo-labels were)."""
    runs = [RunDir(out / "members" / m.name) for m in members]
    digest, rd = _digest(runs, mode), RunDir(out)
    if rd.manifest.is_file() and (out / "ensemble.json").is_file():
        try:
            rd.load()
            old = rd.read_json("ensemble.json")
            if old.get("digest") == digest:
                say(f"{out}: blend up to date (same members); not reweighed")
                return old
        except MlcError:
            pass  # damaged or partial: weigh again
    ids, probs, y = _aligned(runs)
    t = time.monotonic()
    chosen = choose(probs, y, mode, seed)
    names = [m.name for m in members]
    info = {"digest": digest, "mode": mode, **chosen.to_dict(names), "seconds": round(time.monotonic() - t, 2),
            "members": [{"name": m.name, "caches": [caches[c].name for c in m.caches], "head": m.head,
                         "seed": m.seed, "samples_f1": f} for m, f in zip(members, chosen.member_f1, strict=True)]}
    if pseudo is not None:
        info["pseudo"] = pseudo
    if rounds:  # each round's own blend, weighed and scored cross-fitted on the same rows
        info["rounds"] = {label: float(choose([probs[names.index(n)] for n in sub], y, mode, seed).metrics[
            "samples_f1"]) for label, sub in rounds.items()}
    _write(rd, members, runs, caches, chosen, ids, y, info)
    return info


def union(metas: Sequence[CacheMeta]) -> tuple[list[CacheMeta], list[Part]]:
    """The caches the blend head reads and what each feeds it. Without a token map: fit-head's layout (each
    distinct encoder once). With one (an attention member): the map is the one image input (the pooled members read
    its mean) and the other caches feed their caption vectors only, or nothing, so the export stays one graph over
    the same inputs (token map + captions)."""
    tokened = [m for m in metas if m.image_preprocess.get("token_dim")]
    if not tokened:
        return list(metas), plan_parts(metas)
    ordered = [tokened[0], *[m for m in metas if m is not tokened[0]]]
    parts = [Part(True, True), *[Part(False, p.text) for p in plan_parts(ordered)[1:]]]
    kept = [(m, p) for m, p in zip(ordered, parts, strict=True) if p.image or p.text]
    return [m for m, _ in kept], [p for _, p in kept]


def _write(rd: RunDir, members: Sequence[Member], runs: Sequence[RunDir], caches: Sequence[Path], chosen: Blend,
           ids: list[str], y: np.ndarray, info: dict[str, Any]) -> None:
    used = sorted({c for m, w in zip(members, chosen.weights, strict=True) if w > 0 for c in m.caches})
    metas, parts = union([read_meta(caches[c]) for c in used])
    specs, heads = [], []
    for m, r, w in zip(members, runs, chosen.weights, strict=True):
        if w <= 0:
            continue
        loaded = r.load()
        specs.append({"name": m.name, "head": loaded.head_config, "folds": len(loaded.heads), "weight": float(w),
                      **columns(metas, [read_meta(caches[c]) for c in m.caches], parts)})
        heads.append(loaded.heads)
    dims = (sum(m.image_dim for m, p in zip(metas, parts, strict=True) if p.image),
            sum(m.text_dim for m, p in zip(metas, parts, strict=True) if p.text))
    head = BlendHead(image_dim=dims[0], text_dim=dims[1], num_classes=y.shape[1], members=specs,
                     token_dim=token_dim(metas, parts))
    for slot, folds in zip(head.members, heads, strict=True):
        for target, source in zip(slot, folds, strict=True):
            target.load_state_dict(source.state_dict())
    head.eval()
    th = dict(chosen.thresholds, label_ids=list(metas[0].label_ids), label_names=list(metas[0].label_names))
    with rd.writing():
        rd.write(RunFiles(
            kind="head", config={"quality": "best", "members": [m.__dict__ for m in members], "mode": info["mode"],
                                 "pseudo_label": "pseudo" in info},
            features=[feature_entry(Contract.of_cache(m), m.extra.get("recipe", {}), p.to_dict(), m.data_fingerprint)
                      for m, p in zip(metas, parts, strict=True)],
            heads=[head], thresholds=th, metrics=dict(chosen.metrics, ensemble=info["blended"]), history=[],
            val_ids=ids, val_scores=chosen.scores, val_labels=y, log=[json.dumps(info)],
            extra_json={"ensemble.json": info}))
