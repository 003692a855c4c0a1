"""``mlc crossfit``: stage one with a finetuned caption tower, cross-fitted so no feature saw its own label.

The labelled rows are cut into K folds (multi-label stratified). For each fold a fresh copy of the
pretrained text encoder, with a linear layer on top, is trained (the one loop of ``training``) on the
other K-1 folds, then encodes the fold's own rows (out-of-fold features), the test split and any
labelled rows beyond ``--train-rows``; those last two get the mean of the K models' features. Stage two
then trains on features that never memorised their row's labels, as it will meet them on the test set.

During training a fold scores its model only on a sample of its own training rows (to pick the best
epoch): nothing about the out-of-fold rows steers it. Every row a fold trained on is recorded from the
batches themselves, and encoding a row with a model that trained on it is an internal error.

The result is a cache pair like any other (``train__none__<text>__crossfit-...h5`` and its test twin,
image-less), fusable with frozen caches by ``mlc fit-head A.h5 B.h5`` and used by ``mlc run
--crossfit``. The K fold models are not kept (K copies of the tower): ``mlc predict`` and ``export``
need encoders and refuse runs over these features.

Both caches are made by the one cache builder (``features.write_cache``) under extract's reuse policy: their
identity (``CacheMeta``) is known before any fold trains (the text hash is that of the start weights and the
whole seeded cross-fit recipe; the fold models' own digest is recorded in ``extra``), so a current pair is
reused without training, a cache holding other features is refused naming the difference (``--overwrite``
rebuilds it), and the pair is only trained when one of them must be written. Caches this very cross-fit wrote
before (their text hash was the folds' digest) are reused as they are.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .atomic import check_writable, lock
from .cache import CacheMeta, read_meta
from .config import Config, group, opt, require
from .data import DataDir, DataOptions, fingerprint
from .device import autocast, resolve_precision, select_device
from .encoders import NONE, TextEncoder, create_text_encoder
from .errors import MlcError
from .features import Hints, Job, LoaderOptions, Recipe, cache_path, encode_texts, up_to_date, write_cache
from .identity import EncoderId
from .log import get
from .options import ComputeOptions
from .splits import kfold
from .training import Task, TrainOptions, make_sampler, train

MONITOR_ROWS = 512  # training rows a fold scores after each epoch (to pick its best epoch)

logger = get(__name__)


@dataclass(frozen=True, kw_only=True)
class CrossfitConfig(Config):
    """Options of ``mlc crossfit``."""

    data_dir: Path = opt(None, "Data folder: train.csv (and test.csv) with captions.", argument=True, required=True)
    text_encoder: str = opt("minilm-l6", "Text encoder to finetune (a registered name or hf:...).")
    text_weights: str | None = opt(None, "Local text encoder folder instead of the registry's source.")
    random_init: bool = opt(False, "Randomly initialised encoder (tests only; recorded).")
    folds: int = opt(5, "K: each row's features come from the model trained on the other K-1 folds.")
    train_rows: int | None = opt(None, "Train the fold models on the first N labelled rows only; the others are "
                                 "encoded like the test split (the folds' mean), so they stay unseen (benchmarks).")
    encoder_lr: float = opt(5e-5, "Learning rate of the text encoder (--lr is the linear layer's).")
    text_features: str = opt("embedding", "What a caption's features are: embedding (the finetuned encoder's pooled "
                             "vector; each fold's space differs a little, and the test split's fold mean shrinks to "
                             "0.7 of the out-of-fold norm) or logits (the fold model's label scores, one space for "
                             "every fold). Measured on unseen rows (docs/recipes.md): embedding 0.8745 fused, 0.8637 "
                             "alone; logits 0.8708, 0.8491.", aliases=("--output",))
    cache_dir: Path = opt(Path("cache"), "Where the two caches are written (CACHE_DIR/DATA_NAME/...).",
                          aliases=("--out-dir",))
    overwrite: bool = opt(False, "Rebuild the caches of another cross-fit (other options or data) instead of "
                          "stopping.")
    data: DataOptions = group(DataOptions)
    # no DataLoader: every caption is tokenised once, in this process, so --workers would do nothing
    compute: ComputeOptions = group(ComputeOptions, omit=("workers",))
    train: TrainOptions = group(TrainOptions, lr=1e-3, weight_decay=0.01, batch_size=32, epochs=1, patience=0,
                                schedule="cosine", warmup=0.06, clip=1.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.data_dir is not None, "give the data folder"),
                 (self.text_encoder != NONE, "crossfit finetunes a text encoder: --text-encoder cannot be none"),
                 (self.folds >= 2, "--folds must be at least 2"),
                 (self.train_rows is None or self.train_rows >= 2 * self.folds,
                  "--train-rows must leave at least 2 rows per fold"),
                 (self.encoder_lr > 0, "--encoder-lr must be > 0"),
                 (self.text_features in ("logits", "embedding"), "--text-features must be logits or embedding")])

    def recipe(self, data: DataDir) -> Recipe:
        """What the caches record: the encoder, and the cross-fit's identity in place of weights."""
        where = ("data_dir", "image_dir", "cache_dir", "device", "overwrite")  # where and how it runs, not what
        # flat: the compute group's device and precision hash as the own options they were (the digest of mlc 0.2)
        spec = {k: v for k, v in self.flat_dict().items() if k not in where}
        spec["output"] = spec.pop("text_features")  # the name mlc 0.2 hashed: its cross-fits stay current
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
        return Recipe(image_encoder=NONE, text_encoder=self.text_encoder, text_weights=self.text_weights,
                      random_init=self.random_init, crossfit=f"k{self.folds}-{digest}",
                      data=data.options.recorded())


