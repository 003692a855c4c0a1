"""mlc's one logger and the one place that decides what reaches the terminal.

Library code logs through ``logging.getLogger("mlc.<module>")`` (``get``) and never prints. The package
is silent unless asked: ``pipeline/__init__`` gives the ``mlc`` logger a ``NullHandler``, so a Python
caller sees nothing until it configures logging (``logging.basicConfig(level=logging.INFO)``) or calls
``configure``. The CLI calls ``configure(verbosity)`` once per command: ``-q`` warnings only, ``-v`` debug
too; and only rank 0 of a torchrun job speaks (the rule lives here, in ``_RankZero``). Progress bars
follow the same switch (``progress_enabled``). No torch at import.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "mlc"
# -q, neither, -v
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


def get(name: str) -> logging.Logger:
    """The logger of a package module (``get(__name__)``): ``mlc.<module>``, under the one ``mlc`` root."""
    short = name.removeprefix("pipeline").lstrip(".")
    return logging.getLogger(f"{ROOT}.{short}" if short else ROOT)


def rank() -> int:
    """This process's rank in a torchrun job (0 alone). Reads torch.distributed only when torch is loaded, so
    the predict path stays torch-free."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0") or 0)


class _RankZero(logging.Filter):
    """Under torchrun only rank 0 speaks; the other ranks keep their errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or rank() == 0


class _Stderr(logging.StreamHandler):
    """The CLI's handler: the stderr of the moment ``configure`` ran (Click's test runner swaps it per call; an
    exporter that redirects stderr while it works does not take mlc's progress with it)."""


def configure(verbosity: int = 0) -> None:
    """Send mlc's records to stderr as bare lines (the messages carry their own ``warning:`` or ``[mlc x]``):
    ``verbosity`` -1 warnings only (``-q``), 0 progress too, 1 debug too (``-v``). Called again, it replaces
    its own handler rather than adding a second."""
    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(handler)
    handler = _Stderr(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_RankZero())
    root.addHandler(handler)
    root.setLevel(LEVELS[max(-1, min(1, verbosity))])


def progress_enabled() -> bool:
    """Whether progress bars are drawn: progress messages are on (not ``-q``, or asked for by a Python caller)
    and this is rank 0."""
    return logging.getLogger(ROOT).isEnabledFor(logging.INFO) and rank() == 0
