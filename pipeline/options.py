"""Option groups that need no torch: ``mlc predict`` on an exported model builds its config from them
without importing torch (features.py and backends.py, which do, re-use them). ``LoaderOptions``: how frozen encoders
run (extract, submit, run); ``ComputeOptions``: where and in what a stage that trains computes (finetune, crossfit)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .config import Config, borrow, opt, require

BACKENDS = ("auto", "torch", "onnx")
PRECISIONS = ("auto", "fp32", "bf16")  # what training computes in (device.resolve_precision)


@dataclass(frozen=True, kw_only=True)
class LoaderOptions(Config):
    """How encoders run over images: shared by every stage that encodes without training."""

    PANEL: ClassVar[str] = "Encoding"

    encode_batch: int = opt(32, "Images (and captions) per forward pass of the encoders (not the head's "
                            "training batch).")
    workers: int = opt(2, "DataLoader worker processes decoding JPEGs.")
    device: str = opt("auto", "auto (CUDA when available), cpu, cuda or cuda:N.")
    backend: str = opt("auto", "How the frozen encoders run: onnx (ONNX Runtime, CPU; exported once per encoder, "
                       "checked against torch), torch, or auto (onnx on CPU, torch on CUDA).")
    onnx_dir: Path | None = opt(None, "Where exported ONNX graphs are kept and reused, by every command and data "
                                "folder (default $MLC_ONNX_DIR, else $MLC_HOME/onnx, else ~/.cache/mlc/onnx).")

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.encode_batch >= 1, "--encode-batch must be at least 1"),
                 (self.workers >= 0, "--workers must be 0 or more"),
                 (self.backend in BACKENDS, f"--backend must be one of {BACKENDS}")])


@dataclass(frozen=True, kw_only=True)
class ComputeOptions(Config):
    """Where and in what a stage that trains computes: the one ``--device``, ``--precision`` and ``--workers`` of
    finetune and crossfit (a stage without a DataLoader leaves ``workers`` out: ``group(ComputeOptions,
    omit=("workers",))``)."""

    PANEL: ClassVar[str] = "Compute"

    device: str = borrow(LoaderOptions, "device", "auto")
    precision: str = opt("auto", "auto, fp32 or bf16: what forward passes compute in (weights stay fp32). auto: mixed "
                         "precision on CUDA, bf16 on CPUs with AMX or AVX512-BF16, fp32 elsewhere; the one used is "
                         "recorded (finetune: metrics.json; crossfit: its caches).")
    workers: int = borrow(LoaderOptions, "workers", 2)

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}")])