class CaptionTower(nn.Module):
    """A text encoder with a linear layer: token ids and mask (B, T) -> logits (B, C)."""

    def __init__(self, text: TextEncoder, num_classes: int) -> None:
        super().__init__()
        self.text, self.out = text, nn.Linear(text.dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.out(self.text(input_ids, attention_mask))


@dataclass
class Fold:
    """Which rows one fold's model trained on (as drawn into its batches) and which it encoded."""

    index: int
    trained: set[int]
    encoded: np.ndarray


def _fold_task(cfg: CrossfitConfig, tower: CaptionTower, tokens: dict[str, torch.Tensor], y: np.ndarray,
               rows: np.ndarray, device: torch.device, precision: str, seen: set[int]) -> Task:
    """One fold's training as a Task: batches of ``rows`` (recorded in ``seen``), monitored on its own rows."""
    sampler = make_sampler(cfg.train, y[rows])
    monitor = rows[np.linspace(0, len(rows) - 1, min(MONITOR_ROWS, len(rows))).astype(int)]

    def batch(idx: np.ndarray) -> dict[str, torch.Tensor]:
        mask = tokens["attention_mask"][idx]
        t = int(mask.sum(1).max())  # pad only to this batch's longest caption
        return {"input_ids": tokens["input_ids"][idx, :t].to(device), "attention_mask": mask[:, :t].to(device),
                "labels": torch.from_numpy(y[idx]).float()}

    def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        order = rows[sampler.order().numpy()]
        for s in range(0, len(order), cfg.train.batch_size):
            idx = order[s:s + cfg.train.batch_size]
            seen.update(idx.tolist())
            yield batch(idx)

    @torch.inference_mode()
    def predict(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        model.eval()
        out = []
        for s in range(0, len(monitor), 128):
            b = batch(monitor[s:s + 128])
            with autocast(device, precision):
                out.append(torch.sigmoid(model(b["input_ids"], b["attention_mask"]).float()).cpu().numpy())
        return monitor, np.concatenate(out)

    groups = [{"params": list(tower.out.parameters()), "lr": cfg.train.lr},
              {"params": list(tower.text.parameters()), "lr": cfg.encoder_lr}]
    return Task(model=tower, param_groups=groups, y=y, train_rows=rows, sampler=sampler,
                steps_per_epoch=-(-len(sampler) // cfg.train.batch_size), batches=batches,
                forward=lambda m, b: m(b["input_ids"], b["attention_mask"]), predict=predict)


def _encoder(model: nn.Module, device: torch.device, precision: str) -> Callable[..., dict[str, np.ndarray]]:
    """Token ids and mask (B, T) -> {"text": (B, D)}: the tower's logits or its encoder's embedding."""
    @torch.inference_mode()
    def run(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
        with autocast(device, precision):
            return {"text": model(ids.to(device), mask.to(device)).float().cpu().numpy()}
    return run


def crossfit_features(cfg: CrossfitConfig, make_encoder: Callable[[], TextEncoder], captions: list[str],
                      y: np.ndarray, others: list[list[str]], device: torch.device,
                      log: Callable[[str], None],
                      progress: bool = False) -> tuple[np.ndarray, list[np.ndarray], list[Fold], list[str]]:
    """Out-of-fold features (N, D) of ``captions`` (labels ``y``), the fold models' mean features of each list
    in ``others``, what each fold trained on and encoded, and the fold models' weights hashes."""
    precision = resolve_precision(cfg.compute.precision, device)
    n, k = len(captions), cfg.folds
    oof: np.ndarray | None = None
    means: list[np.ndarray] = []
    folds, hashes = [], []
    probe = make_encoder()
    tokens = probe.tokenize(captions)
    for i, (tr, va) in enumerate(kfold(y, k, cfg.train.seed)):
        torch.manual_seed(cfg.train.seed + i)
        tower = CaptionTower(make_encoder() if i else probe, y.shape[1]).to(device)
        seen: set[int] = set()
        log(f"-- fold {i + 1}/{k}: finetuning {cfg.text_encoder} on {len(tr)} rows ({precision}), then encoding "
            f"its {len(va)} held-out rows" + (f" and {sum(map(len, others))} more" if others else ""))
        result = train(_fold_task(cfg, tower, tokens, y, tr, device, precision, seen), cfg.train, device=device,
                       log=log, precision=precision, progress=progress)
        tower.load_state_dict(result.best_state)
        tower.eval()
        if seen & set(va.tolist()):  # the point of cross-fitting; cheap to check, fatal to get wrong
            raise MlcError(f"internal: fold {i + 1} trained on {len(seen & set(va.tolist()))} of the rows it encodes")
        run = _encoder(tower if cfg.text_features == "logits" else tower.text, device, precision)
        got = encode_texts(tower.text, run, [captions[j] for j in va], cfg.train.batch_size * 2)["text"]
        if oof is None:
            oof = np.zeros((n, got.shape[1]), np.float32)
            means = [np.zeros((len(o), got.shape[1]), np.float32) for o in others]
        oof[va] = got
        for m, o in zip(means, others, strict=True):
            if o:
                m += encode_texts(tower.text, run, o, cfg.train.batch_size * 2)["text"].astype(np.float32) / k
        folds.append(Fold(i, seen, va))
        hashes.append(tower.text.rehash())
    assert oof is not None
    return oof, means, folds, hashes


CROSSFIT_HINTS = Hints(bad_image="", skipped="", different="Pass --overwrite to replace it, or --cache-dir to write "
                       "elsewhere.")


def _meta(split: str, cfg: CrossfitConfig, recipe: Recipe, text: TextEncoder, data: DataDir, records: list,
          data_fingerprint: str, labelled: bool) -> CacheMeta:
    """What one cache of this cross-fit holds, known before any fold trains (so the one reuse policy,
    ``features.up_to_date``, can tell a current cache from another): the text identity's hash is that of the
    start weights and the whole cross-fit recipe (seeded); the fold models' own hashes go in ``extra``."""
    labels = data.label_space()
    dim = len(labels.ids) if cfg.text_features == "logits" else text.dim
    made = hashlib.sha256(f"{text.weights_hash} {recipe.crossfit}".encode()).hexdigest()
    tuned = EncoderId(text.name, f"{text.weights_source}, finetuned on {cfg.folds} folds", made,
                      cfg.random_init, text.preprocess.to_dict(), dim)
    return CacheMeta(
        split=split, image=EncoderId(random_init=cfg.random_init), text=tuned, views=1, label_ids=labels.ids,
        label_names=labels.names,
        data_fingerprint=data_fingerprint, num_records=len(records), mlc_version=__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        extra={"recipe": recipe.to_dict(), "crossfit": {"config": cfg.flat_dict(), "labelled": labelled}})


def _written_before(target: Path, meta: CacheMeta) -> bool:
    """A cache this very cross-fit wrote before its identity was known up front (mlc before issue 27: the text hash
    was the fold models' digest): the same recipe and, but for that hash, the same identity. It is reused as it is."""
    if not target.is_file():
        return False
    try:
        old = read_meta(target)
    except MlcError:
        return False
    same = old.replace(text_weights_hash=meta.text.weights_hash).identity() == meta.identity()
    return same and old.extra.get("recipe") == meta.extra["recipe"] and old.text.weights_hash != meta.text.weights_hash


def crossfit(cfg: CrossfitConfig) -> list[Path]:
    """Cross-fit the text tower and write the train (and test) caches through the one cache builder
    (``features.write_cache``, the reuse policy of extract); returns their paths."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = DataDir.open(cfg.data_dir, cfg.data)
    test = data.records("test") if data.has("test") else []
    recs = {"train": data.records("train"), **({"test": test} if test else {})}  # no test cache of no rows
    if not data.has_captions("train"):
        raise MlcError(f"{data.csv_path('train')}: no captions to finetune a text encoder on")
    recipe = cfg.recipe(data)
    weights = cfg.text_weights

    def make() -> TextEncoder:
        return create_text_encoder(cfg.text_encoder, weights=weights, random_init=cfg.random_init)  # seeded: 0

    text = make()
    loader = LoaderOptions(device=cfg.compute.device)
    jobs, metas = [], []
    for split, rows in recs.items():
        target = cache_path(cfg.cache_dir, cfg.data_dir, split, recipe)
        # image bytes too when the folder has images: so it fuses with the image caches of the same data
        meta = _meta(split, cfg, recipe, text, data, rows,
                     fingerprint(rows, data.image_dir if data.options.images else None), split == "train")
        old = _written_before(target, meta)
        jobs.append(Job(recipe, data, split, target, loader, max(1, len(rows)), False, cfg.overwrite or old,
                        CROSSFIT_HINTS))
        metas.append((meta, old))
    current = [old or up_to_date(job, meta) for job, (meta, old) in zip(jobs, metas, strict=True)]  # refusals first
    if all(current):
        logger.info(f"{jobs[0].target}: up to date (same cross-fit, same data); nothing to do")
        return [job.target for job in jobs]
    check_writable(jobs[0].target.parent)  # before minutes of training, not after
    # one cross-fit of these caches at a time: a second stops at once rather than training for nothing
    with lock(jobs[0].target.with_suffix(".crossfit"), f"the cross-fit of {jobs[0].target}"):
        arrays, digest = _features(cfg, make, data, recs)
        for job, (meta, _) in zip(jobs, metas, strict=True):
            meta = dataclasses.replace(meta, extra={**meta.extra, "crossfit": {**meta.extra["crossfit"],
                                                                             "fold_weights_hash": digest}})
            block = arrays[job.split].astype(np.float16)
            write_cache(job, meta, recs[job.split], lambda writer, chunks, b=block: writer.commit(0, {"text": b}))
    return [job.target for job in jobs]


def _features(cfg: CrossfitConfig, make: Callable[[], TextEncoder], data: DataDir,
              recs: dict[str, list]) -> tuple[dict[str, np.ndarray], str]:
    """Every split's cross-fitted text features, and the digest of the fold models' weights hashes."""
    device = select_device(cfg.compute.device)
    train_recs = recs["train"]
    y = data.label_space().multi_hot([r.labels for r in train_recs])
    n = len(train_recs) if cfg.train_rows is None else min(cfg.train_rows, len(train_recs))
    caps = [r.caption for r in train_recs]
    oof, (rest, test), _, hashes = crossfit_features(
        cfg, make, caps[:n], y[:n], [caps[n:], [r.caption for r in recs.get("test", [])]], device,
        logger.info, progress=True)
    return {"train": np.concatenate([oof, rest]), "test": test}, hashlib.sha256(" ".join(hashes).encode()).hexdigest()
