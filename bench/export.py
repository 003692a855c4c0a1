"""Benchmark `mlc export --precision`: size of the export folder and label agreement with float32 and with the run.

Exports RUN (default: runs/demo, `make demo`'s run) as an ONNX folder in float32, float16 and int8, labels the
test photos of DATA (default: examples/comp5329-mini, 201 photos) through each with `pipeline.load` (ONNX Runtime,
no torch), and prints per dtype: folder and model.onnx size, the share of photos whose label set equals
float32's and the run's own submission (`mlc submit`, RUN/submission.csv, when there), and the largest
probability difference from float32.

    .venv/bin/python bench/export.py [--run runs/demo] [--data examples/comp5329-mini] [--out /tmp/mlc-bench-export]
    .venv/bin/python bench/export.py --smoke   # a tiny random-encoder run on generated data (the slow suite)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data import DataDir  # noqa: E402
from pipeline.export import ExportConfig, export  # noqa: E402
from pipeline.predictor import load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "demo")
    ap.add_argument("--data", type=Path, default=REPO / "examples" / "comp5329-mini")
    ap.add_argument("--out", type=Path, default=Path("/tmp/mlc-bench-export"))
    ap.add_argument("--reuse", action="store_true", help="use exports already in --out")
    ap.add_argument("--smoke", action="store_true", help="a tiny random-encoder run on generated data: checks that "
                    "the script runs (its figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        from _smoke import tiny_env, tiny_run

        tiny_env()
        with tempfile.TemporaryDirectory() as tmp:
            args.data, args.run = tiny_run(Path(tmp))
            args.out, args.reuse = Path(tmp) / "exports", False
            bench(args)
        return
    bench(args)


def bench(args: argparse.Namespace) -> None:
    """Export in each dtype, label the test photos through each, print the table."""
    data = DataDir.open(args.data)
    records = data.records("test")
    photos = [data.image_dir / r.image_id for r in records]
    captions = [r.caption for r in records]
    submitted = {}
    if (args.run / "submission.csv").is_file():
        for line in (args.run / "submission.csv").read_text().splitlines()[1:]:
            image_id, labels = line.split(",", 1)
            submitted[image_id] = labels.split()
    probs, labels, sizes = {}, {}, {}
    for dtype in ("fp32", "fp16", "int8"):
        folder = args.out / dtype
        if not (args.reuse and (folder / "export.json").is_file()):
            export(ExportConfig.build(run=args.run, out=folder, precision=dtype))
        sizes[dtype] = (sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
                        (folder / "model.onnx").stat().st_size)
        model = load(folder)
        probs[dtype] = model.predict_proba(photos, captions)
        labels[dtype] = [" ".join(map(str, sorted(x))) for x in model.predict(photos, captions)]
    print(f"{len(photos)} test photos of {args.data}; run {args.run}")
    print(f"{'dtype':8} {'folder MB':>10} {'model.onnx MB':>14} {'= float32 labels':>17} {'= submission':>13} "
          f"{'max |p - p32|':>14}")
    for dtype in probs:
        same32 = np.mean([a == b for a, b in zip(labels[dtype], labels["fp32"], strict=True)])
        same_sub = np.mean([labels[dtype][i] == " ".join(sorted(submitted[r.image_id], key=int))
                            for i, r in enumerate(records)]) if submitted else float("nan")
        diff = float(np.abs(probs[dtype] - probs["fp32"]).max())
        print(f"{dtype:8} {sizes[dtype][0] / 1e6:10.1f} {sizes[dtype][1] / 1e6:14.1f} {100 * same32:16.1f}% "
              f"{100 * same_sub:12.1f}% {diff:14.2e}")


if __name__ == "__main__":
    main()
