"""Registries that describe themselves (as timm's registered models carry their pretrained configs).

A :class:`Registry` maps a name to what builds it (a head class, a loss factory) and keeps, for each, what
the rest of mlc needs to know without an edit of its own: a one-line summary (the docstring's first line), the
entry's options with their defaults and meaning (``options``: name -> (default, help)), the training recipe
``mlc run`` gives it (``recipe``: flat option -> value), whether ``fit-head --grid`` tries it (``grid``) and
whether only mlc builds it (``internal``: the blend of ``mlc run --quality best``, never a user's choice).
The CLI's help (``help``), ``--grid`` and docs/heads.md (``table``) are generated from it: a new head is one
module that registers itself (a package module imported by ``pipeline.heads``, or one ``$MLC_PLUGINS`` names).
No torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import MlcError

T = TypeVar("T")

_PLUGINS_DONE: set[str] = set()


def load_plugins() -> None:
    """Import each module ``$MLC_PLUGINS`` names that is not imported yet (a ``.py`` path or a module name)."""
    for entry in filter(None, os.environ.get("MLC_PLUGINS", "").split(os.pathsep)):
        if entry in _PLUGINS_DONE:
            continue
        _PLUGINS_DONE.add(entry)  # first: a plugin's own lookups must not import it again
        try:
            if entry.endswith(".py"):
                name = f"mlc_plugin_{os.path.basename(entry)[:-3]}"
                spec = importlib.util.spec_from_file_location(name, entry)
                if spec is None or spec.loader is None:
                    raise ImportError(f"{entry} is no Python file")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(entry)
        except (ImportError, OSError) as e:
            raise MlcError(f"MLC_PLUGINS: cannot import {entry} ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class About:
    """What one registry entry says of itself."""

    summary: str
    options: dict[str, tuple[Any, str]] = field(default_factory=dict)  # option -> (default, help)
    recipe: dict[str, Any] = field(default_factory=dict)  # flat training options `mlc run` sets for it
    grid: bool = False  # tried by `fit-head --grid`
    internal: bool = False  # built by mlc itself: not offered as a choice (help, --grid, the option's check)


def _summary(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


class Registry(dict[str, T], Generic[T]):
    """name -> entry, in registration order; ``about[name]`` is what the entry says of itself."""

    def __init__(self, what: str, load: Callable[[], None] | None = None) -> None:
        """``load``: run before every lookup, so entries that modules outside the package register (the
        ``$MLC_PLUGINS`` hook) are there when a name is looked up or listed."""
        super().__init__()
        self.what, self._load = what, load
        self.about: dict[str, About] = {}

    def _ready(self) -> None:
        if self._load is not None:
            self._load()

    def __contains__(self, name: object) -> bool:
        """A registered name needs no loading (so the predict path of a package rule imports no plugin, and no
        torch a plugin may import); another one is looked for again once ``load`` ran."""
        if super().__contains__(name):
            return True
        self._ready()
        return super().__contains__(name)

    def register(self, name: str | None = None, *, summary: str | None = None,
                 options: dict[str, tuple[Any, str]] | None = None, recipe: dict[str, Any] | None = None,
                 grid: bool | None = None, internal: bool | None = None) -> Callable[[T], T]:
        """A decorator registering its target under ``name`` (default: the target's ``name`` attribute). The
        description comes from the keywords, else from the target's ``summary``/``options``/``recipe``/``grid``/
        ``internal`` attributes and its docstring. A name taken by another entry is refused (ValueError)."""

        def add(entry: T) -> T:
            key = name or getattr(entry, "name", None)
            if not key:
                raise ValueError(f"a {self.what} needs a name")
            if dict.__contains__(self, key) and self[key] is not entry:  # no plugin import while registering
                raise ValueError(f"{self.what} {key!r} is registered already ({self[key]!r})")
            self[key] = entry
            self.about[key] = About(
                summary if summary is not None else getattr(entry, "summary", None) or _summary(entry),
                dict(options if options is not None else getattr(entry, "options", {}) or {}),
                dict(recipe if recipe is not None else getattr(entry, "recipe", {}) or {}),
                bool(grid if grid is not None else getattr(entry, "grid", False)),
                bool(internal if internal is not None else getattr(entry, "internal", False)))
            return entry

        return add

    def get_entry(self, name: str) -> T:
        """The entry, or MlcError naming the choices."""
        if name not in self:
            raise MlcError(f"unknown {self.what} {name!r}; choose from {', '.join(sorted(self))}")
        return self[name]

    def choices(self) -> tuple[str, ...]:
        """The names a user may choose (every entry but the internal ones)."""
        self._ready()
        return tuple(n for n in self if not (n in self.about and self.about[n].internal))

    def help(self, lead: str) -> Callable[[], str]:
        """The option's help, made when it is shown (so entries registered later appear): ``lead`` then each
        choosable entry's name, summary and recipe."""

        def text() -> str:
            self._ready()
            parts = []
            for name, about in self.about.items():
                if about.internal:
                    continue
                recipe = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in about.recipe.items())
                parts.append(f"{name} ({about.summary}" + (f"; `mlc run` trains it with {recipe}" if recipe else "")
                             + ")")
            return f"{lead} " + "; ".join(parts) + "."

        return text

    def in_grid(self) -> tuple[str, ...]:
        """The entries ``fit-head --grid`` tries."""
        self._ready()
        return tuple(n for n, a in self.about.items() if a.grid and not a.internal)

    def table(self) -> str:
        """A markdown table of the choosable entries: name, summary, options (default: meaning), recipe, in the grid;
        then a line naming the internal ones."""
        self._ready()
        rows = [f"| {self.what} | what | options | `mlc run` trains it with | in `--grid` |", "|---|---|---|---|---|"]
        inside = [f"`{n}` ({a.summary})" for n, a in self.about.items() if a.internal]
        for name, a in self.about.items():
            if a.internal:
                continue
            opts = "; ".join(f"`{k}` = {d!r}: {h.rstrip('.')}" for k, (d, h) in a.options.items())
            recipe = " ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in a.recipe.items()) or "the defaults"
            rows.append(f"| `{name}` | {a.summary} | {opts} | {recipe} | {'yes' if a.grid else 'no'} |")
        if inside:
            rows += ["", f"Built by mlc itself, never a choice of `--{self.what}`: " + "; ".join(inside) + "."]
        return "\n".join(rows) + "\n"


