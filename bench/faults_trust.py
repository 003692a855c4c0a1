"""Issue 25, trust round three: the fault cases of ``bench/faults.py --group trust``. One case per class of the
issue: outputs (a predictions table over a submission, evaluate --out over an input, --force over a photo, a
FIFO as output, a name too long), reads (a FIFO as --captions, /dev/zero as --labels), model folders that
disagree with themselves (a decision rule edited, a graph as wide as another label set), options (--lr inf, an
old and a new spelling that disagree), interrupts and faults (Ctrl-C during extract, a full disk during the
HDF5 assembly, a killed export's staging folder), a 16-bit photo as a Pillow object, a symlinked subset (what
bench/ builds), read-only caches. Verdicts as faults.py's, plus HANG / OOM (killed, or memory refused: the
child runs under a 12 GB address-space limit so the machine survives the "before" column).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from conftest import make_data_dir
from faults import TINY, Env, _mount, _umount, classify
from faults_inputs import _resign_export, _setup, data_only, with_export

LIMIT_S, LIMIT_BYTES = 60, 12 << 30


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


def _mlc(e: Env, *args: object) -> tuple[int, str]:
    """The CLI under a time and memory limit: (-999, "") when it hung."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=e.root, env=e.env,
                              capture_output=True, text=True, timeout=LIMIT_S, preexec_fn=_limited)
    except subprocess.TimeoutExpired:
        return -999, ""
    return proc.returncode, proc.stdout + proc.stderr


def _verdict(code: int, out: str, names: str = "", right: bool | None = None) -> str:
    if code == -999:
        return f"HANG (killed after {LIMIT_S} s)"
    if "MemoryError" in out or code in (-9, 137):
        return "OOM"
    return classify(code, out, names=names, right=right)


def _kept(verdict: str, path: Path, before: bytes) -> str:
    return verdict if path.read_bytes() == before else f"DESTROYED {path.name} ({verdict})"


def _submit(e: Env, *args: object) -> tuple[int, str]:
    return _mlc(e, "submit", e.run, e.data, "--cache-dir", e.root / "cache", "--workers", 0, *e.extra, *args)


def _predict(e: Env, model: Path, *args: object) -> tuple[int, str]:
    return _mlc(e, "predict", model, e.data / "data" / "1000.jpg", "--caption", "a dog", "--workers", 0, *e.extra,
                *args)


# -------------------------------------------------------------------------------------------- 1. outputs

def case_trust_predictions_over_submission(e: Env) -> str:
    sub = e.root / "sub.csv"
    _submit(e, "--out", sub)
    before = sub.read_bytes()
    return _kept(_verdict(*_predict(e, e.run, "--format", "csv", "--out", sub), names="sub.csv"), sub, before)


def case_trust_evaluate_out_over_train_csv(e: Env) -> str:
    (e.data / "test.csv").write_text((e.data / "train.csv").read_text())
    train = e.data / "train.csv"
    before = train.read_bytes()
    code, out = _mlc(e, "evaluate", e.run, e.data, "--workers", 0, *e.extra, "--out", train, "--force")
    return _kept(_verdict(code, out, names="train.csv"), train, before)


def case_trust_submit_force_over_photo(e: Env) -> str:
    photo = e.data / "data" / "1001.jpg"
    before = photo.read_bytes()
    return _kept(_verdict(*_submit(e, "--out", photo, "--force"), names="1001.jpg"), photo, before)


def case_trust_out_is_a_fifo(e: Env) -> str:
    fifo = e.root / "pipe.csv"
    os.mkfifo(fifo)
    verdict = _verdict(*_predict(e, e.run, "--format", "csv", "--out", fifo, "--force"), names="pipe.csv")
    return verdict if fifo.is_fifo() else f"DESTROYED the FIFO ({verdict})"


def case_trust_out_name_too_long(e: Env) -> str:
    return _verdict(*_predict(e, e.run, "--format", "csv", "--out", e.root / ("p" * 240 + ".csv")), names="ppp")


# -------------------------------------------------------------------------------------------- 2. reads

@_setup(Env.setup)
def case_trust_captions_fifo(e: Env) -> str:
    fifo = e.root / "captions.csv"
    os.mkfifo(fifo)
    return _verdict(*_mlc(e, "predict", e.run, e.data / "data" / "1000.jpg", "--captions", fifo, "--workers", 0,
                          *e.extra), names="captions.csv")


@_setup(data_only)
def case_trust_labels_dev_zero(e: Env) -> str:
    return _verdict(*_mlc(e, "extract", e.data, *TINY, *e.extra, "--cache-dir", e.root / "cache", "--labels",
                          "/dev/zero"), names="/dev/zero")


# -------------------------------------------------------------------------------------------- 3. model folders

def _edited_export(e: Env, edit: Callable[[dict], None]) -> str:
    _resign_export(e.model, edit)
    return _verdict(*_predict(e, e.model), names="export.json").replace("SILENT", "SILENT (the edit was ignored)")


@_setup(with_export)
def case_trust_export_decision_edited(e: Env) -> str:
    return _edited_export(e, lambda d: d["decision"].update(at_least_one=False))


@_setup(with_export)
def case_trust_export_labels_vs_graph(e: Env) -> str:
    def drop(d: dict) -> None:
        for key in ("label_ids", "label_names", "thresholds"):
            d[key] = d[key][:-1]
    return _edited_export(e, drop)


@_setup(with_export)
def case_trust_export_io_types(e: Env) -> str:
    return _edited_export(e, lambda d: d["graph"]["inputs"][0].update(dtype="float32"))


