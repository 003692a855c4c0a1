"""Stage one's precision (``PrecisionOptions``: ``--precision auto|fp32|bf16|int8`` of extract and run), and
int8 stage one: the exported fp32 ONNX graphs quantized with ONNX Runtime.

The image graph is quantized statically (QDQ: int8 weights per channel, uint8 activations whose ranges
are calibrated on the data's own images: the first ``Int8Calibration.images`` labelled images of the data
folder, so ``extract`` and ``submit`` of one data folder build the same graph); the text graph
dynamically (int8 weights, activation ranges per batch at run time: token states have no fixed range).
How the image graph is calibrated (``--int8-calibration METHOD-IMAGES[-float-ends]``: onnxruntime's MinMax,
Entropy or Percentile calibrator, how many images, and whether the first and last convolutions stay
float) is part of the precision's name (``precision_label``: ``int8`` for mlc's first calibration,
``minmax-64``, else ``int8-<spec>``), so it is part of every cache's and run's identity and of the cache's
file name: two calibrations never share a cache or a graph.

A quantized graph is written next to its fp32 graph (``<fp32 name>-int8-[<spec>-]<calibration digest>.onnx``),
atomically, once, and checked against the fp32 graph on the calibration batch (mean cosine of the
features at least ``MIN_COSINE``): int8 cannot match fp32 to float tolerance, but a broken
quantization (a graph that computes something else) is refused. Caches record the precision as part of
their identity, so int8 features never mix with fp32 ones.
"""

from __future__ import annotations

import hashlib
import re
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

MIN_COSINE = 0.9
QUANT_VERSION = 1  # bump when how graphs are quantized changes

Calibration = tuple[np.ndarray, str]  # uint8 pixels (N, 3, H, W) and a digest of what they are


FEATURE_PRECISIONS = ("auto", "fp32", "bf16", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # onnxruntime's CalibrationMethod, by its lower name
FLOAT_ENDS = "float-ends"
CHECK_IMAGES = 64  # the calibration images the int8 graph is checked on (as many as mlc's first calibration)
BATCH = 16  # calibration images per forward of the calibrator (its memory: every activation of a batch)


@dataclass(frozen=True)
class Int8Calibration:
    """How the image graph's activation ranges are calibrated: onnxruntime's ``method`` (minmax: the observed
    range; entropy: the range that keeps the histogram's KL divergence smallest; percentile: the 99.999th
    percentile of |x|) over the first ``images`` labelled images; ``float_ends``: the first convolution (the stem,
    reading the normalised pixels) and the last one with everything after it (the head convolution and the
    pooling) stay float32. Spelled ``METHOD-IMAGES[-float-ends]`` (``spec``), e.g. ``percentile-512-float-ends``."""

    method: str = "minmax"
    images: int = 64
    float_ends: bool = False

    def __post_init__(self) -> None:
        require([(self.method in CALIBRATION_METHODS,
                  f"--int8-calibration: the method must be one of {CALIBRATION_METHODS}, not {self.method!r}"),
                 (isinstance(self.images, int) and 1 <= self.images <= 100_000,
                  f"--int8-calibration: the number of images must be from 1 to 100000, not {self.images!r}")])

    @property
    def spec(self) -> str:
        return f"{self.method}-{self.images}" + (f"-{FLOAT_ENDS}" if self.float_ends else "")

    @classmethod
    def parse(cls, spec: str) -> Int8Calibration:
        """``METHOD-IMAGES[-float-ends]`` -> Int8Calibration; MlcError saying the grammar otherwise."""
        m = re.fullmatch(rf"([a-z]+)-(\d+)(-{FLOAT_ENDS})?", spec.strip().lower())
        if m is None:
            raise MlcError(f"--int8-calibration {spec!r}: expected METHOD-IMAGES[-{FLOAT_ENDS}], METHOD one of "
                           f"{CALIBRATION_METHODS}, e.g. percentile-512-{FLOAT_ENDS}")
        return cls(method=m[1], images=int(m[2]), float_ends=m[3] is not None)


FIRST_CALIBRATION = Int8Calibration()  # mlc's first int8 (issue 21): its caches and graphs are named plain "int8"
DEFAULT_CALIBRATION = FIRST_CALIBRATION


def precision_label(calibration: Int8Calibration) -> str:
    """The int8 precision's name as caches, runs and file names record it."""
    return "int8" if calibration == FIRST_CALIBRATION else f"int8-{calibration.spec}"


def is_int8(precision: str) -> bool:
    return precision == "int8" or precision.startswith("int8-")


def int8_calibration(precision: str) -> Int8Calibration:
    """The calibration an int8 precision label names (``int8``: mlc's first one)."""
    if not is_int8(precision):
        raise MlcError(f"precision {precision!r} is not int8")
    return FIRST_CALIBRATION if precision == "int8" else Int8Calibration.parse(precision[len("int8-"):])


@dataclass(frozen=True, kw_only=True)
class PrecisionOptions(Config):
    """What stage one computes in (recorded in the cache: int8 or bf16 features never pass for fp32 ones)."""

    PANEL: ClassVar[str] = "Encoding"

    precision: str = opt("auto", "fp32, int8 (ONNX Runtime: the image graph statically quantized on the data's own "
                         "images, the text graph dynamically), bf16 (torch autocast; CPUs with AMX or AVX512-BF16, "
                         "and CUDA), or auto (fp32 on CPU, mixed precision on CUDA).")

    int8_calibration: str = opt(DEFAULT_CALIBRATION.spec, "With --precision int8: how the image graph's activation "
                                f"ranges are calibrated, METHOD-IMAGES[-{FLOAT_ENDS}]: METHOD one of "
                                f"{', '.join(CALIBRATION_METHODS)} (onnxruntime's calibrators), IMAGES the first "
                                f"labelled images it is calibrated on, -{FLOAT_ENDS} keeps the first and last "
                                "convolutions in float32. Part of the cache's name and identity "
                                "(docs/recipes.md, 'int8 calibration').")

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.precision in FEATURE_PRECISIONS, f"--precision must be one of {FEATURE_PRECISIONS}")])
        # a bad spec stops here, not after loading the encoders; one given without int8 would be ignored
        calibration = self.calibration()
        require([(self.precision == "int8" or calibration == DEFAULT_CALIBRATION,
                  f"--int8-calibration {self.int8_calibration} applies to --precision int8 only")])

    def calibration(self) -> Int8Calibration:
        return Int8Calibration.parse(self.int8_calibration)


