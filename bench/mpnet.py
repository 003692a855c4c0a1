"""A second caption encoder (mpnet-base) on the shared protocol: concat heads over lite0 + MiniLM, lite0 + MPNet and
lite0 + MiniLM + MPNet (fused), and the 50/50 average of the first two.

Each head is a 5-fold fit-head run with the default decision choice (``--decision auto``), trained and tuned on ids
0-9999 of the shared competition subset and scored on ids 10000-11999, which nothing tuned on. The average's decision
rule is chosen the same way (decision.choose) on the two heads' out-of-fold probabilities, then applied to the
average of their unseen probabilities. The runs are built by pipeline/best.py's fit_members, as ``mlc run --quality
best`` builds its members; rerunning reuses them.

    mlc extract DATA --preset offline --text-encoder mpnet-base --cache-dir /work/cache-shared   # once
    .venv/bin/python bench/mpnet.py --cache-dir /work/cache-shared [--out /tmp/mlc-mpnet-bench] [--folds 5]
    .venv/bin/python bench/mpnet.py --smoke   # tiny random encoders on generated images (its figures mean nothing)

    # int8 MPNet: a caption-only int8 cache, its 768 columns swapped into the fused head's features
    mlc extract DATA --split train --image-encoder none --text-encoder mpnet-base --precision int8 --cache-dir C
    .venv/bin/python bench/mpnet.py --int8-text C/comp5329/train__none__mpnet-base__int8.h5

Prints each head's held-out (cross-fitted) and unseen samples-F1, its rule and seconds, the average's, and the peak
memory (ru_maxrss) of the process.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.best import Member, _aligned, fit_members  # noqa: E402
from pipeline.cache import CacheReader  # noqa: E402
from pipeline.decision import choose  # noqa: E402
from pipeline.fit_head import Features, FitHeadConfig, fit_head, sized  # noqa: E402
from pipeline.log import configure  # noqa: E402
from pipeline.metrics import samples_f1  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.runs import RunDir  # noqa: E402

CACHES = ("comp5329/train__efficientnet-lite0__minilm-l6.h5", "comp5329/train__efficientnet-lite0__mpnet-base.h5")
MEMBERS = (Member("concat-minilm", (0,)), Member("concat-mpnet", (1,)), Member("concat-minilm-mpnet", (0, 1)))


def number(image_id: str) -> int:
    return int(image_id.split(".")[0])


def unseen(run: Path, caches: list[Path], first: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, probabilities, samples-F1 by the run's own rule) of the ids >= ``first``, under the run's heads,
    over exactly the caches it was fitted on."""
    feats = Features.load([CacheReader(c) for c in caches])
    rows = np.flatnonzero(np.array([number(i) for i in feats.ids]) >= first)
    model = Predictor.of_run(RunDir(run).load())
    p = model.from_features(feats.image[rows].numpy(), feats.text[rows].numpy())
    return feats.labels[rows], p, samples_f1(feats.labels[rows], model.decide(p))


