"""Smaller ONNX graphs: float16 weight storage and int8 dynamic quantisation.

float16: every float32 weight of 16 values or more is stored in half precision and cast back to float32
inside the graph (a Cast node that ONNX Runtime folds when it loads the graph), so the arithmetic stays
float32 on every CPU and only the weights' rounding changes (relative 2^-11). int8: ONNX Runtime's
dynamic quantisation of the MatMul/Gemm weights (per tensor; activations quantised on the fly), the other
float weights (convolutions) then stored in float16 as above. Sizes and label agreement are measured by
bench/export.py.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

DTYPES = ("float32", "float16", "int8")
MIN_HALF = 16  # smaller tensors (scalars, quantisation scales, shapes) stay float32: they weigh nothing


def half_weights(model: object) -> object:
    """An onnx.ModelProto with its large float32 initializers stored as float16 and cast back at load."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    assert isinstance(model, onnx.ModelProto)
    graph = model.graph
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= MIN_HALF:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{init.name}__fp16")
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                          name=f"{init.name}__cast"))
            kept.append(half)
        else:
            kept.append(init)
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)  # the casts first: every consumer comes after its producer
    graph.ClearField("node")
    graph.node.extend(nodes)
    return model


def convert(path: Path, dtype: str) -> None:
    """Rewrite the float32 graph at ``path`` in ``dtype`` (float32: unchanged)."""
    import onnx

    if dtype == "float32":
        return
    if dtype == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / "int8.onnx"
            logging.disable(logging.WARNING)  # it advises a pre-processing pass that changes nothing here
            try:
                quantize_dynamic(path, out, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
            finally:
                logging.disable(logging.NOTSET)
            model = onnx.load(str(out))
    else:
        model = onnx.load(str(path))
    onnx.save(half_weights(model), str(path))