def feature_precision(precision: str, device: torch.device,
                      calibration: Int8Calibration = DEFAULT_CALIBRATION) -> str:
    """The precision features are made in: auto is fp32 through ONNX Runtime on a CPU (int8 measured -0.004
    samples-F1 on unseen rows, docs/recipes.md; bf16 needs torch, 4x slower than ONNX here) and mixed
    precision on CUDA, as mlc always did there. int8 is named with its ``calibration`` (``precision_label``)."""
    if precision == "int8":
        if device.type != "cpu":
            raise MlcError("--precision int8 runs through ONNX Runtime on the CPU; use --device cpu")
        return precision_label(calibration)
    return "fp32" if precision == "auto" and device.type == "cpu" else resolve_precision(precision, device)


def calibration_pixels(data: DataDir, encoder: ImageEncoder, n: int = DEFAULT_CALIBRATION.images) -> Calibration:
    """The first ``n`` labelled images (test images for a folder without labels) as the image graph's
    uint8 input, and a digest of their records and bytes."""
    records = data.records("train" if data.has("train") else "test")[:n]
    pixels = encoder.preprocess.pixels(0)
    batch = np.stack([pixels(load_image(data.image_path(r.image_id))).numpy() for r in records])
    return batch, fingerprint(records, data.image_dir)[:12]


def int8_file(fp32: Path, digest: str, calibration: Int8Calibration | None = None) -> Path:
    """Where the quantized version of the fp32 graph ``fp32`` goes (a calibration other than mlc's first is
    spelled out in the name; ``digest`` covers it too)."""
    spec = "" if calibration in (None, FIRST_CALIBRATION) else f"{calibration.spec}-"
    return fp32.with_name(f"{fp32.stem}-int8-{spec}{digest}-q{QUANT_VERSION}.onnx")


