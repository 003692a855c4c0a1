"""The ``mlc`` command line: one typed function per command; its options come from the stage's config.

Each command is a function ``def name(cfg: SomeConfig) -> int | None`` registered in ``COMMANDS``
with the config class it takes. The command's options are generated from the config's fields (their
defaults and help are declared once, in the dataclass, see ``config.opt``), and its help is the
function's docstring. Commands load lazily: ``mlc --help`` imports no stage (and no torch); the stage
module is imported only when its command runs.

Exit codes: 0 success, 1 the command ran but found problems (``validate``), 2 bad input (MlcError).
To add a command: write its config (a frozen ``Config`` dataclass in the stage module) and a function
here, and add both to ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
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

from . import __version__
from .config import Config, Option
from .errors import MlcError
from .log import configure, rank


def _fail(err: MlcError) -> NoReturn:
    """Report a user-facing error on one line and exit 2."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


# ----------------------------------------------------------------------------------------- commands


def validate(cfg: Any) -> int:
    """Read a data folder as training will and report counts, label frequencies and every problem.

    Exits 0 when the folder is clean, 1 when problems were found.
    """
    from .validate import format_report, validate_data_dir

    report = validate_data_dir(cfg.data_dir, csv_only=cfg.csv_only, options=cfg.data)
    typer.echo(format_report(report))
    return 0 if report.ok else 1


def extract(cfg: Any) -> None:
    """Stage 1: encode every image and caption once and cache the embeddings in HDF5.

    Resumable: rerun the same command after an interruption and it continues; rerun it after
    it finished and it does nothing.
    """
    from .extract import extract as run

    paths = run(cfg)
    if rank() == 0:  # under torchrun every rank returns the paths; print once
        for path in paths:
            typer.echo(str(path))


def fit_head(cfg: Any) -> None:
    """Stage 2: train a fusion head over cached features and tune thresholds for samples-F1."""
    from .fit_head import fit_grid
    from .fit_head import fit_head as run

    if cfg.grid:
        board, metrics = fit_grid(cfg)
        typer.echo("leaderboard (held-out samples-F1, each config's best decision rule, cross-fitted):")
        for i, row in enumerate(board, 1):
            typer.echo(f"{i:3d}. {row['samples_f1']:.4f}  " + " ".join(f"{k}={v}" for k, v in row.items()
                                                                        if k not in ("samples_f1", "seconds")))
        typer.echo(f"the chosen config and rule, scored on rows the choice did not see: "
                   f"{metrics['grid_selected_score']:.4f}")
    else:
        metrics = run(cfg)
    typer.echo(f"validation samples-F1 {metrics['samples_f1']:.4f} (decision rule {metrics['threshold_mode']}, "
               f"scored on rows its choice did not see; {metrics['samples_f1_at_0.5']:.4f} at 0.5)  run: {cfg.out}")


def finetune(cfg: Any) -> int | None:
    """Finetune encoders and a fusion head together; the run folder works with submit, report and
    `extract --from-run`."""
    if cfg.nproc > 1 and "RANK" not in os.environ:  # relaunch this very command under torchrun
        return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={cfg.nproc}", "-m", "pipeline.cli", *_without_nproc(sys.argv[1:])])
    from .finetune import finetune as run

    metrics = run(cfg)
    if metrics:
        typer.echo(f"validation samples-F1 {metrics['samples_f1']:.4f} (decision rule {metrics['threshold_mode']})  "
                   f"run: {cfg.out}")
    return None


def crossfit(cfg: Any) -> None:
    """Stage one with a finetuned caption tower, cross-fitted: K fold models, each encoding the rows it did not
    train on (and the test split, averaged); writes a train and a test cache to fuse with frozen ones."""
    from .crossfit import crossfit as run

    for path in run(cfg):
        typer.echo(str(path))


