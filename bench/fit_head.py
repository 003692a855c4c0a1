"""Benchmark stage 2 on the offline-encoder cache of the shared competition subset.

Trains on ids 0-9999 (early stopping and threshold tuning on a stratified 20% of those), and
reports samples-F1 on ids 10000-11999, which neither training nor tuning ever saw. Heads: image,
text, sum, concat, gated; plus the wall time of the default fit + threshold tuning.

    .venv/bin/python bench/fit_head.py [--cache cache/comp5329/train__efficientnet-lite0__minilm-l6*.h5]
    .venv/bin/python bench/fit_head.py --smoke   # tiny random encoders on generated data (the slow suite)

Extract the cache first: `mlc extract ../shared/data/comp5329 --preset offline --split train`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cache import CacheReader  # noqa: E402
from pipeline.evaluation import evaluate  # noqa: E402
from pipeline.fit_head import Features, FitHeadConfig, fit, heads_of, sized  # noqa: E402
from pipeline.heads import predict_proba  # noqa: E402
from pipeline.metrics import samples_f1  # noqa: E402
from pipeline.thresholds import apply_thresholds  # noqa: E402


def find_cache() -> Path:
    hits = sorted((REPO / "cache" / "comp5329").glob("train__efficientnet-lite0__minilm-l6*.h5"))
    if not hits:
        sys.exit("no offline cache of ../shared/data/comp5329: run `mlc extract ../shared/data/comp5329 "
                 "--preset offline --split train` first")
    return hits[0]


def run(cfg: FitHeadConfig, train: Features, report: Features) -> dict:
    """Fit on `train` (its own held-out 20% for early stopping + thresholds), score on `report`."""
    t = time.perf_counter()
    cfg = sized(cfg, len(train.ids))  # the batch, epochs and patience fit-head sizes to the rows
    results, held = fit(cfg, train, lambda s: None)
    scores_held = np.concatenate([r.val_scores for r in results])
    _, th = evaluate(train.labels[held], scores_held, cfg.decision, cfg.train.seed)
    secs = time.perf_counter() - t
    scores = np.mean([predict_proba(h, report.image, report.text).numpy() for h in heads_of(cfg, train, results)],
                     axis=0)
    y = report.labels
    return {
        "at_0.5": samples_f1(y, apply_thresholds(scores, 0.5)),
        "global": samples_f1(y, apply_thresholds(scores, th["global"])),
        "per_class": samples_f1(y, apply_thresholds(scores, np.asarray(th["per_class"]))),
        "seconds": secs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats of the default head")
    ap.add_argument("--smoke", action="store_true", help="tiny random encoders on generated data (ids around 10000), "
                    "once: checks that the script runs (its figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        from _smoke import tiny_cache, tiny_data, tiny_env

        tiny_env()
        with tempfile.TemporaryDirectory() as tmp:
            bench(tiny_cache(tiny_data(Path(tmp) / "data"), Path(tmp) / "cache"), 1, epochs=2)
        return
    bench(args.cache or find_cache(), args.repeats)


def bench(cache: Path, repeats: int, **opts: int) -> None:
    """Every head's unseen samples-F1, then the default head's timing; ``opts``: fit-head options for every fit."""
    reader = CacheReader(cache)
    feats = Features.load([reader])
    ids = np.array([int(i.split(".")[0]) for i in feats.ids])
    train, report = feats.subset(np.flatnonzero(ids < 10000)), feats.subset(np.flatnonzero(ids >= 10000))
    print(f"cache {cache.name}: image {reader.meta.image_encoder} ({feats.image.shape[-1]}-d, "
          f"{feats.image.shape[1]} view(s)), text {reader.meta.text_encoder} ({feats.text.shape[-1]}-d); "
          f"train {len(train.ids)} rows (ids 0-9999), report {len(report.ids)} rows (ids 10000-11999); "
          f"{torch.get_num_threads()} threads")
    print(f"{'head':8s} {'loss':5s} {'F1@0.5':>7s} {'global':>7s} {'per-class':>9s} {'fit+tune s':>10s}")
    rows = [("image", "bce"), ("text", "bce"), ("sum", "bce"), ("concat", "bce"), ("gated", "bce"),
            ("concat", "asl")]
    for head, loss in rows:
        r = run(FitHeadConfig.build(caches=cache, head=head, loss=loss, folds=0, **opts), train, report)
        print(f"{head:8s} {loss:5s} {r['at_0.5']:7.4f} {r['global']:7.4f} {r['per_class']:9.4f} "
              f"{r['seconds']:10.1f}", flush=True)
    times = [run(FitHeadConfig.build(caches=cache, folds=0, **opts), train, report)["seconds"] for _ in range(repeats)]
    print(f"default head (concat, bce) fit + threshold tuning: median {statistics.median(times):.1f} s "
          f"over {repeats} runs ({', '.join(f'{t:.1f}' for t in times)})")


if __name__ == "__main__":
    main()
