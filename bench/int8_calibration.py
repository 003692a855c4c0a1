"""int8 stage one's calibration on the shared protocol: what each calibration of the image graph costs in samples-F1,
and whether the cost is the image side's or the caption side's.

The fp32 lite0 + MiniLM train cache is the baseline. Every other row swaps columns in its features: the image columns
from the image graph quantized with one calibration (``--int8-calibration``: onnxruntime's MinMax, Entropy or
Percentile calibrator, how many images, the first and last convolutions float or not), the caption columns from the
dynamically quantized MiniLM graph, or both. Each row is a 5-fold fit-head run with the default options, trained
and tuned on ids 0-9999 of the shared competition subset and scored on ids 10000-11999, which nothing tuned on.

The train images are decoded once (as ``mlc extract`` decodes them: DataLoader workers, JPEG draft mode) into a
uint8 array under --work, and every graph runs over that array, so only the graphs differ; features, graphs and the
array are kept there, so a rerun only refits the heads.

    .venv/bin/python bench/int8_calibration.py [--cache-dir /work/cache-shared] [--work /tmp/mlc-int8-calibration]
        [--settings minmax-64,minmax-512,percentile-512,...] [--full minmax-64,...] [--speed 512 --repeats 3]
    .venv/bin/python bench/int8_calibration.py --smoke   # tiny random encoders, generated images: figures mean nothing

Prints, per row: the image (or caption) features' cosine to fp32 on the unseen rows, the held-out (cross-fitted) and
unseen samples-F1, the difference to fp32 on the unseen rows, the graph's quantization time and the bare int8
forward's img/s over the decoded array (one process, ONNX Runtime's lanes; noisy on a shared machine: the extract
path's side-by-side speed is bench/extract.py's --engines).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.backends import engine  # noqa: E402
from pipeline.cache import CacheReader  # noqa: E402
from pipeline.data import DataDir  # noqa: E402
from pipeline.datasets import ImageViews, collate_views  # noqa: E402
from pipeline.encoders import create_image_encoder, create_text_encoder  # noqa: E402
from pipeline.fit_head import Features, FitHeadConfig, fit_head  # noqa: E402
from pipeline.metrics import samples_f1  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.quantize import Int8Calibration, calibration_pixels, precision_label  # noqa: E402
from pipeline.runs import RunDir  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "comp5329"
CACHE = "comp5329/train__efficientnet-lite0__minilm-l6.h5"
ENC = {"image": "efficientnet-lite0", "text": "minilm-l6", "random": {}}
FIRST = 10000  # ids >= FIRST are the unseen rows


def number(image_id: str) -> int:
    return int(image_id.split(".")[0])


def pixels(data: DataDir, ids: list[str], image, work: Path) -> np.ndarray:
    """The train images as the image graph's uint8 input (N, 3, H, W), decoded once into ``work``."""
    path = work / f"pixels-{len(ids)}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    by_id = {r.image_id: r for r in data.records("train")}
    pre = image.preprocess
    loader = torch.utils.data.DataLoader(ImageViews(data, [by_id[i] for i in ids], [pre.pixels(0)], pre.draft_size()),
                                         batch_size=64, num_workers=2, collate_fn=collate_views)
    tmp = work / "pixels.partial.npy"
    out = None
    t = time.perf_counter()
    for idx, x, faults in loader:
        if faults:
            raise SystemExit(f"unreadable images: {faults[:3]}")
        if out is None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(ids), *x.shape[2:]))
        out[idx] = x[:, 0].numpy()
        if idx[0] % 2048 == 0:
            print(f"  decoded {idx[-1] + 1}/{len(ids)} images ({time.perf_counter() - t:.0f} s)", flush=True)
    out.flush()
    del out
    tmp.rename(path)
    return np.load(path, mmap_mode="r")


def image_features(label: str, x: np.ndarray, image, data: DataDir, work: Path) -> tuple[np.ndarray, float, float]:
    """(features (N, Di), seconds to build the graph, img/s of the forward) of the image graph in ``label``."""
    path = work / f"image-{label}.npy"
    t = time.perf_counter()
    eng = engine(image, None, backend="onnx", device=torch.device("cpu"), image_cut=None, text_cut=None,
                 onnx_dir=work / "onnx", precision=label, calibration=lambda n: calibration_pixels(data, image, n),
                 log=lambda m: print(f"  {m}", flush=True))
    build_s = time.perf_counter() - t
    if path.is_file():
        return np.load(path), build_s, float("nan")
    t = time.perf_counter()
    with eng.pool() as pool:
        calls = [pool.submit(eng.image, torch.from_numpy(np.array(x[s:s + 32]))) for s in range(0, len(x), 32)]
        feats = np.concatenate([c.result()["image"] for c in calls]).astype(np.float32)
    rate = len(x) / (time.perf_counter() - t)
    np.save(path, feats)
    return feats, build_s, rate


