"""Caches and run folders that cannot lie: whole-or-nothing writes, verified reads, clear errors.

Each test injects one fault class (a real kill -9, an edited or damaged file, a full or read-only
filesystem, a concurrent writer, unusable images) and checks the command ends in a clear error that
names the file, or in a correct result, with nothing lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, make_data_dir, refresh_manifest
from typer.testing import CliRunner

from pipeline import cache as cache_module
from pipeline.atomic import clean_stale, lock
from pipeline.cache import CacheMeta, CacheReader, CacheWriter
from pipeline.cli import app
from pipeline.errors import MlcError, OutputError
from pipeline.extract import ExtractConfig, extract
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.labels import COCO18
from pipeline.runs import RunDir

TINY = ["--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert", "--random-init", "--workers", "0",
        "--backend", "torch"]
runner = CliRunner()


def mlc(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


# --------------------------------------------------------------------------------- run folders


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pipeline import atomic, runs
    from pipeline.fit_head import FitHeadConfig, fit_head
    step, target = int(sys.argv[1]), sys.argv[2]
    calls = {"n": 0}
    def kill_on(fn):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **k)
        return wrapped
    if target == "rmtree":  # after the swap, before the old folder is gone
        atomic.shutil.rmtree = kill_on(atomic.shutil.rmtree)
    else:
        atomic.os.replace = kill_on(atomic.os.replace)  # every file of the run, the swap last
    fit_head(FitHeadConfig.build(caches=sys.argv[3], out=sys.argv[4], epochs=2, folds=2, seed=7), quiet=True)
    print("finished", calls["n"])
""")


