"""No silence over 5 s: a line whenever a long job has printed nothing for a few seconds.

``Heartbeat`` taps ``sys.stdout`` and ``sys.stderr`` (the time and text of their last line) and, from a daemon
thread, says "still: <last line> (N s)" when both have been quiet for ``every`` seconds. ``stage(...)`` names the
work explicitly (a no-op when no heartbeat runs). Torch-free and cheap: the CLI starts one for every command
before importing its stage, whose import alone can take half a minute on a busy machine.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

_ACTIVE: list[Heartbeat] = []
_PREFIX = re.compile(r"^\[mlc [\w-]+\] ")  # a stage's own "[mlc run] " prefix: the heartbeat adds its own


def stage(what: str) -> None:
    """Name the work now going on, for the running heartbeat's lines (nothing when none runs)."""
    for beat in _ACTIVE:
        beat.stage(what)


def announcer(logger: logging.Logger, command: str) -> Callable[[str], None]:
    """A ``say(msg)`` for a long job's steps: ``msg`` logged as "[COMMAND] msg" (the CLI decides what is shown) and
    named as the running heartbeat's stage (what it says while the step is quiet)."""
    def say(msg: str) -> None:
        logger.info(f"[{command}] {msg}")
        stage(msg)
    return say


class _Tap:
    """A text stream that notes when it was last written to, passing everything through."""

    def __init__(self, stream: TextIO, beat: Heartbeat) -> None:
        self._stream, self._beat = stream, beat

    def write(self, text: str) -> int:
        if text:
            self._beat.heard(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Heartbeat:
    """``with Heartbeat(say): ...``: ``say(line)`` whenever stdout and stderr were quiet for ``every`` seconds."""

    def __init__(self, say: Callable[[str], None] | None = None, every: float = 4.0, what: str = "working") -> None:
        self.every, self.what = every, what
        self._say = say
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._last = self._since = time.monotonic()
        self._streams: tuple[TextIO, TextIO] | None = None
        self._emitting, self._mark = False, "still: "

    def stage(self, what: str) -> None:
        with self._lock:
            self.what, self._since = what, time.monotonic()

    def heard(self, text: str = "") -> None:
        """A write: the clock restarts, and a line of text (not the heartbeat's own) becomes what is going on."""
        self._last = time.monotonic()
        line = _PREFIX.sub("", text.replace("\r", "\n").strip().rsplit("\n", 1)[-1].strip())
        if line and not self._emitting and not line.startswith(self._mark):
            self.stage(line[:100])

    def _beat(self) -> None:
        while not self._done.wait(0.5):
            now = time.monotonic()
            if now - self._last >= self.every:
                with self._lock:
                    line = f"{self._mark}{self.what} ({now - self._since:.0f} s)"
                self._emit(line)
                self._last = now

    def _emit(self, line: str) -> None:
        self._emitting = True
        try:
            if self._say is not None:
                self._say(line)
            elif self._streams is not None:
                self._streams[1].write(line + "\n")  # the real stderr, under the tap: not heard as a write
                self._streams[1].flush()
        finally:
            self._emitting = False

    def __enter__(self) -> Heartbeat:
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tap(sys.stdout, self), _Tap(sys.stderr, self)  # type: ignore[assignment]
        _ACTIVE.append(self)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="mlc-heartbeat")
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self not in _ACTIVE:  # stopped already (stop(), then the command's end)
            return
        self._done.set()
        self._thread.join()
        _ACTIVE.remove(self)
        if self._streams is not None and isinstance(sys.stdout, _Tap) and isinstance(sys.stderr, _Tap):
            sys.stdout, sys.stderr = self._streams


def stop() -> None:
    """Stop every running heartbeat (a command that goes quiet on purpose: a server waiting for requests)."""
    for beat in list(_ACTIVE):
        beat.__exit__(None, None, None)


def until_closed(ctx: Any, say: Callable[[str], None], every: float, what: str) -> Heartbeat:
    """A heartbeat running until the click context ``ctx`` closes (the command's end, whatever way it ends)."""
    beat = Heartbeat(say, every=every, what=what)
    beat.__enter__()
    ctx.call_on_close(lambda: beat.__exit__(None, None, None))
    return beat
