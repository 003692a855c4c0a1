"""The ``mlc`` command line: one typed function per command; its options come from the stage's config.

Each command is a function ``def name(cfg: SomeConfig) -> int | None`` registered in ``COMMANDS``
with the config class it takes. The command's options are generated from the config's fields (their
defaults and help are declared once, in the dataclass, see ``config.opt``), and its help is the
function's docstring. Commands load lazily: ``mlc --help`` imports no stage (and no torch); the stage
module is imported only when its command runs.

Exit codes: 0 success, 1 the command ran but found problems (``validate``), 2 bad input (MlcError).
To add a command: write its config (a frozen ``Config`` dataclass in the stage module) and a function
here, and add both to ``COMMANDS``. How a config becomes a command's options: ``cli_options.py``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import click
import typer
import typer.core

from . import __version__
from .cli_options import AliasedCommand, config_command, fail, interrupted, renamed_options
from .errors import MlcError
from .log import configure, rank

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


def _load(name: str) -> click.Command:
    fn, where = COMMANDS[name]
    module, _, cls = where.partition(":")
    config_cls = getattr(importlib.import_module(module), cls)
    sub = typer.Typer(add_completion=False, rich_markup_mode="markdown")
    kind = type("_Command", (AliasedCommand,), {"renamed": renamed_options(config_cls.options())})
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
                interrupted(cmd_name)
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
        fail(MlcError("--quiet and --verbose: choose one"))
    configure(-1 if quiet else 1 if verbose else 0)  # the one place that decides what reaches the terminal


if __name__ == "__main__":  # pragma: no cover
    app()

