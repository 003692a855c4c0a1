"""Benchmark stage 1: `mlc extract` through torch and through ONNX Runtime, side by side.

For each encoder pair, on the first --images labelled images of the shared subset: images per second
of the real extract path (fingerprint, JPEG decoding in DataLoader workers, encoding, chunk commits,
HDF5 assembly; encoders loaded and graphs exported beforehand, as a rerun finds them) with three
engines, alternated so each sees the same machine load, each run in a fresh process (as `mlc extract`
runs), median of --repeats:
  torch eager (plain memory layout), torch (channels_last: the torch backend as shipped), onnx.
Also the bare ONNX forward over tensors already in memory (the ceiling the extract path approaches),
the largest difference between ONNX and torch features per encoder, and (--tune) how the two cores
are best split between ONNX Runtime's threads and the decode workers. ``--engines onnx,onnx int8`` compares
the fp32 graphs with their int8 versions (``--precision int8``; quantized once beforehand) and adds the
feature cosine between the two; ``onnx int8-<calibration>`` (e.g. ``onnx int8-percentile-512-float-ends``) is
int8 with ``--int8-calibration <calibration>``.

    .venv/bin/python bench/extract.py [--images 2000] [--repeats 3] [--tune] [--engines torch eager,torch,onnx]
    .venv/bin/python bench/extract.py --smoke   # tiny random encoders on 12 generated images (the slow suite)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# tiny-bert (the text side of the ResNet50 pair) is a test encoder, registered by the tests' plugin module;
# the runs this script spawns inherit it.
os.environ.setdefault("MLC_PLUGINS", str(REPO / "tests" / "tiny_encoders.py"))

from _subset import first_rows  # noqa: E402

from pipeline.backends import engine  # noqa: E402
from pipeline.data import DataDir  # noqa: E402
from pipeline.encoders import create_image_encoder, create_text_encoder  # noqa: E402
from pipeline.features import Job, LoaderOptions, Recipe, build_cache, cache_path  # noqa: E402
from pipeline.images import load_image  # noqa: E402
from pipeline.quantize import calibration_pixels, is_int8  # noqa: E402

ENGINES = ("torch eager", "torch", "onnx")
ALL_ENGINES = (*ENGINES, "onnx int8")


def make_engine(name: str, image, text, onnx_dir: Path, data: Path | None = None):
    """One of the three ways to run the same encoders (ONNX graphs exported to / reused from onnx_dir).
    The channels_last engine gets its own copy of the image encoder: it converts the weights' layout in
    place."""
    kw = dict(device=torch.device("cpu"), image_cut=None, text_cut=None, onnx_dir=onnx_dir, log=lambda m: None)
    if name == "onnx":
        return engine(image, text, backend="onnx", **kw)
    if is_int8_engine(name):  # calibrated on the data's first images, as extract does
        return engine(image, text, backend="onnx", precision=name.split(" ", 1)[1],
                      calibration=lambda n: calibration_pixels(DataDir.open(data), image, n), **kw)
    if name == "torch eager":
        return engine(image, text, backend="torch", channels_last=False, **kw)
    return engine(copy.deepcopy(image), text, backend="torch", **kw)


def is_int8_engine(name: str) -> bool:
    """``onnx int8`` or ``onnx int8-<calibration>``."""
    return name.startswith("onnx ") and is_int8(name.split(" ", 1)[1])


def engines(image, text, onnx_dir: Path, names: tuple[str, ...] = ENGINES, data: Path | None = None) -> dict:
    return {name: make_engine(name, image, text, onnx_dir, data) for name in names}


def extract_rate(data: Path, recipe: Recipe, image, text, eng, workers: int, tmp: Path) -> float:
    """Images/s of the extract path into a fresh cache folder (removed afterwards)."""
    out = tmp / "cache-run"
    dd = DataDir.open(data)
    n = len(dd.records("train"))
    job = Job(recipe, dd, "train", cache_path(out, data, "train", recipe),
              LoaderOptions(encode_batch=32, workers=workers), chunk_rows=512)
    t = time.perf_counter()
    build_cache(job, image, text, eng, torch.device("cpu"))
    rate = n / (time.perf_counter() - t)
    shutil.rmtree(out)
    return rate


def bare_rate(eng, x: torch.Tensor, captions: list[str], text) -> float:
    """Images/s of the forward alone over in-memory tensors, fed as the extract path feeds it: images in
    batches of 32 and captions as the extract path batches them (length-sorted, 32 a batch), spread over
    the engine's lanes."""
    from pipeline.features import submit_texts

    eng.image(x[:32])  # warm-up
    t = time.perf_counter()
    with eng.pool() as pool:
        calls = [pool.submit(eng.image, x[s:s + 32]) for s in range(0, len(x), 32)]
        _, gather = submit_texts(text, eng.text, captions, 32, None, pool.submit)
        gather(), [c.result() for c in calls]
    return len(x) / (time.perf_counter() - t)


