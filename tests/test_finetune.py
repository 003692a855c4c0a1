"""``mlc finetune`` with tiny random encoders: it learns, resumes after SIGKILL, runs under torchrun,
and its encoders feed ``mlc extract --from-run`` and trunk caches."""

from __future__ import annotations

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
from safetensors.torch import load_file

from pipeline.cache import CacheReader
from pipeline.config import flatten
from pipeline.data import DataDir
from pipeline.encoders import create_image_encoder, load_encoder
from pipeline.errors import MismatchError, MlcError
from pipeline.extract import ExtractConfig, extract
from pipeline.finetune import FinetuneConfig, build_task, finetune
from pipeline.images import load_image
from pipeline.losses import create_loss
from pipeline.runs import RunDir

TINY = dict(image_encoder="tiny-resnet", text_encoder="tiny-bert")
ARGS = ["--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert", "--random-init", "--workers", "0"]


def train_loss(cfg: FinetuneConfig, state: dict | None) -> float:
    """BCE over the training rows with the model in eval mode and no augmentation."""
    task, _ = build_task(cfg.replace(augment=False, sampler="uniform"), torch.device("cpu"))
    if state is not None:
        task.model.load_state_dict(state)
    task.model.eval()
    loss_fn, total, n = create_loss("bce"), 0.0, 0
    with torch.no_grad():
        for b in task.batches(1):
            total += loss_fn(task.forward(task.model, b), b["labels"]).item() * len(b["labels"])
            n += len(b["labels"])
    return total / n


def test_one_epoch_lowers_the_loss(data_dir, tmp_path):
    cfg = FinetuneConfig.build(data_dir=data_dir, out=tmp_path / "run", random_init=True, end_to_end=True, epochs=1,
                               batch_size=4, lr=3e-3, encoder_lr=1e-3, workers=0, warmup=0.0, pos_weight=False,
                               sampler="uniform", augment=False, **TINY)
    before = train_loss(cfg, None)
    finetune(cfg)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    after = train_loss(cfg, ck["model"])
    assert after < before - 0.01, (before, after)
    for name in ("head-0.safetensors", "encoders/image/model.safetensors", "encoders/text/encoder.json",
                 "thresholds.json", "metrics.json", "features.json", "config.json", "val_scores.npz", "manifest.json"):
        assert (tmp_path / "run" / name).exists(), name


def test_partial_unfreeze_trains_only_the_top(data_dir, tmp_path, monkeypatch):
    # A relative --labels file: the run records it absolute, so `submit` from another folder finds it.
    (tmp_path / "labels-here.csv").write_text("id,name\n1,person\n3,car\n18,dog\n")
    monkeypatch.chdir(tmp_path)
    cfg = FinetuneConfig.build(data_dir=data_dir, out=tmp_path / "run", random_init=True, unfreeze=1, epochs=1,
                               batch_size=8, workers=0, lr=1e-2, labels=Path("labels-here.csv"), **TINY)
    finetune(cfg)
    (entry,) = RunDir(tmp_path / "run").read_json("features.json")
    assert entry["recipe"]["data"]["labels"] == str(tmp_path.resolve() / "labels-here.csv")
    first = create_image_encoder("tiny-resnet", random_init=True, seed=cfg.train.seed).state_dict()
    tuned = load_file(str(tmp_path / "run" / "encoders" / "image" / "model.safetensors"))
    assert torch.equal(first["conv1.weight"], tuned["conv1.weight"])  # frozen bottom unchanged
    assert not torch.equal(first["layer4.0.conv1.weight"], tuned["layer4.0.conv1.weight"])  # top trained


