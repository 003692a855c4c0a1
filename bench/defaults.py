"""The default head recipe on three dataset sizes, and which decision rule each picks (issue 26).

Datasets: examples/tags-mini (135 rows, the README's own-data example), examples/comp5329-mini (808 rows, the
demo) and the shared subset's protocol (train and tune on ids 0-9999 of ../shared/data/comp5329, score ids
10000-11999). Each recipe is fit-head with 5 folds over the offline (lite0 + MiniLM) caches. Printed per
dataset and recipe: the cross-fitted score of every decision rule, the rule chosen, the choice's score on rows
it did not see (what mlc prints), the baselines (constant answer, label priors) and, on the shared protocol, the
score on ids 10000-11999 with the chosen rule.

    .venv/bin/python bench/defaults.py --small-caches DIR [--shared-cache H5] [--recipes old,bce,asl]

    .venv/bin/python bench/defaults.py --smoke   # a tiny random-encoder cache of generated rows (the slow suite)

DIR holds tags-mini/ and comp5329-mini/ train caches (`mlc extract ... --split train --cache-dir DIR`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cache import CacheReader  # noqa: E402
from pipeline.fit_head import FitHeadConfig, fit_head  # noqa: E402
from pipeline.metrics import samples_f1  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.runs import RunDir  # noqa: E402

CACHE = "train__efficientnet-lite0__minilm-l6.h5"
# "old": mlc before issue 26 (batch 256, 40 epochs, patience 4, BCE, per-class thresholds)
RECIPES = {
    "old": dict(batch_size=256, epochs=40, patience=4, loss="bce", decision="per-class"),
    "bce": dict(loss="bce"),
    "asl": dict(loss="asl"),
    "asl-d2": dict(loss="asl", dropout=0.2),
}


def one(cache: Path, recipe: dict, out: Path, report_from: int | None) -> dict:
    readers = [CacheReader(cache)]
    from pipeline.fit_head import Features

    feats = Features.load(readers)
    report = None
    if report_from is not None:
        ids = np.array([int(i.split(".")[0]) for i in feats.ids])
        report = feats.subset(np.flatnonzero(ids >= report_from))
        feats = feats.subset(np.flatnonzero(ids < report_from))
    t = time.perf_counter()
    m = fit_head(FitHeadConfig.build(caches=(cache,), out=out, folds=5, **recipe), loaded=(readers, feats), quiet=True)
    out_m = {"f1": m["samples_f1"], "rule": m["threshold_mode"], "cand": m["decision"]["candidates"],
             "constant": m["baselines"]["constant"], "priors": m["baselines"]["priors"],
             "secs": time.perf_counter() - t}
    if report is not None:
        model = Predictor.of_run(RunDir(out).load())
        probs = model.from_features(report.image.numpy(), report.text.numpy())
        out_m["unseen"] = samples_f1(report.labels, model.decide(probs))
        from pipeline.decision import fit_rule

        run = RunDir(out)
        val = np.load(run.path / "val_scores.npz")
        # every rule tuned on the 10,000 held-out predictions, scored on the unseen rows
        out_m["unseen_by_rule"] = {r: samples_f1(report.labels, fit_rule(r, val["labels"], val["scores"]).apply(probs))
                                   for r in m["decision"]["candidates"]}
    return out_m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-caches", type=Path, help="required, but with --smoke")
    ap.add_argument("--shared-cache", type=Path, default=Path("/work/cache-shared/comp5329") / CACHE)
    ap.add_argument("--recipes", default="old,bce,asl")
    ap.add_argument("--datasets", default="tags-mini,comp5329-mini,shared")
    ap.add_argument("--smoke", action="store_true", help="a tiny random-encoder cache of generated rows (ids around "
                    "10000) as a small dataset and as the shared one, 2 epochs: checks that the script runs (its "
                    "figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        from _smoke import named, tiny_cache, tiny_data, tiny_env

        tiny_env()
        for recipe in RECIPES.values():
            recipe["epochs"] = 2
        with tempfile.TemporaryDirectory() as tmp:
            cache = tiny_cache(tiny_data(Path(tmp) / "data", n_train=30), Path(tmp) / "tiny")
            args.small_caches, args.datasets, args.recipes = Path(tmp) / "small", "tiny,shared", "old,bce"
            args.shared_cache = named(cache, args.small_caches, f"tiny/{CACHE}")
            bench(args)
        return
    if args.small_caches is None:
        ap.error("the following arguments are required: --small-caches")
    bench(args)


def bench(args: argparse.Namespace) -> None:
    """Each recipe on each dataset, one line each."""
    for ds in args.datasets.split(","):
        cache = args.shared_cache if ds == "shared" else args.small_caches / ds / CACHE
        for name in args.recipes.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                r = one(cache, RECIPES[name], Path(tmp) / "run", 10000 if ds == "shared" else None)
            cand = " ".join(f"{k}={v:.4f}" for k, v in r["cand"].items())
            extra = f" unseen(10000-11999) {r['unseen']:.4f}" if "unseen" in r else ""
            if "unseen_by_rule" in r:
                extra += " [" + " ".join(f"{k}={v:.4f}" for k, v in r["unseen_by_rule"].items()) + "]"
            print(f"{ds:14s} {name:7s} chosen {r['rule']:22s} {r['f1']:.4f} | constant {r['constant']:.4f} "
                  f"priors {r['priors']:.4f} | {cand}{extra} ({r['secs']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
