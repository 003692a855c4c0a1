"""Which recipe to use: samples-F1 on images no training or tuning saw, and the wall time of each recipe.

On the shared competition subset: every recipe trains (and tunes its thresholds) on ids 0-9999 and is
scored on ids 10000-11999. Recipes: the frozen offline encoders with one split or 5 folds, each offline
encoder pair, two caches fused, the CPU finetune route (a trunk cache, then the encoders' top
blocks finetuned from the frozen head) at several cuts, epochs and learning rates, int8 stage one, and
the cross-fitted caption tower (``mlc crossfit`` with ``--train-rows 10000``: its fold models train on
ids 0-9999 only; ids 10000-11999 get the folds' mean features, as the test split does) fused with the
frozen lite0 + MiniLM cache, and the attention head over lite0's 7x7 token maps (``--image-pooling tokens``,
trained with ``heads.AttentionHead.recipe``, as ``mlc run --head attention`` does).

    .venv/bin/python bench/recipes.py [--only frozen,default,fused,trunk,int8,crossfit,attention]
                                      [--trunk CUT:EPOCHS:LR:ENC_LR,...]
                                      [--crossfit FOLDS:EPOCHS:PRECISION[:OUTPUT],...]
                                      [--attention FOLDS,...]

    .venv/bin/python bench/recipes.py --smoke   # the default recipes, tiny random encoders on generated data

Wall times: extraction of the train split (ONNX Runtime, 2 cores) + training + threshold tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cache import CacheReader  # noqa: E402
from pipeline.crossfit import CrossfitConfig, crossfit  # noqa: E402
from pipeline.datasets import TrunkRows, to_device  # noqa: E402
from pipeline.extract import ExtractConfig, extract  # noqa: E402
from pipeline.finetune import FinetuneConfig, finetune  # noqa: E402
from pipeline.fit_head import Features, FitHeadConfig, fit_head  # noqa: E402
from pipeline.heads import HEADS  # noqa: E402
from pipeline.metrics import samples_f1  # noqa: E402
from pipeline.model import load_model  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.runs import RunDir  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "comp5329"
TEXT = "minilm-l6"
# the image encoders by their short names, the text cut of the trunk caches and extract's other options:
# --smoke swaps in tiny random encoders
IMAGES = {"lite0": "efficientnet-lite0", "lite2": "efficientnet-lite2"}
TEXT_CUT = "layer4"
EXTRACT: dict[str, Any] = {}
FIT: dict[str, Any] = {}  # fit-head options of every frozen head
TRAIN_ROWS = 10000  # the rows of ids 0-9999: the finetune's first rows, the attention head's training rows


def cache(image: str, cache_dir: Path, **cuts: str) -> tuple[Path, float]:  # cuts: or precision
    """The train cache of ``image`` + MiniLM (made once), and how long making it took (0 when reused)."""
    t = time.perf_counter()
    (path,) = extract(ExtractConfig.build(data_dir=SHARED, image_encoder=image, text_encoder=TEXT, splits=("train",),
                                          cache_dir=cache_dir, **cuts, **EXTRACT))
    return path, time.perf_counter() - t


def split(readers: list[CacheReader]) -> tuple[Features, Features, np.ndarray, np.ndarray]:
    feats = Features.load(readers)
    ids = np.array([int(i.split(".")[0]) for i in feats.ids])
    train, report = np.flatnonzero(ids < 10000), np.flatnonzero(ids >= 10000)
    return feats.subset(train), feats.subset(report), train, report


def frozen(caches: list[Path], folds: int, out: Path, head: str = "concat", **opts: Any) -> tuple[float, float]:
    """(samples-F1 on ids 10000-11999, seconds to fit + tune) of a head over ``caches``; ``opts``: fit-head's."""
    readers = [CacheReader(c) for c in caches]
    train, report, _, _ = split(readers)
    t = time.perf_counter()
    fit_head(FitHeadConfig.build(caches=tuple(caches), out=out, folds=folds, head=head, **{**FIT, **opts}),
             loaded=(readers, train), quiet=True)
    secs = time.perf_counter() - t
    model = Predictor.of_run(RunDir(out).load())
    return samples_f1(report.labels, model.decide(model.from_features(report.image.numpy(), report.text.numpy()))), \
        secs


