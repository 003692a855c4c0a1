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

    .venv/bin/python bench/finetune.py [--rows 2500] [--parts 1,2]

Needs the trunk cache: `mlc extract ../shared/data/comp5329 --preset offline --image-cut block11
--text-cut layer4 --split train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _subset import first_rows  # noqa: E402

from pipeline.cache import CacheReader  # noqa: E402
from pipeline.encoders import create_image_encoder, create_text_encoder  # noqa: E402
from pipeline.extract import ExtractConfig, extract  # noqa: E402
from pipeline.finetune import FinetuneConfig, MultiModal, finetune  # noqa: E402
from pipeline.fit_head import Features, FitHeadConfig, cross_fitted_f1, train_head  # noqa: E402
from pipeline.heads import create_head  # noqa: E402
from pipeline.losses import create_loss  # noqa: E402
from pipeline.splits import train_val_split  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "comp5329"


def bare_loop(batch: int, steps: int) -> float:
    """Images/s of forward + backward + Adam step over in-memory tensors, lite0 + MiniLM + sum head."""
    torch.manual_seed(0)
    image, text = create_image_encoder("efficientnet-lite0"), create_text_encoder("minilm-l6")
    model = MultiModal(image, text, create_head("sum", image_dim=1280, text_dim=384, num_classes=18))
    model.train()
    opt = torch.optim.Adam([{"params": model.head.parameters(), "lr": 1e-4},
                            {"params": [*image.parameters(), *text.parameters()], "lr": 1e-5}], weight_decay=1e-5)
    loss_fn = create_loss("bce")
    x = torch.randn(batch, 3, 224, 224)
    ids = torch.randint(1000, 5000, (batch, 16))
    mask = torch.ones_like(ids)
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


def frozen_f1(cache: Path, rows: int, seed: int = 0) -> tuple[float, float]:
    """Fit-head `sum` over the frozen embeddings of the first `rows` rows, mlc's 80/20 split."""
    reader = CacheReader(cache)
    f = Features.load(reader)
    f = Features(f.ids[:rows], f.image[:rows], f.text[:rows], f.labels[:rows])
    tr, va = train_val_split(f.labels, 0.2, seed)
    t = time.perf_counter()
    res = train_head(FitHeadConfig(cache=cache, head="sum"), f, tr, va)
    secs = time.perf_counter() - t
    return cross_fitted_f1(f.labels[va], res.val_scores, "per-class", seed), len(tr) * res.best_epoch / secs


def run_finetune(cfg: FinetuneConfig) -> tuple[float, float]:
    metrics = finetune(cfg)
    history = json.loads((cfg.out / "history.json").read_text())
    rate = statistics.median(h["train_rows_per_second"] for h in history)
    return metrics["samples_f1"], rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--parts", default="1,2")
    ap.add_argument("--trunk-epochs", type=int, default=2)
    ap.add_argument("--cache-dir", type=Path, default=REPO / "cache" / "comp5329")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    trunk = next(iter(sorted(args.cache_dir.glob("train__efficientnet-lite0__minilm-l6__img-block11*.h5"))), None)
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        base = FinetuneConfig(data_dir=SHARED, image_encoder="efficientnet-lite0", text_encoder="minilm-l6",
                              batch_size=args.batch_size, workers=2, epochs=1, seed=0)
        if "1" in parts:
            rows = 12 * args.batch_size * 5 // 4  # 80% of it trains: 12 steps
            ours = [run_finetune(dataclasses.replace(base, end_to_end=True, max_rows=rows, out=tmp / f"o{k}"))[1]
                    for k in range(2)]
            bare = bare_loop(args.batch_size, 8)
            print(f"end-to-end step, batch {args.batch_size}: mlc finetune {statistics.median(ours):.2f} img/s "
                  f"(incl. JPEG decode + augmentation), bare loop {bare:.2f} img/s, ratio "
                  f"{statistics.median(ours) / bare:.2f}", flush=True)
        if "2" in parts:
            if trunk is None:
                sys.exit("no block11 trunk cache: see this script's docstring")
            print(f"quality on the first {args.rows} labelled rows (80% train / 20% held out):")
            f1, rate = frozen_f1(trunk, args.rows)
            print(f"  frozen embeddings + fit-head sum        samples-F1 {f1:.4f}   {rate:9.0f} img/s", flush=True)
            # The block13 cache is extracted here for the same first rows only (a few minutes).
            (block13,) = extract(ExtractConfig(data_dir=first_rows(SHARED, args.rows, tmp), splits=("train",),
                                               image_encoder="efficientnet-lite0", text_encoder="minilm-l6",
                                               image_cut="block13", text_cut="layer4", out_dir=tmp / "cache"))
            for cut, cache in (("block11", trunk), ("block13", block13)):
                f1, rate = run_finetune(dataclasses.replace(
                    base, data_dir=None, from_cache=cache, image_cut=cut, max_rows=args.rows,
                    epochs=args.trunk_epochs, lr=1e-3, encoder_lr=1e-4, out=tmp / f"trunk-{cut}"))
                print(f"  trunk cache, train above {cut} ({args.trunk_epochs} ep) samples-F1 {f1:.4f}   "
                      f"{rate:9.1f} img/s", flush=True)
            f1, rate = run_finetune(dataclasses.replace(base, end_to_end=True, max_rows=args.rows,
                                                        lr=1e-3, encoder_lr=1e-4, out=tmp / "e2e"))
            print(f"  end-to-end finetune (1 epoch)            samples-F1 {f1:.4f}   {rate:9.1f} img/s", flush=True)


if __name__ == "__main__":
    main()
