"""``mlc run --quality best --pseudo-label`` on the shared protocol: each member and each blend with and without
pseudo-labels, side by side.

Round one is best's pooled members (no attention member: it takes ~30 min) over lite0 + MiniLM (`a`) and lite0 +
MPNet (`m`), fitted on ids 0-9999 of the shared competition subset. The unlabelled rows are ids 10000-11999 with
their labels hidden plus the 1,001 test rows (the competition's situation: the scored rows are unlabelled). Round
two refits every member with each fold's confident pseudo-labels from round one's heads of that fold
(pipeline/pseudo.py), once per --confidence. Everything is scored on ids 10000-11999: the members, the blends of
round one, of round two and of both (weights and decision rule fitted on the held-out rows of ids 0-9999 alone).

    .venv/bin/python bench/pseudo.py --cache-dir /work/cache-shared [--out /tmp/pseudo] [--confidence 0.9
        --confidence 0.75] [--reuse /tmp/k28-best]   # copy round-one members fitted elsewhere (refitted if stale)

Prints held-out (cross-fitted) and unseen samples-F1 of each, the pseudo rows kept per fold, and the seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from best import blends, unseen  # noqa: E402

from pipeline.best import Member, fit_members, plan, students  # noqa: E402
from pipeline.cache import CacheReader  # noqa: E402
from pipeline.log import configure  # noqa: E402
from pipeline.pseudo import PseudoRows, Teacher, Unlabelled  # noqa: E402
from pipeline.runs import RunDir  # noqa: E402

A = "comp5329/{}__efficientnet-lite0__minilm-l6.h5"
M = "comp5329/{}__efficientnet-lite0__mpnet-base.h5"


class SoftTeacher(Teacher):
    """--soft: every unlabelled row, with fold k's teacher probabilities as soft targets (the alternative to
    pipeline.pseudo's confident hard rows, measured here only)."""

    def key(self, seed: int) -> dict:
        return {**super().key(seed), "confidence": "soft"}

    def rows(self, seed: int, caches: tuple[int, ...], ids: list[str], y: np.ndarray) -> PseudoRows:
        hard = Teacher.rows(self, seed, caches, ids, y)
        _, probs = self.fold_targets(seed, ids, y)
        every = np.arange(len(hard.rows.ids))
        return PseudoRows(hard.rows, [every] * len(probs), [p.astype(np.float32) for p in probs], self.key(seed))


