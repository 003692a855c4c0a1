"""Precision: bf16 training and inference where the CPU has it (fp32 master weights), int8 stage one through
ONNX Runtime (features close to fp32, a cache of its own), and the precision recorded and checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_data_dir

from pipeline import device as dev
from pipeline.backends import graph_dir
from pipeline.cache import CacheReader
from pipeline.data import DataDir
from pipeline.encoders import create_image_encoder, create_text_encoder
from pipeline.errors import MismatchError, MlcError
from pipeline.extract import ExtractConfig, extract
from pipeline.features import Recipe, encoders_and_engine
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.quantize import feature_precision
from pipeline.runs import Contract, RunDir
from pipeline.training import Task, TrainOptions, make_sampler, train

TINY = dict(image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True, workers=0, encode_batch=4)
CPU = torch.device("cpu")


@pytest.fixture
def flags(monkeypatch):
    """Pretend the CPU has the given feature flags."""
    def set_flags(*names: str) -> None:
        monkeypatch.setattr(dev, "cpu_flags", lambda: set(names))
    return set_flags


def test_precision_follows_the_cpu(flags):
    flags("avx2")
    assert dev.resolve_precision("auto", CPU) == "fp32" and dev.resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(MlcError, match="no bf16 arithmetic"):
        dev.resolve_precision("bf16", CPU)
    flags("avx512f", "avx512_bf16")
    assert dev.cpu_bf16() == "avx512" and dev.resolve_precision("bf16", CPU) == "bf16"
    assert dev.resolve_precision("auto", CPU) == "bf16" and dev.resolve_precision("fp32", CPU) == "fp32"
    flags("avx512_bf16", "amx_bf16", "amx_tile")
    assert dev.cpu_bf16() == "amx" and dev.resolve_precision("auto", CPU) == "bf16"
    with pytest.raises(MlcError, match="--precision must be one of"):
        dev.resolve_precision("int4", CPU)
    # stage one: auto stays fp32 (ONNX Runtime) on a CPU; int8 is asked for by name
    assert feature_precision("auto", CPU) == "fp32" and feature_precision("int8", CPU) == "int8"


def _task(seen: list[tuple[bool, torch.dtype]]) -> Task:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(64, 8)
    y = (x[:, :3] > 0).numpy().astype(np.uint8)
    rows = np.arange(64)
    opts = TrainOptions(epochs=2, batch_size=16)
    sampler = make_sampler(opts, y)

    def forward(m, b):
        out = m(b["x"])
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out

    return Task(model=model, param_groups=[{"params": list(model.parameters()), "lr": 1e-2}], y=y, train_rows=rows,
                sampler=sampler, steps_per_epoch=4,
                batches=lambda e: ({"x": x[i], "labels": torch.from_numpy(y[i.numpy()]).float()}
                                   for i in sampler.order().split(16)),
                forward=forward, predict=lambda m: (rows, torch.sigmoid(m(x)).detach().numpy()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_autocasts_and_keeps_fp32_master_weights(precision):
    seen: list = []
    task = _task(seen)
    res = train(task, TrainOptions(epochs=2, batch_size=16), device=CPU, log=lambda m: None, precision=precision)
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert seen and all(on == (precision == "bf16") and dtype == want for on, dtype in seen)
    assert all(v.dtype == torch.float32 for v in res.best_state.values())  # master weights stay fp32
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] + 0.05


def test_int8_features_are_close_to_fp32_and_cached_apart(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=16, n_test=4)
    cache, graphs_dir = tmp_path / "cache", graph_dir()  # the session's graphs: fp32 reused, int8 made here
    (fp32,) = extract(ExtractConfig.build(data_dir=data, cache_dir=cache, splits=("train",), backend="onnx", **TINY))
    (int8,) = extract(ExtractConfig.build(data_dir=data, cache_dir=cache, splits=("train",), precision="int8", **TINY))
    assert int8 != fp32 and int8.name.endswith("int8.h5")
    with CacheReader(fp32) as a, CacheReader(int8) as b:
        assert (a.meta.precision, b.meta.precision) == ("fp32", "int8")
        assert a.meta.differences(b.meta) == ["precision: this cache has 'fp32', that one has 'int8'"]
        assert "int8" in b.meta.extra["backend"]["image"] and "int8" in b.meta.extra["backend"]["text"]
        for name in ("image", "text"):
            x, q = a.array(name).astype(np.float32).reshape(16, -1), b.array(name).astype(np.float32).reshape(16, -1)
            cos = (x * q).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(q, axis=1)
            assert cos.min() > 0.95, (name, cos)
            assert not np.allclose(x, q, rtol=1e-3, atol=1e-4), name  # really another computation
    graphs = sorted(p.name for p in graphs_dir.glob("*int8*.onnx"))
    assert len(graphs) == 2
    stamps = {p: p.stat().st_mtime_ns for p in graphs_dir.glob("*int8*.onnx")}
    extract(ExtractConfig.build(data_dir=data, cache_dir=cache, splits=("test",), precision="int8", **TINY))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the int8 graphs are reused, not rebuilt


def test_int8_needs_onnx_and_a_pooled_cache(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=8, n_test=2)
    with pytest.raises(MlcError, match="--backend onnx"):
        extract(ExtractConfig.build(data_dir=data, cache_dir=tmp_path / "c", precision="int8", backend="torch", **TINY))
    recipe = Recipe(image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True, image_cut="layer3",
                    precision="int8")
    with pytest.raises(MlcError, match="trunk caches"):
        encoders_and_engine(recipe, ExtractConfig.build(data_dir=data, onnx_dir=tmp_path / "onnx", **TINY).loader,
                            CPU, data=DataDir.open(data))


def test_a_run_refuses_features_of_another_precision(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=16, n_test=4)
    (int8,) = extract(ExtractConfig.build(data_dir=data, cache_dir=tmp_path / "c", splits=("train",), precision="int8",
                                          **TINY))
    fit_head(FitHeadConfig.build(caches=int8, out=tmp_path / "run", epochs=2, folds=0), quiet=True)
    run = RunDir(tmp_path / "run").load()
    assert run.features[0]["contract"]["precision"] == "int8"
    image, text = create_image_encoder("tiny-resnet", random_init=True, seed=0), \
        create_text_encoder("tiny-bert", random_init=True, seed=0)
    fp32 = Contract.of_encoders(image, text, run.labels)
    with pytest.raises(MismatchError, match="precision"):
        Contract.from_dict(run.features[0]["contract"]).check(fp32, what="fp32 features")
    old = {k: v for k, v in fp32.to_dict().items() if k != "precision"}  # a run written before precision
    assert Contract.from_dict(old) == fp32
