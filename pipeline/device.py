"""Device selection, mixed precision and torch.distributed set-up, with no hard-coded ``.cuda()``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .errors import MlcError


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


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA; a no-op on CPU (CPU autocast is slower than fp32 here)."""
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
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