def smoke(args: argparse.Namespace) -> None:
    """Point ``args`` at tiny caches of generated rows (ids 9984-10007, 4 test rows) under the shared caches' names
    (the `m` cache a copy of `a`), in a scratch folder removed at exit."""
    import atexit
    import tempfile

    from _smoke import named, tiny_cache, tiny_data, tiny_env

    tiny_env()
    tmp = Path(tempfile.mkdtemp(prefix="mlc-pseudo-smoke-"))
    atexit.register(shutil.rmtree, tmp, True)
    data = tiny_data(tmp / "data")
    args.cache_dir, args.out, args.folds, args.confidence, args.soft = tmp / "cache", tmp / "out", 2, [0.51], True
    for split in ("train", "test"):
        cache = tiny_cache(data, tmp / "tiny", split=split)
        for name in (A, M):
            named(cache, args.cache_dir, name.format(split))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("/work/cache-shared"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mlc-pseudo-bench"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--confidence", type=float, action="append", default=[],
                    help="a pseudo-label confidence to measure (repeatable; default 0.75, mlc run's)")
    ap.add_argument("--soft", action="store_true", help="also round two with every unlabelled row and soft targets "
                    "(fold k's teacher probabilities)")
    ap.add_argument("--reuse", type=Path, help="a bench/best.py --out whose members/ to copy as round one")
    ap.add_argument("--smoke", action="store_true", help="tiny random encoders on generated data, 2 folds, "
                    "confidence 0.51: checks that the script runs (its figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        smoke(args)
    configure(0)
    confidences = args.confidence or [0.75]
    train = [args.cache_dir / A.format("train"), args.cache_dir / M.format("train")]
    test = [args.cache_dir / A.format("test"), args.cache_dir / M.format("test")]
    ids = np.array([int(i.split(".")[0]) for i in CacheReader(train[0]).image_ids])
    rows, hidden = np.flatnonzero(ids < 10000), np.flatnonzero(ids >= 10000)
    members = plan(1, texts=[1])
    fit = {"epochs": 2} if args.smoke else {}
    (args.out / "members").mkdir(parents=True, exist_ok=True)
    if args.reuse:
        for m in members:
            src, dst = args.reuse / "members" / m.name, args.out / "members" / m.name
            if src.is_dir() and not dst.exists():
                shutil.copytree(src, dst)
    t0 = time.perf_counter()
    one = fit_members(members, train, args.out, folds=args.folds, rows=rows, quiet=True, **fit)
    print(f"round one: {len(one)} members, {time.perf_counter() - t0:.0f} s", flush=True)

    loaded: dict[tuple[int, ...], Unlabelled] = {}

    def unlabelled(idx: tuple[int, ...]) -> Unlabelled:
        if idx not in loaded:  # ids >= 10000 with their labels hidden, then the test rows
            loaded[idx] = Unlabelled.load([train[c] for c in idx], hidden).join(
                Unlabelled.load([test[c] for c in idx]))
        return loaded[idx]

    for c in confidences + ["soft"] * args.soft:
        out = args.out / (f"c{round(c * 100)}" if c != "soft" else "soft")
        (out / "members").mkdir(parents=True, exist_ok=True)
        for m in one:  # round one's members are the teacher: the same folders under each confidence's run
            if not (out / "members" / m.name).exists():
                shutil.copytree(args.out / "members" / m.name, out / "members" / m.name)
        t = time.perf_counter()
        kind = SoftTeacher if c == "soft" else Teacher
        teach = kind.of(one, out, args.folds, unlabelled, 0.75 if c == "soft" else c,
                        ["ids 10000-11999 (labels hidden)", "test"])
        two = fit_members(students(one), train, out, folds=args.folds, rows=rows, quiet=True, teacher=teach, **fit)
        print(f"round two at confidence {c}: {len(two)} members, {time.perf_counter() - t:.0f} s", flush=True)
        report(one, {c: (out, two)}, train)  # each confidence's figures as soon as they are there


def report(one: list[Member], outs: dict[float, tuple[Path, list[Member]]], caches: list[Path]) -> None:
    """Each member's figures in each round, the pseudo rows kept, and the blends."""
    print(f"\n{'member':18s} {'held-out':>9s} {'unseen':>7s} {'s':>6s}  pseudo rows kept per fold (of unlabelled)")
    first = next(iter(outs.values()))[0] if outs else None
    for m in one:
        for c, (out, _) in [(None, (first, None)), *outs.items()]:
            name = m.name if c is None else f"{m.name}-pl"
            run = RunDir(out / "members" / name)
            _, _, f1 = unseen(run.path, caches)
            kept = "" if c is None else json.dumps({k: v for k, v in run.read_json("pseudo.json").items()
                                                   if k in ("rows_kept", "unlabelled_rows")})
            label = name if c is None else f"{name} @{c}"
            print(f"{label:18s} {run.read_metrics()['samples_f1']:9.4f} {f1:7.4f} "
                  f"{run.read_metrics()['seconds']:6.0f}  {kept}", flush=True)
    for c, (out, two) in outs.items():
        r1, r2 = [m.name for m in one], [m.name for m in two]
        print(f"\nconfidence {c}:")
        blends(out, caches, {"round one": r1, "round two (pseudo)": r2, "both rounds": r1 + r2,
                             "concat-am, both rounds": ["concat-am", "concat-am-pl"]})


if __name__ == "__main__":
    main()
