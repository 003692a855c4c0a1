"""Stage configs: frozen, keyword-only dataclasses composed of option groups; fields carry their CLI help.

Each option is declared once, with ``opt(default, help)``. An option group shared by several stages (the
data layout, the encoders, the loader, training) is a ``Config`` of its own that validates itself; a stage
config holds its own options and its groups as fields::

    data: DataOptions = group(DataOptions)
    train: TrainOptions = group(TrainOptions, lr=1e-3, epochs=1)   # this stage's own defaults

``cli.py`` shows every option flat (``--lr``, not ``--train-lr``), under its group's help panel, and builds
the nested config with ``Cls.build(**flat)``, which Python callers use too. Configs never change once made:
values are coerced before construction (``Config.coerce``: str -> Path, a list -> tuple, and a class's own
normalisation), on every construction, direct, ``build`` or ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from .errors import MlcError

C = TypeVar("C", bound="Config")


def opt(default: Any, help: str | Callable[[], str], *, argument: bool = False, flag: str | None = None,
        required: bool = False, aliases: tuple[str, ...] = ()) -> Any:
    """A config field: its default and its help (or a function making it when shown: a registry's choices, which
    grow as entries register). ``argument``: a positional CLI argument; ``flag``: the
    option's name when it is not ``--field-name``; ``required``: the CLI insists (the Python default
    stays, and ``__post_init__`` says what is missing); ``aliases``: old, deprecated spellings the CLI still
    takes (hidden from --help, a one-line notice on stderr)."""
    meta = {"help": help, "argument": argument, "flag": flag, "required": required, "aliases": aliases}
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple for sequence defaults (configs are frozen)")
    return dataclasses.field(default=default, metadata=meta)


def group(options: type[Config], *, omit: tuple[str, ...] = (), **defaults: Any) -> Any:
    """A field holding the option group ``options``; ``defaults``: this stage's own defaults for some of the
    group's options (their help stays the group's); ``omit``: the group's options this stage has no use for (not
    among its options, nor in its config.json), so it offers none that does nothing."""
    unknown = (set(defaults) | set(omit)) - {f.name for f in dataclasses.fields(options)}
    if unknown:
        raise TypeError(f"{options.__name__} has no option {sorted(unknown)}")
    return dataclasses.field(default_factory=functools.partial(options, **defaults),
                             metadata={"group": options, "defaults": defaults, "omit": tuple(omit)})


def borrow(owner: type, name: str, default: Any) -> Any:
    """The option ``name`` of the config ``owner`` (its help and flag) with another default: for a stage that
    offers one option of another stage's."""
    return dataclasses.field(default=default, metadata=owner.__dataclass_fields__[name].metadata)


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise MlcError with the message of the first failed check."""
    for ok, msg in checks:
        if not ok:
            raise MlcError(msg)


# Ranges of numeric options by name, whichever config holds them (a rule, so later options are covered by
# adding a line): beyond these a value is no typo-proof choice but a crash or a machine out of memory later.
RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, 2**32 - 1),  # numpy's generators take no negative seed
    "hidden": (1, 65536), "batch_size": (1, 65536), "encode_batch": (1, 65536), "workers": (0, 256),
    "chunk_rows": (1, 1 << 20),
    "views": (1, 64), "folds": (0, 1000), "epochs": (1, 1_000_000), "patience": (0, 1_000_000),
    "lr": (0, 100), "encoder_lr": (0, 100), "weight_decay": (0, 100), "clip": (0, 1e6),
}


def option_flag(name: str, field: dataclasses.Field) -> str:
    """An option's name on the command line: its ``flag``, else ``--field-name``."""
    return field.metadata.get("flag") or "--" + name.replace("_", "-")


