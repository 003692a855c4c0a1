"""``mlc run --quality best`` on the shared protocol: each member, the blend, and the blend under each decision rule.

Every member trains (and tunes its thresholds) on ids 0-9999 of the shared competition subset, the blend's weights
and decision rule are fitted on those rows' out-of-fold probabilities, and everything is scored on ids 10000-11999,
which nothing tuned on. The members and the blend are built by pipeline/best.py, exactly as ``mlc run --quality
best`` builds them (fit_members + blend), over the lite0 + MiniLM cache and (when given) the lite2 + MiniLM one.

    .venv/bin/python bench/best.py --cache-dir /work/cache-shared [--out /tmp/best] [--folds 5] [--no-extra]
        [--tokens] [--text-cache CACHE]   # the attention member over lite0's token maps; MPNet's caption members

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
from pipeline.fused import Part, load_joined  # noqa: E402
from pipeline.log import configure  # noqa: E402
from pipeline.metrics import samples_f1  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.runs import Contract, RunDir  # noqa: E402

NAME = "comp5329/train__efficientnet-{}__minilm-l6.h5"
TOKENS = "comp5329/train__efficientnet-lite0__minilm-l6__img-tokens.h5"


def unseen(run: Path, caches: list[Path]) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, probabilities, samples-F1 by the run's own decision rule) of ids 10000-11999 under the run's heads,
    its features joined as it was trained (features.json: which caches, and what each one feeds)."""
    loaded = RunDir(run).load()
    metas = {c: CacheReader(c).meta for c in caches}
    paths = [next(c for c, m in metas.items() if Contract.of_cache(m) == Contract.from_dict(e.contract))
             for e in loaded.entries]
    readers = [CacheReader(c) for c in paths]
    ids, image, text = load_joined(readers, [Part.of(e) for e in loaded.entries])
    rows = np.flatnonzero(np.array([int(i.split(".")[0]) for i in ids]) >= 10000)
    labels = readers[0].labels()[rows]
    model = Predictor.of_run(loaded)
    p = model.from_features(image[rows], text[rows])
    del image
    return labels, p, samples_f1(labels, model.decide(p))


def blends(out: Path, caches: list[Path], sets: dict[str, list[str]]) -> None:
    """Each named set of members in OUT/members blended (weights and rule chosen on the held-out rows alone):
    held-out (cross-fitted) and unseen samples-F1 (bench/pseudo.py uses it too)."""
    from pipeline.best import _aligned
    from pipeline.decision import choose as choose_rule
    from pipeline.ensemble import choose, mix

    names = sorted({n for s in sets.values() for n in s})
    runs = {n: RunDir(out / "members" / n) for n in names}
    _, probs, y = _aligned([runs[n] for n in names])
    unseen_p, yu = {}, None
    for n in names:
        yu, unseen_p[n], _ = unseen(runs[n].path, caches)
    width = max(18, *map(len, sets))
    print(f"\n{'blend of':{width}s} {'members':>7s} {'held-out':>9s} {'unseen':>7s}  weights")
    for label, sub in sets.items():
        b = choose([probs[names.index(n)] for n in sub], y, "auto", 0)
        rule = choose_rule(y.astype(np.float64), b.scores)
        f1 = samples_f1(yu, rule.decision.apply(mix([unseen_p[n] for n in sub], b.weights)))
        print(f"{label:{width}s} {len(sub):7d} {b.metrics['samples_f1']:9.4f} {f1:7.4f}  "
              + " ".join(f"{n}={w:.2f}" for n, w in zip(sub, b.weights, strict=True) if w > 0), flush=True)


def ablate(out: Path, caches: list[Path]) -> None:
    """Blends of subsets of every member fitted in OUT/members (all; without the attention member; without the
    extra text encoder's members, named ...am...; the main cache's pooled members only)."""
    names = sorted(p.name for p in (out / "members").iterdir() if RunDir(p).manifest.is_file())
    blends(out, caches, {
        "all": names, "no attention": [n for n in names if not n.startswith("attention")],
        "no extra text": [n for n in names if "am" not in n.split("-")[1]],
        "main pooled only": [n for n in names if not n.startswith("attention") and "am" not in n.split("-")[1]]})


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
    ap.add_argument("--tokens", action="store_true", help="add the attention member over lite0's token maps "
                    f"(--cache-dir/{TOKENS}); the blend then reads the maps, and lite2's members are left out")
    ap.add_argument("--text-cache", type=Path, action="append", default=[], help="a train cache of lite0 with "
                    "another text encoder (e.g. MPNet): its caption members (repeatable)")
    ap.add_argument("--time-limit", type=float, default=0.0)
    ap.add_argument("--existing", action="store_true", help="blend only the members already fitted in --out "
                    "(fit nothing)")
    ap.add_argument("--only", default="", help="fit only these members (comma-separated names), then stop: to fit "
                    "members in two processes; a run without it reuses them")
    ap.add_argument("--ablate", action="store_true", help="then blends of subsets of every member fitted in --out "
                    "(with and without the attention member, the extra text encoder's members)")
    ap.add_argument("--smoke", action="store_true", help="tiny random encoders on generated data, 2 folds, lite0's "
                    "stand-in only: checks that the script runs (its figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        smoke(args)
    configure(0)  # the members' progress lines (mlc logs; the package is silent unless asked)
    caches = [args.cache_dir / NAME.format(e) for e in (("lite0",) if args.no_extra or args.tokens
                                                        else ("lite0", "lite2"))]
    n_image = len(caches)
    tokens = None
    if args.tokens:
        tokens = len(caches)
        caches.append(args.cache_dir / TOKENS)
    texts = list(range(len(caches), len(caches) + len(args.text_cache)))
    caches += args.text_cache
    tags = ["a", "b"][:n_image] + ["t"] * (tokens is not None) + [f"m{k + 1}" for k in range(len(texts))]
    ids = np.array([int(i.split(".")[0]) for i in CacheReader(caches[0]).image_ids])
    train_rows = np.flatnonzero(ids < 10000)
    (args.out / "members").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    only = set(filter(None, args.only.split(",")))
    wanted = [m for m in plan(n_image, tokens=tokens, texts=texts) if (not only or m.name in only)
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
        print(f"{m.name:14s} {'+'.join(tags[c] for c in m.caches):10s} {info['member_samples_f1'][m.name]:9.4f} "
              f"{f1:7.4f} {info['weights'][m.name]:7.3f} {run.read_metrics()['seconds']:6.0f}")
    y, p, own = unseen(args.out, caches)
    # the blend head (every member's columns of the fused features) must give the members' weighted mix
    print(f"blend head vs the members' weighted mix: max |diff| {np.abs(p - mixed).max():.2e}")
    print(f"\nblend ({'blended' if info['blended'] else 'best member alone'}): held-out {info['samples_f1']:.4f} "
          f"(cross-fitted weights), unseen {own:.4f} by the run's own rule")
    from pipeline.decision import choose as choose_rule
    held = RunDir(args.out).held_out()
    choice = choose_rule(held.labels.astype(np.float64), held.scores)
    print(f"decision rule chosen on the held-out rows: {choice.rule} "
          f"(candidates {json.dumps({k: round(v, 4) for k, v in choice.scores.items()})}); "
          f"unseen {samples_f1(y, choice.decision.apply(p)):.4f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"members {fit_s:.0f} s, blend {blend_s:.0f} s, peak RSS {rss:.0f} MB")
    if args.ablate:
        ablate(args.out, caches)


if __name__ == "__main__":
    main()
