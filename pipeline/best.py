"""``mlc run --quality best``: several members fitted over the cached features, blended on their out-of-fold
probabilities into one run folder that submits, predicts and exports like any run.

Members are ordinary fit-head runs in RUN/members/NAME (concat, sum and gated heads over the main cache, an extra
image encoder's cache and both fused, and more seeds), fitted cheapest-first and each reused when already fitted
with the same options over the same features. ``ensemble.choose`` weighs them (non-negative weights, cross-fitted)
or keeps the best member alone when blending does not win, and the run folder itself holds one ``blend`` head
(heads.BlendHead: every member's fold heads, their columns of the fused features and their weights), the blend's
cross-fitted held-out scores and thresholds, and ensemble.json (members, weights, each one's score and the blend's).
``--time-limit`` stops adding members once the next one would not fit, and blends those already there.

Like workflow.py this module sits above the stages: it chains fit_head; no stage imports it.
"""

from __future__ import annotations

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
from .fused import _identity, plan_parts
from .head_blend import BlendHead
from .heartbeat import stage
from .log import get
from .runs import Contract, RunDir, RunFiles, feature_entry

# The image encoder a best run adds beside the main one (its own resolution, its own cache).
EXTRA_IMAGE = {"efficientnet-lite0": "efficientnet-lite2"}

logger = get(__name__)


@dataclass(frozen=True)
class Member:
    """One member: a fit-head run over some of the caches (indices into the run's cache list)."""

    name: str
    caches: tuple[int, ...]
    head: str = "concat"
    seed: int = 0


def plan(n_caches: int) -> list[Member]:
    """The members of a best run over ``n_caches`` caches (the main one first), cheapest and likeliest first, so a
    time limit cuts the least useful ones."""
    members = [Member("concat-a", (0,)), Member("gated-a", (0,), "gated"), Member("sum-a", (0,), "sum"),
               Member("concat-a-s1", (0,), seed=1)]
    if n_caches > 1:
        members[1:1] = [Member("concat-b", (1,)), Member("concat-ab", (0, 1))]
        members += [Member("gated-b", (1,), "gated"), Member("gated-ab", (0, 1), "gated")]
    return members


def _say(msg: str) -> None:
    logger.info(f"[mlc run] {msg}")
    stage(msg)  # what the CLI's heartbeat says while this step is quiet


def columns(union: Sequence[CacheMeta], member: Sequence[CacheMeta]) -> dict[str, list[list[int]]]:
    """Where a member's image and text features sit in the fused features of ``union`` (fit-head's layout: each
    distinct encoder once, images then texts), as [start, end) ranges in the member's own order."""
    out: dict[str, list[list[int]]] = {}
    for kind in ("image", "text"):
        where, off = {}, 0
        for m, part in zip(union, plan_parts(union), strict=True):
            dim = m.image_dim if kind == "image" else m.text_dim
            if getattr(part, kind) and dim:
                where[_identity(m, kind)] = [off, off + dim]
                off += dim
        out[f"{kind}_ranges"] = [where[_identity(m, kind)] for m, part in zip(member, plan_parts(member), strict=True)
                                 if getattr(part, kind) and (m.image_dim if kind == "image" else m.text_dim)]
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
                **fit_options: Any) -> list[Member]:
    """Fit (or reuse) each member into OUT/members/NAME; returns the members that are there. ``rows``: fit on these
    rows of the caches only (benchmarks); ``decision``: fit-head's --decision; ``fit_options``: more of fit-head's
    options (e.g. epochs); ``quiet``: without fit-head's own lines (its folds and epochs: the progress within a
    member)."""
    from .workflow import _up_to_date  # the one reuse rule of mlc run

    budget, done, loaded = Budget(time_limit, time.monotonic(), []), [], {}
    for i, m in enumerate(members):
        paths = [caches[c] for c in m.caches]
        run = RunDir(out / "members" / m.name)
        cfg = FitHeadConfig.build(caches=tuple(paths), out=run.path, folds=folds, head=m.head, seed=m.seed,
                                  decision=decision, output=output or OutputOptions(), **fit_options)
        cfg = sized(cfg, len(rows) if rows is not None else read_meta(paths[0]).num_records)  # as config.json holds it
        fresh = not _up_to_date(run, cfg.to_dict(), paths)
        if not budget.allows(fresh, len(done)):
            say(f"time limit: {budget.left():.0f} s left, a member takes about {np.mean(budget.spent):.0f} s; "
                f"stopping at {len(done)} of {len(members)} members")
            break
        if fresh:
            t = time.monotonic()
            eta = f", about {np.mean(budget.spent) * (len(members) - i):.0f} s left" if budget.spent else ""
            say(f"member {i + 1}/{len(members)}: {m.name} ({m.head} over {', '.join(p.name for p in paths)}, "
                f"seed {m.seed}){eta}")
            key = tuple(m.caches)
            if key not in loaded:
                readers = [CacheReader(p) for p in paths]
                feats = Features.load(readers)
                loaded[key] = (readers, feats if rows is None else feats.subset(rows))
            fit_head(cfg, loaded=loaded[key], quiet=quiet, member_of=out)
            budget.spent.append(time.monotonic() - t)
            say(f"member {m.name}: held-out samples-F1 {run.read_metrics()['samples_f1']:.4f} "
                f"({budget.spent[-1]:.0f} s)")
        else:
            say(f"member {i + 1}/{len(members)}: {m.name} up to date; not refitted")
        done.append(m)
    return done


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
          say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Weigh the members (ensemble.choose) and write OUT as a run folder with one blend head; reused when its
    members and rule are unchanged. Returns ensemble.json's content."""
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
    _write(rd, members, runs, caches, chosen, ids, y, info)
    return info