def check_numbers(config: Any) -> None:
    """Every number among ``config``'s own fields finite (inf and NaN are refused: --lr inf trained into NaN
    weights and a traceback) and within its ``RANGES``; MlcError naming the option otherwise."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        flag = option_flag(f.name, f)
        if isinstance(value, float) and not math.isfinite(value):
            raise MlcError(f"{flag} {value}: not a finite number")
        lo, hi = RANGES.get(f.name, (-math.inf, math.inf))
        if not lo <= value <= hi:
            raise MlcError(f"{flag} {value}: out of range (it must be from {_num(lo)} to {_num(hi)})")


def _num(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:g}"


class Option(NamedTuple):
    """One option of a config, by its flat name: where it lives and what it defaults to in this config."""

    field: dataclasses.Field
    hint: Any  # its type
    group: str | None  # the field of the group holding it; None for the config's own options
    panel: str | None  # its group's help panel
    default: Any  # this config's default (a group's stage default where the config sets one)


class _Coerced(type):
    """Configs' metaclass: every construction passes its keywords through ``cls.coerce`` first, so a frozen config
    is never patched after the fact."""

    def __call__(cls, *args: Any, **values: Any) -> Any:
        return super().__call__(*args, **cls.coerce(values))  # type: ignore[attr-defined]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(metaclass=_Coerced):
    """Base of every config and option group: ``__post_init__`` chains, so each group validates itself."""

    def __post_init__(self) -> None:
        check_numbers(self)

    @classmethod
    def coerce(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The constructor's keywords in their fields' types: str -> Path, a list or a lone value -> tuple.
        Subclasses normalise further (``super().coerce`` first); unknown keywords are left to the constructor."""
        hints = _hints(cls)
        return {k: _as_type(hints[k], v) if k in hints else v for k, v in values.items()}

    @classmethod
    def options(cls) -> dict[str, Option]:
        """Every option this config takes, by flat name: its own fields, then each group's, in field order."""
        return _options(cls)

    @classmethod
    def build(cls: type[C], **flat: Any) -> C:
        """This config from flat option names (the CLI's, underscored), each sent to its group; a group may come
        whole (``encoders=cfg.encoders``) and flat names then change some of its values. MlcError for a name the
        config does not take."""
        options, groups = cls.options(), _groups(cls)
        unknown = sorted(k for k in flat if k not in options and k not in groups)
        if unknown:
            raise MlcError(f"{cls.__name__} takes no option {', '.join(unknown)} (it takes: "
                           f"{', '.join(sorted(options))})")
        own: dict[str, Any] = {k: v for k, v in flat.items() if k in options and options[k].group is None}
        for name, (kind, defaults) in groups.items():
            given = {k: v for k, v in flat.items() if k in options and options[k].group == name}
            whole = flat.get(name)
            if whole is not None and not isinstance(whole, kind):
                raise MlcError(f"{cls.__name__}: {name} must be a {kind.__name__}, not {type(whole).__name__}")
            if whole is not None:
                own[name] = dataclasses.replace(whole, **given) if given else whole
            elif given:
                own[name] = kind(**{**defaults, **given})
        return cls(**own)

    def replace(self: C, **flat: Any) -> C:
        """A copy with some options changed, by flat name (``cfg.replace(lr=1e-2)``)."""
        return type(self).build(**{**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **flat})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, nested: each group a dict under its field name (less the options it omits). Paths as
        strings, tuples as lists."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for f in dataclasses.fields(self):
            for name in f.metadata.get("omit", ()):
                del out[f.name][name]
        return out

    def flat_dict(self) -> dict[str, Any]:
        """JSON-ready, flat: every option by its flat name (what the CLI takes, and what mlc 0.2 wrote)."""
        return flatten(self.to_dict())


def flatten(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict as read back (config.json, a checkpoint's), flat: groups' options lifted to the top level.
    A flat dict (written before groups were fields) comes back as it is."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        out.update(flatten(v) if isinstance(v, Mapping) else {k: v})
    return out


def _plain(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _as_type(hint: Any, value: Any) -> Any:
    """``value`` as the field type ``hint`` wants it, where that is a plain conversion (else unchanged)."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        items = (value,) if isinstance(value, str | os.PathLike) else value
        return tuple(_as_type(args[0], x) for x in items)
    wants_path = hint is Path or (origin in (typing.Union, types.UnionType) and Path in args)
    if wants_path and isinstance(value, str | os.PathLike) and not isinstance(value, Path):
        return Path(value)
    return value


def _groups(cls: type) -> dict[str, tuple[type[Config], dict[str, Any]]]:
    """The config's group fields: name -> (group class, this config's defaults for it)."""
    return {f.name: (f.metadata["group"], f.metadata["defaults"]) for f in dataclasses.fields(cls)
            if "group" in f.metadata}


@functools.cache
def _options(cls: type) -> dict[str, Option]:
    out: dict[str, Option] = {}

    def add(name: str, option: Option) -> None:
        if name in out:
            raise TypeError(f"{cls.__name__}: two options named {name}")
        out[name] = option

    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if "group" not in f.metadata:
            add(f.name, Option(f, hints[f.name], None, None, f.default))
    groups = _groups(cls)
    for name, (kind, defaults) in groups.items():
        omit = cls.__dataclass_fields__[name].metadata.get("omit", ())
        for f in (f for f in dataclasses.fields(kind) if f.name not in omit):
            add(f.name, Option(f, _hints(kind)[f.name], name, getattr(kind, "PANEL", None),
                               defaults.get(f.name, f.default)))
    clash = set(groups) & set(out)
    if clash:
        raise TypeError(f"{cls.__name__}: a group and an option share the name {sorted(clash)}")
    return out
