"""Benchmark `mlc finetune` on the shared competition subset (offline encoders, this CPU).

Part 1, overhead: images per second of `mlc finetune --end-to-end`'s training loop (JPEG decoding
and the seed's augmentations in DataLoader workers, sampler, clipping, schedule) against a bare
PyTorch loop over the same model, batch, loss and optimiser on tensors already in memory.

Part 2, quality on the same rows: the first --rows labelled images, split 80/20 (stratified, the
split mlc uses); samples-F1 on the 20% (thresholds cross-fitted) of
  a) the frozen pipeline: a fit-head `sum` head over the cached embeddings,
  b) a trunk-cache finetune (`--from-cache`, blocks above the cut + MiniLM's top layers + head),
  c) end-to-end finetuning for one epoch,
each with its training images per second.

    .venv/bin/python bench/finetune.py [--rows 2500] [--parts 1,2]   # --parts 3: ids 0-9999 -> 10000-11999
    .venv/bin/python bench/finetune.py --smoke   # parts 1 and 2, tiny random encoders on generated data (slow suite)

Needs the trunk cache: `mlc extract ../shared/data/comp5329 --preset offline --image-cut block11
--text-cut layer4 --split train`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _subset import first_rows  # noqa: E402

from pipeline.encoders import create_image_encoder, create_text_encoder  # noqa: E402
from pipeline.extract import ExtractConfig, extract  # noqa: E402
from pipeline.finetune import FinetuneConfig, finetune  # noqa: E402
from pipeline.fit_head import FitHeadConfig, fit_head  # noqa: E402
from pipeline.heads import create_head  # noqa: E402
from pipeline.losses import create_loss  # noqa: E402
from pipeline.model import MultiModal  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "comp5329"
# The encoders, their cuts (part 2's trunk caches: the given one, then the one made here) and the text cut;
# --smoke swaps in the tiny random ones.
ENC = {"image": "efficientnet-lite0", "text": "minilm-l6", "cuts": ("block11", "block13"), "text_cut": "layer4",
       "random_init": False}


def bare_loop(batch: int, steps: int) -> float:
    """Images/s of forward + backward + Adam step over in-memory tensors, lite0 + MiniLM + sum head."""
    torch.manual_seed(0)
    rnd = {"random_init": True, "seed": 0} if ENC["random_init"] else {}
    image, text = create_image_encoder(ENC["image"], **rnd), create_text_encoder(ENC["text"], **rnd)
    model = MultiModal(image, text, create_head("sum", image_dim=image.dim, text_dim=text.dim, num_classes=18))
    model.train()
    opt = torch.optim.Adam([{"params": model.head.parameters(), "lr": 1e-4},
                            {"params": [*image.parameters(), *text.parameters()], "lr": 1e-5}], weight_decay=1e-5)
    loss_fn = create_loss("bce")
    x = torch.randn(batch, 3, image.preprocess.crop, image.preprocess.crop)
    tok = text.tokenize(["a man riding a horse along the beach at sunset with a dog and two children"] * batch)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    y = (torch.rand(batch, 18) < 0.1).float()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        loss = loss_fn(model(x, ids, mask), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i:  # the first step pays one-off allocation costs
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def run_finetune(cfg: FinetuneConfig, per_step: bool = False) -> tuple[float, float]:
    """(held-out samples-F1, training images/s): the whole epoch's rate, or the median step's."""
    metrics = finetune(cfg)
    history = json.loads((cfg.out / "history.json").read_text())
    history = [epoch for fold in history for epoch in fold]  # a list of epochs per fold (one fold here)
    if per_step:
        steps = statistics.median(h["median_step_seconds"] for h in history)
        return metrics["samples_f1"], cfg.train.batch_size / steps
    return metrics["samples_f1"], statistics.median(h["train_rows_per_second"] for h in history)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--parts", default="1,2")
    ap.add_argument("--trunk-epochs", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=REPO / "cache" / "comp5329")
    ap.add_argument("--smoke", action="store_true", help="parts 1 and 2 with tiny random encoders on generated data: "
                    "checks that the script runs (its figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        smoke(args)
        return
    trunk = next(iter(sorted(args.cache_dir.glob("train__efficientnet-lite0__minilm-l6__img-block11*.h5"))), None)
    bench(args, trunk)


def smoke(args: argparse.Namespace) -> None:
    """Parts 1 and 2 on 24 generated rows, tiny random encoders, batch 4, 2 epochs above the cuts."""
    global SHARED
    from _smoke import IMAGE, TEXT, tiny_cache, tiny_data, tiny_env

    tiny_env()
    ENC.update(image=IMAGE, text=TEXT, cuts=("layer2", "layer3"), text_cut="layer1", random_init=True)
    with tempfile.TemporaryDirectory() as tmp:
        SHARED = tiny_data(Path(tmp) / "data")
        trunk = tiny_cache(SHARED, Path(tmp) / "cache", image_cut="layer2", text_cut="layer1")
        args.parts, args.rows, args.batch_size, args.trunk_epochs = "1,2", 24, 4, 1
        bench(args, trunk)


def bench(args: argparse.Namespace, trunk: Path | None) -> None:
    """The parts asked for (``trunk``: the first cut's trunk cache, when there is one)."""
    parts = set(args.parts.split(","))
    cut0, cut1 = ENC["cuts"]
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        base = FinetuneConfig.build(data_dir=SHARED, image_encoder=ENC["image"], text_encoder=ENC["text"],
                                    batch_size=args.batch_size, workers=0 if ENC["random_init"] else 2, epochs=1,
                                    seed=0, random_init=ENC["random_init"])
        if "1" in parts:
            rows = 12 * args.batch_size * 5 // 4  # 80% of it trains: 12 steps
            # Alternate ours and bare, twice, so both see the same machine load; median step times.
            ours, bare = [], []
            for k in range(2):
                ours.append(run_finetune(base.replace(end_to_end=True, max_rows=rows, out=tmp / f"o{k}"),
                                         per_step=True)[1])
                bare.append(bare_loop(args.batch_size, 8))
            o, b = statistics.median(ours), statistics.median(bare)
            print(f"end-to-end training step, batch {args.batch_size} (median step): mlc finetune {o:.2f} img/s "
                  f"(JPEG decode + augmentation in 2 workers), bare loop on in-memory tensors {b:.2f} img/s, "
                  f"ratio {o / b:.2f}", flush=True)
        if "3" in parts:
            print("full split: train on ids 0-9999 (20% of them held out for early stopping and thresholds), "
                  "samples-F1 on ids 10000-11999:")
            part3(trunk, base, args.trunk_epochs, tmp)
        if "2" in parts:
            if trunk is None:
                sys.exit(f"no {cut0} trunk cache: see this script's docstring")
            print(f"quality on the first {args.rows} labelled rows (80% train / 20% held out, the same split "
                  "for every row below; samples-F1 with per-class thresholds, cross-fitted):")
            # A block13 trunk cache of exactly those rows (a few minutes); it also holds their embeddings.
            (block13,) = extract(ExtractConfig.build(data_dir=first_rows(SHARED, args.rows, tmp), splits=("train",),
                                                     image_encoder=ENC["image"], text_encoder=ENC["text"],
                                                     image_cut=cut1, text_cut=ENC["text_cut"], cache_dir=tmp / "cache",
                                                     random_init=ENC["random_init"]))
            frozen = tmp / "frozen"
            t = time.perf_counter()
            m = fit_head(FitHeadConfig.build(caches=block13, out=frozen, head="sum", folds=0), quiet=True)
            epochs = json.loads((frozen / "metrics.json").read_text())["best_epochs"][0] + 4  # + patience
            rate = args.rows * 0.8 * epochs / (time.perf_counter() - t)
            print(f"  frozen embeddings + fit-head sum           samples-F1 {m['samples_f1']:.4f}   "
                  f"{rate:9.0f} img/s", flush=True)
            # Finetunes start from that head (--init-head), as a user would after fit-head.
            tuned = dict(init_head=frozen, sampler="uniform", pos_weight=False, lr=3e-4, encoder_lr=1e-4,
                         max_rows=args.rows)
            for cut, cache in ((cut0, trunk), (cut1, block13)):
                f1, rate = run_finetune(base.replace(data_dir=None, from_cache=cache, image_cut=cut,
                                                     epochs=args.trunk_epochs, out=tmp / f"trunk-{cut}", **tuned))
                print(f"  trunk cache, train above {cut} ({args.trunk_epochs} epochs) samples-F1 {f1:.4f}   "
                      f"{rate:9.1f} img/s", flush=True)
            f1, rate = run_finetune(base.replace(end_to_end=True, epochs=1, out=tmp / "e2e", **tuned))
            print(f"  end-to-end finetune (1 epoch)               samples-F1 {f1:.4f}   {rate:9.1f} img/s",
                  flush=True)

def part3(trunk: Path, base: FinetuneConfig, epochs: int, tmp: Path) -> None:
    """The issue's full-size split: train on ids 0-9999, report on ids 10000-11999 (never seen)."""
    from pipeline.cache import CacheReader
    from pipeline.datasets import TrunkRows, to_device
    from pipeline.fit_head import Features
    from pipeline.metrics import samples_f1
    from pipeline.model import load_model
    from pipeline.predictor import Predictor
    from pipeline.runs import RunDir
    from pipeline.thresholds import apply_thresholds

    reader = CacheReader(trunk)
    feats = Features.load([reader])
    ids = np.array([int(i.split(".")[0]) for i in feats.ids])
    train_rows, report_rows = np.flatnonzero(ids < 10000), np.flatnonzero(ids >= 10000)
    y_report = feats.labels[report_rows]
    # Frozen: a sum head on rows 0-9999 (its own 80/20 split), a run folder that --init-head takes.
    frozen = tmp / "frozen-full"
    t = time.perf_counter()
    m = fit_head(FitHeadConfig.build(caches=trunk, head="sum", out=frozen, folds=0),
                 loaded=([reader], feats.subset(train_rows)), quiet=True)
    secs = time.perf_counter() - t
    model = Predictor.of_run(RunDir(frozen).load())
    s = model.from_features(feats.image[report_rows].numpy(), feats.text[report_rows].numpy())
    f1 = samples_f1(y_report, model.decide(s))
    rate = len(train_rows) * 0.8 * (m["best_epochs"][0] + 4) / secs
    print(f"  frozen + fit-head sum                         samples-F1 {f1:.4f}  {rate:9.0f} img/s", flush=True)
    ft = base.replace(data_dir=None, from_cache=trunk, image_cut="block11", max_rows=10000, epochs=epochs,
                      init_head=frozen, sampler="uniform", pos_weight=False, lr=3e-4, encoder_lr=1e-4,
                      out=tmp / "trunk-full")
    _, rate = run_finetune(ft)
    tuned = RunDir(ft.out).load()
    model = load_model(tuned, reader.meta.image_cut, reader.meta.text_cut)
    loader = torch.utils.data.DataLoader(TrunkRows(reader, report_rows, False, 0), batch_size=64)
    out = []
    with torch.no_grad():
        for batch in loader:
            b = to_device(batch, torch.device("cpu"))
            out.append(torch.sigmoid(model(b["pixels"], b["input_ids"], b["attention_mask"])).numpy())
    f1 = samples_f1(y_report, apply_thresholds(np.concatenate(out), tuned.thresholds))
    print(f"  trunk cache block11, {epochs} epochs                 samples-F1 {f1:.4f}  {rate:9.1f} img/s",
          flush=True)

if __name__ == "__main__":
    main()
