"""Stage 2, ``mlc fit-head``: train a light fusion head over cached features, then tune thresholds.

Everything lives in memory as float32 tensors (a 30,000-image cache of 2048+768-d features is
~340 MB), so an epoch is a few matrix multiplies and the whole fit takes seconds. Thresholds are
tuned on held-out predictions and the tuned F1 reported is cross-fitted (``evaluation``). With
``--folds K`` the held-out predictions are out-of-fold over the whole set and the K heads are
averaged at prediction time. ``--grid`` fits heads x losses x learning rates and keeps the best
(dinov2's linear evaluation, sized for seconds).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from logging import DEBUG, INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import OutputOptions
from .cache import CacheReader
from .config import Config, group, opt, require
from .decision import decisions, rules_help, select_nested
from .errors import MlcError
from .evaluation import evaluate
from .fused import load_joined, plan_parts, token_dim
from .heads import HEADS, HeadOptions, predict_proba
from .log import get
from .losses import LOSSES
from .pseudo import PseudoRows
from .runs import Contract, RunDir, RunFiles, feature_entry
from .splits import kfold, train_val_split
from .training import Task, TrainOptions, TrainResult, make_sampler, sized_training, train

# The grid: every registered head and loss that says it belongs in the grid (``grid``) x head batch x dropout.
# Batch "auto" is the row-count rule (training.sized_training), "small" a quarter of it (at least 8): the two ends
# small data is sensitive to.
GRID_BATCHES = ("auto", "small")
GRID_DROPOUTS = (0.2, 0.5)


def default_grid() -> dict[str, tuple]:
    """``--grid``: the registered heads and losses in the grid x ``GRID_BATCHES`` x ``GRID_DROPOUTS``."""
    return {"head": HEADS.in_grid(), "loss": LOSSES.in_grid(), "batch_size": GRID_BATCHES, "dropout": GRID_DROPOUTS}


def _grid_help() -> str:
    grid = default_grid()
    return (f"Train a grid of heads ({', '.join(grid['head'])}) x losses ({', '.join(grid['loss'])}) x head batch "
            f"({', '.join(grid['batch_size'])}) x dropout ({', '.join(map(str, grid['dropout']))}), print a "
            "leaderboard and the chosen config's score on rows the choice did not see.")

logger = get(__name__)


@dataclass(frozen=True, kw_only=True)
class FitHeadConfig(Config):
    """Options of ``mlc fit-head``; written to the run folder as config.json.

    Defaults were measured (bench/fit_head.py, 10,000 train rows): batch 256 at lr 3e-3 with
    dropout 0.5 matches the seed's batch 64 / lr 1e-4 in samples-F1 and fits in a third of the time.
    """

    caches: tuple[Path, ...] = opt((), "Train cache(s) written by `mlc extract` (.../train__*.h5). Several are "
                                   "fused: one head over all their image and text features.", argument=True,
                                   required=True)
    out: Path = opt(Path("runs/head"), "Run folder to write: a new or empty folder, or a fit-head run it replaces.")
    folds: int = opt(5, "K-fold: train K heads, tune thresholds on out-of-fold predictions, average the heads "
                     "at prediction (0 = one split; 5 measured +0.008 samples-F1 over one split).")
    decision: str = opt("auto", lambda: "The decision rule: auto (every rule scored cross-fitted on held-out rows, "
                        "the best kept) or one of them: " + rules_help() + ".", aliases=("--thresholds",))
    grid: bool = opt(False, _grid_help)
    output: OutputOptions = group(OutputOptions)
    train: TrainOptions = group(TrainOptions, batch_size=None, epochs=None, patience=None)  # sized to the rows
    fusion: HeadOptions = group(HeadOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(bool(self.caches), "give a train cache"),
                 (self.decision in decisions(), f"--decision must be one of {', '.join(decisions())}"),
                 (self.folds == 0 or self.folds >= 2, "--folds must be 0 (a single split) or at least 2")])


@dataclass
class Features:
    """Labelled caches in memory: image (N, V, Di), text (N, Dt), labels (N, C); several caches are fused.
    ``token_dim``: the image features are a token map of (Di / token_dim) tokens (0: pooled vectors)."""

    ids: list[str]
    image: torch.Tensor
    text: torch.Tensor
    labels: np.ndarray
    token_dim: int = 0

    @classmethod
    def load(cls, readers: list[CacheReader]) -> Features:
        for r in readers:
            if r.meta.split != "train":
                raise MlcError(f"{r.path}: fit-head needs a labelled (train) cache, this one is {r.meta.split!r}")
        parts = plan_parts([r.meta for r in readers])
        ids, image, text = load_joined(readers, parts)
        return cls(ids, torch.from_numpy(image), torch.from_numpy(text), readers[0].labels(),
                   token_dim([r.meta for r in readers], parts))

    def subset(self, rows: np.ndarray) -> Features:
        return Features([self.ids[i] for i in rows], self.image[rows], self.text[rows], self.labels[rows],
                        self.token_dim)

    def create_head(self, opts: HeadOptions) -> torch.nn.Module:
        """``opts``' head sized for these features."""
        return opts.create_head(self.image.shape[-1], self.text.shape[-1], self.labels.shape[1], self.token_dim)