def _write(rd: RunDir, members: Sequence[Member], runs: Sequence[RunDir], caches: Sequence[Path], chosen: Blend,
           ids: list[str], y: np.ndarray, info: dict[str, Any]) -> None:
    used = sorted({c for m, w in zip(members, chosen.weights, strict=True) if w > 0 for c in m.caches})
    metas = [read_meta(caches[c]) for c in used]
    specs, heads = [], []
    for m, r, w in zip(members, runs, chosen.weights, strict=True):
        if w <= 0:
            continue
        loaded = r.load()
        specs.append({"name": m.name, "head": loaded.head_config, "folds": len(loaded.heads), "weight": float(w),
                      **columns(metas, [read_meta(caches[c]) for c in m.caches])})
        heads.append(loaded.heads)
    parts = plan_parts(metas)
    dims = (sum(m.image_dim for m, p in zip(metas, parts, strict=True) if p.image),
            sum(m.text_dim for m, p in zip(metas, parts, strict=True) if p.text))
    head = BlendHead(image_dim=dims[0], text_dim=dims[1], num_classes=y.shape[1], members=specs)
    for slot, folds in zip(head.members, heads, strict=True):
        for target, source in zip(slot, folds, strict=True):
            target.load_state_dict(source.state_dict())
    head.eval()
    th = dict(chosen.thresholds, label_ids=list(metas[0].label_ids), label_names=list(metas[0].label_names))
    with rd.writing():
        rd.write(RunFiles(
            kind="head", config={"quality": "best", "members": [m.__dict__ for m in members], "mode": info["mode"]},
            features=[feature_entry(Contract.of_cache(m), m.extra.get("recipe", {}), p.to_dict(), m.data_fingerprint)
                      for m, p in zip(metas, parts, strict=True)],
            heads=[head], thresholds=th, metrics=dict(chosen.metrics, ensemble=info["blended"]), history=[],
            val_ids=ids, val_scores=chosen.scores, val_labels=y, log=[json.dumps(info)],
            extra_json={"ensemble.json": info}))


def extra_image(cfg: Any) -> str | None:
    """The image encoder of a best run's second cache, or None."""
    name = cfg.extra_image_encoder
    if name == "auto":
        return EXTRA_IMAGE.get(cfg.encoders.image_encoder)
    return None if name == "none" or name == cfg.encoders.image_encoder else name


def best_route(cfg: Any, train: list[Path], test: Path) -> dict[str, Any]:
    """``mlc run --quality best`` after the main caches are there (cfg: workflow.RunConfig): the extra image
    encoder's train cache, the members, the blend in cfg.out. Returns ensemble.json's content."""
    from .extract import ExtractConfig, extract

    caches = list(train)
    extra = extra_image(cfg)
    if extra is not None:
        _say(f"extracting the second image encoder's features ({extra}; reused when already there)")
        enc = cfg.encoders.replace(image_encoder=extra, image_weights=None)
        caches += extract(ExtractConfig(data_dir=cfg.data_dir, splits=("train",), cache_dir=cfg.cache_dir,
                                        overwrite=cfg.overwrite, encoders=enc, numerics=cfg.numerics,
                                        loader=cfg.loader, data=cfg.data))
    members = plan(len(caches))
    (cfg.out / "members").mkdir(parents=True, exist_ok=True)
    _say(f"fitting up to {len(members)} members ({cfg.folds} folds each)"
         + (f" within {cfg.time_limit:.0f} s" if cfg.time_limit else ""))
    done = fit_members(members, caches, cfg.out, folds=cfg.folds, time_limit=cfg.time_limit, output=cfg.output,
                       decision=cfg.decision)
    info = blend(done, caches, cfg.out, mode=cfg.decision, seed=0)
    _say(f"blend of {len(done)} members: cross-fitted samples-F1 {info['blend_samples_f1']:.4f}, best member "
         f"{max(info['member_samples_f1'].values()):.4f}; "
         + ("blended" if info["blended"] else "the best member alone scored at least as well: kept alone"))
    return info
