"""Fault injection, as a user would meet faults: what each command does with them.

Every case builds a tiny generated dataset, a cache and a run with the CLI of the mlc checkout given
(--repo, default this one; point it at an older checkout for a before/after table), injects one
fault and classifies what happens next:

  correct  the command did the right thing (the result is right, or the old state is intact)
  clear    it stopped with exit code 2 and a one-line error naming the file, without a traceback
  SILENT   it succeeded with a wrong or incomplete result
  TRACE    it stopped with a Python traceback
  CRASH    the process died (segmentation fault)

    .venv/bin/python bench/faults.py [--repo PATH] [--only CASE,...] [--group all|core|inputs|trust]
    .venv/bin/python bench/faults.py --smoke   # two quick trust cases (the slow suite)

The inputs group (issue 18 part B: data faults, photos, model folders, edited files) is bench/faults_inputs.py;
the trust group (issue 25: output policy, bounded reads, self-agreeing model folders, options, interrupts) is
bench/faults_trust.py.

Disk-full and read-only cases mount small tmpfs file systems and need root; they are skipped otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
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
        return self.mlc("extract", data or self.data, *TINY, *self.extra, "--cache-dir", out or self.root / "cache",
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
        return self.mlc("submit", self.run, self.data, "--cache-dir", self.root / "cache", "--workers", 0,
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
    code, out = e.extract("--split", "train", "--skip-bad-images", "--cache-dir", e.root / "c2")
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
    args = ["--split", "train", "--encode-batch", "4", "--chunk-rows", "8", "--views", "100", "--cache-dir",
            e.root / "c3"]
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
        code, out = e.extract("--split", "train", "--image-cut", "layer2", "--chunk-rows", "8", "--encode-batch", "8",
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


# ------------------------------------------------------------------ issue 18, part A: outputs, reruns, resources
# Outputs that never destroy, reruns that never lie, resource faults. One more verdict here:
#   DESTROYED  the command deleted or overwrote what mlc did not write, or one of its own inputs


def _own_files(folder: Path) -> dict[str, bytes]:
    """A folder of the user's (made when missing): what no command may delete."""
    if not folder.exists():
        (folder / "sub").mkdir(parents=True)
        (folder / "notes.txt").write_text("my notes\n")
        (folder / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 mine")
    return _files(folder)


def _files(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _kept(code: int, out: str, path: Path, before: dict[str, bytes], names: str = "") -> str:
    """DESTROYED when ``path`` lost or changed what it held, else how the command ended."""
    if not path.exists() or _files(path) != before:
        return f"DESTROYED (exit {code})"
    return classify(code, out, names=names, right=True)


def _folder_commands(e: Env, out: Path) -> dict[str, tuple]:
    return {"fit-head": ("fit-head", e.cache, "--out", out, "--epochs", 1),
            "finetune": ("finetune", e.data, *TINY, "--out", out, "--epochs", 1, "--batch-size", 8),
            "export": ("export", e.run, "--out", out),
            "run": ("run", e.data, *TINY, *e.extra, "--folds", 2, "--cache-dir", e.root / "cache", "--out", out)}


def _joined(results: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in results.items())


def case_out_foreign_folder(e: Env) -> str:
    results = {}
    for name, args in _folder_commands(e, e.root / "mine").items():
        before = _own_files(e.root / "mine")
        results[name] = _kept(*e.mlc(*args), e.root / "mine", before, names="mine")
    return _joined(results)


def case_out_folder_of_runs(e: Env) -> str:
    runs = e.root / "runs"
    for name in ("a", "b"):
        e.mlc("fit-head", e.cache, "--out", runs / name, "--epochs", 1, "--folds", 0)
    before = _files(runs)
    return _kept(*e.mlc("fit-head", e.cache, "--out", runs, "--epochs", 1), runs, before, names="runs")


def case_out_run_with_a_user_file(e: Env) -> str:
    (e.run / "my-notes.txt").write_text("keep me\n")
    before = _files(e.run)
    return _kept(*e.mlc("fit-head", e.cache, "--out", e.run, "--epochs", 1), e.run, before, names="my-notes.txt")


def case_out_is_an_input(e: Env) -> str:
    photo = e.data / "data" / "1000.jpg"
    cases = {
        "fit-head --out CACHE_DIR": (e.cache.parent, ("fit-head", e.cache, "--out", e.cache.parent, "--epochs", 1)),
        "submit --out DATA/test.csv": (e.data / "test.csv", ("submit", e.run, e.data, "--cache-dir",
                                                             e.root / "cache", "--workers", 0, *e.extra, "--out",
                                                             e.data / "x" / ".." / "test.csv")),
        "predict --out PHOTO": (photo, ("predict", e.run, photo, "--caption", "a dog", *e.extra, "--workers", 0,
                                        "--out", photo)),
        "export --out RUN/..": (e.run, ("export", e.run, "--out", e.run.parent)),
    }
    (e.data / "x").mkdir()
    results = {}
    for name, (victim, args) in cases.items():
        before = _files(victim)
        results[name] = _kept(*e.mlc(*args), victim, before)
    return _joined(results)


def case_out_foreign_file(e: Env) -> str:
    mine = e.root / "mine.csv"
    results = {}
    for name, args in {"submit": ("submit", e.run, e.data, "--cache-dir", e.root / "cache", "--workers", 0,
                                  *e.extra),
                       "predict": ("predict", e.run, e.data / "data" / "1000.jpg", "--caption", "a dog", *e.extra,
                                   "--workers", 0)}.items():
        mine.write_text("id,value\n1,2\n")
        before = _files(mine)
        results[name] = _kept(*e.mlc(*args, "--out", mine), mine, before, names="mine.csv")
    return _joined(results)


def _mlc_run(e: Env, *extra: object) -> tuple[int, str]:
    return e.mlc("run", e.data, *TINY, *e.extra, "--folds", 2, "--cache-dir", e.root / "cache", "--out",
                 e.root / "runs" / "demo", *extra)


def _drop_last_rows(csv: Path, n: int) -> list[str]:
    lines = csv.read_text().splitlines()[:-n]
    csv.write_text("\n".join(lines) + "\n")
    return [ln.split(",", 1)[0] for ln in lines[1:]]


def _submitted(e: Env) -> list[str]:
    return [ln.split(",", 1)[0] for ln in (e.root / "runs" / "demo" / "submission.csv").read_text().splitlines()[1:]]


def case_rerun_test_csv_changed(e: Env) -> str:
    _mlc_run(e)
    ids = _drop_last_rows(e.data / "test.csv", 1)
    code, out = _mlc_run(e)
    stop = classify(code, out, names="--overwrite")
    if code == 0:
        return f"{stop} (old submission)" if _submitted(e) != ids else "correct"
    lacks = [opt for opt in ("--overwrite", "--out-dir") if opt in out.splitlines()[-1] and opt not in
             e.mlc("run", "--help")[1]]
    stop += f" (names {', '.join(lacks)}, which run lacks)" if lacks else ""
    code, out = _mlc_run(e, "--overwrite")
    redo = ("correct" if _submitted(e) == ids else "SILENT (old submission)") if code == 0 else \
        "no such option" if "No such option" in out else classify(code, out)
    return f"rerun: {stop}; --overwrite: {redo}"


def case_rerun_test_reextracted(e: Env) -> str:
    _mlc_run(e)
    ids = _drop_last_rows(e.data / "test.csv", 1)
    e.extract("--split", "test", "--overwrite")
    code, out = _mlc_run(e)
    if code != 0:
        return classify(code, out)
    return "correct" if _submitted(e) == ids else "SILENT (the old submission reported)"


def case_rerun_train_reextracted(e: Env) -> str:
    _mlc_run(e)
    _drop_last_rows(e.data / "train.csv", 2)
    e.extract("--split", "train", "--overwrite")
    code, out = _mlc_run(e)
    if code != 0:
        return classify(code, out)
    return "SILENT (the old run reported, not refitted)" if "not refitted" in out else "correct (refitted)"


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up, then free ``leave`` bytes."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))


@contextlib.contextmanager
def _disk_with_run(e: Env, name: str, read_only: bool = False) -> Iterator[Path | None]:
    """A 4 MB tmpfs holding a copy of the run (None where mounting needs root), read-only if asked."""
    disk = e.root / name
    if not _mount(disk, "4m"):
        yield None
        return
    try:
        shutil.copytree(e.run, disk / "run")
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        yield disk
    finally:
        _umount(disk)


def _predict_to(e: Env, run: Path, out: Path) -> tuple[int, str]:
    return e.mlc("predict", run, e.data / "data" / "1000.jpg", "--caption", "a dog", *e.extra, "--workers", 0,
                 "--out", out)


def case_full_disk_writes(e: Env) -> str:
    with _disk_with_run(e, "small") as small:
        if small is None:
            return "skipped (no mount)"
        _fill(small, 12 << 10)
        old = _files(small / "run")
        results = {"fit-head": _kept(*e.mlc("fit-head", e.cache, "--out", small / "run", "--epochs", 1),
                                     small / "run", old, names=str(small))}
        for name, args in _folder_commands(e, small / "new").items():
            if name in ("export", "finetune"):
                results[name] = classify(*e.mlc(*args), names=str(small))
        results["report"] = _kept(*e.mlc("report", small / "run"), small / "run", old, names=str(small))
        _fill(small, 0)
        results["predict"] = classify(*_predict_to(e, small / "run", small / "p.csv"), names=str(small))
        return _joined(results)


def case_read_only_writes(e: Env) -> str:
    with _disk_with_run(e, "ro", read_only=True) as ro:
        if ro is None:
            return "skipped (no mount)"
        results = {name: classify(*e.mlc(*args), names=str(ro))
                   for name, args in _folder_commands(e, ro / "new").items() if name in ("export", "finetune")}
        results["report"] = classify(*e.mlc("report", ro / "run"), names=str(ro))
        results["predict"] = classify(*_predict_to(e, e.run, ro / "p.csv"), names=str(ro))
        return _joined(results)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main() -> None:
    from faults_inputs import CASES as INPUTS  # the group of issue 18 part B (inputs), in its own module
    from faults_trust import CASES as TRUST  # issue 25's classes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--only", default="")
    ap.add_argument("--group", choices=("all", "core", "inputs", "trust"), default="all")
    ap.add_argument("--smoke", action="store_true", help="two quick cases of the trust group (data only): checks that "
                    "the harness runs")
    args = ap.parse_args()
    if args.smoke:
        import faults_trust

        args.group, args.only = "trust", "trust_old_and_new_spelling,trust_labels_dev_zero"
        faults_trust.LIMIT_S = 300  # a hang is what a case catches; on a busy machine a start alone may take 60 s
    groups = {"core": CASES, "inputs": INPUTS, "trust": TRUST}
    cases = {k: v for name, group in groups.items() if args.group in ("all", name) for k, v in group.items()}
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