def head_task(cfg: FitHeadConfig, feats: Features, train_idx: np.ndarray, val_idx: np.ndarray,
              extra: tuple[PseudoRows, int] | None = None) -> Task:
    """A head over in-memory features as a training task: batches are index gathers, no DataLoader. ``extra``:
    pseudo rows and the fold whose targets they train with (rows past the labelled ones; never held out)."""
    torch.manual_seed(cfg.train.seed)
    head = feats.create_head(cfg.fusion)
    n, y = len(feats.ids), feats.labels
    rows_all, p_img, p_txt = train_idx, feats.image[:0], feats.text[:0]
    if extra is not None:  # positions n.. are the fold's kept pseudo rows, after the labelled ones
        pseudo, k = extra
        keep = torch.from_numpy(pseudo.keep[k])
        p_img, p_txt = pseudo.rows.image[keep], pseudo.rows.text[keep]
        y = np.concatenate([feats.labels, pseudo.targets[k]]).astype(np.float32)  # targets may be soft
        rows_all = np.concatenate([train_idx, n + np.arange(len(keep))])
    y_t = torch.from_numpy(y).float()
    tr = torch.from_numpy(rows_all)
    sampler = make_sampler(cfg.train, y[rows_all])
    views, p_views = feats.image.shape[1], max(1, p_img.shape[1])

    def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        order = tr[sampler.order()]
        g = torch.Generator().manual_seed(cfg.train.seed * 100003 + epoch)
        for s in range(0, len(order), cfg.train.batch_size):
            rows = order[s:s + cfg.train.batch_size]
            lab, ps = rows[rows < n], rows[rows >= n] - n
            v = torch.randint(views, (len(lab),), generator=g)  # one cached view per sample and epoch
            image, text = feats.image[lab, v], feats.text[lab]
            if len(ps):
                w = torch.randint(p_views, (len(ps),), generator=g)
                image, text = torch.cat([image, p_img[ps, w]]), torch.cat([text, p_txt[ps]])
            yield {"image": image, "text": text, "labels": torch.cat([y_t[lab], y_t[n + ps]])}

    def predict(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
        return val_idx, predict_proba(model, feats.image[val_idx], feats.text[val_idx]).numpy()

    return Task(model=head, param_groups=[{"params": list(head.parameters()), "lr": cfg.train.lr}], y=y,
                train_rows=rows_all, sampler=sampler, steps_per_epoch=-(-len(sampler) // cfg.train.batch_size),
                batches=batches, forward=lambda m, b: m(b["image"], b["text"]), predict=predict)


def fit(cfg: FitHeadConfig, feats: Features, log: Callable[[str], None],
        pseudo: PseudoRows | None = None) -> tuple[list[TrainResult], np.ndarray]:
    """Train one head (or K fold heads); returns their results and the held-out rows they were scored on.
    ``pseudo``: unlabelled rows with per-fold targets, added to each fold's training rows (K folds only)."""
    if pseudo is not None and (not cfg.folds or len(pseudo.keep) != cfg.folds):
        raise MlcError(f"pseudo-labels are made per fold: {len(pseudo.keep)} sets for --folds {cfg.folds}")
    if cfg.folds:
        parts = kfold(feats.labels, cfg.folds, cfg.train.seed)
    else:
        parts = [train_val_split(feats.labels, cfg.train.val_fraction, cfg.train.seed)]
    results = []
    for k, (tr, va) in enumerate(parts):
        more = f" + {len(pseudo.keep[k])} pseudo-labelled" if pseudo is not None else ""
        log(f"-- fold {k + 1}/{cfg.folds}: {len(tr)} train{more}, {len(va)} held out" if cfg.folds
            else f"{len(tr)} train rows, {len(va)} validation rows")
        task = head_task(cfg, feats, tr, va, None if pseudo is None else (pseudo, k))
        results.append(train(task, cfg.train, device=torch.device("cpu"), log=log))
    return results, np.concatenate([r.val_rows for r in results])


def heads_of(cfg: FitHeadConfig, feats: Features, results: list[TrainResult]) -> list[torch.nn.Module]:
    """The best-epoch head of each result, in eval mode."""
    heads = []
    for r in results:
        head = feats.create_head(cfg.fusion)
        head.load_state_dict(r.best_state)
        heads.append(head.eval())
    return heads


def train_rows(cfg: FitHeadConfig, rows: int) -> int:
    """Rows one fold's head trains on (K-1 folds of ``rows``, or all but the validation split)."""
    return rows * (cfg.folds - 1) // cfg.folds if cfg.folds else round(rows * (1 - cfg.train.val_fraction))


def sized(cfg: FitHeadConfig, rows: int) -> FitHeadConfig:
    """``cfg`` with the batch, epochs and patience it leaves open set from the row count (training.sized_training)."""
    return cfg.replace(**sized_training(train_rows(cfg, rows), cfg.train))


def _fit_and_score(cfg: FitHeadConfig, feats: Features, log: Callable[[str], None], pseudo: PseudoRows | None = None
                   ) -> tuple[list[TrainResult], np.ndarray, np.ndarray, dict, dict]:
    """Fit, then evaluate the held-out scores: (results, held-out rows, their scores, metrics, thresholds)."""
    cfg = sized(cfg, len(feats.ids))
    start = time.perf_counter()
    results, held = fit(cfg, feats, log, pseudo)
    scores = np.concatenate([r.val_scores for r in results])
    metrics, th = evaluate(feats.labels[held], scores, cfg.decision, cfg.train.seed)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    metrics["best_epochs"] = [r.best_epoch for r in results]
    return results, held, scores, metrics, th


def fit_head(cfg: FitHeadConfig, loaded: tuple[list[CacheReader], Features] | None = None, quiet: bool = False,
             extra_json: dict[str, Any] | None = None, member_of: Path | None = None,
             pseudo: PseudoRows | None = None) -> dict[str, Any]:
    """Run stage 2 and write the run folder (whole, or not at all); returns metrics.json's content. ``member_of``:
    the best run (``mlc run --quality best``) whose members/ holds ``cfg.out``; ``pseudo``: pseudo-labelled rows
    for each fold's training side (``--pseudo-label``; pipeline/pseudo.py)."""
    run = _claim(cfg, member_of)
    readers, feats = loaded or _load(cfg.caches)
    with run.writing():  # before training: a folder that cannot be written fails now, not after the fit
        return _fit_head(cfg, run, readers, feats, quiet, extra_json, pseudo)


def _fit_head(cfg: FitHeadConfig, run: RunDir, readers: list[CacheReader], feats: Features, quiet: bool,
              extra_json: dict[str, Any] | None, pseudo: PseudoRows | None = None) -> dict[str, Any]:
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        logger.log(DEBUG if quiet else INFO, msg)

    parts = plan_parts([r.meta for r in readers])
    for r, part in zip(readers, parts, strict=True):
        used = [f"image {r.meta.image_encoder} ({r.meta.image_dim}-d)"] * part.image
        used += [f"text {r.meta.text_encoder} ({r.meta.text_dim}-d)"] * part.text
        log(f"cache {r.path}: " + (", ".join(used) or "nothing new (its encoders feed already)"))
    log(f"{len(feats.ids)} rows, {feats.image.shape[1]} view(s), image {feats.image.shape[-1]}-d, "
        f"text {feats.text.shape[-1]}-d")
    cfg = sized(_head_for(cfg, feats, log), len(feats.ids))
    t = cfg.train
    log(f"training: batch {t.batch_size}, up to {t.epochs} epochs, patience {t.patience}, lr {t.lr}, loss {t.loss} "
        f"({train_rows(cfg, len(feats.ids))} training rows a fold)")
    feats.create_head(cfg.fusion)  # the head fits these features (token maps or pooled), or says so before any fold
    results, held, scores, metrics, th = _fit_and_score(cfg, feats, log, pseudo)
    log_decision(metrics, log)
    meta = readers[0].meta
    th.update(label_ids=list(meta.label_ids), label_names=list(meta.label_names))
    run.write(RunFiles(
        kind="head", config=cfg.to_dict(),
        features=[feature_entry(Contract.of_cache(r.meta), r.meta.extra.get("recipe", {}), part.to_dict(),
                                r.meta.data_fingerprint) for r, part in zip(readers, parts, strict=True)],
        heads=heads_of(cfg, feats, results), thresholds=th, metrics=metrics,
        history=[r.history for r in results], val_ids=[feats.ids[i] for i in held], val_scores=scores,
        val_labels=feats.labels[held], log=lines, extra_json=extra_json))
    return metrics


def log_decision(metrics: dict[str, Any], log: Callable[[str], None]) -> None:
    """The decision rules' cross-fitted scores, the one chosen, and the baselines' verdict: a few lines."""
    d, base = metrics["decision"], metrics["baselines"]
    log("held-out samples-F1 by decision rule (cross-fitted): "
        + ", ".join(f"{k} {v:.4f}" for k, v in d["candidates"].items()) + f"; {metrics['seconds']:.1f} s")
    how = "forced by --decision" if d["forced"] else f"{d['selected_score']:.4f} on rows the choice did not see"
    log(f"decision rule: {d['rule']} ({how}); baselines: constant answer {base['constant']:.4f}, "
        f"label priors {base['priors']:.4f}")
    if base["verdict"]:
        log(f"warning: {base['verdict']}")


def _claim(cfg: FitHeadConfig, member_of: Path | None = None) -> RunDir:
    """The run folder --out names, proved safe to replace: never a cache it reads, nor a folder mlc did not write.
    Inside another run only as a member of ``member_of`` (a best run's members/ is no part of its manifest)."""
    allow = []
    if member_of is not None:
        if Path(cfg.out).resolve().parent != (Path(member_of) / "members").resolve():
            raise MlcError(f"{cfg.out}: a member's run folder lies in {Path(member_of) / 'members'}")
        allow = [cfg.out]
    return RunDir(cfg.out).claim("head", inputs=cfg.caches, force=cfg.output.force, allow=allow)


def _head_for(cfg: FitHeadConfig, feats: Features, log: Callable[[str], None]) -> FitHeadConfig:
    """A dataset without images gets a text-only head, one without captions an image-only head (said)."""
    for missing, only in (("image", "text"), ("text", "image")):
        width = feats.image.shape[-1] if missing == "image" else feats.text.shape[-1]
        if width == 0 and missing in HEADS[cfg.fusion.head].modalities:
            article = "an" if only == "image" else "a"
            log(f"note: no {missing} features in this data: {article} {only}-only head instead of {cfg.fusion.head!r}")
            return cfg.replace(head=only)
    return cfg


def _load(caches: tuple[Path, ...]) -> tuple[list[CacheReader], Features]:
    readers = [CacheReader(c) for c in caches]
    return readers, Features.load(readers)


def fit_grid(cfg: FitHeadConfig, grid: dict[str, tuple] | None = None,
             quiet: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Fit every combination, pick the best held-out samples-F1 (each config with its best decision rule,
    cross-fitted), refit it into ``cfg.out``.

    Returns the leaderboard (best first) and the chosen run's metrics, whose ``samples_f1`` is the whole choice
    (config and rule) scored on rows it did not see (decision.select_nested), not the board's maximum. The board
    and that score are saved as grid.json.
    """
    grid = grid or default_grid()
    _claim(cfg)  # before the grid's minutes of fitting
    loaded = _load(cfg.caches)
    feats = loaded[1]
    keys = list(grid)
    board, held_scores = [], []
    combos = list(itertools.product(*(grid[k] for k in keys)))
    for i, combo in enumerate(combos, 1):
        params = dict(zip(keys, combo, strict=True))
        if not quiet:  # each config fits every fold: say which one, the heartbeat covers its seconds
            logger.info(f"  config {i}/{len(combos)}: {' '.join(f'{k}={v}' for k, v in params.items())}")
        _, held, scores, m, _ = _fit_and_score(_grid_config(cfg, params, len(feats.ids)), feats, lambda s: None)
        order = np.argsort(held)
        held_scores.append(scores[order])
        best_rule = max(m["decision"]["candidates"].items(), key=lambda kv: kv[1])
        board.append({**params, "samples_f1": best_rule[1], "rule": best_rule[0], "at_0.5": m["samples_f1_at_0.5"],
                      "seconds": m["seconds"]})
        logger.log(DEBUG if quiet else INFO, f"  {' '.join(f'{k}={v}' for k, v in params.items()):50s} "
                   f"samples-F1 {best_rule[1]:.4f} ({best_rule[0]}; {m['seconds']:.1f} s)")
    y = feats.labels[np.sort(held)]
    honest = select_nested(y, held_scores, cfg.train.seed)
    ranked = sorted(range(len(board)), key=lambda i: -board[i]["samples_f1"])
    board = [board[i] for i in ranked]
    best = {k: board[0][k] for k in keys}
    if not quiet:
        logger.info(f"grid: best {board[0]['samples_f1']:.4f} on the rows it was picked on; the choice scored on rows "
                    f"it did not see: {honest:.4f}")
    metrics = fit_head(_grid_config(cfg, best, len(feats.ids)), loaded, quiet=quiet,
                       extra_json={"grid.json": {"board": board,  # None: too few rows to score the choice
                                                   "selected_score": honest if np.isfinite(honest) else None}})
    metrics["grid_selected_score"] = honest
    return board, metrics


def _grid_config(cfg: FitHeadConfig, params: dict[str, Any], rows: int) -> FitHeadConfig:
    """A grid row's config: batch "auto" / "small" resolved against the row count."""
    params = dict(params)
    if params.get("batch_size") in ("auto", "small"):
        auto = sized(cfg.replace(batch_size=None), rows).train.batch_size
        params["batch_size"] = None if params["batch_size"] == "auto" else max(8, auto // 4)
    return cfg.replace(**params)
