"""Replay a recorded recipe: ``mlc run --config RUN`` and ``mlc fit-head --config RUN/config.json``.

A run folder records what made it: ``config.json`` (the stage's config: fit-head's or finetune's) and, for a run
``mlc run`` made, ``run.json`` (the RunConfig: data folder, encoders, folds, head...). ``--config`` reads one of
them as the command's defaults; every option given on the command line overrides it. Nothing here runs a stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config, flatten
from .errors import MlcError
from .folders import read_json
from .log import get

log = get(__name__)  # mlc.<module>: under the root the CLI configures

RUN_RECIPE = "run.json"  # written by `mlc run` into its run folder, after the run (runs._LATER lists it)
_NOT_REPLAYED = ("kind", "force")  # what a recorded config holds that is no recipe: the run's kind, --force


def recorded(path: Path, command: str, config_cls: type[Config]) -> dict[str, Any]:
    """The options recorded in ``path`` (a run folder, its config.json or run.json, or any config JSON) that
    ``config_cls`` takes, flat. ``mlc run`` reads run.json (a run it made), another command config.json."""
    path = Path(path)
    if path.is_dir():
        want = RUN_RECIPE if command == "run" else "config.json"
        if not (path / want).is_file():
            raise MlcError(f"{path}: no {want} in this folder" + (
                " (a run that `mlc run` did not make: replay its config.json with `mlc fit-head --config`, or "
                "give `mlc run` the data folder and options)" if command == "run" else ""))
        path = path / want
    elif command == "run" and path.name == "config.json" and (path.parent / RUN_RECIPE).is_file():
        path = path.parent / RUN_RECIPE  # mlc run's own recipe, beside the fit's config.json
    d = read_json(path, "the recorded config")
    if not isinstance(d, dict):
        raise MlcError(f"{path}: not a config (a JSON object), found {type(d).__name__}")
    if command == "run" and d.get("kind") in ("head", "finetune"):
        raise MlcError(f"{path}: the config of `mlc {'fit-head' if d['kind'] == 'head' else 'finetune'}`, not of "
                       f"`mlc run`: replay it with `mlc {'fit-head' if d['kind'] == 'head' else 'finetune'} "
                       f"--config {path}`")
    flat = {k: v for k, v in flatten(d).items() if k not in _NOT_REPLAYED}
    takes = config_cls.options()
    unknown = sorted(set(flat) - set(takes))
    if unknown:
        raise MlcError(f"{path}: options `mlc {command}` does not take: {', '.join(unknown)} (a config of another "
                       "command?)")
    log.info("replaying %s", path)
    return flat


def merge(recorded_options: dict[str, Any], given: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The recorded options, overridden by those given explicitly (on the command line); the command's defaults
    fill only what neither holds."""
    return {**given, **recorded_options, **{k: v for k, v in given.items() if k in explicit}}


def replayed(command: str, config_cls: type[Config], values: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """The CLI's ``values`` with the recorded config of ``--config`` under them: only the options given on the
    command line (not defaulted, by the click context ``ctx``) override it."""
    # by name: Typer may run its own copy of click, whose ParameterSource is another enum. An argument taking any
    # number of values reads as given even when none were: empty is not given.
    explicit = {n for n, v in values.items() if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") not in
                ("DEFAULT", "DEFAULT_MAP") and v not in ([], ())}
    return merge(recorded(ctx.params["config"], command, config_cls), values, explicit)