def max_diffs(engs: dict, x: torch.Tensor, captions: list[str], text) -> tuple[float, float]:
    tok = text.tokenize(captions[:64])
    if "torch" not in engs:
        return float("nan"), float("nan")
    img = np.abs(engs["onnx"].image(x[:32])["image"] - engs["torch"].image(x[:32])["image"]).max()
    txt = np.abs(engs["onnx"].text(tok["input_ids"], tok["attention_mask"])["text"]
                 - engs["torch"].text(tok["input_ids"], tok["attention_mask"])["text"]).max()
    return float(img), float(txt)


def _encoders(image_name: str, text_name: str):
    random = image_name == "resnet50" or image_name.startswith("tiny")  # no ResNet50 weights here: same FLOPs
    image = create_image_encoder(image_name, random_init=random, seed=0 if random else None)
    text = create_text_encoder(text_name, random_init=text_name.startswith("tiny"), seed=0)
    return image, text, Recipe(image_encoder=image_name, text_encoder=text_name, random_init=random)


def _sample(image, data: Path, n: int = 256) -> tuple[torch.Tensor, list[str]]:
    """The first n images as uint8 tensors (decoded once) and their captions."""
    dd = DataDir.open(data)
    records = dd.records("train")[:n]
    tf = image.preprocess.pixels(0)
    return torch.stack([tf(load_image(dd.image_path(r.image_id))) for r in records]), [r.caption for r in records]


def measure(what: str, pair: str, data: Path, workers: int, tmp: Path) -> float:
    """One figure, in this (fresh) process: ``what`` is an engine's extract rate or "bare onnx"."""
    image, text, recipe = _encoders(*pair.split("+"))
    eng = make_engine("onnx" if what == "bare onnx" else what, image, text, tmp / "onnx", data)
    if is_int8_engine(what):
        recipe = dataclasses.replace(recipe, precision=what.split(" ", 1)[1])
    if what == "bare onnx":
        x, captions = _sample(image, data)
        return bare_rate(eng, x, captions, text)
    return extract_rate(data, recipe, image, text, eng, workers, tmp)


def cosines(engs: dict, x: torch.Tensor, captions: list[str], text) -> dict[str, tuple[float, float]]:
    """Mean feature cosine of each int8 engine to the fp32 ONNX one: images, captions."""
    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())
    tok = text.tokenize(captions)
    a = engs["onnx"]
    return {name: (cos(a.image(x)["image"], b.image(x)["image"]),
                   cos(a.text(tok["input_ids"], tok["attention_mask"])["text"],
                       b.text(tok["input_ids"], tok["attention_mask"])["text"]))
            for name, b in engs.items() if is_int8_engine(name)}


