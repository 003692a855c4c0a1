"""The ``mlc`` command line: a thin Typer layer, one function per command calling its stage module.

Exit codes: 0 success, 1 the command ran but found problems (``validate``), 2 bad input (MlcError).
To add a command: parse options, build the stage's config, call it inside ``try/except MlcError``
and pass the error to ``_fail``; import heavy modules (torch) inside the command, not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from . import __version__
from .errors import MlcError

app = typer.Typer(
    help="Multi-label image+caption classification for the COMP5329 competition: "
    "validate the data, extract features, fit heads, write submissions.",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(err: MlcError) -> NoReturn:
    """Report a user-facing error on one line and exit 2."""
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the mlc version and exit."
    ),
) -> None:
    """Multi-label image+caption classification for the COMP5329 competition."""


@app.command()
def validate(
    data_dir: Path = typer.Argument(
        ..., help="Competition data folder: train.csv, test.csv and the images (in data/, images/ or beside)."
    ),
    csv_only: bool = typer.Option(
        False, "--csv-only", help="Check only the CSV files; skip opening every image (much faster)."
    ),
) -> None:
    """Read a data folder as training will and report counts, label frequencies and every problem.

    Exits 0 when the folder is clean, 1 when problems were found.
    """
    from .validate import format_report, validate_data_dir

    try:
        report = validate_data_dir(data_dir, csv_only=csv_only)
    except MlcError as err:
        _fail(err)
    typer.echo(format_report(report))
    if not report.ok:
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