def trunk(trunk_cache: Path, frozen_run: Path, out: Path, epochs: int, lr: float,
          encoder_lr: float) -> tuple[float, float]:
    """(samples-F1 on ids 10000-11999, seconds) of the trunk route: finetune from the frozen head."""
    reader = CacheReader(trunk_cache)
    t = time.perf_counter()
    finetune(FinetuneConfig.build(from_cache=trunk_cache, out=out, max_rows=TRAIN_ROWS, init_head=frozen_run,
                                  epochs=epochs, sampler="uniform", pos_weight=False, lr=lr, encoder_lr=encoder_lr,
                                  batch_size=32, workers=2, image_encoder=reader.meta.image_encoder, text_encoder=TEXT,
                                  head="concat"))
    secs = time.perf_counter() - t
    run = RunDir(out).load()
    model = load_model(run, reader.meta.image_cut, reader.meta.text_cut)
    ids = np.array([int(i.split(".")[0]) for i in reader.image_ids])
    rows = np.flatnonzero(ids >= 10000)
    loader = torch.utils.data.DataLoader(TrunkRows(reader, rows, False, 0), batch_size=64, num_workers=2)
    scores = []
    with torch.no_grad():
        for batch in loader:
            b = to_device(batch, torch.device("cpu"))
            scores.append(torch.sigmoid(model(b["pixels"], b["input_ids"], b["attention_mask"])).numpy())
    y = reader.labels()[rows]
    return samples_f1(y, run.decision.apply(np.concatenate(scores))), secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=REPO / "cache")
    ap.add_argument("--only", default="frozen,fused,trunk")
    ap.add_argument("--trunk", default="block13:2:3e-4:1e-4,block15:2:3e-4:1e-4,block13:3:3e-4:1e-4,"
                                       "block13:2:1e-3:3e-4",
                    help="trunk configs: CUT:EPOCHS:HEAD_LR:ENCODER_LR, comma-separated")
    ap.add_argument("--crossfit", default="5:1:bf16",
                    help="cross-fits: FOLDS:EPOCHS:PRECISION[:OUTPUT], comma-separated (OUTPUT: embedding or logits)")
    ap.add_argument("--attention", default="5", help="fold counts of the attention-head recipe, comma-separated")
    ap.add_argument("--results", type=Path, default=Path(tempfile.gettempdir()) / "mlc-recipes.json")
    ap.add_argument("--smoke", action="store_true", help="the default recipes (one trunk config) with tiny random "
                    "encoders on generated data: checks that the script runs (its figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        smoke(args)
        return
    bench(args)


def smoke(args: argparse.Namespace) -> None:
    """The default parts on 24 generated rows (ids 9984-10007), tiny random encoders, one trunk config."""
    global SHARED, TEXT, TEXT_CUT, TRAIN_ROWS
    from _smoke import IMAGE, tiny_data, tiny_env
    from _smoke import TEXT as TINY_TEXT

    tiny_env()
    IMAGES.update(lite0=IMAGE, lite2=IMAGE)
    TEXT, TEXT_CUT, TRAIN_ROWS = TINY_TEXT, "layer1", 16
    EXTRACT.update(random_init=True, workers=0)
    FIT.update(epochs=2)
    with tempfile.TemporaryDirectory() as tmp:
        SHARED = tiny_data(Path(tmp) / "data")
        args.cache_dir, args.results = Path(tmp) / "cache", Path(tmp) / "results.json"
        args.trunk = "layer3:1:3e-4:1e-4"
        bench(args)


def bench(args: argparse.Namespace) -> None:
    """Every recipe of --only, each printed (and saved to --results) as it ends."""
    parts = set(args.only.split(","))
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}

    def record(name: str, f1: float, secs: float) -> None:
        results[name] = {"samples_f1": round(f1, 4), "seconds": round(secs, 1)}
        args.results.write_text(json.dumps(results, indent=1))
        print(f"{name:62s} samples-F1 {f1:.4f}   {secs:7.1f} s", flush=True)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        lite0, t0 = cache(IMAGES["lite0"], args.cache_dir)
        lite2, t2 = cache(IMAGES["lite2"], args.cache_dir) if parts & {"frozen", "fused"} else (lite0, 0.0)
        print(f"train caches: lite0 + MiniLM {t0:.0f} s, lite2 + MiniLM {t2:.0f} s (0 = reused)", flush=True)
        if "frozen" in parts:
            for name, caches, folds in (("lite0 + MiniLM, one split", [lite0], 0),
                                        ("lite0 + MiniLM, 5 folds", [lite0], 5),
                                        ("lite2 + MiniLM, one split", [lite2], 0),
                                        ("lite2 + MiniLM, 5 folds", [lite2], 5)):
                record(name, *frozen(caches, folds, tmp / name.replace(" ", "_")))
        if "default" in parts:  # the frozen default alone, beside the new recipes
            record("lite0 + MiniLM, 5 folds", *frozen([lite0], 5, tmp / "default"))
            record("frozen MiniLM alone (--head text), 5 folds", *frozen([lite0], 5, tmp / "text", head="text"))
        if "attention" in parts:  # image token maps + the attention head, as `mlc run --head attention` trains it
            tok, tt = cache(IMAGES["lite0"], args.cache_dir, image_pooling="tokens")
            print(f"token-map train cache: {tt:.0f} s (0 = reused)", flush=True)
            for folds in map(int, args.attention.split(",")):
                record(f"lite0 token maps + MiniLM, attention head, {folds} folds",
                       *frozen([tok], folds, tmp / f"attention-{folds}", head="attention",
                              **HEADS.about["attention"].recipe))  # sized from the 10,000 training rows: batch 256
        if "fused" in parts:
            record("lite0 + lite2 + MiniLM fused, 5 folds", *frozen([lite0, lite2], 5, tmp / "fused"))
        if "trunk" in parts:
            for spec in args.trunk.split(","):
                cut, ep, lr_s, enc_s = spec.split(":")
                epochs, lr, enc_lr = int(ep), float(lr_s), float(enc_s)
                tc, secs = cache(IMAGES["lite0"], args.cache_dir, image_cut=cut, text_cut=TEXT_CUT)
                # The starting head is fitted on the finetune's own split (the first 10,000 rows, seed 0, 20%
                # held out): a 5-fold head trained on the rows the finetune holds out (finetune refuses it).
                base = tmp / f"frozen-{cut}"
                f1, fsecs = frozen([tc], 0, base)
                name = f"trunk {cut} + MiniLM {TEXT_CUT}, {epochs} ep, lr {lr:g}/{enc_lr:g}"
                f1_t, tsecs = trunk(tc, base, tmp / f"trunk-{cut}-{epochs}-{lr}", epochs, lr, enc_lr)
                print(f"  (trunk cache {secs:.0f} s, its one-split start head {f1:.4f} in {fsecs:.0f} s)", flush=True)
                record(name, f1_t, tsecs)
        if "int8" in parts:
            int8, ti = cache(IMAGES["lite0"], args.cache_dir, precision="int8")
            print(f"int8 train cache: {ti:.0f} s (0 = reused)", flush=True)
            record("lite0 + MiniLM int8, 5 folds", *frozen([int8], 5, tmp / "int8"))
        if "crossfit" in parts:
            for spec in args.crossfit.split(","):
                k, ep, precision, output = (spec.split(":") + ["embedding"])[:4]
                t = time.perf_counter()
                cf, _ = crossfit(CrossfitConfig.build(data_dir=SHARED, train_rows=10000, folds=int(k), epochs=int(ep),
                                                      precision=precision, text_features=output,
                                                      cache_dir=args.cache_dir))
                cf_secs = time.perf_counter() - t
                print(f"  (cross-fit {spec}: {cf_secs:.0f} s, 0 = reused)", flush=True)
                f1, secs = frozen([lite0, cf], 5, tmp / f"crossfit-{spec}")
                what = f"cross-fitted MiniLM {output} ({k} folds, {ep} ep, {precision})"
                record(f"lite0 + MiniLM + {what}, 5 folds", f1, secs + cf_secs)
                record(f"{what} alone, 5 folds", *frozen([cf], 5, tmp / f"crossfit-alone-{spec}"))


if __name__ == "__main__":
    main()
