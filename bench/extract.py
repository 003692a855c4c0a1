"""Benchmark stage 1: `mlc extract` throughput against a bare forward loop (the ceiling).

For each encoder: images (captions) per second of the real extract path (JPEG decoding in
DataLoader workers, chunk commits, progress bar) and of a bare `inference_mode` forward over
tensors already in memory, same batch size and threads, measured side by side, median of
--repeats. Also this machine's fp32 matmul rate and ResNet50's share of it.

    .venv/bin/python bench/extract.py [--data ../shared/data/comp5329] [--images 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _subset import first_rows  # noqa: E402

from pipeline.data import DataDir, load_image  # noqa: E402
from pipeline.encoders import create_image_encoder, create_text_encoder  # noqa: E402
from pipeline.extract import ExtractConfig  # noqa: E402
from pipeline.features import Job, build_cache, cache_path  # noqa: E402

RESNET50_GFLOP = 8.18  # 4.09 GMACs per 224x224 image (torchvision's published figure) x 2


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def bare_text_seconds(enc: torch.nn.Module, captions: list[str], batch: int) -> float:
    """Seconds for tokenise + length-sorted batched forward over all captions (extract's text path)."""
    t = time.perf_counter()
    with torch.inference_mode():
        tok = enc.tokenize(captions)
        lengths = tok["attention_mask"].sum(1)
        order = torch.argsort(lengths, descending=True)
        for s in range(0, len(captions), batch):
            rows = order[s:s + batch]
            m = int(lengths[rows].max())
            enc(tok["input_ids"][rows, :m], tok["attention_mask"][rows, :m])
    return time.perf_counter() - t


def bench_pair(image_name: str, text_name: str, data: Path, batch: int, repeats: int, random_init: bool,
               workers: int, tmp: Path) -> dict:
    """Median rates: bare image forward, bare image+text (the ceiling), and the real extract path."""
    enc = create_image_encoder(image_name, random_init=random_init, seed=0 if random_init else None)
    enc = enc.eval().to(memory_format=torch.channels_last)
    dd = DataDir.open(data)
    records = dd.records("train")
    tf = enc.preprocess.transform(0)
    x = torch.stack([tf(load_image(dd.image_path(r.image_id))) for r in records])
    x = x.contiguous(memory_format=torch.channels_last)
    captions = [r.caption for r in records]
    txt_enc = create_text_encoder(text_name, random_init=random_init, seed=0 if random_init else None).eval()
    bare, ceiling, real = [], [], []
    for k in range(repeats):
        with torch.inference_mode():
            enc(x[:batch])  # warm-up
            t = time.perf_counter()
            for s in range(0, len(x), batch):
                enc(x[s:s + batch])
            t_img = time.perf_counter() - t
        t_txt = bare_text_seconds(txt_enc, captions, batch * 2)
        bare.append(len(x) / t_img)
        ceiling.append(len(x) / (t_img + t_txt))
        out = tmp / f"cache-{image_name}-{k}"
        cfg = ExtractConfig(data_dir=data, image_encoder=image_name, text_encoder=text_name, splits=("train",),
                            random_init=random_init, batch_size=batch, workers=workers, out_dir=out,
                            chunk_rows=batch * 4)
        # The extract path itself (fingerprint, decode workers, encode, chunk commits, HDF5 assembly),
        # with the encoders already loaded, as the bare loops have them.
        t = time.perf_counter()
        recipe = cfg.recipe()
        build_cache(Job(recipe, DataDir.open(data), "train", cache_path(out, data, "train", recipe), cfg,
                        cfg.chunk_rows), enc, txt_enc, torch.device("cpu"))
        real.append(len(x) / (time.perf_counter() - t))
        shutil.rmtree(out)
    return {"bare": statistics.median(bare), "ceiling": statistics.median(ceiling),
            "extract": statistics.median(real)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "comp5329")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--encoders", default="efficientnet-lite0,efficientnet-lite2,resnet50")
    args = ap.parse_args()
    if not args.data.is_dir():
        args.data = REPO / "examples" / "comp5329-mini"
    print(f"data {args.data}, {args.images} images, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.workers} decode worker(s), median of {args.repeats}")
    gf = matmul_gflops()
    print(f"fp32 matmul (2048^3): {gf:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        data = first_rows(args.data, args.images, tmp)
        print(f"{'image + text encoder':34s} {'bare image':>10s} {'bare img+txt':>12s} {'extract':>8s} "
              f"{'extract/bare':>12s}   (images per second)")
        for name in args.encoders.split(","):
            random = name == "resnet50"  # no ResNet50 weights here: random init, same FLOPs
            text = "tiny-bert" if random else "minilm-l6"
            r = bench_pair(name, text, data, args.batch_size, args.repeats, random, args.workers, tmp)
            line = (f"{name + ' + ' + text:34s} {r['bare']:10.2f} {r['ceiling']:12.2f} {r['extract']:8.2f} "
                    f"{r['extract'] / r['ceiling']:12.2f}")
            if random:
                rate = r["bare"] * RESNET50_GFLOP
                line += (f"   resnet50 bare {1 / r['bare']:.3f} s/img = {rate:.1f} GFLOP/s = "
                         f"{rate / gf:.0%} of matmul")
            print(line, flush=True)
        caps = [r.caption for r in DataDir.open(data).records("train")]
        minilm = create_text_encoder("minilm-l6").eval()
        secs = statistics.median(bare_text_seconds(minilm, caps, 64) for _ in range(args.repeats))
        print(f"minilm-l6 alone: {len(caps) / secs:.1f} captions/s (tokenise + length-sorted batches of 64)")


if __name__ == "__main__":
    main()
