"""Stage one's precision (``PrecisionOptions``: ``--precision auto|fp32|bf16|int8`` of extract and run), and
int8 stage one: the exported fp32 ONNX graphs quantized with ONNX Runtime.

The image graph is quantized statically (QDQ: int8 weights per channel, uint8 activations whose ranges
are calibrated on the data's own images: the first ``CALIBRATION_IMAGES`` labelled images of the data
folder, so ``extract`` and ``submit`` of one data folder build the same graph); the text graph
dynamically (int8 weights, activation ranges per batch at run time: token states have no fixed range).

A quantized graph is written next to its fp32 graph (``<fp32 name>-int8-<calibration digest>.onnx``),
atomically, once, and checked against the fp32 graph on the calibration batch (mean cosine of the
features at least ``MIN_COSINE``): int8 cannot match fp32 to float tolerance, but a broken
quantization (a graph that computes something else) is refused. Caches record the precision as part of
their identity, so int8 features never mix with fp32 ones.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .atomic import atomic_path
from .backends import ort_session
from .config import Config, opt, require
from .data import DataDir, fingerprint
from .device import resolve_precision
from .encoders import ImageEncoder
from .errors import MlcError
from .graphs import BackendError, io_names, probe_inputs, quiet_exporter
from .images import load_image

CALIBRATION_IMAGES = 64  # measured on lite0: feature cosine 0.992 against fp32 on unseen images
MIN_COSINE = 0.9
QUANT_VERSION = 1  # bump when how graphs are quantized changes

Calibration = tuple[np.ndarray, str]  # uint8 pixels (N, 3, H, W) and a digest of what they are


FEATURE_PRECISIONS = ("auto", "fp32", "bf16", "int8")


@dataclass(frozen=True, kw_only=True)
class PrecisionOptions(Config):
    """What stage one computes in (recorded in the cache: int8 or bf16 features never pass for fp32 ones)."""

    PANEL: ClassVar[str] = "Encoding"

    precision: str = opt("auto", "fp32, int8 (ONNX Runtime: the image graph statically quantized on the data's own "
                         "images, the text graph dynamically), bf16 (torch autocast; CPUs with AMX or AVX512-BF16, "
                         "and CUDA), or auto (fp32 on CPU, mixed precision on CUDA).")

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.precision in FEATURE_PRECISIONS, f"--precision must be one of {FEATURE_PRECISIONS}")])


def feature_precision(precision: str, device: torch.device) -> str:
    """The precision features are made in: auto is fp32 through ONNX Runtime on a CPU (int8 measured -0.004
    samples-F1 on unseen rows, docs/recipes.md; bf16 needs torch, 4x slower than ONNX here) and mixed
    precision on CUDA, as mlc always did there."""
    if precision == "int8":
        if device.type != "cpu":
            raise MlcError("--precision int8 runs through ONNX Runtime on the CPU; use --device cpu")
        return "int8"
    return "fp32" if precision == "auto" and device.type == "cpu" else resolve_precision(precision, device)


def calibration_pixels(data: DataDir, encoder: ImageEncoder, n: int = CALIBRATION_IMAGES) -> Calibration:
    """The first ``n`` labelled images (test images for a folder without labels) as the image graph's
    uint8 input, and a digest of their records and bytes."""
    records = data.records("train" if data.has("train") else "test")[:n]
    pixels = encoder.preprocess.pixels(0)
    batch = np.stack([pixels(load_image(data.image_path(r.image_id))).numpy() for r in records])
    return batch, fingerprint(records, data.image_dir)[:12]


def int8_file(fp32: Path, digest: str) -> Path:
    """Where the quantized version of the fp32 graph ``fp32`` goes."""
    return fp32.with_name(f"{fp32.stem}-int8-{digest}-q{QUANT_VERSION}.onnx")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).mean())


def quantize_graph(fp32: Path, out: Path, calibration: np.ndarray | None, input_name: str = "pixels") -> None:
    """Write ``out``: ``fp32`` statically quantized on ``calibration`` (uint8 images), or dynamically
    quantized (weights only) when there is none."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, x: np.ndarray) -> None:
            self.items = iter([{input_name: x[i:i + 16]} for i in range(0, len(x), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, quiet_exporter(), atomic_path(out) as target:
        if calibration is None:
            quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=True)
        else:
            pre = Path(tmp) / "pre.onnx"  # shape inference + folding first, as ONNX Runtime recommends
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(target), Batches(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _inputs(encoder: Any, calibration: Calibration | None) -> dict[str, np.ndarray]:
    names, _ = io_names(encoder, None)
    args = (calibration[0],) if calibration is not None else tuple(a.numpy() for a in probe_inputs(encoder))
    return dict(zip(names, args, strict=True))


def int8_session(fp32: Path, fp32_session: Any, encoder: Any, cut: str | None, log: Callable[[str], None],
                 calibration: Callable[[], Calibration] | None) -> tuple[Any, Path, float]:
    """A checked int8 session for the encoder whose verified fp32 graph is ``fp32``: (session, its file, mean
    cosine to fp32 on the check batch). Static for an image encoder (``calibration`` gives its images),
    dynamic for a text encoder. BackendError when it cannot be built or computes something else."""
    if cut is not None:
        raise BackendError("--precision int8 makes pooled features for heads; trunk caches (--image-cut, "
                           "--text-cut) feed training: extract them in fp32")
    calib = calibration() if isinstance(encoder, ImageEncoder) and calibration is not None else None
    if isinstance(encoder, ImageEncoder) and calib is None:
        raise BackendError(f"{encoder.name}: int8 needs calibration images")
    digest = calib[1] if calib is not None else "dynamic"
    path = int8_file(fp32, hashlib.sha256(digest.encode()).hexdigest()[:12])
    feed = _inputs(encoder, calib)
    want = fp32_session.run(None, feed)[0]
    for attempt in range(2):
        if not path.is_file():
            how = "dynamic" if calib is None else f"static, calibrated on {len(calib[0])} images"
            log(f"quantizing {encoder.name} to int8 ({how}): {path}")
            try:
                quantize_graph(fp32, path, None if calib is None else calib[0])
            except Exception as e:
                raise BackendError(f"{encoder.name}: int8 quantization failed ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200] if str(e) else ''}); use --precision fp32") from e
        try:
            session = ort_session(path)
            cos = _cosine(session.run(None, feed)[0], want)
        except Exception as e:  # a truncated or foreign file: rebuild it once
            cos, why = float("nan"), f"unreadable ({type(e).__name__})"
        else:
            why = f"feature cosine to fp32 {cos:.3f} < {MIN_COSINE}"
        if cos >= MIN_COSINE:
            return session, path, cos
        path.unlink(missing_ok=True)
        if attempt:
            raise BackendError(f"{encoder.name}: its int8 graph does not reproduce the fp32 one ({why}); use "
                               "--precision fp32")
        log(f"{path}: {why}; quantizing it again")
    raise AssertionError("unreachable")