@pytest.mark.slow
def test_resume_after_sigkill_ends_where_an_uninterrupted_run_does(tmp_path):
    data_dir = make_data_dir(tmp_path / "tiny", n_train=64, n_test=2)
    common = ["finetune", str(data_dir), *ARGS, "--end-to-end", "--epochs", "3", "--batch-size", "4",
              "--lr", "1e-3"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.cli", *common, "--out", str(killed)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not last.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (killed / "metrics.json").exists(), "kill it after epoch 1, before the end"
    assert torch.load(last, weights_only=True)["epoch"] < 3
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    whole = subprocess.run([sys.executable, "-m", "pipeline.cli", *common, "--out", str(tmp_path / "whole")],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    for name in ("head-0.safetensors", "encoders/image/model.safetensors"):
        a, b = load_file(str(killed / name)), load_file(str(tmp_path / "whole" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")


def test_existing_run_needs_resume(data_dir, tmp_path):
    cfg = FinetuneConfig.build(data_dir=data_dir, out=tmp_path / "run", random_init=True, epochs=1, batch_size=8,
                               workers=0, **TINY)
    finetune(cfg)
    with pytest.raises(MlcError, match="--resume"):
        finetune(cfg)
    with pytest.raises(MismatchError, match="other options"):
        finetune(cfg.replace(resume=True, lr=0.5))
    last = tmp_path / "run" / "checkpoints" / "last.pt"  # as mlc 0.2 wrote it: its config flat
    ck = torch.load(last, weights_only=True)
    assert ck["config"]["train"]["lr"] == cfg.train.lr
    torch.save({**ck, "config": flatten(ck["config"])}, last)
    with pytest.raises(MismatchError, match="other options"):
        finetune(cfg.replace(resume=True, lr=0.5))
    finetune(cfg.replace(resume=True))  # resumes (at its last epoch: nothing left to train)


@pytest.mark.slow
def test_two_process_gloo_run_under_torchrun(data_dir, tmp_path):
    out = tmp_path / "ddp"
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "finetune", str(data_dir), *ARGS, "--end-to-end",
                          "--epochs", "1", "--batch-size", "4", "--out", str(out), "--nproc", "2", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr
    # Only rank 0 prints and writes: one summary line, one set of files.
    assert res.stderr.count("best epoch") == 1
    assert (out / "head-0.safetensors").is_file() and RunDir(out).has_encoders()
    assert len(list(out.glob(".*.tmp"))) == 0


def test_extract_from_run_uses_the_finetuned_encoders(data_dir, tmp_path):
    run = tmp_path / "run"
    finetune(FinetuneConfig.build(data_dir=data_dir, out=run, random_init=True, end_to_end=True, epochs=1, batch_size=4,
                                  lr=1e-2, encoder_lr=1e-2, workers=0, **TINY))
    base = dict(data_dir=data_dir, splits=("train",), workers=0, backend="torch", **TINY)
    (pre,) = extract(ExtractConfig.build(cache_dir=tmp_path / "c", random_init=True, **base))
    (post,) = extract(ExtractConfig.build(cache_dir=tmp_path / "c", from_run=run, **base))
    image, text = load_encoder(RunDir(run).encoder_dir("image")), load_encoder(RunDir(run).encoder_dir("text"))
    rec = DataDir.open(data_dir).records("train")[2]
    with torch.inference_mode():
        want_i = image(image.preprocess.transform(0)(load_image(data_dir / "data" / rec.image_id))[None]).numpy()
        tok = text.tokenize([rec.caption])
        want_t = text(tok["input_ids"], tok["attention_mask"]).numpy()
    with CacheReader(pre) as a, CacheReader(post) as b:
        assert b.meta.source_run == str(run.resolve()) and b.meta.image_weights_hash == image.weights_hash
        assert not np.allclose(a.array("image"), b.array("image"), atol=1e-3)
        np.testing.assert_allclose(b.array("image")[2, 0].astype(np.float32), want_i[0], rtol=2e-2, atol=2e-3)
        np.testing.assert_allclose(b.array("text")[2].astype(np.float32), want_t[0], rtol=2e-2, atol=2e-3)


def test_finetune_over_a_trunk_cache(data_dir, tmp_path):
    (cache,) = extract(ExtractConfig.build(data_dir=data_dir, cache_dir=tmp_path / "c", splits=("train",), workers=0,
                                           backend="torch", random_init=True, image_cut="layer3", text_cut="layer1",
                                           views=2, **TINY))
    cfg = FinetuneConfig.build(from_cache=cache, out=tmp_path / "run", epochs=2, batch_size=4, lr=3e-3, encoder_lr=1e-3,
                               workers=0, warmup=0.0, pos_weight=False, sampler="uniform", **TINY)
    before = train_loss(cfg, None)
    finetune(cfg)
    after = train_loss(cfg, torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"])
    assert after < before - 0.01, (before, after)
    # A run that expects another cut refuses this cache.
    with pytest.raises(MismatchError, match="image_cut"):
        finetune(cfg.replace(out=tmp_path / "other", image_cut="layer2"))
    # Its encoders are whole (frozen bottom + trained top): extract --from-run works on the run.
    (post,) = extract(ExtractConfig.build(data_dir=data_dir, cache_dir=tmp_path / "c", splits=("train",), workers=0,
                                          backend="torch", from_run=tmp_path / "run", **TINY))
    assert CacheReader(post).meta.source_run == str((tmp_path / "run").resolve())


def test_init_head_must_not_have_trained_on_the_rows_the_finetune_holds_out(data_dir, tmp_path):
    """A 5-fold head (or one fitted on another split) saw the finetune's held-out rows: its held-out F1 and
    thresholds would be optimistic, so it is refused; a head fitted on the same split is taken."""
    from pipeline.fit_head import FitHeadConfig, fit_head

    (cache,) = extract(ExtractConfig.build(data_dir=data_dir, cache_dir=tmp_path / "c", splits=("train",), workers=0,
                                           backend="torch", random_init=True, **TINY))
    cfg = FinetuneConfig.build(data_dir=data_dir, out=tmp_path / "ft", random_init=True, epochs=1, batch_size=4,
                               workers=0, augment=False, **TINY)
    for name, folds, seed, fault in (("folds", 2, 0, "a 2-fold run"), ("other", 0, 3, "trained on")):
        fit_head(FitHeadConfig.build(caches=cache, out=tmp_path / name, epochs=1, folds=folds, seed=seed), quiet=True)
        with pytest.raises(MlcError, match=fault) as info:
            finetune(cfg.replace(init_head=tmp_path / name))
        assert "--folds 0 --seed 0 --val-fraction 0.2" in str(info.value)
    fit_head(FitHeadConfig.build(caches=cache, out=tmp_path / "same", epochs=1, folds=0), quiet=True)
    start = RunDir(tmp_path / "same").load().heads[0].state_dict()
    task, _ = build_task(cfg.replace(init_head=tmp_path / "same"), torch.device("cpu"))
    got = task.model.head.state_dict()
    assert all(torch.equal(got[k], v) for k, v in start.items())