def speeds(labels: list[str], x: np.ndarray, image, data: DataDir, work: Path, repeats: int) -> dict[str, list[float]]:
    """Bare forward img/s of the fp32 image graph and each int8 one over the first images of ``x`` (in memory),
    engines alternated, ``repeats`` times, in this one process (graphs built beforehand)."""
    engs = {label: engine(image, None, backend="onnx", device=torch.device("cpu"), image_cut=None, text_cut=None,
                          onnx_dir=work / "onnx", precision=label, log=lambda m: None,
                          calibration=lambda n: calibration_pixels(data, image, n)) for label in ["fp32", *labels]}
    batch = torch.from_numpy(np.array(x))
    got: dict[str, list[float]] = {k: [] for k in engs}
    for rep in range(repeats):
        for label in list(engs) if rep % 2 == 0 else list(engs)[::-1]:
            eng = engs[label]
            eng.image(batch[:32])  # warm-up
            t = time.perf_counter()
            with eng.pool() as pool:
                [c.result() for c in [pool.submit(eng.image, batch[s:s + 32]) for s in range(0, len(batch), 32)]]
            got[label].append(len(batch) / (time.perf_counter() - t))
    return got


def text_features(data: DataDir, ids: list[str], work: Path) -> np.ndarray:
    """MiniLM's int8 (dynamically quantized) caption features of the train rows, in ``ids``' order."""
    path = work / "text-int8.npy"
    if path.is_file():
        return np.load(path)
    text = create_text_encoder(ENC["text"], **ENC["random"])
    eng = engine(None, text, backend="onnx", device=torch.device("cpu"), image_cut=None, text_cut=None,
                 onnx_dir=work / "onnx", precision="int8", log=lambda m: print(f"  {m}", flush=True))
    by_id = {r.image_id: r.caption for r in data.records("train")}
    caps = [by_id[i] for i in ids]
    order = np.argsort([len(c) for c in caps])  # length-sorted batches pad less, as the extract path does
    out = np.zeros((len(caps), text.dim), np.float32)
    for s in range(0, len(order), 64):
        rows = order[s:s + 64]
        tok = text.tokenize([caps[i] for i in rows])
        out[rows] = eng.text(tok["input_ids"], tok["attention_mask"])["text"]
    np.save(path, out)
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def fit_and_score(name: str, reader: CacheReader, feats: Features, out: Path, folds: int,
                  seed: int) -> tuple[float, float, float]:
    """(held-out samples-F1, unseen samples-F1, seconds) of the default head over ``feats``' ids < FIRST."""
    ids = np.array([number(i) for i in feats.ids])
    rows, unseen = np.flatnonzero(ids < FIRST), np.flatnonzero(ids >= FIRST)
    run = out / (name if seed == 0 else f"{name}__s{seed}")
    if not (run / "metrics.json").is_file():
        t = time.perf_counter()
        # the run folder names the fp32 cache although some columns are swapped: a bench run, never submitted
        fit_head(FitHeadConfig.build(caches=(reader.path,), out=run, folds=folds, head="concat", seed=seed),
                 loaded=([reader], feats.subset(rows)), quiet=True)
        secs = time.perf_counter() - t
    else:
        secs = float("nan")
    model = Predictor.of_run(RunDir(run).load())
    p = model.from_features(feats.image[unseen].numpy(), feats.text[unseen].numpy())
    return RunDir(run).read_metrics()["samples_f1"], samples_f1(feats.labels[unseen], model.decide(p)), secs


