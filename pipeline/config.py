"""Stage configs: frozen, keyword-only dataclasses whose fields carry their CLI help.

Each option is declared once, with ``opt(default, help)``; ``cli.py`` turns a config's fields into
the command's options, so the default and the help live in exactly one place. Option groups shared by
several stages (encoders, loaders, training) are base classes; a stage that wants another default
for an inherited option says so with ``redefault`` (the help stays the base's).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .errors import MlcError


def opt(default: Any, help: str, *, argument: bool = False, flag: str | None = None, required: bool = False) -> Any:
    """A config field: its default and its help. ``argument``: a positional CLI argument; ``flag``: the
    option's name when it is not ``--field-name``; ``required``: the CLI insists (the Python default
    stays, and ``__post_init__`` says what is missing)."""
    meta = {"help": help, "argument": argument, "flag": flag, "required": required}
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple for sequence defaults (configs are frozen)")
    return dataclasses.field(default=default, metadata=meta)


def redefault(base: type, name: str, default: Any) -> Any:
    """The field ``name`` of ``base`` with another default; help and flags unchanged."""
    meta = base.__dataclass_fields__[name].metadata  # type: ignore[attr-defined]
    return dataclasses.field(default=default, metadata=meta)


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise MlcError with the message of the first failed check."""
    for ok, msg in checks:
        if not ok:
            raise MlcError(msg)


def as_paths(cfg: Any, *names: str) -> None:
    """Coerce the named fields of a frozen config to Path (None stays None)."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, Path):
            object.__setattr__(cfg, name, Path(v))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base of every config and option group: ``__post_init__`` chains, so each group validates itself."""

    def __post_init__(self) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def group(self, options: type[Config]) -> dict[str, Any]:
        """The values of the option group ``options`` (a Config this stage's config inherits), by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(options)}


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config: Paths as strings, tuples as lists."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