def _without_nproc(argv: list[str]) -> list[str]:
    """argv minus ``--nproc N`` / ``--nproc=N`` (torchrun would take --nproc for its own option)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def submit(cfg: Any) -> None:
    """Write the Kaggle submission CSV (ImageID,Labels) for every test image, thresholds applied."""
    from .submit import submit as run

    path, line = run(cfg)
    typer.echo(f"wrote {path}: {line}")


def report(cfg: Any) -> None:
    """Write PNG plots and report.html into RUN/report/: per-class F1, PR curves, thresholds, curves."""
    from .report import make_report

    typer.echo(f"wrote {make_report(cfg.run)}")


def run(cfg: Any) -> None:
    """The whole job in one command: validate, extract train and test, fit-head, submit, report; each step
    reuses what is already done, so a rerun does no work."""
    from .workflow import run as go

    result = go(cfg)
    typer.echo(f"validation samples-F1 {result['samples_f1']:.4f} (cross-fitted)  run: {result['run']}")
    typer.echo(f"submission: {result['submission'] or 'none (no test.csv)'}   report: {result['report']}")


def predict(cfg: Any) -> None:
    """Labels and probabilities for new photos (files, folders, globs) and their captions, from a run folder or
    an exported model: a table for people, csv, or JSON lines for programs."""
    from .predict import run as go

    go(cfg)


def evaluate(cfg: Any) -> None:
    """Score a run or an exported model on a labelled CSV (a data folder's test or train split, or a CSV file):
    samples-F1 and each label's precision, recall and F1."""
    from .evaluate import evaluate as go
    from .evaluate import render

    typer.echo(render(go(cfg)))


def export(cfg: Any) -> None:
    """Write one self-contained folder that predicts without the training data, the caches or torch: model.onnx,
    tokenizer, export.json (preprocessing, labels, thresholds, decision rule) and a README with a client;
    --precision fp16 halves its size, int8 quantises it."""
    from .export import export as go

    path, size = go(cfg)
    typer.echo(f"wrote {path}: {size / 1e6:.1f} MB ({cfg.precision}, {cfg.format})")


def serve(cfg: Any) -> None:
    """Serve a run folder or an export on a local HTTP endpoint: JSON predict, labels, model card and health
    endpoints, and a web page at / to try photos and captions (needs the serve extra: pip install 'mlc[serve]')."""
    from .serve import bind, build, serve, url_of

    sock = bind(cfg.host, cfg.port)  # first: a port in use is said before a model loads for seconds
    typer.echo(f"loading {cfg.model}", err=True)
    app = build(cfg)
    typer.echo(f"serving {cfg.model} on {url_of(sock)} (Ctrl+C stops)", err=True)
    from .heartbeat import stop

    stop()  # loading had its heartbeat; a server waiting for requests is quiet on purpose
    serve(app, sock)


def runs(cfg: Any) -> None:
    """A leaderboard of the runs under FOLDER (default runs/): recipe, encoders, head, folds, decision rule,
    cross-fitted samples-F1 and its baselines, fit time, size and date; --out writes it as an HTML page with each
    label's F1 side by side. A damaged run is a row saying what is wrong."""
    from .leaderboard import runs as go

    _, table = go(cfg)
    typer.echo(table)
    if cfg.out is not None:
        typer.echo(f"wrote {cfg.out}")


def encoders(cfg: Any) -> None:
    """List the registered image and text encoders and presets."""
    from .encoders import PRESETS, list_encoders

    names = list_encoders()
    typer.echo("image encoders: " + ", ".join(names["image"]))
    typer.echo("text encoders:  " + ", ".join(names["text"]))
    for name, (img, txt) in PRESETS.items():
        typer.echo(f"preset {name}: {img} + {txt}")


# command name -> (its function, "module:ConfigClass")
COMMANDS: dict[str, tuple[Callable[[Any], int | None], str]] = {
    "run": (run, "pipeline.workflow:RunConfig"),
    "validate": (validate, "pipeline.validate:ValidateConfig"),
    "extract": (extract, "pipeline.extract:ExtractConfig"),
    "fit-head": (fit_head, "pipeline.fit_head:FitHeadConfig"),
    "finetune": (finetune, "pipeline.finetune:FinetuneConfig"),
    "crossfit": (crossfit, "pipeline.crossfit:CrossfitConfig"),
    "submit": (submit, "pipeline.submit:SubmitConfig"),
    "report": (report, "pipeline.report:ReportConfig"),
    "predict": (predict, "pipeline.predict:PredictConfig"),
    "evaluate": (evaluate, "pipeline.evaluate:EvaluateConfig"),
    "export": (export, "pipeline.export:ExportConfig"),
    "runs": (runs, "pipeline.leaderboard:RunsConfig"),
    "serve": (serve, "pipeline.serve:ServeConfig"),
    "encoders": (encoders, "pipeline.config:Config"),
}


# ------------------------------------------------------------------------------ config -> options


def _flag(name: str, option: Option) -> str:
    """The option's name on the command line: its ``flag``, else ``--field-name``."""
    return option.field.metadata.get("flag") or "--" + name.replace("_", "-")


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
        flag = _flag(name, option)
        decls = [f"{flag}/--no-{flag[2:]}"] if hint is bool and default else [flag]
        info = typer.Option(... if meta.get("required") else default, *decls, help=text,
                            rich_help_panel=option.panel)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hint), hint


