"""Benchmark `mlc predict` cold start: one photo, a fresh process each time, wall time and peak memory.

Side by side, alternated, median of --repeats fresh processes each:
  export  `mlc predict EXPORT photo --caption ...` on an ONNX export (onnxruntime + tokenizers, no torch)
  run     `mlc predict RUN photo --caption ...` on the run folder itself (torch encoders, ONNX graphs cached
          in the user graph cache (~/.cache/mlc/onnx) and checked against torch at load)
The export is written first (`mlc export RUN --out EXPORT --precision fp16`) unless it exists. Wall time is the
whole command as a user runs it (interpreter start included); peak RSS is the child's (wait4 rusage).

    .venv/bin/python bench/predict.py [--run runs/demo] [--export /tmp/mlc-bench-predict] [--repeats 5]
    .venv/bin/python bench/predict.py --smoke   # a tiny random-encoder run on generated data, once (the slow suite)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "comp5329-mini" / "data" / "30000.jpg"


def once(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one fresh `python -m pipeline.cli ARGS` process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t
    out = proc.stdout.read().decode() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr.read().decode() if proc.stderr else ''}")
    assert "labels (probability)" in out, out
    return secs, usage.ru_maxrss / 1024  # Linux: KB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "demo")
    ap.add_argument("--export", type=Path, default=Path("/tmp/mlc-bench-predict"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="a tiny random-encoder run on generated data, once: checks "
                    "that the script runs (its figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        from _smoke import FIRST_ID, tiny_env, tiny_run

        tiny_env()  # the spawned processes inherit the tiny encoders
        with tempfile.TemporaryDirectory() as tmp:
            data, args.run = tiny_run(Path(tmp))
            args.export, args.repeats = Path(tmp) / "export", 1
            bench(args, data / "data" / f"{FIRST_ID}.jpg")
        return
    bench(args, PHOTO)


def bench(args: argparse.Namespace, photo: Path) -> None:
    """Export once when needed, then time both ways alternated; print every run and the medians."""
    if not (args.export / "export.json").is_file():
        subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(args.run), "--out", str(args.export),
                        "--precision", "fp16"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    common = [str(photo), "--caption", "a man riding a horse on a beach"]
    paths = {"export": ["predict", str(args.export), *common], "run": ["predict", str(args.run), *common]}
    once(paths["run"])  # the run's ONNX graphs exported once beforehand, as a second call finds them
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
    for _ in range(args.repeats):
        for name, cmd in paths.items():
            got[name].append(once(cmd))
    print(f"one photo, fresh process, median of {args.repeats} (each run: seconds / peak MB)")
    for name, runs in got.items():
        secs, mb = statistics.median(s for s, _ in runs), statistics.median(m for _, m in runs)
        print(f"  {name:7} {secs:6.2f} s {mb:7.0f} MB   " + "  ".join(f"{s:.2f}/{m:.0f}" for s, m in runs))
    e, r = (statistics.median(s for s, _ in got[k]) for k in ("export", "run"))
    em, rm = (statistics.median(m for _, m in got[k]) for k in ("export", "run"))
    print(f"  export / run: time {e / r:.2f}x, memory {em / rm:.2f}x")


if __name__ == "__main__":
    main()
