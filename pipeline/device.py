"""Device selection, mixed precision and torch.distributed set-up, with no hard-coded ``.cuda()``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import MlcError
from .options import PRECISIONS  # what training computes in; torch-free, so ComputeOptions checks it without torch


def select_device(name: str = "auto") -> torch.device:
    """``auto`` -> the local CUDA device when there is one (per LOCAL_RANK under torchrun), else CPU."""
    if name not in {"auto", "cpu", "cuda"} and not name.startswith("cuda:"):
        raise MlcError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MlcError(f"--device {name} asked for CUDA, but torch sees no CUDA device")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def cpu_bf16() -> str | None:
    """What this CPU computes bf16 matrix products with: "amx" (AMX tiles), "avx512" (AVX512-BF16 dot
    products) or None (bf16 would be emulated, slower than fp32)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    return "avx512" if "avx512_bf16" in flags else None


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run computes in: "fp32", "bf16" or (CUDA without bf16) "fp16"; fp32 master weights in
    every case. ``auto``: mixed precision on CUDA (as mlc always did), bf16 on CPUs with bf16 arithmetic (AMX,
    or AVX512-BF16: there bf16 trained MiniLM 2.0x and EfficientNet-Lite0 1.4x as many rows/s as fp32, medians
    of runs alternated side by side, with the same held-out F1; bench/precision.py, docs/recipes.md), fp32
    elsewhere (bf16 would be emulated)."""
    if precision not in PRECISIONS:
        raise MlcError(f"--precision must be one of {PRECISIONS}, not {precision!r}")
    if device.type == "cuda":
        if precision == "fp32":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else ("fp16" if precision == "auto" else _no_bf16("this GPU"))
    if precision == "bf16":
        return "bf16" if cpu_bf16() else _no_bf16("this CPU (no AMX-BF16 or AVX512-BF16)")
    return "bf16" if precision == "auto" and cpu_bf16() else "fp32"


def _no_bf16(what: str) -> str:
    raise MlcError(f"--precision bf16: {what} has no bf16 arithmetic; use --precision fp32 or auto")


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Autocast to a resolved precision ("bf16" or "fp16", on CPU or CUDA); "fp32" is a no-op."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes files and prints progress."""
    return rank() == 0


@contextlib.contextmanager
def distributed(device_name: str = "auto") -> Iterator[torch.device]:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); yield the device."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = select_device(device_name)
    if launched and not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
        try:
            yield device
        finally:
            torch.distributed.destroy_process_group()
    else:
        yield device