def rules_table() -> str:
    """A markdown table of the decision rules (decision.RULES): name, summary, what fitting tunes, the one-SE
    simplicity rank, whether an ONNX export's client.py carries it."""
    from .decision import RULES, simplest_first

    rows = ["| rule | what | tunes | simplicity rank (lower wins ties) | in an ONNX export's client.py |",
            "|---|---|---|---|---|"]
    for name in simplest_first():
        r = RULES[name]
        rows.append(f"| `{name}` | {r.summary} | {', '.join(r.tuned) or 'nothing'} | {r.rank} | "
                    f"{'yes' if r.client is not None else 'no: export it with --format safetensors'} |")
    return "\n".join(rows) + "\n"


def document() -> str:
    """docs/heads.md: the head, loss and decision-rule registries as tables (``python -m pipeline.registries >
    docs/heads.md``)."""
    from .heads import HEADS
    from .losses import LOSSES

    return ("# Heads, losses and decision rules\n\n(Back to the [README](../README.md). Generated from the "
            "registries by `python -m pipeline.registries > docs/heads.md`; `tests/test_registries.py` checks it is "
            "current.)\n\n"
            "A head is a class in a module that registers it (`@HEADS.register()`, pipeline/heads.py), a loss a "
            "factory (`@LOSSES.register(name)`, pipeline/losses.py). What each says of itself becomes `--head` and "
            "`--loss`'s help, `fit-head --grid` and these tables. A head outside the package: a module "
            "`$MLC_PLUGINS` names.\n\n## Heads\n\n" + HEADS.table() + "\n## Losses\n\n" + LOSSES.table()
            + "\n## Decision rules\n\nA rule registers itself (`register(Rule(...))`, pipeline/decision.py) from a "
            "`pipeline/rule_<family>.py` module; `--decision auto` scores every rule cross-fitted and keeps the "
            "simplest within one standard error of the best ([DESIGN.md](DESIGN.md)).\n\n" + rules_table())


if __name__ == "__main__":
    sys.stdout.write(document())
