"""int8 stage one's calibration (``--int8-calibration``): spelled, named in the precision, kept apart in graphs and
caches, and the float ends left float in the quantized graph."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import make_data_dir

from pipeline.backends import graph_dir, onnx_file, onnx_session
from pipeline.cache import CacheReader
from pipeline.data import DataDir
from pipeline.encoders import create_image_encoder
from pipeline.errors import MismatchError, MlcError
from pipeline.extract import ExtractConfig, extract
from pipeline.features import Job, LoaderOptions, Recipe, up_to_date
from pipeline.quantize import (
    FIRST_CALIBRATION,
    Int8Calibration,
    feature_precision,
    float_ends,
    int8_calibration,
    precision_label,
    quantize_graph,
)

TINY = dict(image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True, workers=0, encode_batch=4)
CPU = torch.device("cpu")


def test_a_calibration_is_spelled_and_named_in_the_precision():
    c = Int8Calibration.parse("Percentile-512-float-ends")
    assert (c.method, c.images, c.float_ends) == ("percentile", 512, True)
    assert c.spec == "percentile-512-float-ends" and Int8Calibration.parse(c.spec) == c
    assert precision_label(c) == "int8-percentile-512-float-ends" and int8_calibration(precision_label(c)) == c
    # mlc's first calibration keeps the plain name its caches and runs carry
    assert precision_label(FIRST_CALIBRATION) == "int8" and int8_calibration("int8") == FIRST_CALIBRATION
    assert FIRST_CALIBRATION.spec == "minmax-64"
    assert feature_precision("int8", CPU, Int8Calibration(method="entropy", images=8)) == "int8-entropy-8"
    assert feature_precision("fp32", CPU, c) == "fp32"
    for bad, why in (("median-64", "method must be one of"), ("minmax-0", "from 1 to 100000"),
                     ("minmax", "expected METHOD-IMAGES"), ("minmax-64-ends", "expected METHOD-IMAGES")):
        with pytest.raises(MlcError, match=why):
            Int8Calibration.parse(bad)
    with pytest.raises(MlcError, match="--int8-calibration"):  # before any encoder is loaded
        ExtractConfig.build(data_dir="d", precision="int8", int8_calibration="minmax-many")
    with pytest.raises(MlcError, match="applies to --precision int8 only"):  # not silently ignored
        ExtractConfig.build(data_dir="d", int8_calibration="entropy-64")
    assert ExtractConfig.build(data_dir="d", int8_calibration="MinMax-64").numerics.calibration() == FIRST_CALIBRATION


def _graph(tmp_path, how: Int8Calibration) -> onnx.ModelProto:
    image = create_image_encoder("tiny-resnet", random_init=True, seed=0)
    onnx_session(image, None, graph_dir(), lambda m: None)  # the session's fp32 graph (exported once)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 3, 64, 64), dtype=np.uint8)
    out = tmp_path / f"{how.spec}.onnx"
    quantize_graph(onnx_file(graph_dir(), image, None), out, pixels, how=how)
    return onnx.load(str(out))


def _float_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """The Conv node reads its weights as a float initializer (not through a DequantizeLinear)."""
    inits = {i.name: i for i in model.graph.initializer}
    w = inits.get(node.input[1])
    return w is not None and w.data_type == onnx.TensorProto.FLOAT


def _last_convs(model: onnx.ModelProto) -> set[str]:
    """The convolutions no other convolution follows (the head; in a ResNet the last block's two branches)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def conv_below(n: onnx.NodeProto) -> bool:
        return any(c.op_type == "Conv" or conv_below(c) for out in n.output for c in consumers.get(out, ()))

    return {n.name for n in model.graph.node if n.op_type == "Conv" and not conv_below(n)}


def test_float_ends_stay_float_in_the_quantized_graph(tmp_path):
    plain = _graph(tmp_path, Int8Calibration(images=8))
    ends = _graph(tmp_path, Int8Calibration(images=8, float_ends=True))
    for model, float_first_last in ((plain, False), (ends, True)):
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        last = _last_convs(model)
        assert len(convs) > 2 + len(last) and last
        floats = {n.name for n in convs if _float_weight(model, n)}
        assert floats == ({convs[0].name} | last if float_first_last else set())  # the body is int8 in both
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        pool = [n for n in model.graph.node if n.op_type in ("ReduceMean", "GlobalAveragePool")]
        # the pooling reads float values, not dequantized ones
        assert len(pool) == 1 and (producers[pool[0].input[0]] != "DequantizeLinear") == float_first_last
    names = float_ends(ends)
    assert names[0] == [n for n in ends.graph.node if n.op_type == "Conv"][0].name and set(names) > _last_convs(ends)


def test_two_calibrations_never_share_a_graph_or_a_cache(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=12, n_test=2)
    cache, graphs = tmp_path / "cache", tmp_path / "onnx"
    graphs.mkdir()  # the session's fp32 graphs (not exported again); the int8 ones made here stay here
    for p in graph_dir().glob("*tiny-*.onnx"):
        if "int8" not in p.name:
            shutil.copy(p, graphs)

    def run(spec: str | None, **more: str):
        opts = {} if spec is None else {"int8_calibration": spec}
        (path,) = extract(ExtractConfig.build(data_dir=data, cache_dir=cache, splits=("train",), precision="int8",
                                              onnx_dir=graphs, **opts, **{**TINY, **more}))
        return path

    first, other = run(None), run("percentile-8-float-ends")
    assert first.name.endswith("__random_int8.h5") and other.name.endswith("__random_int8-percentile-8-float-ends.h5")
    with CacheReader(first) as a, CacheReader(other) as b:
        assert (a.meta.precision, b.meta.precision) == ("int8", "int8-percentile-8-float-ends")
        assert a.meta.differences(b.meta) == ["precision: this cache has 'int8', that one has "
                                              "'int8-percentile-8-float-ends'"]
        assert b.meta.extra["recipe"]["precision"] == "int8-percentile-8-float-ends"  # submit makes test alike
        assert not np.allclose(a.array("image"), b.array("image"))  # another graph computed them
        assert np.array_equal(a.array("text"), b.array("text"))  # the caption graph is the same dynamic one
    made = sorted(p.name for p in graphs.glob("*int8*.onnx"))
    assert len(made) == 3 and sum("int8-percentile-8-float-ends-" in m for m in made) == 1, made  # + text, + first
    # a cache made with one calibration, found where another's belongs, is refused by the one reuse policy
    with CacheReader(first) as a:
        meta = a.meta.replace(precision="int8-minmax-8")
    third = first.with_name(first.name.replace("int8", "int8-minmax-8"))
    shutil.copy(first, third)
    recipe = Recipe(image_encoder="tiny-resnet", text_encoder="tiny-bert", random_init=True, precision="int8-minmax-8")
    job = Job(recipe, DataDir.open(data), "train", third, LoaderOptions())
    with pytest.raises(MismatchError, match="precision: the cache has 'int8', these options ha"):
        up_to_date(job, meta)
    assert up_to_date(dataclasses.replace(job, target=first), meta.replace(precision="int8"))  # its own: reused
    # a caption-only cache has no image graph to calibrate: one int8 cache whatever the calibration
    text_only = run("entropy-8", image_encoder="none")
    assert text_only.name.endswith("__random_int8.h5")