# -------------------------------------------------------------------------------------------- 4. options

def case_trust_lr_inf(e: Env) -> str:
    return _verdict(*_mlc(e, "fit-head", e.cache, "--out", e.root / "run2", "--lr", "inf", "--epochs", 2),
                    names="--lr")


@_setup(data_only)
def case_trust_old_and_new_spelling(e: Env) -> str:
    code, out = _mlc(e, "extract", e.data, *TINY, *e.extra, "--out-dir", e.root / "a", "--cache-dir", e.root / "b")
    if code == 0:
        return "SILENT (one of the two folders ignored)"
    return "clear" if code == 2 and "Traceback" not in out and "--out-dir" in out else _verdict(code, out)


# -------------------------------------------------------------------------------------------- 5. interrupts

@_setup(data_only)
def case_trust_ctrl_c_during_extract(e: Env) -> str:
    data = make_data_dir(e.root / "big", n_train=600, n_test=2)
    cmd = [sys.executable, "-m", "pipeline.cli", "extract", data, *TINY[:-2], "--workers", "2", *e.extra,
           "--cache-dir", e.root / "cache", "--split", "train"]
    p = subprocess.Popen(list(map(str, cmd)), cwd=e.root, env=e.env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.set_blocking(p.stdout.fileno(), False)  # type: ignore[union-attr]
    buf, t = b"", time.time()
    while b"extract train" not in buf and time.time() - t < LIMIT_S and p.poll() is None:
        buf += p.stdout.read() or b""  # type: ignore[union-attr]
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group, decode workers included
    os.set_blocking(p.stdout.fileno(), True)  # type: ignore[union-attr]
    out = (buf + p.stdout.read()).decode(errors="replace").replace("\r", "\n")  # type: ignore[union-attr]
    code = p.wait()
    lines = [ln for ln in out.splitlines() if ln.strip() and "extract train" not in ln and "ONNX" not in ln]
    if "Traceback" in out:
        return "TRACE"
    return "clear" if code == 130 and len(lines) == 1 else f"exit {code}, {len(lines)} lines"


# the script tests/test_trust.py runs for the same fault: one copy of it
from test_trust import FULL_AT_ASSEMBLY  # noqa: E402


@_setup(data_only)
def case_trust_full_disk_at_assembly(e: Env) -> str:
    disk = e.root / "disk"
    if not _mount(disk, "4m"):
        return "skipped (no mount)"
    try:
        data = make_data_dir(e.root / "d200", n_train=200, n_test=2)
        code, out = e.python(FULL_AT_ASSEMBLY, data, *TINY, *e.extra, "--cache-dir", disk / "c", "--split", "train")
        lines = [ln for ln in out.replace("\r", "\n").splitlines() if ln.strip() and "extract train" not in ln
                 and not ln.startswith("[mlc extract] still:")]  # a slow start's heartbeat is not noise
        if code == 2 and len(lines) > 1:
            return f"NOISE ({len(lines)} lines: h5py tracebacks after the error)"
        return classify(code, out, names="No space left")
    finally:
        _umount(disk)


def case_trust_killed_export_staging(e: Env) -> str:
    stage = e.root / ".model.999999.abcd1234.staging"  # pid 999999: no such process
    stage.mkdir()
    (stage / "model.onnx").write_bytes(bytes(1000))
    code, out = _mlc(e, "export", e.run, "--out", e.root / "model")
    return _verdict(code, out, right=not stage.exists()).replace("SILENT", "SILENT (the staging folder stays)")


# -------------------------------------------------------------------------------------------- 6-8

def case_trust_pil_16bit_photo(e: Env) -> str:
    code, out = e.python(textwrap.dedent("""
        import sys
        import numpy as np
        from PIL import Image
        from pipeline import load
        a = (np.arange(48 * 64).reshape(48, 64) * 21 % 65535).astype(np.uint16)
        Image.fromarray(a).save("g16.png")
        pred = load(sys.argv[1], backend="torch")
        d = abs(pred.predict_proba(["g16.png"], ["a dog"]) - pred.predict_proba([Image.open("g16.png")], ["a dog"]))
        print("max diff", float(d.max()))
    """), e.run)
    if code != 0:
        return classify(code, out)
    diff = float(out.split("max diff")[-1])
    return "correct" if diff < 1e-5 else f"SILENT (object and path differ by {diff:.3f})"


@_setup(data_only)
def case_trust_symlinked_subset(e: Env) -> str:
    sub = e.root / "subset"
    (sub / "data").mkdir(parents=True)
    for p in (e.data / "data").iterdir():
        (sub / "data" / p.name).symlink_to(p.resolve())
    for name in ("train.csv", "test.csv"):
        (sub / name).write_text((e.data / name).read_text())
    code, out = _mlc(e, "extract", sub, *TINY, *e.extra, "--cache-dir", e.root / "cache")
    return _verdict(code, out, right=True).replace("clear", "REFUSED (a subset of links into the image store)")


def case_trust_read_only_cache(e: Env) -> str:
    ro = e.root / "ro"
    if not _mount(ro, "16m"):
        return "skipped (no mount)"
    try:
        subprocess.run(["cp", "-r", str(e.root / "cache"), str(ro / "cache")], check=True)
        e.extract("--split", "test", out=ro / "cache")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        code, out = _mlc(e, "submit", e.run, e.data, "--cache-dir", ro / "cache", "--workers", 0, *e.extra, "--out",
                         e.root / "sub.csv")
        return _verdict(code, out, right=(e.root / "sub.csv").is_file())
    finally:
        _umount(ro)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_trust_")}
