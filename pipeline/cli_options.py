"""How a stage's config becomes a Typer command: one option per config field (help and default declared once,
in the dataclass: ``config.opt``), old spellings rewritten with a notice (``respell``), ``--config`` replay, and
MlcError turned into one ``error:`` line and exit 2. ``cli.py`` lists the commands and loads them with this."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, NoReturn

import click
import typer
import typer.core

try:  # typer 0.2x runs on a click of its own (typer._click): only its UsageError ends in one usage box
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - an older typer, on click itself
    from click import UsageError

from .config import Config, Option, option_flag
from .errors import MlcError


def fail(err: MlcError) -> NoReturn:
    """Report a user-facing error on one line and exit 2."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _parameter(name: str, option: Option, replayable: bool = False) -> tuple[inspect.Parameter, Any]:
    """The Typer parameter of one option, and the annotation Typer should see (``replayable``: a command with
    --config, whose required arguments may come from the recorded config instead)."""
    meta, hint, default = option.field.metadata, option.hint, option.default
    text = meta["help"]() if callable(meta["help"]) else meta["help"]  # a registry's help lists what is registered
    if typing.get_origin(hint) is tuple:  # Typer repeats list options; configs keep tuples
        hint = list[typing.get_args(hint)[0]]
        default = list(default)
    if meta.get("argument"):
        required = meta.get("required") and not replayable  # the config's own checks still require it
        info = typer.Argument(... if required else default, help=text, show_default=False)
    else:
        flag = option_flag(name, option.field)
        decls = [f"{flag}/--no-{flag[2:]}"] if hint is bool and default else [flag]
        info = typer.Option(... if meta.get("required") else default, *decls, help=text,
                            rich_help_panel=option.panel)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hint), hint


def renamed_options(options: dict[str, Option]) -> dict[str, str]:
    """Old spelling -> new one, for every option's ``aliases``: a flag, or the name (DATA_DIR) of the last positional
    argument."""
    last = [name for name, o in options.items() if o.field.metadata.get("argument")][-1:]
    out = {}
    for name, o in options.items():
        meta = o.field.metadata
        if meta.get("aliases") and meta.get("argument") and [name] != last:
            raise TypeError(f"{name}: only the last argument can have an option alias")
        for old in meta.get("aliases", ()):
            out[old] = name.upper() if meta.get("argument") else option_flag(name, o.field)
    return out


def respell(args: list[str], renamed: dict[str, str], takes_value: set[str], command: str) -> list[str]:
    """``args`` with each old spelling of ``renamed`` (--old X, --old=X) replaced by the new one (for an argument,
    the value moved to the end, where it is the last positional), and a one-line notice on stderr for each.
    ``takes_value``: the options whose next word is their value, never an option."""
    _refuse_both_spellings(args, renamed, takes_value)
    out: list[str] = []
    moved: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        old, eq, value = word.partition("=")
        if word == "--":
            out += args[i:]
            break
        if old in renamed:
            new = renamed[old]
            flag = new.startswith("--")
            typer.echo(f"warning: mlc {command} {old} is deprecated; "
                       + (f"use {new}" if flag else f"give it as the argument {new}"), err=True)
            if flag:
                out.append(new + eq + value)
            elif eq:
                moved.append(value)
            elif i + 1 < len(args):
                i += 1
                moved.append(args[i])
            else:
                raise UsageError(f"Option '{old}' requires an argument.")
        else:
            out.append(word)
            if word in takes_value and i + 1 < len(args):
                i += 1
                out.append(args[i])
        i += 1
    return out + moved


def _given(args: list[str], flags: set[str], takes_value: set[str]) -> dict[str, str]:
    """The value each of ``flags`` has in ``args`` (--flag X, --flag=X; "" for a switch)."""
    found: dict[str, str] = {}
    for i, word in enumerate(args):
        if word == "--":
            break
        name, eq, value = word.partition("=")
        if name in flags:
            found[name] = value if eq else (args[i + 1] if name in takes_value and i + 1 < len(args) else "")
    return found


def _refuse_both_spellings(args: list[str], renamed: dict[str, str], takes_value: set[str]) -> None:
    """UsageError when an old spelling and its new one are both given with different values (the last one
    silently won before); the same value twice is harmless."""
    new = _given(args, {n for n in renamed.values() if n.startswith("--")}, takes_value | set(renamed))
    old = _given(args, set(renamed), takes_value | set(renamed))
    for o, value in old.items():
        n = renamed[o]
        if n in new and new[n] != value:
            raise UsageError(f"{o} is the old spelling of {n}, and they disagree ({value!r} and "
                                   f"{new[n]!r}): give {n} once")


class AliasedCommand(typer.core.TyperCommand):
    """A command that still takes its options' old spellings (``opt(..., aliases=...)``): hidden from --help,
    rewritten to the new ones before parsing."""

    renamed: typing.ClassVar[dict[str, str]] = {}

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if self.renamed:
            # by duck type: typer's options are no click.Option under the click typer 0.2x vendors
            takes_value = {o for p in self.params if getattr(p, "param_type_name", "") == "option"
                           and not getattr(p, "is_flag", False) for o in p.opts}
            args = respell(args, self.renamed, takes_value, self.name or "")
        return super().parse_args(ctx, args)


def interrupted(name: str) -> NoReturn:
    """Ctrl-C: one line and exit 130, no traceback (outputs are written atomically: none is half-done)."""
    typer.echo(f"interrupted: mlc {name} stopped; its outputs are as they were before (an extract resumes "
               "from its finished chunks when run again)", err=True)
    raise typer.Exit(130) from None


def config_command(name: str, fn: Callable[[Any], int | None], config_cls: type[Config]) -> Callable[..., None]:
    """A function Typer can register: keyword parameters from ``config_cls``'s options (its groups' flattened),
    calling ``fn(config_cls.build(**options))`` and turning MlcError into one line and exit code 2."""
    options = config_cls.options()
    # arguments, then the stage's own options, then the option groups'
    order = sorted(options, key=lambda n: (not options[n].field.metadata.get("argument"), options[n].group is not None))
    replayable = name in REPLAYABLE
    built = [_parameter(n, options[n], replayable) for n in order]
    if replayable:
        context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        built += [_REPLAY, (context, typer.Context)]

    def command(**values: Any) -> None:
        ctx = values.pop("ctx", None)
        try:
            if values.pop("config", None) is not None:
                from .replay import replayed

                values = replayed(name, config_cls, values, ctx)
            code = fn(config_cls.build(**values))
        except MlcError as err:
            fail(err)
        except KeyboardInterrupt:
            interrupted(name)
        if code:
            raise typer.Exit(code)

    command.__signature__ = inspect.Signature([p for p, _ in built])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: hint for p, hint in built}
    command.__name__ = name.replace("-", "_")
    command.__doc__ = fn.__doc__
    return command


REPLAYABLE = ("run", "fit-head")  # the commands with --config
_REPLAY = (inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=typer.Option(
    None, "--config", help="Replay a recorded recipe: a run folder, its config.json (fit-head) or run.json (mlc run). "
    "Every option given here overrides the recorded one.", rich_help_panel="Replay")), typing.Optional[str])  # noqa: UP045
