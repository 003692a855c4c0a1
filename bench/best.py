"""``mlc run --quality best`` on the shared protocol: each member, the blend, and the blend under each decision rule.

Every member trains (and tunes its thresholds) on ids 0-9999 of the shared competition subset, the blend's weights
and decision rule are fitted on those rows' out-of-fold probabilities, and everything is scored on ids 10000-11999,
which nothing tuned on. The members and the blend are built by pipeline/best.py, exactly as ``mlc run --quality
best`` builds them (fit_members + blend), over the lite0 + MiniLM cache and (when given) the lite2 + MiniLM one.

    .venv/bin/python bench/best.py --cache-dir /work/cache-shared [--out /tmp/best] [--folds 5] [--no-extra]

Prints each member's held-out (cross-fitted) and unseen samples-F1 and seconds, the blend's, and the peak memory
(ru_maxrss) of the process. Rerunning reuses the members already fitted in --out.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.best import blend, fit_members, plan  # noqa: E402
from pipeline.cache import CacheReader  # noqa: E402
from pipeline.fit_head import Features  # noqa: E402
from pipeline.log import configure  # noqa: E402
from pipeline.metrics import samples_f1  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.runs import RunDir  # noqa: E402

NAME = "comp5329/train__efficientnet-{}__minilm-l6.h5"


def unseen(run: Path, caches: list[Path]) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, probabilities, samples-F1 by the run's own decision rule) of ids 10000-11999 under the run's heads,
    its features joined as it was trained."""
    loaded = RunDir(run).load()
    wanted = {e["contract"]["image_encoder"] for e in loaded.features}
    readers = [CacheReader(c) for c in caches if CacheReader(c).meta.image_encoder in wanted]
    feats = Features.load(readers)
    ids = np.array([int(i.split(".")[0]) for i in feats.ids])
    rows = np.flatnonzero(ids >= 10000)
    model = Predictor.of_run(loaded)
    p = model.from_features(feats.image[rows].numpy(), feats.text[rows].numpy())
    return feats.labels[rows], p, samples_f1(feats.labels[rows], model.decide(p))


def smoke(args: argparse.Namespace) -> None:
    """Point ``args`` at a tiny cache of generated rows (ids 9984-10007) under lite0's cache name, in a scratch
    folder removed at exit."""
    import atexit
    import shutil
    import tempfile

    from _smoke import named, tiny_cache, tiny_data, tiny_env

    tiny_env()
    tmp = Path(tempfile.mkdtemp(prefix="mlc-best-smoke-"))
    atexit.register(shutil.rmtree, tmp, True)
    cache = tiny_cache(tiny_data(tmp / "data"), tmp / "tiny")
    args.cache_dir, args.out, args.folds, args.no_extra = tmp / "cache", tmp / "out", 2, True
    named(cache, args.cache_dir, NAME.format("lite0"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("/work/cache-shared"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mlc-best-bench"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--no-extra", action="store_true", help="lite0 + MiniLM only")
    ap.add_argument("--time-limit", type=float, default=0.0)
    ap.add_argument("--existing", action="store_true", help="blend only the members already fitted in --out "
                    "(fit nothing)")
    ap.add_argument("--only", default="", help="fit only these members (comma-separated names), then stop: to fit "
                    "members in two processes; a run without it reuses them")
    ap.add_argument("--smoke", action="store_true", help="tiny random encoders on generated data, 2 folds, lite0's "
                    "stand-in only: checks that the script runs (its figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        smoke(args)
    configure(0)  # the members' progress lines (mlc logs; the package is silent unless asked)
    caches = [args.cache_dir / NAME.format(e) for e in (("lite0",) if args.no_extra else ("lite0", "lite2"))]
    ids = np.array([int(i.split(".")[0]) for i in CacheReader(caches[0]).image_ids])
    train_rows = np.flatnonzero(ids < 10000)
    (args.out / "members").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    only = set(filter(None, args.only.split(",")))
    wanted = [m for m in plan(len(caches)) if (not only or m.name in only)
              and (not args.existing or RunDir(args.out / "members" / m.name).manifest.is_file())]
    members = fit_members(wanted, caches, args.out,
                          folds=args.folds, time_limit=args.time_limit, rows=train_rows, quiet=True,
                          **({"epochs": 2} if args.smoke else {}))
    if only:
        return
    fit_s = time.perf_counter() - t0
    info = blend(members, caches, args.out)
    blend_s = time.perf_counter() - t0 - fit_s
    mixed = 0.0
    print(f"\n{'member':14s} {'caches':10s} {'held-out':>9s} {'unseen':>7s} {'weight':>7s} {'s':>6s}")
    for m in members:
        y, p, f1 = unseen(args.out / "members" / m.name, caches)
        run = RunDir(args.out / "members" / m.name)
        mixed = mixed + info["weights"][m.name] * p
        print(f"{m.name:14s} {'+'.join('ab'[c] for c in m.caches):10s} {info['member_samples_f1'][m.name]:9.4f} "
              f"{f1:7.4f} {info['weights'][m.name]:7.3f} {run.read_metrics()['seconds']:6.0f}")
    y, p, own = unseen(args.out, caches)
    # the blend head (every member's columns of the fused features) must give the members' weighted mix
    print(f"blend head vs the members' weighted mix: max |diff| {np.abs(p - mixed).max():.2e}")
    print(f"\nblend ({'blended' if info['blended'] else 'best member alone'}): held-out {info['samples_f1']:.4f} "
          f"(cross-fitted weights), unseen {own:.4f} by the run's own rule")
    try:
        from pipeline.decision import choose as choose_rule
        held = RunDir(args.out).held_out()
        choice = choose_rule(held.labels.astype(np.float64), held.scores)
        print(f"decision rule chosen on the held-out rows: {choice.rule} "
              f"(candidates {json.dumps({k: round(v, 4) for k, v in choice.scores.items()})}); "
              f"unseen {samples_f1(y, choice.decision.apply(p)):.4f}")
    except ImportError:
        print("no pipeline.decision (branch i26 not merged): per-class thresholds only")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"members {fit_s:.0f} s, blend {blend_s:.0f} s, peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