def bench_pair(pair: str, data: Path, repeats: int, workers: int, tmp: Path, names: tuple[str, ...] = ENGINES) -> dict:
    """Every figure of one pair. Each measurement runs in a process of its own, as `mlc extract` does: in
    one long process, an ONNX extract right after a torch one ran 5% slower (113 vs 119 img/s) than
    the same extract in a fresh process."""
    image, text, _ = _encoders(*pair.split("+"))
    t = time.perf_counter()
    engs = engines(image, text, tmp / "onnx", names, data)  # the ONNX graphs, exported once for every process
    export_s = time.perf_counter() - t
    rates: dict[str, list[float]] = {k: [] for k in (*names, "bare onnx")}
    for _ in range(repeats):
        for name in (*names, "bare onnx"):
            out = subprocess.run([sys.executable, __file__, "--measure", name, "--pairs", pair, "--data", str(data),
                                  "--workers", str(workers), "--tmp", str(tmp)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"measuring {name} failed:\n{out.stderr[-3000:]}")
            rates[name].append(float(out.stdout.strip().splitlines()[-1]))
    x, captions = _sample(image, data)
    cos = cosines(engs, x, captions, text) if "onnx" in engs else {}
    return {"rates": rates, "diffs": max_diffs(engs, x, captions, text), "cosines": cos, "export_s": export_s,
            "n": len(DataDir.open(data).records("train"))}


def tune(data: Path, tmp: Path) -> None:
    """lite0 + MiniLM through ONNX: extract img/s for each split of the cores (threads x workers)."""
    image, text = create_image_encoder("efficientnet-lite0"), create_text_encoder("minilm-l6")
    recipe = Recipe(image_encoder="efficientnet-lite0", text_encoder="minilm-l6")
    print("onnx threads x decode workers (lite0 + MiniLM extract, img/s):")
    for threads in (2, 1):
        torch.set_num_threads(threads)
        eng = engine(image, text, backend="onnx", device=torch.device("cpu"), image_cut=None, text_cut=None,
                     onnx_dir=tmp / "onnx", log=lambda m: None)
        for workers in (0, 1, 2, 3):
            rate = extract_rate(data, recipe, image, text, eng, workers, tmp)
            print(f"  {threads} ORT thread(s), {workers} decode worker(s): {rate:7.1f}", flush=True)
    torch.set_num_threads(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "comp5329")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--resnet-images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--pairs", default="efficientnet-lite0+minilm-l6,resnet50+tiny-bert")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, among {ALL_ENGINES} and "
                    "'onnx int8-<calibration>' (METHOD-IMAGES[-float-ends], as --int8-calibration)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # one figure, internal
    ap.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny random encoders on 12 generated images, once: checks "
                    "that the script runs (its figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        args.pairs, args.repeats, args.images = "tiny-resnet+tiny-bert", 1, 12
        args.engines = "torch,onnx,onnx int8-minmax-8-float-ends"
        args.workers = 0
    if args.measure:
        print(measure(args.measure, args.pairs, args.data, args.workers, args.tmp))
        return
    if not args.data.is_dir():
        args.data = REPO / "examples" / "comp5329-mini"
    with tempfile.TemporaryDirectory() as tmp_s:
        if args.smoke:
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import make_data_dir

            args.data = make_data_dir(Path(tmp_s) / "tiny", n_train=args.images, n_test=2)
        run(args)


def run(args: argparse.Namespace) -> None:
    print(f"data {args.data}; batch 32, {torch.get_num_threads()} threads, {args.workers} decode workers; "
          f"median of {args.repeats}, engines alternated, each run in a fresh process")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.tune:
            tune(first_rows(args.data, args.images, tmp / "tune"), tmp)
        for pair in args.pairs.split(","):
            image_name, text_name = pair.split("+")
            n = args.resnet_images if image_name == "resnet50" else args.images
            data = first_rows(args.data, n, tmp / pair)
            names = tuple(args.engines.split(","))
            r = bench_pair(pair, data, args.repeats, args.workers, tmp, names)
            runs, rates = r["rates"], {k: statistics.median(v) for k, v in r["rates"].items()}
            base = names[0]  # ratios against the first engine listed
            print(f"\n{pair} ({'random init, ' if image_name == 'resnet50' else ''}{r['n']} images; ONNX export "
                  f"{r['export_s']:.1f} s once):")
            width = max(12, *map(len, names))
            for name in (*names, "bare onnx"):
                print(f"  {name:{width}s} {rates[name]:7.1f} img/s   {rates[name] / rates[base]:5.2f}x {base}   (runs: "
                      f"{' / '.join(f'{v:.1f}' for v in runs[name])})")
            for other in names[1:]:
                ratios = [o / e for o, e in zip(runs[other], runs[base], strict=True)]
                print(f"  {other} / {base}, run by run: {' / '.join(f'{v:.2f}x' for v in ratios)}")
            for name, (ci, ct) in r["cosines"].items():
                print(f"  {name} vs fp32 feature cosine (mean over 256 images): image {ci:.4f}, text {ct:.4f}")
            print(f"  extract / bare onnx forward: {rates['onnx'] / rates['bare onnx']:.2f}")
            if "torch" in names:
                print(f"  max |onnx - torch|: image {r['diffs'][0]:.2e}, text {r['diffs'][1]:.2e}", flush=True)


if __name__ == "__main__":
    main()
