"""The exceptions mlc raises for bad input; the CLI turns them into one clear line and exit code 2."""

from __future__ import annotations


class MlcError(Exception):
    """Any user-facing failure: bad input, missing weights, a mismatched cache or run."""


class DataError(MlcError):
    """A fault in an input file, located by file and (when known) 1-based line number."""

    def __init__(self, file: str, line: int | None, fault: str) -> None:
        self.file, self.line, self.fault = str(file), line, fault
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__(f"{where}: {fault}")


class ImageError(MlcError):
    """An image file that is missing or cannot be decoded."""

    def __init__(self, path: str, fault: str) -> None:
        self.path, self.fault = str(path), fault
        super().__init__(f"{path}: {fault}")


class WeightsError(MlcError):
    """Pretrained weights that cannot be found or loaded."""


class MismatchError(MlcError):
    """A cache, run folder or checkpoint that does not belong with what it is used with."""


class OutputError(MlcError):
    """A file or folder that cannot be written: disk full, read-only, permission denied."""

    def __init__(self, path: str, err: OSError | str) -> None:
        self.path = str(path)
        self.why = err if isinstance(err, str) else _reason(err.strerror or str(err))
        super().__init__(f"cannot write {path}: {self.why}")


def _reason(text: str) -> str:
    """One line out of an OSError with no strerror: HDF5's "... errno = 28, error message = '...' ..." spans
    lines and buries the reason; its error message is the reason."""
    import re

    m = re.search(r"error message = '([^']+)'", text)
    return m.group(1) if m else " ".join(text.split())[:300]


class BusyError(MlcError):
    """Another mlc process is writing the same cache or run folder."""
