"""The longest silence of a command: run it, stamp every line (and tqdm's \\r updates) it prints on stdout and
stderr, print the gaps over the limit and the longest one (the interpreter's exit after the last line is shown
apart: it is Python's teardown, not the command's work). Exit 1 when a gap is over the limit.

    python bench/silence.py [--limit 5] -- mlc run examples/comp5329-mini --preset offline --out runs/silence

    python bench/silence.py --smoke   # `mlc validate` on generated data, limit 60 s (the slow suite)

(issue #29: no silence over 5 s anywhere; docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time


def stamped(cmd: list[str]) -> tuple[int, list[tuple[float, str]]]:
    """Run ``cmd``; (exit code, [(seconds since start, line)]) with stdout and stderr read as they come."""
    t0 = time.monotonic()
    lines: list[tuple[float, str]] = [(0.0, "(start)")]
    lock = threading.Lock()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def read(stream: object) -> None:
        buf = b""
        while chunk := stream.read1(4096):  # type: ignore[attr-defined]
            buf += chunk
            *done, buf = buf.replace(b"\r", b"\n").split(b"\n")
            now = time.monotonic() - t0
            with lock:
                lines.extend((now, d.decode(errors="replace")) for d in done if d.strip())

    threads = [threading.Thread(target=read, args=(s,)) for s in (proc.stdout, proc.stderr)]
    for t in threads:
        t.start()
    code = proc.wait()
    for t in threads:
        t.join()
    lines.append((time.monotonic() - t0, "(end)"))
    return code, sorted(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=float, default=5.0, help="the longest silence allowed, in seconds")
    ap.add_argument("--smoke", action="store_true", help="`mlc validate` on generated data with a 60 s limit (a "
                    "busy machine may start Python slowly): checks that the script runs")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if args.smoke:
        import tempfile
        from pathlib import Path

        from _smoke import REPO, tiny_data, tiny_env

        tiny_env()
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
        with tempfile.TemporaryDirectory() as tmp:
            args.limit = 60.0
            return report(args.limit, [sys.executable, "-m", "pipeline.cli", "validate", str(tiny_data(Path(tmp)))])
    if not cmd:
        ap.error("give the command after --")
    return report(args.limit, cmd)


def report(limit: float, cmd: list[str]) -> int:
    """Run ``cmd``, print its gaps over ``limit`` and its longest silence; 1 when a gap is over (or it failed)."""
    code, lines = stamped(cmd)
    # the last gap is the interpreter's exit after the command's last line (torch's teardown): shown, not counted
    gaps = [(b[0] - a[0], a, b) for a, b in zip(lines[:-1], lines[1:-1], strict=False)]
    over = [g for g in gaps if g[0] > limit]
    for gap, a, b in over:
        print(f"silent {gap:.1f} s after {a[0]:.1f} s: {a[1][:70]!r} -> {b[1][:70]!r}")
    worst = max(gaps, key=lambda g: g[0])
    print(f"exit {code}; {len(lines) - 2} lines in {lines[-1][0]:.1f} s; longest silence {worst[0]:.1f} s "
          f"(after {worst[1][1][:70]!r}); {len(over)} over {limit:g} s; the interpreter's exit after the last "
          f"line {lines[-1][0] - lines[-2][0]:.1f} s")
    return 1 if over or code else 0


if __name__ == "__main__":
    sys.exit(main())