def smoke_caches(tmp: Path) -> tuple[list[Path], int]:
    """Two tiny caches of the same generated images (tiny-bert mean- and cls-pooled stand in for the two caption
    encoders), and the first id of the unseen rows."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_ENCODERS, make_data_dir

    os.environ["MLC_PLUGINS"] = TINY_ENCODERS
    from pipeline.encoders import EncoderOptions
    from pipeline.extract import ExtractConfig, extract

    data = make_data_dir(tmp / "tiny", n_train=48, n_test=2)
    caches = []
    for pooling in ("mean", "cls"):
        enc = EncoderOptions.build(image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True,
                                   text_pooling=pooling)
        caches += extract(ExtractConfig.build(data_dir=data, splits=("train",), cache_dir=tmp / f"cache-{pooling}",
                                              encoders=enc))
    ids = sorted(number(i) for i in CacheReader(caches[0]).image_ids)
    return caches, ids[len(ids) * 2 // 3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("/work/cache-shared"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mlc-mpnet-bench"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny random encoders on 48 generated images, 3 folds: "
                    "checks that the script runs (its figures mean nothing)")
    ap.add_argument("--int8-text", type=Path, help="a caption-only (--image-encoder none) int8 mpnet-base train cache: "
                    "also fit the fused head with MPNet's features from it (fit-head cannot fuse a caption-only cache "
                    "with an image one: its data fingerprint leaves the images out, so the columns are swapped here)")
    args = ap.parse_args()
    configure(0)  # fit_members' progress lines
    with tempfile.TemporaryDirectory() as tmp_s:
        if args.smoke:
            caches, first = smoke_caches(Path(tmp_s))
            args.out, args.folds = Path(tmp_s) / "out", 3
        else:
            caches, first = [args.cache_dir / c for c in CACHES], 10000
        run(args, caches, first)
        if args.int8_text:
            int8_text(args, caches, first)


def run(args: argparse.Namespace, caches: list[Path], first: int) -> None:
    ids = np.array([number(i) for i in CacheReader(caches[0]).image_ids])
    rows = np.flatnonzero(ids < first)
    (args.out / "members").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    members = fit_members(list(MEMBERS), caches, args.out, folds=args.folds, rows=rows, quiet=True)
    fit_s = time.perf_counter() - t0
    print(f"\n{len(rows)} rows to train and tune on, {len(ids) - len(rows)} unseen; {args.folds} folds")
    print(f"{'head':22s} {'held-out':>9s} {'unseen':>7s} {'rule':>22s} {'s':>6s}")
    runs, unseen_p = [], []
    for m in members:
        run_dir = RunDir(args.out / "members" / m.name)
        metrics = run_dir.read_metrics()
        y_u, p, f1 = unseen(run_dir.path, [caches[c] for c in m.caches], first)
        runs.append(run_dir)
        unseen_p.append(p)
        print(f"{m.name:22s} {metrics['samples_f1']:9.4f} {f1:7.4f} {metrics['decision']['rule']:>22s} "
              f"{metrics['seconds']:6.0f}")
    _, held, y_h = _aligned(runs[:2])  # the out-of-fold probabilities on the first run's held-out rows
    t = time.perf_counter()
    c = choose(y_h, (held[0] + held[1]) / 2)
    avg_f1 = samples_f1(y_u, c.decision.apply((unseen_p[0] + unseen_p[1]) / 2))
    print(f"{'50/50 minilm + mpnet':22s} {c.selected_score:9.4f} {avg_f1:7.4f} {c.rule:>22s} "
          f"{time.perf_counter() - t:6.0f}")
    print(f"\nfitting {fit_s:.0f} s (0 when every run was reused); peak memory (ru_maxrss) "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")



def int8_text(args: argparse.Namespace, caches: list[Path], first: int) -> None:
    """The fused head again, MPNet's columns (the last 768 of the text) taken from the int8 caption-only cache."""
    readers = [CacheReader(c) for c in caches]
    feats, q = Features.load(readers), CacheReader(args.int8_text)
    if list(q.image_ids) != list(feats.ids):
        raise SystemExit(f"{args.int8_text}: other rows than {caches[0]}")
    t8 = torch.from_numpy(q.array("text").astype(np.float32))
    dim = t8.shape[1]
    cos = torch.nn.functional.cosine_similarity(feats.text[:, -dim:], t8, dim=1)
    feats.text = torch.cat([feats.text[:, :-dim], t8], 1)
    ids = np.array([number(i) for i in feats.ids])
    rows, un = np.flatnonzero(ids < first), np.flatnonzero(ids >= first)
    out = args.out / "int8-text"
    cfg = sized(FitHeadConfig.build(caches=tuple(caches), out=out, folds=args.folds, head="concat", seed=0), len(rows))
    t = time.perf_counter()
    fit_head(cfg, loaded=(readers, feats.subset(rows)), quiet=True)  # the run folder names the fp32 caches: bench only
    metrics, model = RunDir(out).read_metrics(), Predictor.of_run(RunDir(out).load())
    p = model.from_features(feats.image[un].numpy(), feats.text[un].numpy())
    f1 = samples_f1(feats.labels[un], model.decide(p))
    print(f"{'...-minilm-mpnet-int8':22s} {metrics['samples_f1']:9.4f} {f1:7.4f} {metrics['decision']['rule']:>22s} "
          f"{time.perf_counter() - t:6.0f}   (MPNet int8 vs fp32 features: cosine mean {cos.mean():.4f}, "
          f"min {cos.min():.4f})")


if __name__ == "__main__":
    main()
