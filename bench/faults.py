"""Fault injection, as a user would meet faults: what each command does with them.

Every case builds a tiny generated dataset, a cache and a run with the CLI of the mlc checkout given
(--repo, default this one; point it at an older checkout for a before/after table), injects one
fault and classifies what happens next:

  correct  the command did the right thing (the result is right, or the old state is intact)
  clear    it stopped with exit code 2 and a one-line error naming the file, without a traceback
  SILENT   it succeeded with a wrong or incomplete result
  TRACE    it stopped with a Python traceback
  CRASH    the process died (segmentation fault)

    .venv/bin/python bench/faults.py [--repo PATH] [--only CASE,...] [--group all|core|inputs]

The inputs group (issue 18 part B: data faults, photos, model folders, edited files) is bench/faults_inputs.py.

Disk-full and read-only cases mount small tmpfs file systems and need root; they are skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import make_data_dir  # noqa: E402

TINY = ["--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert", "--random-init", "--workers", "0"]


class Env:
    """One checkout's CLI over one scratch folder."""

    def __init__(self, repo: Path, root: Path) -> None:
        self.repo, self.root = repo, root
        self.env = {**os.environ, "PYTHONPATH": str(repo), "MLC_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        help_text = self.mlc("extract", "--help")[1]
        self.extra = ["--backend", "torch"] if "--backend" in help_text else []

    def mlc(self, *args: object, timeout: int = 600) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr

    def python(self, code: str, *args: object) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stdout + proc.stderr

    def extract(self, *args: object, data: Path | None = None, out: Path | None = None) -> tuple[int, str]:
        return self.mlc("extract", data or self.data, *TINY, *self.extra, "--out-dir", out or self.root / "cache",
                        *args)

    def setup(self, folds: int = 3) -> None:
        self.data = make_data_dir(self.root / "tiny", n_train=30, n_test=4)
        code, out = self.extract()
        assert code == 0, out
        self.cache = next((self.root / "cache").rglob("train__*.h5"))
        self.run = self.root / "run"
        code, out = self.mlc("fit-head", self.cache, "--out", self.run, "--epochs", 3, "--folds", folds)
        assert code == 0, out

    def submit(self, *args: object) -> tuple[int, str]:
        return self.mlc("submit", self.run, "--data", self.data, "--cache-dir", self.root / "cache", "--workers", 0,
                        *self.extra, *args)


def classify(code: int, out: str, names: str = "", right: bool | None = None) -> str:
    if code < 0 or code == 139:
        return f"CRASH (signal {-code if code < 0 else 11})"
    if "Traceback" in out:
        return "TRACE"
    if code == 2 and out.strip().splitlines()[-1].startswith("error:") and (not names or names in out):
        return "clear"
    if code == 0:
        return "correct" if right else "SILENT"
    return f"exit {code}: {out.strip().splitlines()[-1][:60] if out.strip() else ''}"


# ------------------------------------------------------------------------------------------- cases

def case_refit_killed(e: Env) -> str:
    code, _ = e.submit()
    before = (e.run / "submission.csv").read_text()
    killer = textwrap.dedent("""
        import os, signal, sys
        from pipeline import atomic
        n = {"calls": 0}
        real = atomic.os.replace
        def replace(*a, **k):
            n["calls"] += 1
            if n["calls"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        atomic.os.replace = replace
        from pipeline.cli import app
        sys.argv = ["mlc", "fit-head", sys.argv[1], "--out", sys.argv[2], "--epochs", "3", "--folds", "2",
                    "--seed", "5"]
        app()
    """)
    e.python(killer, e.cache, e.run)
    code, out = e.submit("--out", e.root / "after.csv")
    if code != 0:
        return classify(code, out)
    same = (e.root / "after.csv").read_text() == before
    return "correct" if same else "SILENT (mixed old and new files accepted)"


def case_missing_fold_head(e: Env) -> str:
    (e.run / "head-1.safetensors").unlink()
    return classify(*e.submit(), names="head-1.safetensors")


def _edit_json(e: Env, name: str, edit: Callable[[dict], None]) -> None:
    path = e.run / name
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def case_garbage_thresholds(e: Env) -> str:
    (e.run / "thresholds.json").write_text("{garbage")
    return classify(*e.submit(), names="thresholds.json")


def case_nan_thresholds(e: Env) -> str:
    _edit_json(e, "thresholds.json", lambda d: d["per_class"].__setitem__(1, float("nan")))
    return classify(*e.submit(), names="thresholds.json")


def case_edited_label_ids(e: Env) -> str:
    _edit_json(e, "thresholds.json", lambda d: d["label_ids"].__setitem__(-1, 12))
    return classify(*e.submit(), names="thresholds.json")


def case_garbage_head_json(e: Env) -> str:
    (e.run / "head.json").write_text("[1, 2")
    return classify(*e.submit(), names="head.json")


def case_truncated_head(e: Env) -> str:
    p = e.run / "head-0.safetensors"
    p.write_bytes(p.read_bytes()[:300])
    return classify(*e.submit(), names="head-0.safetensors")


def case_garbage_contract(e: Env) -> str:
    name = "features.json" if (e.run / "features.json").exists() else "cache.json"
    (e.run / name).write_text('{"x": 1}')
    return classify(*e.submit(), names=name)


def case_random_bytes_in_cache(e: Env) -> str:
    import h5py
    import numpy as np

    with h5py.File(e.cache, "r") as f:
        ds = f["image"]
        offset = ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset()
    with open(e.cache, "r+b") as fh:
        fh.seek(offset + 8)
        fh.write(np.random.default_rng(0).bytes(256))
    code, out = e.mlc("fit-head", e.cache, "--out", e.root / "run2", "--epochs", 2)
    return classify(code, out, names=e.cache.name)


def case_overwrite_corrupt_cache(e: Env) -> str:
    e.cache.write_bytes(b"not an HDF5 file")
    code, out = e.extract("--split", "train", "--overwrite")
    return classify(code, out, right=code == 0)


def case_all_images_bad(e: Env) -> str:
    for p in (e.data / "data").glob("*.jpg"):
        p.write_bytes(b"garbage")
    code, out = e.extract("--split", "train", "--skip-bad-images", "--out-dir", e.root / "c2")
    return classify(code, out, names="train.csv")


def case_skipped_test_image(e: Env) -> str:
    (e.data / "data" / "36889.jpg").write_bytes(b"\xff\xd8 broken")
    e.extract("--split", "test", "--skip-bad-images", "--overwrite")
    code, out = e.submit()
    names_image = "36889.jpg" in out
    hints_ok = "--out-dir" not in out and "pass --skip-bad-images" not in out.lower()
    verdict = classify(code, out, names="36889.jpg")
    if names_image and hints_ok:
        return verdict
    return f"{verdict} (does not name the image, or hints options submit lacks)"


def case_concurrent_extracts(e: Env) -> str:
    args = ["--split", "train", "--batch-size", "4", "--chunk-rows", "8", "--views", "100", "--out-dir", e.root / "c3"]
    cmd = [sys.executable, "-m", "pipeline.cli", "extract", str(e.data), *TINY, *e.extra, *map(str, args)]
    procs = [subprocess.Popen(cmd, cwd=e.root, env=e.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    results = [(p.communicate(timeout=600)[0], p.returncode) for p in procs]
    codes = sorted(r[1] for r in results)
    if codes == [0, 0]:
        return "correct (serialised)"
    loser = max(results, key=lambda r: r[1])
    leftovers = [p for p in (e.root / "c3").rglob("*") if ".partial" in str(p) or p.name.endswith(".tmp")]
    verdict = classify(loser[1], loser[0], names="another mlc process")
    return verdict + (f"; {len(leftovers)} leftover file(s)" if leftovers else "")


def case_stale_tmp_files(e: Env) -> str:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = e.cache.parent
    stale = [folder / f".{e.cache.name}.{dead.pid}.abcd1234.tmp", folder / f".{e.cache.name}.abcd1234.tmp"]
    for p in stale:
        p.write_bytes(b"x" * 100)
    e.extract("--split", "train", "--views", "2")
    left = [p.name for p in stale if p.exists()]
    return "correct (removed)" if len(left) < len(stale) else "SILENT (left behind)"


def _mount(path: Path, size: str, *opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", *opts)), "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def case_disk_full_extract(e: Env) -> str:
    small = e.root / "small"
    if not _mount(small, "120k"):
        return "skipped (no mount)"
    try:
        data = make_data_dir(e.root / "tiny60", n_train=60, n_test=2)
        code, out = e.extract("--split", "train", "--image-cut", "layer2", "--chunk-rows", "8", "--batch-size", "8",
                              data=data, out=small)
        return classify(code, out, names=str(small))
    finally:
        _umount(small)


def case_read_only(e: Env) -> str:
    ro = e.root / "ro"
    if not _mount(ro, "1m", "ro"):
        return "skipped (no mount)"
    try:
        results = {
            "extract": classify(*e.extract("--split", "train", out=ro / "cache"), names=str(ro)),
            "fit-head": classify(*e.mlc("fit-head", e.cache, "--out", ro / "run", "--epochs", 2), names=str(ro)),
            "submit": classify(*e.submit("--out", ro / "sub.csv"), names=str(ro)),
        }
        return ", ".join(f"{k}: {v}" for k, v in results.items())
    finally:
        _umount(ro)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main() -> None:
    from faults_inputs import CASES as INPUTS  # the group of issue 18 part B (inputs), in its own module

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--only", default="")
    ap.add_argument("--group", choices=("all", "core", "inputs"), default="all")
    args = ap.parse_args()
    cases = {**(CASES if args.group != "inputs" else {}), **(INPUTS if args.group != "core" else {})}
    names = [n for n in cases if not args.only or n in args.only.split(",")]
    print(f"mlc checkout: {args.repo}")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            e = Env(args.repo.resolve(), Path(tmp))
            try:
                getattr(cases[name], "setup", Env.setup)(e)  # a case may need less than a fitted run
                verdict = cases[name](e)
            except Exception as exc:  # noqa: BLE001 - a case that cannot even be set up is reported
                verdict = f"(setup failed: {type(exc).__name__}: {exc})"[:100]
        print(f"{name:28s} {verdict}", flush=True)


if __name__ == "__main__":
    main()
