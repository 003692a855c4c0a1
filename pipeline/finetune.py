"""``mlc finetune``: train encoders and a stage-two head together, with the loop of ``training``.

Three modes:
- ``--end-to-end``: every encoder weight trains, images decoded and augmented each epoch (the
  seed report's recipe: Adam, lr 1e-4, wd 1e-5, batch 64, 4 epochs, BCE + pos_weight, weighted sampler).
- default: only the top ``--unfreeze N`` blocks of each encoder train (the rest frozen, in eval mode).
- ``--from-cache CACHE``: the frozen bottom was run once by ``mlc extract --image-cut/--text-cut``;
  only the encoders' top parts (above the cut) and the head run, over cached activations.

Each epoch validates (samples-F1 with thresholds tuned on held-out rows), keeps ``best.pt`` and
``last.pt``, and ``--resume`` continues from ``last.pt`` exactly. The finished run folder has the
layout of a fit-head run plus ``encoders/image`` and ``encoders/text``. Under torchrun it runs
DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import OutputOptions
from .cache import CacheReader, check_compatible
from .config import Config, group, opt, require
from .data import DataDir, DataOptions
from .datasets import CaptionCollate, ImageCaptionRows, TrunkRows, to_device
from .device import autocast, distributed, is_main, rank, resolve_precision, world_size
from .encoders import NONE, EncoderOptions, ImageEncoder, TextEncoder
from .errors import MismatchError, MlcError
from .evaluation import evaluate
from .features import Recipe
from .heads import HeadOptions
from .labels import LabelSpace
from .log import get
from .model import MultiModal
from .options import ComputeOptions
from .runs import Contract, RunDir, RunFiles, data_inputs, feature_entry
from .splits import train_val_split
from .training import Task, TrainOptions, TrainResult, make_sampler, train

logger = get(__name__)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(Config):
    """Options of ``mlc finetune``; written to the run folder as config.json. Defaults: the seed report's."""

    data_dir: Path | None = opt(None, "Data folder (not needed with --from-cache).", argument=True)
    out: Path = opt(Path("runs/finetune"), "Run folder to write: a new or empty folder, or a finetune run it "
                    "replaces (or continues, with --resume).")
    end_to_end: bool = opt(False, "Train every encoder weight (the seed report's recipe); without it only the "
                           "top --unfreeze blocks train.")
    unfreeze: int = opt(2, "Top blocks of each encoder that train when not --end-to-end (0 = head only).")
    from_cache: Path | None = opt(None, "Train the encoders' top parts over a trunk cache (`mlc extract "
                                  "--image-cut ... --text-cut ...`) instead of images.")
    image_cut: str | None = opt(None, "Where the image encoder's frozen trunk ends: with --from-cache, the cut the "
                                "cache was made at (checked; default: the cache's).")
    text_cut: str | None = opt(None, "Where the text encoder's frozen trunk ends: with --from-cache, the cut the cache "
                               "was made at (checked; default: the cache's).")
    init_head: Path | None = opt(None, "Start the head from a fit-head run's head.")
    encoder_lr: float | None = opt(None, "Learning rate of the encoders (default lr/10).")
    max_rows: int | None = opt(None, "Use only the first N labelled rows (quick runs).")
    augment: bool = opt(True, "The seed's image augmentations.")
    channels_last: bool = opt(True, "Image convolutions in channels_last memory layout (about 1.4x faster on CPU "
                              "and on GPUs, same numbers); --no-channels-last to use the plain layout.")
    resume: bool = opt(False, "Continue from OUT/checkpoints/last.pt.")
    nproc: int = opt(1, "Processes: >1 relaunches under torchrun (DDP; NCCL on CUDA, gloo on CPU).")
    output: OutputOptions = group(OutputOptions)
    data: DataOptions = group(DataOptions)
    compute: ComputeOptions = group(ComputeOptions)
    train: TrainOptions = group(TrainOptions, pos_weight=True, sampler="weighted", optimizer="adam", lr=1e-4,
                                weight_decay=1e-5, batch_size=64, epochs=4, patience=0, best_by="f1-tuned",
                                schedule="cosine", warmup=0.05, clip=1.0)
    fusion: HeadOptions = group(HeadOptions, head="sum", dropout=0.2)
    encoders: EncoderOptions = group(EncoderOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        require([
            (self.data_dir is not None or self.from_cache is not None, "give DATA_DIR or --from-cache"),
            (not (self.end_to_end and self.from_cache), "--end-to-end retrains the whole encoders from images; "
             "--from-cache trains only above the cached cut: choose one"),
            (self.unfreeze >= 0, "--unfreeze must be 0 or more"),
            (self.encoder_lr is None or self.encoder_lr >= 0, "--encoder-lr must be 0 or more"),
            (self.max_rows is None or self.max_rows >= 10, "--max-rows must be at least 10"),
            (self.nproc >= 1, "--nproc must be at least 1"),
        ])

    @property
    def mode(self) -> str:
        return "from-cache" if self.from_cache else ("end-to-end" if self.end_to_end else "partial")

    @property
    def enc_lr(self) -> float:
        # Pretrained encoders want smaller steps than a freshly initialised head.
        return self.encoder_lr if self.encoder_lr is not None else self.train.lr * 0.1


@dataclass
class _Source:
    """The labelled rows and how to make their model inputs."""

    image: ImageEncoder
    text: TextEncoder
    ids: list[str]
    y: np.ndarray
    labels: LabelSpace
    reader: CacheReader | None = None  # --from-cache
    data: DataDir | None = None  # images
    records: list | None = None


def _source(cfg: FinetuneConfig) -> _Source:
    if not cfg.from_cache:
        if NONE in (cfg.encoders.image_encoder, cfg.encoders.text_encoder):
            raise MlcError("finetune trains an image and a text encoder together; use fit-head for a dataset "
                           "without images or captions")
        image, text = cfg.encoders.create(seed=cfg.train.seed)
        data = DataDir.open(cfg.data_dir, cfg.data)
        records = data.records("train")
        space = data.label_space()
        return _Source(image, text, [r.image_id for r in records], space.multi_hot([r.labels for r in records]),
                       space, data=data, records=records)
    reader = CacheReader(cfg.from_cache)
    meta = reader.meta
    if meta.split != "train" or not meta.image_cut or not meta.text_cut:
        raise MismatchError(f"{cfg.from_cache}: --from-cache needs a train cache extracted with --image-cut and "
                            "--text-cut")
    expect = {"image_encoder": cfg.encoders.image_encoder, "text_encoder": cfg.encoders.text_encoder}
    expect.update({k: getattr(cfg, k) for k in ("image_cut", "text_cut") if getattr(cfg, k) is not None})
    check_compatible(meta, expect, what=f"the trunk cache {cfg.from_cache}")
    image, text = Recipe.from_dict(meta.extra["recipe"], str(cfg.from_cache)).encoders()
    if (image.weights_hash, text.weights_hash) != (meta.image_weights_hash, meta.text_weights_hash):
        raise MismatchError(f"{cfg.from_cache}: the encoders' weights differ from those the trunk cache was "
                            "extracted with")
    return _Source(image, text, reader.image_ids, reader.labels(), meta.labels, reader=reader)


def _init_head(cfg: FinetuneConfig, src: _Source, held_out: set[str]) -> torch.nn.Module:
    """The --init-head run's head, refused when it trained on rows this finetune holds out: the held-out F1
    would be optimistic and the thresholds tuned on it biased (measured: worse on unseen images)."""
    start = RunDir(cfg.init_head).load()
    start.contract.check(Contract.of_encoders(src.image, src.text, src.labels), what=f"--init-head {cfg.init_head}")
    fix = (f"fit the starting head on this finetune's split: mlc fit-head CACHE --folds 0 --seed {cfg.train.seed} "
           f"--val-fraction {cfg.train.val_fraction}")
    if len(start.heads) > 1:
        raise MlcError(f"--init-head {cfg.init_head}: a {len(start.heads)}-fold run, whose heads each trained on most "
                       f"of the rows this finetune holds out; {fix}")
    seen = held_out - start.dir.held_out_ids()
    if seen:
        raise MlcError(f"--init-head {cfg.init_head}: its head trained on {len(seen)} of the {len(held_out)} rows "
                       f"this finetune holds out (e.g. {min(seen)}); {fix}")
    return start.heads[0]


def _model(cfg: FinetuneConfig, src: _Source, device: torch.device, held_out: set[str]) -> MultiModal:
    head = cfg.fusion.create_head(src.image.dim, src.text.dim, src.y.shape[1], src.image.preprocess.token_dim)
    if cfg.init_head:
        head = _init_head(cfg, src, held_out)
    cuts = (src.reader.meta.image_cut, src.reader.meta.text_cut) if src.reader else (None, None)
    model = MultiModal(src.image, src.text, head, *cuts, channels_last=cfg.channels_last).to(device)
    if not cfg.end_to_end:
        model.freeze_all_but_top(cfg.unfreeze)
    return model


def _loaders(cfg: FinetuneConfig, src: _Source, train_idx: np.ndarray, val_idx: np.ndarray, sampler: Any,
             device: torch.device) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    kw: dict[str, Any] = dict(num_workers=cfg.compute.workers, pin_memory=device.type == "cuda",
                              persistent_workers=False, generator=torch.Generator().manual_seed(cfg.train.seed))
    if cfg.compute.workers:
        kw["prefetch_factor"] = 2
    collate = None
    if src.reader is not None:
        train_ds: torch.utils.data.Dataset = TrunkRows(src.reader, train_idx, True, cfg.train.seed)
        val_ds: torch.utils.data.Dataset = TrunkRows(src.reader, val_idx, False, cfg.train.seed)
    else:
        pre, n = src.image.preprocess, len(src.y)
        train_tf = pre.train_transform() if cfg.augment else pre.transform(0)
        # Records are indexed by position: rows 0..n-1 of the CSV.
        rows = ImageCaptionRows(src.data, src.records[:n], train_tf, src.y)
        train_ds = torch.utils.data.Subset(rows, train_idx)
        val_ds = torch.utils.data.Subset(ImageCaptionRows(src.data, src.records[:n], pre.transform(0), src.y),
                                         val_idx)
        collate = CaptionCollate(src.text.tokenize)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=sampler,
                                               collate_fn=collate, **kw)
    # Each rank scores its own slice of the validation rows; the slices are gathered on every rank.
    val_part = torch.utils.data.Subset(val_ds, list(range(rank(), len(val_ds), world_size())))
    val_loader = torch.utils.data.DataLoader(val_part, batch_size=cfg.train.batch_size, shuffle=False,
                                             collate_fn=collate, **kw)
    return train_loader, val_loader


