"""fp32 against bf16 training on this CPU, side by side in one run: rows/s and samples-F1.

Two towers, each trained by mlc's own loop (``training.train``) in both precisions, alternated and repeated:
- caption: MiniLM + a linear layer (``crossfit``'s fold task), trained on shared-subset ids 0..N-1
  for one epoch, scored (samples-F1 at 0.5 and with per-class thresholds, cross-fitted) on ids
  10000..10999, which it never saw;
- image: EfficientNet-Lite0 + a linear layer, one epoch end to end on M images (uint8 views decoded
  once beforehand, so only the model is timed); rows/s only.

    OMP_NUM_THREADS=1 .venv/bin/python bench/precision.py [--rows 2000] [--images 96] [--repeats 2]
    .venv/bin/python bench/precision.py --smoke   # tiny random encoders on generated data, once (the slow suite)

Prints every run, then medians per precision and the bf16 / fp32 ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.crossfit import CaptionTower, CrossfitConfig, _fold_task  # noqa: E402
from pipeline.data import DataDir  # noqa: E402
from pipeline.device import autocast, cpu_bf16  # noqa: E402
from pipeline.encoders import create_image_encoder, create_text_encoder  # noqa: E402
from pipeline.evaluation import cross_fitted_f1  # noqa: E402
from pipeline.images import load_image  # noqa: E402
from pipeline.metrics import samples_f1  # noqa: E402
from pipeline.thresholds import apply_thresholds  # noqa: E402
from pipeline.training import Task, make_sampler, train  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "comp5329"
# the encoders and the scored rows (row indices); --smoke swaps in tiny random encoders and its own rows
ENC = {"image": "efficientnet-lite0", "text": "minilm-l6", "random": {}, "held": range(10000, 11000)}


def caption_run(precision: str, caps: list[str], y: np.ndarray, rows: int) -> tuple[float, float, float]:
    """(train rows/s, samples-F1 at 0.5, tuned cross-fitted samples-F1 on ids 10000-10999)."""
    torch.manual_seed(0)
    cfg = CrossfitConfig.build(data_dir=SHARED, folds=2, epochs=1)
    tower = CaptionTower(create_text_encoder(ENC["text"], **ENC["random"]), y.shape[1])
    tokens = tower.text.tokenize(caps)
    cpu = torch.device("cpu")
    res = train(_fold_task(cfg, tower, tokens, y, np.arange(rows), cpu, precision, set()), cfg.train, device=cpu,
                log=lambda m: None, precision=precision)
    tower.load_state_dict(res.best_state)
    tower.eval()
    held = np.asarray(ENC["held"])
    scores = []
    with torch.inference_mode():
        for s in range(0, len(held), 128):
            idx = held[s:s + 128]
            m = tokens["attention_mask"][idx]
            t = int(m.sum(1).max())
            with autocast(cpu, precision):
                scores.append(torch.sigmoid(tower(tokens["input_ids"][idx, :t], m[:, :t]).float()).numpy())
    p = np.concatenate(scores)
    return (res.history[0]["train_rows_per_second"], samples_f1(y[held], apply_thresholds(p, 0.5)),
            cross_fitted_f1(y[held], p, "per-class", 0))


def image_run(precision: str, pixels: torch.Tensor, y: np.ndarray) -> float:
    """Train rows/s of lite0 + a linear layer, one epoch over ``pixels`` (uint8, already decoded)."""
    torch.manual_seed(0)
    enc = create_image_encoder(ENC["image"], **ENC["random"]).to(memory_format=torch.channels_last)
    model = nn.Sequential(enc, nn.Linear(enc.dim, y.shape[1]))
    cfg = CrossfitConfig.build(data_dir=SHARED, folds=2, epochs=1, batch_size=16, sampler="uniform")
    rows = np.arange(len(pixels))
    sampler = make_sampler(cfg.train, y[rows])
    x = enc.preprocess.normalize(pixels).contiguous(memory_format=torch.channels_last)

    def batches(epoch: int):
        order = sampler.order()
        for s in range(0, len(order), cfg.train.batch_size):
            i = order[s:s + cfg.train.batch_size]
            yield {"x": x[i], "labels": torch.from_numpy(y[i.numpy()]).float()}

    task = Task(model=model, param_groups=[{"params": list(model.parameters()), "lr": 1e-4}], y=y[rows],
                train_rows=rows, sampler=sampler, steps_per_epoch=-(-len(rows) // cfg.train.batch_size),
                batches=batches, forward=lambda m, b: m(b["x"]),
                predict=lambda m: (rows[:2], np.full((2, y.shape[1]), 0.5)))
    res = train(task, cfg.train, device=torch.device("cpu"), log=lambda m: None, precision=precision)
    return res.history[0]["train_rows_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000, help="caption tower training rows")
    ap.add_argument("--images", type=int, default=96, help="image tower training rows")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny random encoders on 24 generated rows, once: checks "
                    "that the script runs (its figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        global SHARED
        from _smoke import IMAGE, TEXT, tiny_data, tiny_env

        tiny_env()
        ENC.update(image=IMAGE, text=TEXT, random={"random_init": True, "seed": 0}, held=range(16, 24))
        args.rows, args.images, args.repeats = 16, 8, 1
        with tempfile.TemporaryDirectory() as tmp:
            SHARED = tiny_data(Path(tmp) / "data")
            bench(args)
        return
    bench(args)


def bench(args: argparse.Namespace) -> None:
    """Both towers in both precisions, alternated; every run, then the medians."""
    print(f"CPU bf16: {cpu_bf16()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), capability "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
    data = DataDir.open(SHARED)
    recs = data.records("train")
    y = data.label_space().multi_hot([r.labels for r in recs])
    caps = [r.caption for r in recs]
    pre = create_image_encoder(ENC["image"], **ENC["random"]).preprocess
    pixels = torch.stack([pre.pixels(0)(load_image(data.image_path(r.image_id))) for r in recs[:args.images]])
    got: dict[tuple[str, str], list] = {}
    for rep in range(args.repeats):
        for precision in ("fp32", "bf16") if rep % 2 == 0 else ("bf16", "fp32"):
            c = caption_run(precision, caps, y, args.rows)
            i = image_run(precision, pixels, y[:args.images])
            got.setdefault(("caption", precision), []).append(c)
            got.setdefault(("image", precision), []).append(i)
            print(f"run {rep + 1} {precision}: caption {c[0]:.1f} rows/s, F1@0.5 {c[1]:.4f}, F1 tuned {c[2]:.4f}; "
                  f"image {i:.1f} rows/s", flush=True)
    print("\nmedians")
    for tower in ("caption", "image"):
        speed = {p: statistics.median(v[0] if tower == "caption" else v for v in got[(tower, p)])
                 for p in ("fp32", "bf16")}
        line = f"{tower:8s} fp32 {speed['fp32']:7.1f} rows/s  bf16 {speed['bf16']:7.1f} rows/s  " \
               f"ratio {speed['bf16'] / speed['fp32']:.2f}x"
        if tower == "caption":
            f1 = {p: statistics.median(v[2] for v in got[(tower, p)]) for p in ("fp32", "bf16")}
            line += f"  samples-F1 fp32 {f1['fp32']:.4f}  bf16 {f1['bf16']:.4f}"
        print(line)


if __name__ == "__main__":
    main()
