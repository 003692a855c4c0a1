"""Benchmark `mlc serve` under load against `mlc predict` in a loop: throughput, p50/p95 latency, peak memory.

On loopback only (the server this script starts, on 127.0.0.1, port chosen by the OS):
  serve -b B   N requests (one photo + caption each, multipart) from C concurrent clients; the server
               micro-batches what arrives together up to B photos (--batch-size; 1: no batching), waiting
               --batch-wait-ms 10 (its default) for a batch to fill
  predict      `mlc predict MODEL photo --caption ...` in a loop, one fresh process a photo, as a script would
Latency is per request (client side, queueing included) or per process; peak memory is the server's VmHWM or
the predict process's peak RSS. Photos and captions: examples/comp5329-mini's test split, cycled. Bounded:
at most 2,000 requests, 256 clients, 200 predict processes and --time-limit seconds per phase.

    .venv/bin/python bench/serve.py [--model model/] [--run runs/demo] [--requests 100] [--clients 100] [--loop 20]
                                    [--batch-sizes 8,1,32] [--repeats 3]
    .venv/bin/python bench/serve.py --smoke   # a tiny random-encoder export, 8 requests (the slow suite)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "examples" / "comp5329-mini"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def samples(n: int) -> list[tuple[Path, str]]:
    with open(MINI / "test.csv", newline="") as f:
        rows = [(MINI / "data" / r["ImageID"], r["Caption"]) for r in csv.DictReader(f)]
    return [rows[i % len(rows)] for i in range(n)]


def multipart(photo: Path, caption: str) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="caption"\r\n\r\n{caption}\r\n--{b}\r\n'
            f'Content-Disposition: form-data; name="photo"; filename="{photo.name}"\r\nContent-Type: image/jpeg\r\n\r\n'
            ).encode() + photo.read_bytes() + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def start(model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(model), "--host", "127.0.0.1",
                             "--port", "0", *extra], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if m := re.search(r"on (http://127\.0\.0\.1:\d+/)", line):
            return proc, m.group(1)
    raise SystemExit(f"mlc serve did not start (exit {proc.wait()})")


def peak_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


def one(url: str, photo: Path, caption: str) -> tuple[float, int, str]:
    body, kind = multipart(photo, caption)
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "api/predict", body, {"Content-Type": kind}),
                                    timeout=120) as r:
            out = json.load(r)["predictions"][0]["names"]
            return time.perf_counter() - t, r.status, ",".join(out)
    except urllib.error.HTTPError as e:
        return time.perf_counter() - t, e.code, e.read().decode()[:200]
    except OSError as e:  # refused, reset, timed out
        return time.perf_counter() - t, 0, str(e)[:200]


def load_phase(model: Path, n: int, clients: int, limit: float, *extra: str) -> dict:
    proc, url = start(model, *extra)
    try:
        one(url, *samples(1)[0])  # warm: first session run
        work = samples(n)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(one, url, p, c) for p, c in work]
            got = [f.result(timeout=max(1.0, limit - (time.perf_counter() - t0))) for f in futures]
        wall = time.perf_counter() - t0
        health = json.load(urllib.request.urlopen(url + "api/health", timeout=30))
        mem = peak_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    lat = sorted(s for s, _, _ in got)
    errors = [(code, msg) for _, code, msg in got if code != 200]
    return {"requests": n, "errors": len(errors), "first_error": errors[0] if errors else None, "wall_s": wall,
            "per_s": n / wall, "p50_ms": 1000 * lat[len(lat) // 2], "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))],
            "peak_mb": mem, "batches": health["batches"], "largest_batch": health["largest_batch"]}


def predict_loop(model: Path, n: int, limit: float) -> dict:
    secs, mems = [], []
    t0 = time.perf_counter()
    for photo, caption in samples(n):
        if time.perf_counter() - t0 > limit:
            break
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "predict", str(model), str(photo),
                                 "--caption", caption], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"mlc predict failed on {photo}")
        secs.append(time.perf_counter() - t)
        mems.append(usage.ru_maxrss / 1024)
    wall = time.perf_counter() - t0
    secs.sort()
    return {"requests": len(secs), "errors": 0, "wall_s": wall, "per_s": len(secs) / wall,
            "p50_ms": 1000 * statistics.median(secs), "p95_ms": 1000 * secs[int(0.95 * (len(secs) - 1))],
            "peak_mb": max(mems), "batches": len(secs), "largest_batch": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "model", help="an export (written from --run if missing)")
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "demo")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--loop", type=int, default=20, help="mlc predict processes in the baseline loop")
    ap.add_argument("--batch-sizes", default="8,1,32", help="the server's --batch-size, one phase each")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each server setting, alternated (at most 10)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase at most")
    ap.add_argument("--smoke", action="store_true", help="a tiny random-encoder run on generated data, "
                    "exported; 8 requests from 4 clients, 2 predict processes: checks that the script runs "
                    "(figures mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        from _smoke import tiny_env, tiny_run

        tiny_env()
        ENV.update({k: os.environ[k] for k in ("MLC_PLUGINS", "MLC_ONNX_DIR", "MLC_OFFLINE")})
        with tempfile.TemporaryDirectory() as tmp:
            _, args.run = tiny_run(Path(tmp))
            args.model, args.requests, args.clients, args.loop = Path(tmp) / "model", 8, 4, 2
            args.batch_sizes, args.repeats = "4,1", 1
            bench(args)
        return
    bench(args)


def bench(args: argparse.Namespace) -> None:
    """Every server setting under load, alternated, then the predict loop; every run, then the medians."""
    n, clients, loop = min(args.requests, 2000), min(args.clients, 256), min(args.loop, 200)
    if not (args.model / "export.json").is_file():
        subprocess.run([sys.executable, "-m", "pipeline.cli", "export", str(args.run), "--out", str(args.model)],
                       cwd=REPO, env=ENV, check=True)
    sizes = args.batch_sizes.split(",")
    runs: dict[str, list[dict]] = {f"serve --batch-size {b}": [] for b in sizes}
    for _ in range(max(1, min(args.repeats, 10))):  # alternated, so a busy minute hits every setting alike
        for b in sizes:
            runs[f"serve --batch-size {b}"].append(load_phase(args.model, n, clients, args.time_limit,
                                                              "--batch-size", b))
    runs["mlc predict in a loop"] = [predict_loop(args.model, loop, args.time_limit)]
    print(f"model {args.model}; {os.cpu_count()} CPUs; photos of {MINI.name} (one photo + caption a request); "
          f"{clients} concurrent clients; each server setting run {len(runs[next(iter(runs))])} times, alternated")
    print(f"{'':28} {'requests':>8} {'errors':>6} {'photos/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'peak MB':>8} "
          f"{'batches':>7} {'largest':>7}")
    for name, got in runs.items():
        for i, r in enumerate(got):
            print(f"{name if i == 0 else '':28} {r['requests']:8d} {r['errors']:6d} {r['per_s']:8.1f} "
                  f"{r['p50_ms']:8.0f} {r['p95_ms']:8.0f} {r['peak_mb']:8.0f} {r['batches']:7d} "
                  f"{r['largest_batch']:7d}")
            if r.get("first_error"):
                print(f"  first error: {r['first_error']}")
    print("medians (photos/s, p50 ms, p95 ms, peak MB):")
    for name, got in runs.items():
        med = {k: statistics.median(r[k] for r in got) for k in ("per_s", "p50_ms", "p95_ms", "peak_mb")}
        print(f"  {name:28} {med['per_s']:6.1f} {med['p50_ms']:8.0f} {med['p95_ms']:8.0f} {med['peak_mb']:8.0f}"
              f"   errors {sum(r['errors'] for r in got)} of {sum(r['requests'] for r in got)}")


if __name__ == "__main__":
    main()
