"""One training loop for every stage that trains: ``fit-head`` (a head over cached features) and
``finetune`` (encoders + head over images or trunk caches).

A stage describes its run as a :class:`Task` (the model, its parameter groups, how to get an
epoch's batches, the forward and held-out prediction); :func:`train` does the rest the same way for
both: sampler epochs, optimiser and schedule, AMP and gradient scaling, accumulation and clipping,
DDP, the best-epoch rule with patience, per-epoch history, and (when given a folder) checkpoints
``best.pt``/``last.pt`` that ``resume`` continues from exactly.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .atomic import atomic_path
from .config import Config, flatten, opt, require
from .device import autocast, is_main, rank, world_size
from .errors import MismatchError, MlcError
from .evaluation import cross_fitted_f1
from .log import progress_enabled
from .losses import LOSSES, create_loss, inverse_frequency_weights, pos_weight_from_labels
from .metrics import samples_f1
from .thresholds import apply_thresholds

SAMPLERS = ("uniform", "weighted")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
BEST_BY = ("f1@0.5", "f1-tuned")


@dataclass(frozen=True, kw_only=True)
class TrainOptions(Config):
    """How a model trains; a stage sets its own defaults with ``group(TrainOptions, lr=...)``."""

    PANEL: ClassVar[str] = "Training"

    loss: str = opt("bce", LOSSES.help("Loss (docs/heads.md):"))
    pos_weight: bool = opt(False, "Weight positives per class by negatives/positives (bce only).")
    sampler: str = opt("uniform", "uniform, or weighted (inverse label frequency, with replacement, as the "
                       "seed report).")
    optimizer: str = opt("adamw", "adam or adamw.")
    lr: float = opt(3e-3, "Learning rate (of the head, when encoders train too).")
    weight_decay: float = opt(1e-4, "Weight decay.")
    batch_size: int | None = opt(256, "Rows per training step (per process). fit-head and run: from the row "
                                 "count when not given (~32 steps an epoch, 16 to 256 rows).")
    epochs: int | None = opt(40, "Most epochs. fit-head and run: from the row count when not given "
                             "(enough for ~1000 steps, 40 to 200).")
    patience: int | None = opt(4, "Epochs without a better held-out score before stopping (0 = never stop early); "
                               "fit-head: a tenth of the epochs (at least 4) when not given.")
    best_by: str = opt("f1@0.5", "What picks the best epoch: held-out samples-F1 at threshold 0.5 ('f1@0.5', "
                       "cheap) or with per-class thresholds, cross-fitted ('f1-tuned').")
    schedule: str = opt("constant", "Learning rate after warm-up: constant or cosine.")
    warmup: float = opt(0.0, "Warm-up, as a fraction of all steps.")
    clip: float = opt(0.0, "Gradient norm clipping (0 = off).")
    accumulate: int = opt(1, "Gradient accumulation steps.")
    val_fraction: float = opt(0.2, "Held-out fraction (multi-label stratified).")
    seed: int = opt(0, "Random seed (split, initialisation, sampling).")

    def __post_init__(self) -> None:
        super().__post_init__()
        require([
            (self.loss in LOSSES, f"--loss must be one of {sorted(LOSSES)}"),
            (self.sampler in SAMPLERS, f"--sampler must be one of {SAMPLERS}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}"),
            (self.best_by in BEST_BY, f"--best-by must be one of {BEST_BY}"),
            (self.lr > 0 and self.weight_decay >= 0, "--lr must be > 0 and --weight-decay >= 0"),
            (min(self.batch_size or 1, self.epochs or 1, self.accumulate) >= 1,
             "--batch-size, --epochs and --accumulate must be at least 1"),
            ((self.patience or 0) >= 0, "--patience must be 0 (never stop early) or more"),
            (0.0 <= self.warmup < 1.0, "--warmup is a fraction of all steps, in [0, 1)"),
            (self.clip >= 0, "--clip must be 0 (off) or positive"),
            (0.0 < self.val_fraction < 1.0, "--val-fraction must be in (0, 1)"),
        ])


def sized_training(train_rows: int, opts: TrainOptions) -> dict[str, int]:
    """Batch, epochs and patience for a head training on ``train_rows`` rows: the ones ``opts`` leaves None.

    Small data must get enough steps: at batch 256 a 108-row fold is one step an epoch, and the head stopped at
    epoch 5 knowing only the commonest label (0.65 samples-F1 on tags-mini, where "person" for every photo
    scores 0.65). So: ~32 steps an epoch (train rows / 32, 16 to 256 rows; 10,000 rows keep 256, as measured),
    epochs enough for ~SIZED_STEPS steps (40 to 200), and patience a tenth of them (at least 4), since a small
    held-out fold's score is noisy from epoch to epoch.
    """
    batch = opts.batch_size or min(256, max(16, train_rows // 32))
    steps = max(1, -(-train_rows // batch))
    epochs = opts.epochs or min(200, max(40, -(-SIZED_STEPS // steps)))
    patience = opts.patience if opts.patience is not None else max(4, epochs // 10)
    return {"batch_size": batch, "epochs": epochs, "patience": patience}


SIZED_STEPS = 1000  # training steps a small dataset's head gets (epochs capped at 200)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Uniform or weighted (with replacement) draws of positions 0..n-1, the same on every rank, split
    by rank. The order depends only on (seed, epoch): resuming at an epoch boundary reproduces it, and
    each rank takes every world_size-th index of one draw (a distributed WeightedRandomSampler)."""

    def __init__(self, weights: np.ndarray | None, n: int, seed: int) -> None:
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return math.ceil(self.n / world_size())

    def order(self) -> torch.Tensor:
        """This rank's positions for the current epoch, (len(self),) int64."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        pad = len(self) * world_size() - self.n  # equal batches on every rank keep DDP in step
        return torch.cat([order, order[:pad]])[rank()::world_size()]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())


def make_sampler(opts: TrainOptions, y_train: np.ndarray) -> EpochSampler:
    """The sampler ``opts.sampler`` names over the training rows' labels (N, C)."""
    weights = inverse_frequency_weights(y_train) if opts.sampler == "weighted" else None
    return EpochSampler(weights, len(y_train), opts.seed)


