"""Stage 2, ``mlc fit-head``: train a light fusion head over cached features, then tune thresholds.

Everything lives in memory as float32 tensors (a 30,000-image cache of 2048+768-d features is
~340 MB), so an epoch is a few matrix multiplies and the whole fit takes seconds.

Honest figures: thresholds are tuned on held-out predictions, and the F1 we report for tuned
thresholds is *cross-fitted*: the held-out rows are cut in two halves, thresholds tuned on one
half are scored on the other and vice versa. The thresholds saved for submission are tuned on all
held-out rows. With ``--folds K`` the held-out predictions are out-of-fold over the whole set and
the K heads are averaged at prediction time.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_json, write_text
from .cache import CacheReader
from .device import select_device
from .errors import MlcError
from .heads import HEADS, create_head, predict_proba
from .losses import LOSSES, create_loss, inverse_frequency_weights, pos_weight_from_labels
from .metrics import samples_f1, summarize
from .runs import cache_record, write_run_files
from .splits import kfold, train_val_split
from .thresholds import apply_thresholds, tune_global, tune_per_class

THRESHOLD_MODES = ("per-class", "global", "fixed")
SAMPLERS = ("uniform", "weighted")


@dataclass(frozen=True)
class FitHeadConfig:
    """Hyper-parameters of one head fit; written to the run folder as config.json.

    Defaults were measured (bench/fit_head.py, 10,000 train rows): batch 256 at lr 3e-3 with
    dropout 0.5 matches the seed's batch 64 / lr 1e-4 in samples-F1 and fits in a third of the time.
    """

    cache: Path
    out: Path = Path("runs/head")
    head: str = "concat"
    loss: str = "bce"
    pos_weight: bool = False
    sampler: str = "uniform"
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    epochs: int = 40
    patience: int = 4
    hidden: int = 512
    dropout: float = 0.5
    val_fraction: float = 0.2
    folds: int = 0
    thresholds: str = "per-class"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache", Path(self.cache))
        object.__setattr__(self, "out", Path(self.out))
        checks = [
            (self.head in HEADS, f"--head must be one of {sorted(HEADS)}"),
            (self.loss in LOSSES, f"--loss must be one of {sorted(LOSSES)}"),
            (self.sampler in SAMPLERS, f"--sampler must be one of {SAMPLERS}"),
            (self.optimizer in ("adam", "adamw"), "--optimizer must be adam or adamw"),
            (self.thresholds in THRESHOLD_MODES, f"--thresholds must be one of {THRESHOLD_MODES}"),
            (self.lr > 0 and self.weight_decay >= 0, "--lr must be > 0 and --weight-decay >= 0"),
            (self.batch_size >= 1 and self.epochs >= 1 and self.patience >= 1,
             "--batch-size, --epochs and --patience must be at least 1"),
            (0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)"),
            (0.0 < self.val_fraction < 1.0, "--val-fraction must be in (0, 1)"),
            (self.folds == 0 or self.folds >= 2, "--folds must be 0 (a single split) or at least 2"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MlcError(msg)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


@dataclass
class Features:
    """A labelled cache in memory: image (N, V, Di), text (N, Dt), labels (N, C)."""

    ids: list[str]
    image: torch.Tensor
    text: torch.Tensor
    labels: np.ndarray

    @classmethod
    def load(cls, reader: CacheReader) -> Features:
        return cls(reader.image_ids, torch.from_numpy(reader.array("image")).float(),
                   torch.from_numpy(reader.array("text")).float(), reader.labels())


@dataclass
class FitResult:
    head: torch.nn.Module
    val_scores: np.ndarray
    history: list[dict[str, float]]
    best_epoch: int


def predict(head: torch.nn.Module, image: torch.Tensor, text: torch.Tensor) -> np.ndarray:
    """Probabilities (N, C) as numpy, averaged over the cached image views."""
    return predict_proba(head, image, text).numpy()


def train_head(cfg: FitHeadConfig, feats: Features, train_idx: np.ndarray, val_idx: np.ndarray,
               log: Callable[[str], None] = lambda s: None) -> FitResult:
    """Train one head on ``train_idx``, early-stopped on samples-F1 (at 0.5) of ``val_idx``."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    y = feats.labels
    head = create_head(cfg.head, image_dim=feats.image.shape[-1], text_dim=feats.text.shape[-1],
                       num_classes=y.shape[1], hidden=cfg.hidden, dropout=cfg.dropout)
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pos_weight = pos_weight_from_labels(y[train_idx]) if cfg.pos_weight else None
    loss_fn = create_loss(cfg.loss, pos_weight=pos_weight)
    y_t = torch.from_numpy(y).float()
    tr = torch.from_numpy(train_idx)
    sample_w = torch.from_numpy(inverse_frequency_weights(y[train_idx])).double()
    views = feats.image.shape[1]

    best = (-1.0, 0, None, None)  # (f1, epoch, state, val scores)
    history: list[dict[str, float]] = []
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        if cfg.sampler == "weighted":  # the seed's WeightedRandomSampler: with replacement
            order = tr[torch.multinomial(sample_w, len(tr), replacement=True, generator=gen)]
        else:
            order = tr[torch.randperm(len(tr), generator=gen)]
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            rows = order[s:s + cfg.batch_size]
            # One cached view per sample and epoch: augmentation at the price of a gather.
            v = torch.randint(views, (len(rows),), generator=gen)
            logits = head(feats.image[rows, v], feats.text[rows])
            loss = loss_fn(logits, y_t[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(rows)
        scores = predict(head, feats.image[val_idx], feats.text[val_idx])
        f1 = samples_f1(y[val_idx], apply_thresholds(scores, 0.5))
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_f1_at_0.5": f1})
        log(f"epoch {epoch:3d}  train loss {total / len(order):.4f}  val samples-F1@0.5 {f1:.4f}")
        if f1 > best[0]:
            best = (f1, epoch, {k: t.clone() for k, t in head.state_dict().items()}, scores)
        elif epoch - best[1] >= cfg.patience:
            break
    head.load_state_dict(best[2])
    return FitResult(head.eval(), best[3], history, best[1])


def cross_fitted_f1(y: np.ndarray, scores: np.ndarray, mode: str, seed: int) -> float:
    """Samples-F1 with thresholds tuned on one half of the rows and scored on the other (both ways)."""
    if mode == "fixed":
        return samples_f1(y, apply_thresholds(scores, 0.5))
    a, b = train_val_split(y, 0.5, seed)
    f1s, n = 0.0, 0
    for tune, score in ((a, b), (b, a)):
        t = fit_thresholds(y[tune], scores[tune], mode)
        f1s += samples_f1(y[score], apply_thresholds(scores[score], t)) * len(score)
        n += len(score)
    return f1s / n


def fit_thresholds(y: np.ndarray, scores: np.ndarray, mode: str) -> np.ndarray:
    """(C,) thresholds for ``mode``: fixed 0.5, one global value, or per class from the global one."""
    c = y.shape[1]
    if mode == "fixed":
        return np.full(c, 0.5, np.float32)
    g = tune_global(y, scores)
    if mode == "global":
        return np.full(c, g, np.float32)
    return np.asarray(tune_per_class(y, scores, init=np.full(c, g)), np.float32)


def fit(cfg: FitHeadConfig, feats: Features, log: Callable[[str], None]) -> tuple[list[FitResult], np.ndarray]:
    """Train one head (or K fold heads); returns them and the held-out row indices they were scored on."""
    if cfg.folds:
        results, held = [], []
        for k, (tr, va) in enumerate(kfold(feats.labels, cfg.folds, cfg.seed)):
            log(f"-- fold {k + 1}/{cfg.folds}: {len(tr)} train, {len(va)} held out")
            results.append(train_head(cfg, feats, tr, va, log))
            held.append(va)
        return results, np.concatenate(held)
    tr, va = train_val_split(feats.labels, cfg.val_fraction, cfg.seed)
    log(f"{len(tr)} train rows, {len(va)} validation rows")
    return [train_head(cfg, feats, tr, va, log)], va


def evaluate(y: np.ndarray, scores: np.ndarray, mode: str, seed: int) -> tuple[dict, dict]:
    """Held-out scores -> (metrics, thresholds), both JSON-ready; shared by fit-head and finetune.

    Metrics at 0.5 and with global / per-class thresholds (cross-fitted); the thresholds for
    submission are tuned on all the held-out rows with ``mode``.
    """
    t_final = fit_thresholds(y, scores, mode)
    metrics = {
        "samples_f1_at_0.5": samples_f1(y, apply_thresholds(scores, 0.5)),
        "samples_f1_global": cross_fitted_f1(y, scores, "global", seed),
        "samples_f1_per_class": cross_fitted_f1(y, scores, "per-class", seed),
        "threshold_mode": mode,
        "held_out_rows": int(len(y)),
        "note": "tuned-threshold F1s are cross-fitted: thresholds tuned on one half of the held-out rows, "
                "scored on the other half, and vice versa",
    }
    metrics["samples_f1"] = {"fixed": metrics["samples_f1_at_0.5"], "global": metrics["samples_f1_global"],
                             "per-class": metrics["samples_f1_per_class"]}[mode]
    metrics["detail_with_final_thresholds_in_sample"] = summarize(y, scores, t_final)
    thresholds = {"mode": mode, "global": float(tune_global(y, scores)), "per_class": t_final.tolist()}
    return _to_jsonable(metrics), thresholds


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _fit_and_score(cfg: FitHeadConfig, feats: Features, reader: CacheReader,
                   log: Callable[[str], None]) -> tuple[list[FitResult], np.ndarray, np.ndarray, dict, dict]:
    """Fit, then evaluate the held-out scores: (heads, held-out rows, their scores, metrics, thresholds)."""
    start = time.perf_counter()
    results, held = fit(cfg, feats, log)
    scores = np.concatenate([r.val_scores for r in results])
    metrics, th = evaluate(feats.labels[held], scores, cfg.thresholds, cfg.seed)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    metrics["best_epochs"] = [r.best_epoch for r in results]
    th["label_ids"] = list(reader.meta.label_ids)
    return results, held, scores, metrics, th


def load_features(cfg: FitHeadConfig) -> tuple[CacheReader, Features]:
    reader = CacheReader(cfg.cache)
    if reader.meta.split != "train":
        raise MlcError(f"{cfg.cache}: fit-head needs a labelled (train) cache, this one is {reader.meta.split!r}")
    return reader, Features.load(reader)


def fit_head(cfg: FitHeadConfig, loaded: tuple[CacheReader, Features] | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Run stage 2 and write the run folder; returns metrics.json's content."""
    select_device(cfg.device)  # validates the option; heads this small train fastest on the CPU
    reader, feats = loaded or load_features(cfg)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        if not quiet:
            print(msg, file=sys.stderr)

    log(f"cache {cfg.cache}: {len(feats.ids)} rows, {feats.image.shape[1]} view(s), "
        f"image {reader.meta.image_encoder} ({feats.image.shape[-1]}-d), text {reader.meta.text_encoder} "
        f"({feats.text.shape[-1]}-d)")
    results, held, scores, metrics, th = _fit_and_score(cfg, feats, reader, log)
    log(f"held-out samples-F1: {metrics['samples_f1_at_0.5']:.4f} at 0.5, "
        f"{metrics['samples_f1_global']:.4f} global threshold, {metrics['samples_f1_per_class']:.4f} per-class "
        f"(cross-fitted); {metrics['seconds']:.1f} s")
    write_run_files(
        cfg.out, config={"kind": "head", **cfg.to_dict()}, cache=cache_record(reader.meta),
        head_config=results[0].head.config(), heads=[r.head for r in results], thresholds=th, metrics=metrics,
        history=[r.history for r in results] if cfg.folds else results[0].history,
        val_ids=[feats.ids[i] for i in held], val_scores=scores, val_labels=feats.labels[held],
    )
    write_text(cfg.out / "train.log", "\n".join(lines) + "\n")
    return metrics


# The grid dinov2's linear evaluation runs, sized for seconds: heads x losses x learning rates.
DEFAULT_GRID: dict[str, tuple] = {"head": ("concat", "sum", "gated"), "loss": ("bce", "asl"), "lr": (3e-3, 1e-3)}


def fit_grid(cfg: FitHeadConfig, grid: dict[str, tuple] | None = None,
             quiet: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Fit every combination, pick the best held-out samples-F1, refit it into ``cfg.out``.

    Returns the leaderboard (best first) and the chosen run's metrics; the board is saved as grid.json.
    """
    grid = grid or DEFAULT_GRID
    loaded = load_features(cfg)
    keys = list(grid)
    board = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, combo, strict=True))
        _, _, _, m, _ = _fit_and_score(dataclasses.replace(cfg, **params), loaded[1], loaded[0], lambda s: None)
        board.append({**params, "samples_f1": m["samples_f1"], "at_0.5": m["samples_f1_at_0.5"],
                      "seconds": m["seconds"]})
        if not quiet:
            print(f"  {' '.join(f'{k}={v}' for k, v in params.items()):40s} "
                  f"samples-F1 {m['samples_f1']:.4f}  ({m['seconds']:.1f} s)", file=sys.stderr)
    board.sort(key=lambda r: -r["samples_f1"])
    best = {k: board[0][k] for k in keys}
    metrics = fit_head(dataclasses.replace(cfg, **best), loaded, quiet=quiet)
    write_json(cfg.out / "grid.json", board)
    return board, metrics