@torch.no_grad()
def _predict(model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             n_classes: int, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """Held-out probabilities (rows, scores), gathered from every rank."""
    model.eval()
    rows, scores = [], []
    for batch in loader:
        b = to_device(batch, device)
        with autocast(device, precision):
            logits = model(b["pixels"], b["input_ids"], b["attention_mask"])
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        rows.append(b["rows"].cpu().numpy())
    part = (np.concatenate(rows) if rows else np.zeros(0, np.int64),
            np.concatenate(scores) if scores else np.zeros((0, n_classes), np.float32))
    if world_size() > 1:
        parts: list[Any] = [None] * world_size()
        torch.distributed.all_gather_object(parts, part)
        part = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return part


def build_task(cfg: FinetuneConfig, device: torch.device) -> tuple[Task, _Source]:
    """The model, its data and loaders as a training task."""
    torch.manual_seed(cfg.train.seed)
    src = _source(cfg)
    n = len(src.ids) if cfg.max_rows is None else min(cfg.max_rows, len(src.ids))
    src.ids, src.y = src.ids[:n], src.y[:n]
    train_idx, val_idx = train_val_split(src.y, cfg.train.val_fraction, cfg.train.seed)
    model = _model(cfg, src, device, {str(src.ids[i]) for i in val_idx})
    sampler = make_sampler(cfg.train, src.y[train_idx])
    train_loader, val_loader = _loaders(cfg, src, train_idx, val_idx, sampler, device)
    precision = resolve_precision(cfg.compute.precision, device)

    def batches(epoch: int) -> Any:
        if isinstance(train_loader.dataset, TrunkRows):
            train_loader.dataset.epoch = epoch
        return (to_device(b, device) for b in train_loader)

    groups = [{"params": [q for q in model.head.parameters() if q.requires_grad], "lr": cfg.train.lr},
              {"params": [q for m in (model.image, model.text) for q in m.parameters() if q.requires_grad],
               "lr": cfg.enc_lr}]
    task = Task(model=model, param_groups=groups, y=src.y, train_rows=train_idx, sampler=sampler,
                steps_per_epoch=len(train_loader), batches=batches,
                forward=lambda m, b: m(b["pixels"], b["input_ids"], b["attention_mask"]),
                predict=lambda m: _predict(m, val_loader, device, src.y.shape[1], precision),
                train_mode=(lambda m: m.train()) if cfg.end_to_end else (lambda m: m.train_partially()),
                rng_state=lambda: train_loader.generator.get_state(),
                set_rng_state=lambda s: train_loader.generator.set_state(s))
    return task, src


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train, validate each epoch, checkpoint, and write the run folder. Returns metrics.json's content."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run = _claim(cfg) if is_main() else RunDir(cfg.out)
    with distributed(cfg.compute.device) as device, run.writing() if is_main() else contextlib.nullcontext():
        if is_main() and not cfg.resume and (run.checkpoints / "last.pt").exists():
            raise MlcError(f"{cfg.out} already holds a finetune run; pass --resume to continue it or choose "
                           "another --out")
        task, src = build_task(cfg, device)
        lines: list[str] = []

        def log(msg: str) -> None:
            if is_main():
                lines.append(msg)
            logger.info(msg)

        groups = task.param_groups
        precision = resolve_precision(cfg.compute.precision, device)
        log(f"finetune ({cfg.mode}): {len(task.sampler) * world_size()} train draws/epoch, "
            f"{len(task.y) - len(task.train_rows)} validation rows, "
            f"{sum(q.numel() for q in groups[1]['params']) / 1e6:.2f} M encoder + "
            f"{sum(q.numel() for q in groups[0]['params']) / 1e6:.2f} M head parameters training, device {device}, "
            f"{world_size()} process(es), precision {precision}")
        result = train(task, cfg.train, device=device, log=log, checkpoints=run.checkpoints, config=cfg.to_dict(),
                       resume=cfg.resume, precision=precision, progress=True)
        metrics = _write_run(cfg, task.model, src, result, log, lines, precision) if is_main() else {}
        if world_size() > 1:
            torch.distributed.barrier()
        return metrics


def _claim(cfg: FinetuneConfig) -> RunDir:
    """The run folder --out names, proved safe to write before training: never the data, the trunk cache or the
    --init-head run it reads, nor a folder mlc did not write."""
    inputs = data_inputs(DataDir.open(cfg.data_dir, cfg.data)) if cfg.data_dir is not None else []
    return RunDir(cfg.out).claim("finetune", inputs=inputs + ([cfg.from_cache] if cfg.from_cache else []),
                                 sealed=[cfg.init_head] if cfg.init_head else [], force=cfg.output.force)


def _write_run(cfg: FinetuneConfig, model: MultiModal, src: _Source, result: TrainResult,
               log: Any, lines: list[str], precision: str) -> dict[str, Any]:
    """Best epoch -> a run folder that `mlc submit`, `report` and `extract --from-run` take."""
    model = model.cpu()
    model.load_state_dict(result.best_state)
    model.image.rehash()
    model.text.rehash()
    y = src.y[result.val_rows]
    metrics, th = evaluate(y, result.val_scores, "auto", cfg.train.seed)
    metrics.update(best_epoch=result.best_epoch, best_epochs=[result.best_epoch], mode=cfg.mode, precision=precision)
    th.update(label_ids=list(src.labels.ids), label_names=list(src.labels.names))
    data = cfg.data.recorded() if src.data is not None else (
        src.reader.meta.extra.get("recipe", {}).get("data") if src.reader is not None else None)
    recipe = Recipe(image_encoder=model.image.name, text_encoder=model.text.name, from_run=str(cfg.out.resolve()),
                    data=data)
    log(f"best epoch {result.best_epoch}: held-out samples-F1 {metrics['samples_f1']:.4f} (tuned, cross-fitted); "
        f"run folder {cfg.out}")
    RunDir(cfg.out.resolve()).write(RunFiles(  # claimed, and its lock held, by finetune()
        kind="finetune", config=cfg.to_dict(),
        features=[feature_entry(Contract.of_encoders(model.image, model.text, src.labels), recipe.to_dict(),
                                data_fingerprint=src.reader.meta.data_fingerprint if src.reader is not None else None)],
        heads=[model.head], thresholds=th, metrics=metrics, history=[result.history],
        val_ids=[src.ids[r] for r in result.val_rows], val_scores=result.val_scores, val_labels=y, log=lines,
        encoders=(model.image, model.text)))
    return metrics