def _renamed(options: dict[str, Option]) -> dict[str, str]:
    """Old spelling -> new one, for every option's ``aliases``: a flag, or the name (DATA_DIR) of the last positional
    argument."""
    last = [name for name, o in options.items() if o.field.metadata.get("argument")][-1:]
    out = {}
    for name, o in options.items():
        meta = o.field.metadata
        if meta.get("aliases") and meta.get("argument") and [name] != last:
            raise TypeError(f"{name}: only the last argument can have an option alias")
        for old in meta.get("aliases", ()):
            out[old] = name.upper() if meta.get("argument") else _flag(name, o)
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


class _Command(typer.core.TyperCommand):
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


def _interrupted(name: str) -> typing.NoReturn:
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
            _fail(err)
        except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (outputs are written atomically: none half-done)
            _interrupted(name)
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


def _load(name: str) -> click.Command:
    fn, where = COMMANDS[name]
    module, _, cls = where.partition(":")
    config_cls = getattr(importlib.import_module(module), cls)
    sub = typer.Typer(add_completion=False, rich_markup_mode="markdown")
    kind = type("_Command", (_Command,), {"renamed": _renamed(config_cls.options())})
    sub.command(name, cls=kind)(config_command(name, fn, config_cls))
    return typer.main.get_command(sub)


def _heartbeat(ctx: click.Context, name: str) -> None:
    """No silence over 5 s from here to the command's end (importing a stage alone can take 25 s on a busy machine):
    a line on stderr whenever nothing was printed for 3 s (3, not 5: the interpreter starts before it)."""
    from .heartbeat import until_closed

    quiet = bool(ctx.params.get("quiet"))  # -q silences the heartbeat with the progress lines

    def say(line: str) -> None:
        if not quiet:
            typer.echo(f"[mlc {name}] {line}", err=True)

    until_closed(ctx, say, 3.0, f"starting mlc {name}")


class _LazyGroup(typer.core.TyperGroup):
    """Lists commands from ``COMMANDS`` without importing them; builds one only when it runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return typer.core.TyperCommand(name, help=COMMANDS[name][0].__doc__)  # for listing: help only

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                            list[str]]:
        cmd_name, cmd, rest = super().resolve_command(ctx, args)
        if cmd_name in COMMANDS:
            _heartbeat(ctx, cmd_name)
            try:
                cmd = _load(cmd_name)  # importing a stage can take a minute on a busy machine: Ctrl-C may come here
            except KeyboardInterrupt:
                _interrupted(cmd_name)
        return cmd_name, cmd, rest


app = typer.Typer(
    cls=_LazyGroup,
    help="Multi-label image+caption classification: validate the data, extract features, fit heads, "
    "finetune, write submissions and reports.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlc {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the mlc version and exit."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr: no progress "
                                    "lines or bars (`mlc -q run ...`)."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug lines too on stderr (`mlc -v run ...`)."),
         ) -> None:
    """Multi-label image+caption classification."""
    if quiet and verbose:
        _fail(MlcError("--quiet and --verbose: choose one"))
    configure(-1 if quiet else 1 if verbose else 0)  # the one place that decides what reaches the terminal


if __name__ == "__main__":  # pragma: no cover
    app()