def float_ends(model: Any) -> list[str]:
    """The nodes ``float_ends`` keeps float: the first convolution (the stem), and every node no convolution follows
    (the last convolutions, one or several where a residual branch joins, and the activation and pooling after
    them), in the graph's (topological) order."""
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not convs:
        return []
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    conv_below = [False] * len(nodes)
    for i in reversed(range(len(nodes))):
        conv_below[i] = any(nodes[j].op_type == "Conv" or conv_below[j] for out in nodes[i].output
                            for j in consumers.get(out, ()))
    return [nodes[convs[0]].name] + [n.name for i, n in enumerate(nodes) if i > convs[0] and not conv_below[i]]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).mean())


def quantize_graph(fp32: Path, out: Path, calibration: np.ndarray | None, input_name: str = "pixels",
                   how: Int8Calibration = FIRST_CALIBRATION) -> None:
    """Write ``out``: ``fp32`` statically quantized on ``calibration`` (uint8 images) as ``how`` says, or
    dynamically quantized (weights only) when there is none."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        """The images in batches of BATCH; ``set_range`` lets the calibrator take them one batch at a time."""

        def __init__(self, x: np.ndarray) -> None:
            self.batches = [{input_name: x[i:i + BATCH]} for i in range(0, len(x), BATCH)]
            self.set_range(0, len(self.batches))

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.items = iter(self.batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[how.method]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, quiet_exporter(), atomic_path(out) as target:
        if calibration is None:
            quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=True)
        else:
            pre = Path(tmp) / "pre.onnx"  # shape inference + folding first, as ONNX Runtime recommends
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            exclude = float_ends(onnx.load(str(pre))) if how.float_ends else []
            # one batch per collection (CalibStridedMinMax): the calibrator otherwise keeps every activation of
            # every image in memory at once (512 images of lite0: gigabytes); ranges and histograms merge exactly
            quantize_static(str(pre), str(target), Batches(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method, nodes_to_exclude=exclude,
                            extra_options={"CalibStridedMinMax": 1})


def _inputs(encoder: Any, calibration: Calibration | None) -> dict[str, np.ndarray]:
    names, _ = io_names(encoder, None)
    args = (calibration[0],) if calibration is not None else tuple(a.numpy() for a in probe_inputs(encoder))
    return dict(zip(names, args, strict=True))


def int8_session(fp32: Path, fp32_session: Any, encoder: Any, cut: str | None, log: Callable[[str], None],
                 calibration: Callable[[int], Calibration] | None,
                 how: Int8Calibration = FIRST_CALIBRATION) -> tuple[Any, Path, float]:
    """A checked int8 session for the encoder whose verified fp32 graph is ``fp32``: (session, its file, mean
    cosine to fp32 on the check batch). Static for an image encoder (``calibration(n)`` gives its first n images,
    calibrated as ``how`` says), dynamic for a text encoder. BackendError when it cannot be built or computes
    something else."""
    if cut is not None:
        raise BackendError("--precision int8 makes pooled features for heads; trunk caches (--image-cut, "
                           "--text-cut) feed training: extract them in fp32")
    image = isinstance(encoder, ImageEncoder)
    calib = calibration(how.images) if image and calibration is not None else None
    if image and calib is None:
        raise BackendError(f"{encoder.name}: int8 needs calibration images")
    # mlc's first calibration keeps its graphs' names; any other is part of the digest and the name
    digest = "dynamic" if calib is None else calib[1] if how == FIRST_CALIBRATION else f"{calib[1]}|{how.spec}"
    path = int8_file(fp32, hashlib.sha256(digest.encode()).hexdigest()[:12], how if image else None)
    feed = _inputs(encoder, None if calib is None else (calib[0][:CHECK_IMAGES], calib[1]))
    want = fp32_session.run(None, feed)[0]
    for attempt in range(2):
        if not path.is_file():
            what = "dynamic" if calib is None else f"static, {how.method} on {len(calib[0])} images" + \
                (", first and last convolutions float" if how.float_ends else "")
            log(f"quantizing {encoder.name} to int8 ({what}): {path}")
            try:
                quantize_graph(fp32, path, None if calib is None else calib[0], how=how)
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