@dataclass
class Task:
    """What :func:`train` needs from a stage.

    ``batches(epoch)`` yields dicts holding a ``labels`` (B, C) tensor and whatever ``forward(model,
    batch)`` reads to give (B, C) logits; ``predict(model)`` returns the held-out (rows, scores) with
    rows indexing ``y``. ``param_groups`` are optimiser groups, each with its own ``lr``.
    """

    model: nn.Module
    param_groups: list[dict[str, Any]]
    y: np.ndarray  # (N, C) labels of every row
    train_rows: np.ndarray  # rows of y that train (for pos_weight)
    sampler: EpochSampler
    steps_per_epoch: int  # batches per epoch on this rank
    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]]
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    predict: Callable[[nn.Module], tuple[np.ndarray, np.ndarray]]
    train_mode: Callable[[nn.Module], None] = lambda m: m.train()
    rng_state: Callable[[], Any] = lambda: None  # extra RNG state to checkpoint (a loader's generator)
    set_rng_state: Callable[[Any], None] = lambda s: None


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]  # the best epoch's model state dict (CPU)
    best_epoch: int
    history: list[dict[str, float]]
    val_rows: np.ndarray  # held-out rows and their scores at the best epoch
    val_scores: np.ndarray


@dataclass
class _Progress:
    """The loop's state, as checkpointed."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=lambda: {"f1": -1.0, "epoch": 0})
    best_state: dict[str, torch.Tensor] | None = None
    best_val: tuple[np.ndarray, np.ndarray] | None = None


def lr_lambda(opts: TrainOptions, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over ``opts.warmup`` of the steps, then constant or cosine decay to 0."""
    warm = int(opts.warmup * total_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if opts.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config without the options that may change between a run and its resumption; flat, so a checkpoint of
    mlc 0.2 (a flat config) resumes too."""
    # image_dir unset is what a checkpoint from before --image-dir existed meant
    return {k: v for k, v in flatten(config).items() if k not in ("resume", "nproc") and
            not (k == "image_dir" and v is None)}


class _Checkpoints:
    """``best.pt`` and ``last.pt`` in a folder; rank 0 writes, atomically."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder, self.config = folder, config
        self.last, self.best = folder / "last.pt", folder / "best.pt"

    def save(self, state: dict[str, Any], is_best: bool) -> None:
        if not is_main():
            return
        state = {**state, "config": self.config}
        # best.pt before last.pt: last.pt is the commit point a resume trusts, so a kill between
        # the two writes must not leave a last.pt whose best.pt is missing.
        for path in ([self.best] if is_best else []) + [self.last]:
            # through a Python file: a full disk is then an OSError (OutputError); torch.save given a path
            # reports it as a RuntimeError about "unexpected pos"
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                torch.save(state, fh)

    def load(self, which: Path) -> dict[str, Any]:
        if not which.is_file():
            raise MlcError(f"--resume: {which} does not exist")
        ck = torch.load(which, map_location="cpu", weights_only=True)
        if _comparable(ck["config"]) != _comparable(self.config):
            raise MismatchError(f"--resume: {which} was written with other options; rerun with the same ones")
        return ck


def _score(opts: TrainOptions, y: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    out = {"val_f1_at_0.5": samples_f1(y, apply_thresholds(scores, 0.5))}
    if opts.best_by == "f1-tuned":
        out["val_f1_tuned"] = cross_fitted_f1(y, scores, "per-class", opts.seed)
    return out


def train(task: Task, opts: TrainOptions, *, device: torch.device, log: Callable[[str], None],
          checkpoints: Path | None = None, config: dict[str, Any] | None = None, resume: bool = False,
          precision: str = "fp32", progress: bool = False) -> TrainResult:
    """Train ``task.model`` for ``opts.epochs`` (early-stopped by ``opts.patience``); return the best epoch.
    ``precision``: a resolved ``device.resolve_precision`` (forward passes autocast to it; weights,
    gradients and optimiser state stay fp32)."""
    model = task.model
    opt_cls = torch.optim.AdamW if opts.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(task.param_groups, lr=opts.lr, weight_decay=opts.weight_decay)
    updates = math.ceil(task.steps_per_epoch / opts.accumulate)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts, updates * opts.epochs))
    pos_weight = pos_weight_from_labels(task.y[task.train_rows]).to(device) if opts.pos_weight else None
    loss_fn = create_loss(opts.loss, pos_weight=pos_weight)
    # fp16 gradients underflow without scaling; bf16 has fp32's exponent range and needs none.
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")
    ddp: nn.Module = model
    if world_size() > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)
    ck = _Checkpoints(checkpoints, config or {}) if checkpoints is not None else None
    state = _resume(ck, task, optimizer, sched, scaler, log) if resume else _Progress()
    params = [q for g in optimizer.param_groups for q in g["params"]]
    step = _Stepper(optimizer, sched, scaler, params, opts, task.steps_per_epoch)
    for epoch in range(state.epoch + 1, opts.epochs + 1):
        t0 = time.perf_counter()
        task.sampler.epoch = epoch
        task.train_mode(model)
        loss, seen, step_secs = _epoch(task, ddp, loss_fn, step, device, precision, epoch, opts.epochs, progress)
        train_secs = time.perf_counter() - t0
        rows, scores = task.predict(model)
        order = np.argsort(rows)
        rows, scores = rows[order], scores[order]
        val = _score(opts, task.y[rows], scores)
        f1 = val["val_f1_tuned" if opts.best_by == "f1-tuned" else "val_f1_at_0.5"]
        state.history.append({"epoch": epoch, "train_loss": loss, **val, "train_seconds": round(train_secs, 2),
                              "train_rows_per_second": round(seen * world_size() / train_secs, 2),
                              "median_step_seconds": round(float(np.median(step_secs[1:] or step_secs)), 4)})
        log(f"epoch {epoch:3d}  train loss {loss:.4f}  " + "  ".join(f"{k} {v:.4f}" for k, v in val.items())
            + f"  {seen * world_size() / train_secs:.1f} rows/s")
        is_best = f1 > state.best["f1"]
        if is_best:
            state.best = {"f1": f1, "epoch": epoch}
            state.best_state, state.best_val = _cpu_state(model), (rows, scores)
        state.epoch = epoch
        if ck is not None:
            ck.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
                     "scaler": scaler.state_dict(), "rng": _rng(), "task_rng": task.rng_state(), "epoch": epoch,
                     "history": state.history, "best": state.best,
                     "val": {"rows": torch.from_numpy(rows), "scores": torch.from_numpy(scores)}}, is_best)
        if opts.patience and epoch - int(state.best["epoch"]) >= opts.patience:
            break
    if world_size() > 1:
        torch.distributed.barrier()  # best.pt is written before any rank reads it back
    return _result(state, ck)