@pytest.mark.slow
def test_kill_at_every_step_of_a_refit_leaves_the_old_run_or_the_new(fitted):
    run, cache = fitted["run"], fitted["cache"]
    old = RunDir(run).load()
    old_manifest = (run / "manifest.json").read_text()
    code, _ = mlc("submit", run, fitted["data"], "--cache-dir", fitted["tmp"] / "cache", "--workers", 0,
                  "--backend", "torch")
    assert code == 0 and (run / "submission.csv").is_file()
    script = fitted["tmp"] / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    total = None
    for step in range(1, 40):
        proc = subprocess.run([sys.executable, str(script), str(step), "replace", str(cache), str(run)],
                              capture_output=True, text=True, env=env, timeout=300)
        if proc.returncode == 0:  # ran past its last write: that many steps exist
            total = int(proc.stdout.split()[-1])
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        loaded = RunDir(run).load()  # verified: never a mix of old and new files
        assert (run / "manifest.json").read_text() == old_manifest, f"killed at step {step}"
        assert len(loaded.heads) == len(old.heads) == 3 and (run / "submission.csv").is_file()
    assert total is not None and total >= 10  # one per file of the run, plus the swap
    new = RunDir(run).load()
    assert len(new.heads) == 2 and json.loads((run / "config.json").read_text())["train"]["seed"] == 7
    assert not (run / "submission.csv").exists()  # it belonged to the old run
    assert not [p for p in run.parent.iterdir() if ".staging" in p.name or p.name.endswith(".tmp")]
    # Killed after the swap, before the old folder was deleted: the new run stands, the leftover goes.
    proc = subprocess.run([sys.executable, str(script), "1", "rmtree", str(cache), str(run)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert len(RunDir(run).load().heads) == 2
    assert [p for p in run.parent.iterdir() if ".staging" in p.name]  # the old run, left aside ...
    clean_stale(run.parent)
    assert not [p for p in run.parent.iterdir() if ".staging" in p.name]  # ... removed by the next writer


def test_a_missing_fold_head_is_refused(fitted):
    run = fitted["run"]
    (run / "head-1.safetensors").unlink()
    code, out = mlc("submit", run, fitted["data"], "--cache-dir", fitted["tmp"] / "cache", "--workers", 0)
    assert code == 2 and "head-1.safetensors: missing from the folder" in out
    code, out = mlc("report", run)
    assert code == 2 and "head-1.safetensors" in out


def test_an_extra_head_is_refused(fitted):
    run = fitted["run"]
    (run / "head-3.safetensors").write_bytes((run / "head-0.safetensors").read_bytes())
    with pytest.raises(MlcError, match=r"head-3.safetensors: not part of .*\(not in its manifest\); remove it"):
        RunDir(run).load()


@pytest.mark.parametrize("case", ["garbage", "nan", "labels", "dims", "truncated-head", "features"])
def test_edited_or_damaged_files_name_the_file_and_field(fitted, case):
    run = fitted["run"]
    th = json.loads((run / "thresholds.json").read_text())
    if case == "garbage":
        (run / "thresholds.json").write_text("{not json")
        want = r"thresholds.json: not as it was written"
    elif case == "nan":
        th["per_class"][1] = float("nan")
        (run / "thresholds.json").write_text(json.dumps(th))  # json writes the token NaN
        want = r"thresholds.json: holds NaN"
    elif case == "labels":
        th["label_ids"][-1] = 12  # not a label of the data
        (run / "thresholds.json").write_text(json.dumps(th))
        want = r"thresholds.json: label_ids .* differ from the labels the features were made for"
    elif case == "dims":
        head = json.loads((run / "head.json").read_text())
        head["image_dim"] += 1
        (run / "head.json").write_text(json.dumps(head))
        want = r"head.json: image_dim/text_dim .* do not match"
    elif case == "truncated-head":
        p = run / "head-2.safetensors"
        p.write_bytes(p.read_bytes()[:500])
        want = r"head-2.safetensors: cannot load the head's weights"
    else:
        feats = json.loads((run / "features.json").read_text())
        del feats[0]["contract"]["image_dim"]
        (run / "features.json").write_text(json.dumps(feats))
        want = r"features.json: \[0\].contract.image_dim: expected int"
    if case != "garbage":
        # a consistent manifest: the run as a buggy writer would have left it; the schema must catch it
        refresh_manifest(run)
    with pytest.raises(MlcError, match=want):
        RunDir(run).load()
    code, out = mlc("submit", run, fitted["data"], "--cache-dir", fitted["tmp"] / "cache", "--workers", 0)
    assert code == 2 and "error:" in out and "Traceback" not in out
    assert not (run / "submission.csv").exists()


def test_an_old_run_folder_names_its_format(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "cache.json").write_text("{}")
    code, out = mlc("submit", tmp_path / "old", tmp_path)
    assert code == 2 and "run format 1" in out


# --------------------------------------------------------------------------------------- caches


def test_damaged_cache_bytes_are_detected(fitted):
    cache = fitted["cache"]
    with h5py.File(cache, "r") as f:
        ds = f["image"]
        offset = ds.id.get_chunk_info(0).byte_offset
        assert ds.fletcher32
    with open(cache, "r+b") as fh:  # random bytes over the first chunk of the image features
        fh.seek(offset + 16)
        fh.write(np.random.default_rng(0).bytes(64))
    code, out = mlc("fit-head", cache, "--out", fitted["tmp"] / "r2", "--epochs", 1)
    assert code == 2 and f"{cache}: the 'image' dataset is damaged" in out and "--overwrite" in out
    assert not (fitted["tmp"] / "r2").exists()


def test_non_finite_features_are_refused_with_their_rows(tmp_path):
    n = 20
    meta = CacheMeta.from_dict(dict(split="train", image_encoder="tiny-resnet", text_encoder="tiny-bert",
                                    image_weights="r",
                     image_weights_hash="a" * 64, text_weights="r", text_weights_hash="b" * 64, random_init=True,
                     image_preprocess={}, text_preprocess={}, views=1, image_dim=4, text_dim=3,
                     label_ids=COCO18.ids, label_names=COCO18.names, data_fingerprint="f" * 64, num_records=n))
    image = np.ones((n, 1, 4), np.float16)
    image[7, 0, 2] = np.nan
    image[11, 0, 0] = np.inf
    w = CacheWriter(tmp_path / "c.h5", meta, [f"{i}.jpg" for i in range(n)], np.eye(18)[np.arange(n) % 18], 32)
    w.commit(0, {"image": image, "text": np.ones((n, 3), np.float16)})
    w.finalize()
    with pytest.raises(MlcError, match=r"2 row\(s\) of 'image' hold NaN or infinite values \(e.g. 7.jpg, 11.jpg\)"):
        fit_head(FitHeadConfig.build(caches=tmp_path / "c.h5", out=tmp_path / "run", epochs=1, folds=2), quiet=True)


def test_an_hdf5_writer_that_dies_is_reported_and_the_chunks_kept(tmp_path, monkeypatch):
    """The assembly runs in a child process because HDF5 can crash (a full disk): a child that dies
    without a word is an error naming the file, and the committed chunks stay for a rerun."""
    n = 4
    meta = CacheMeta.from_dict(dict(split="test", image_encoder="tiny-resnet", text_encoder="tiny-bert",
                                    image_weights="r",
                     image_weights_hash="a" * 64, text_weights="r", text_weights_hash="b" * 64, random_init=True,
                     image_preprocess={}, text_preprocess={}, views=1, image_dim=4, text_dim=3,
                     label_ids=COCO18.ids, label_names=COCO18.names, data_fingerprint="f" * 64, num_records=n))
    w = CacheWriter(tmp_path / "c.h5", meta, [f"{i}.jpg" for i in range(n)], None, 32)
    w.commit(0, {"image": np.ones((n, 1, 4), np.float16), "text": np.ones((n, 3), np.float16)})
    monkeypatch.setattr(cache_module.h5py, "File", lambda *a, **k: os._exit(139))  # as a segfault would
    with pytest.raises(OutputError, match=r"c\.h5: the HDF5 writer died \(exit code 139"):
        w.finalize()
    assert not (tmp_path / "c.h5").exists() and w.pending() == []


def test_overwrite_replaces_a_corrupt_cache_file(fitted, capsys):
    data, cache = fitted["data"], fitted["cache"]
    cache.write_bytes(b"this is not HDF5")
    args = ["extract", data, *TINY, "--split", "train", "--cache-dir", fitted["tmp"] / "cache"]
    code, out = mlc(*args)
    assert code == 2 and "not an mlc feature cache, or a damaged one" in out and "--overwrite" in out
    code, out = mlc(*args, "--overwrite")
    assert code == 0 and "replacing" in out
    assert len(CacheReader(cache).image_ids) == 30


def test_orphan_chunks_are_deleted_never_adopted(fitted):
    data, cache = fitted["data"], fitted["cache"]
    with CacheReader(cache) as r:
        good = r.array("image")
    cache.unlink()  # so the next run encodes, and meets the orphan
    partial = Path(f"{cache}.partial")
    partial.mkdir()
    # a chunk left by another plan (another writer that failed), with no plan.json beside it
    np.savez(partial / "chunk-000000.npz", _plan=np.asarray("0" * 64), image=np.zeros((512, 1, 128), np.float16),
             text=np.zeros((512, 32), np.float16))
    code, out = mlc("extract", data, *TINY, "--split", "train", "--cache-dir", fitted["tmp"] / "cache", "--overwrite")
    assert code == 0, out
    assert "resuming" not in out  # nothing adopted
    with CacheReader(cache) as r:
        np.testing.assert_array_equal(r.array("image"), good)
    assert not partial.exists()
    partial.mkdir()  # a leftover beside a finished cache goes too
    (partial / "chunk-000003.npz").write_bytes(b"junk")
    code, out = mlc("extract", data, *TINY, "--split", "train", "--cache-dir", fitted["tmp"] / "cache")
    assert code == 0 and "up to date" in out and not partial.exists()


def test_stale_temporary_files_of_dead_processes_are_removed(fitted):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = fitted["cache"].parent
    stale = folder / f".{fitted['cache'].name}.{dead.pid}.abcd1234.tmp"
    stale.write_bytes(b"x" * 1000)
    mine = folder / f".something.{os.getpid()}.abcd1234.tmp"  # a live writer's file stays
    mine.write_bytes(b"y")
    extract(ExtractConfig.build(data_dir=fitted["data"], cache_dir=fitted["tmp"] / "cache", splits=("train",),
                                image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True, workers=0,
                                backend="torch", views=2))
    assert not stale.exists() and mine.exists()


def test_a_held_lock_names_its_holder_and_is_free_once_released(tmp_path):
    """A second writer stops at once with the holder's pid; after release the lock file holds no stale pid."""
    target = tmp_path / "x.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.atomic import lock\n"
         f"with lock({str(target)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"another mlc process is writing {target} \(pid {holder.pid}\)"
        with pytest.raises(MlcError, match=busy), lock(target):
            pass
    finally:
        holder.kill()
        holder.wait()
    with lock(target):  # the dead holder's lock died with it
        pass
    assert (tmp_path / ".x.h5.lock").read_text() == ""


@pytest.mark.slow
def test_two_concurrent_extracts(tmp_path):
    """Both started at once: one writes the cache, the other stops at once naming it; nothing is mixed."""
    data = make_data_dir(tmp_path / "tiny", n_train=120, n_test=2)
    # 64 views an image (the most --views takes): the writer holds the cache for seconds, while the other arrives
    cmd = [sys.executable, "-m", "pipeline.cli", "extract", str(data), *TINY, "--split", "train", "--encode-batch", "4",
           "--chunk-rows", "8", "--views", "64", "--cache-dir", str(tmp_path / "c")]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in procs]
    assert sorted(r[3] for r in results) == [0, 2], [r[2][-1500:] for r in results]
    (winner,) = [r for r in results if r[3] == 0]
    (loser,) = [r for r in results if r[3] == 2]
    target = tmp_path / "c" / "tiny" / "train__tiny-resnet__tiny-bert__random_v64.h5"
    assert f"another mlc process is writing the cache {target} (pid {winner[0]})" in loser[2]
    assert CacheReader(target).array("image").shape == (120, 64, 128)
    assert not Path(f"{target}.partial").exists()


# ------------------------------------------------------------------------------------ bad images


def test_every_image_bad_is_an_error(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=6, n_test=2)
    for p in (data / "data").glob("*.jpg"):
        p.write_bytes(b"not a jpeg")
    code, out = mlc("extract", data, *TINY, "--split", "train", "--skip-bad-images", "--cache-dir", tmp_path / "c")
    assert code == 2 and "every image of" in out and "train.csv is missing or unreadable (6" in out
    assert not list((tmp_path / "c").rglob("*.h5"))


def test_submit_names_the_test_images_a_cache_skipped(fitted):
    data, tmp = fitted["data"], fitted["tmp"]
    (data / "data" / "36889.jpg").write_bytes(b"\xff\xd8 broken")
    code, out = mlc("extract", data, *TINY, "--split", "test", "--skip-bad-images", "--cache-dir", tmp / "cache")
    assert code == 0 and "skipped 1 bad images in test: 36889.jpg" in out
    code, out = mlc("submit", fitted["run"], data, "--cache-dir", tmp / "cache", "--workers", 0,
                    "--backend", "torch")
    assert code == 2 and "lacks 1 test image(s): 36889.jpg" in out
    assert "repair or replace" in out and "--overwrite" in out and "--out-dir" not in out
    assert "--skip-bad-images to reuse" not in out  # submit has no such option
    code, out = mlc("submit", fitted["run"], data, "--cache-dir", tmp / "cache", "--workers", 0,
                    "--backend", "torch", "--overwrite")
    assert code == 2 and "36889.jpg" in out and "every test image needs a prediction" in out
    assert "--skip-bad-images" not in out


# ------------------------------------------------------------------------- full / read-only disks


def _mount(path: Path, size: str, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def mounts(tmp_path):
    made: list[Path] = []

    def mount(name: str, size: str, *options: str) -> Path:
        path = tmp_path / name
        if not _mount(path, size, *options):
            pytest.skip("cannot mount a tmpfs here (needs root); the full/read-only disk tests are skipped")
        made.append(path)
        return path

    yield mount
    for path in made:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_full_disk_during_extract_is_a_clear_error_and_resumes(tmp_path, mounts):
    small = mounts("small", "400k")
    data = make_data_dir(tmp_path / "tiny", n_train=60, n_test=2)
    args = ["extract", data, *TINY, "--split", "train", "--image-cut", "layer2", "--chunk-rows", "8",
            "--encode-batch", "8", "--cache-dir", small]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]  # not 139: HDF5 never meets the full disk
    assert "error: cannot write" in proc.stderr and ("No space left" in proc.stderr or "free space" in proc.stderr)
    assert "Traceback" not in proc.stderr
    partial = next(small.rglob("*.partial"))
    kept = len(list(partial.glob("chunk-*.npz")))
    assert kept >= 1
    subprocess.run(["mount", "-o", "remount,size=4m", str(small)], check=True)  # space freed
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (cache,) = small.rglob("train__*.h5")
    assert len(CacheReader(cache).image_ids) == 60


def test_read_only_destinations_fail_before_the_work(fitted, mounts):
    ro = mounts("ro", "1m", "ro")
    code, out = mlc("fit-head", fitted["cache"], "--out", ro / "run", "--epochs", 50)
    assert code == 2 and f"cannot write {ro}" in out and "Read-only file system" in out
    assert "epoch" not in out  # refused before training
    code, out = mlc("extract", fitted["data"], *TINY, "--cache-dir", ro / "cache")
    assert code == 2 and "Read-only file system" in out
    code, out = mlc("submit", fitted["run"], fitted["data"], "--cache-dir", fitted["tmp"] / "cache",
                    "--out", ro / "sub.csv", "--workers", 0)
    assert code == 2 and "Read-only file system" in out
    assert "Traceback" not in out