def main() -> None:
    global FIRST, SHARED
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path("/work/cache-shared"), help="holds the fp32 " + CACHE)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mlc-int8-calibration"))
    ap.add_argument("--settings", default="minmax-64,minmax-512,percentile-512,entropy-512,minmax-64-float-ends,"
                    "percentile-512-float-ends",
                    help="image calibrations (METHOD-IMAGES[-float-ends]), comma-separated")
    ap.add_argument("--full", default="minmax-64", help="calibrations also measured with the int8 captions (both "
                    "sides int8, as `mlc extract --precision int8` makes them)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--speed", type=int, default=0, metavar="N", help="also time the bare image forward of fp32 and "
                    "every calibration over N decoded images, side by side (alternated, --repeats times)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", default="0", help="fit-head seeds (split, initialisation, sampling), comma-separated: "
                    "each row is fitted once per seed, against fp32's fit of the same seed")
    ap.add_argument("--smoke", action="store_true", help="tiny random encoders on 48 generated images, 3 folds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        if args.smoke:
            args.work, args.folds, args.full = Path(tmp_s) / "work", 3, "minmax-8"
            args.settings, args.speed, args.repeats, args.seeds = "minmax-8,percentile-8-float-ends", 16, 1, "0,1"
            cache, SHARED, FIRST = smoke_cache(Path(tmp_s))
        else:
            cache = args.cache_dir / CACHE
        bench(args, cache)


def smoke_cache(tmp: Path) -> tuple[Path, Path, int]:
    """A tiny fp32 cache of generated images, its data folder and the first unseen id."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_ENCODERS, make_data_dir

    os.environ["MLC_PLUGINS"] = TINY_ENCODERS
    from pipeline.extract import ExtractConfig, extract

    data = make_data_dir(tmp / "tiny", n_train=48, n_test=2)
    ENC.update(image="tiny-resnet", text="tiny-bert", random={"random_init": True, "seed": 0})
    (cache,) = extract(ExtractConfig.build(data_dir=data, splits=("train",), cache_dir=tmp / "cache", workers=0,
                                           image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True))
    ids = sorted(number(i) for i in CacheReader(cache).image_ids)
    return cache, data, ids[len(ids) * 2 // 3]


def bench(args: argparse.Namespace, cache: Path) -> None:
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    reader = CacheReader(cache)
    base_feats = Features.load([reader])
    data = DataDir.open(SHARED)
    image = create_image_encoder(ENC["image"], **ENC["random"])
    unseen = np.flatnonzero(np.array([number(i) for i in base_feats.ids]) >= FIRST)
    print(f"{len(base_feats.ids)} rows ({len(unseen)} unseen), {args.folds} folds; decoding the images once",
          flush=True)
    x = pixels(data, base_feats.ids, image, args.work)
    fp32_img = base_feats.image[:, 0].numpy()
    check, _, _ = image_features("fp32", x[:64], image, data, args.work / "check")
    print(f"fp32 graph over the decoded array vs the cache: max |diff| {np.abs(check - fp32_img[:64]).max():.2e}")
    labels = {s: precision_label(Int8Calibration.parse(s)) for s in args.settings.split(",")}
    images = {"fp32": (fp32_img, float("nan"), float("nan"))}
    for spec, label in labels.items():
        print(f"image graph {label}", flush=True)
        images[spec] = image_features(label, x, image, data, args.work)
    if args.speed:
        rates = speeds(list(labels.values()), x[:args.speed], image, data, args.work, args.repeats)
        print(f"\nbare image forward over {args.speed} images in memory, img/s (runs; ratio to fp32, run by run):")
        for label, runs in rates.items():
            ratio = [r / f for r, f in zip(runs, rates["fp32"], strict=True)]
            print(f"  {label:28s} {statistics.median(runs):7.1f}  ({' / '.join(f'{r:.1f}' for r in runs)}; "
                  f"{' / '.join(f'{r:.2f}x' for r in ratio)}, median {statistics.median(ratio):.2f}x)", flush=True)
    t8 = text_features(data, base_feats.ids, args.work)
    rows = [("fp32", "fp32")] + [("fp32", "int8")] + [(s, "fp32") for s in labels] + \
        [(s, "int8") for s in args.full.split(",") if s]
    out = args.work / "runs"
    seeds = [int(v) for v in args.seeds.split(",")]
    print(f"\nseeds {seeds}: held-out, unseen and (unseen - fp32's unseen) are means over the seeds; the run-by-run "
          "differences follow")
    print(f"{'image':30s} {'caption':8s} {'cos img':>8s} {'cos txt':>8s} {'held-out':>9s} {'unseen':>7s} "
          f"{'vs fp32':>8s} {'quant s':>8s} {'img/s':>7s} {'fit s':>6s}  by seed")
    base: dict[int, float] = {}
    for img, txt in rows:
        feats = Features(base_feats.ids, torch.from_numpy(images[img][0])[:, None], base_feats.text if txt == "fp32"
                         else torch.from_numpy(t8), base_feats.labels, base_feats.token_dim)
        name = f"{'fp32' if img == 'fp32' else labels[img]}__{txt}"
        got = [fit_and_score(name, reader, feats, out, args.folds, seed) for seed in seeds]
        for seed, (_, f1, _) in zip(seeds, got, strict=True):
            base.setdefault(seed, f1)  # the first row is fp32's
        diffs = [f1 - base[seed] for seed, (_, f1, _) in zip(seeds, got, strict=True)]
        ci = cosine(images[img][0][unseen], fp32_img[unseen]).mean()
        ct = cosine(feats.text[unseen].numpy(), base_feats.text[unseen].numpy()).mean()
        print(f"{'fp32' if img == 'fp32' else labels[img]:30s} {txt:8s} {ci:8.4f} {ct:8.4f} "
              f"{np.mean([g[0] for g in got]):9.4f} {np.mean([g[1] for g in got]):7.4f} {np.mean(diffs):+8.4f} "
              f"{images[img][1]:8.1f} {images[img][2]:7.1f} {sum(g[2] for g in got):6.0f}  "
              + " / ".join(f"{d:+.4f}" for d in diffs), flush=True)


if __name__ == "__main__":
    main()
