"""Benchmark the fast test suite (`pytest -m "not slow"`) of two checkouts side by side.

Each checkout is exported with `git archive` into a fresh folder (a fresh clone: no graph cache, no
pytest cache, no `../shared`), then the two suites run alternately, one at a time, --repeats times each.
A pytest plugin counts the ONNX encoder exports of each run and the seconds they took. Prints every run,
then the medians and the ratio after / before.

    .venv/bin/python bench/suite.py [--base b3493dd] [--head HEAD] [--repeats 1] [--select EXPR]
    .venv/bin/python bench/suite.py --smoke   # HEAD against HEAD, tests/test_metrics.py only (the slow suite)
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = textwrap.dedent('''
    import time
    import pipeline.backends as b
    stats = {"n": 0, "s": 0.0}
    _real = b.export
    def _export(*a, **k):
        t = time.perf_counter()
        try:
            return _real(*a, **k)
        finally:
            stats["n"] += 1
            stats["s"] += time.perf_counter() - t
    b.export = _export
    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line(f"mlc-bench exports {stats['n']} {stats['s']:.1f}")
''')


def checkout(rev: str, root: Path) -> Path:
    folder = root / rev.replace("/", "_")
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run_suite(folder: Path, plugins: Path, select: str | None, paths: tuple[str, ...] = ()) -> dict[str, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "mlc_bench_exports", "-p", "no:cacheprovider",
           *paths]
    if select:
        cmd += ["-k", select]
    env = {"PYTHONPATH": f"{folder}:{plugins}", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    out = proc.stdout + proc.stderr
    exports = re.search(r"mlc-bench exports (\d+) ([\d.]+)", out)
    passed = re.search(r"(\d+) passed", out)
    if proc.returncode != 0 or exports is None:
        raise SystemExit(f"{folder}: the suite failed (exit {proc.returncode}):\n{out[-3000:]}")
    return {"wall": wall, "exports": int(exports[1]), "export_s": float(exports[2]),
            "passed": int(passed[1]) if passed else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="b3493dd")
    ap.add_argument("--head", default="HEAD")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--select", default=None, help="pytest -k expression (a quick check of this script)")
    ap.add_argument("--smoke", action="store_true", help="HEAD against HEAD, tests/test_metrics.py only, once: checks "
                    "that the script runs (its figures mean nothing)")
    args = ap.parse_args()
    paths: tuple[str, ...] = ()
    if args.smoke:
        args.base, args.head, args.repeats, paths = "HEAD", "HEAD", 1, ("tests/test_metrics.py",)
    with tempfile.TemporaryDirectory(prefix="mlc-bench-suite-") as tmp:
        root = Path(tmp)
        (root / "plugins").mkdir()
        (root / "plugins" / "mlc_bench_exports.py").write_text(PLUGIN)
        (root / "before").mkdir(), (root / "after").mkdir()  # the same revision may be both
        folders = {"before": checkout(args.base, root / "before"), "after": checkout(args.head, root / "after")}
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for i in range(args.repeats):
            for name, folder in folders.items():  # alternated: load changes hit both alike
                r = run_suite(folder, root / "plugins", args.select, paths)
                runs[name].append(r)
                print(f"run {i + 1} {name:6s} wall {r['wall']:.1f} s  tests {r['passed']}  "
                      f"ONNX exports {r['exports']} ({r['export_s']:.1f} s)", flush=True)
        med = {k: statistics.median(r["wall"] for r in v) for k, v in runs.items()}
        print(f"median wall: before {med['before']:.1f} s, after {med['after']:.1f} s, "
              f"after / before {med['after'] / med['before']:.2f}")


if __name__ == "__main__":
    main()