def _resume(ck: _Checkpoints | None, task: Task, optimizer: torch.optim.Optimizer, sched: Any, scaler: Any,
            log: Callable[[str], None]) -> _Progress:
    """Model, optimiser, schedule, scaler and RNG states as ``last.pt`` left them."""
    if ck is None:
        raise MlcError("resume needs a checkpoint folder")
    saved = ck.load(ck.last)
    task.model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    _set_rng(saved["rng"])
    task.set_rng_state(saved["task_rng"])
    log(f"resuming after epoch {saved['epoch']}")
    return _Progress(saved["epoch"], saved["history"], saved["best"])


def _result(state: _Progress, ck: _Checkpoints | None) -> TrainResult:
    if state.best_state is None:  # the best epoch ran before a resume: it lives in best.pt
        if ck is None or not ck.best.is_file():
            raise MlcError("training ran no epoch, so there is no best model")
        saved = torch.load(ck.best, map_location="cpu", weights_only=True)
        state.best_state = saved["model"]
        state.best_val = (saved["val"]["rows"].numpy(), saved["val"]["scores"].numpy())
    assert state.best_val is not None
    return TrainResult(state.best_state, int(state.best["epoch"]), state.history, *state.best_val)


class _Stepper:
    """Backward with gradient scaling and accumulation; an optimiser step every ``accumulate`` batches."""

    def __init__(self, optimizer: torch.optim.Optimizer, sched: Any, scaler: Any, params: list, opts: TrainOptions,
                 steps_per_epoch: int) -> None:
        self.optimizer, self.sched, self.scaler, self.params = optimizer, sched, scaler, params
        self.accumulate, self.clip, self.last = opts.accumulate, opts.clip, steps_per_epoch

    def __call__(self, i: int, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulate).backward()
        if (i + 1) % self.accumulate == 0 or i + 1 == self.last:
            if self.clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.params, self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.sched.step()


def _epoch(task: Task, model: nn.Module, loss_fn: nn.Module, step: _Stepper, device: torch.device, precision: str,
           epoch: int, epochs: int, progress: bool) -> tuple[float, int, list[float]]:
    """One pass over the epoch's batches: (mean train loss, rows seen, seconds per step)."""
    total, seen, step_secs = 0.0, 0, []
    bar = tqdm(task.batches(epoch), total=task.steps_per_epoch, desc=f"epoch {epoch}/{epochs}", unit="batch",
               disable=not (progress and progress_enabled()), dynamic_ncols=True, file=sys.stderr, leave=False)
    step.optimizer.zero_grad(set_to_none=True)
    t = time.perf_counter()
    for i, batch in enumerate(bar):
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast(device, precision):
            loss = loss_fn(task.forward(model, batch).float(), labels)
        step(i, loss)
        total += loss.item() * len(labels)
        seen += len(labels)
        if progress:
            bar.set_postfix(loss=f"{total / seen:.4f}")
        step_secs.append(time.perf_counter() - t)  # data wait included (the first pays start-up)
        t = time.perf_counter()
    bar.close()
    return total / max(seen, 1), seen, step_secs


def _rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
