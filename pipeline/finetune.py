"""``mlc finetune``: train encoders and a stage-two head together.

Three modes share one training loop:
- ``--end-to-end``: every encoder weight trains, images decoded and augmented each epoch (the
  seed report's recipe: Adam, lr 1e-4, wd 1e-5, batch 64, 4 epochs, BCE + pos_weight, weighted sampler).
- default: only the top ``--unfreeze N`` blocks of each encoder train (the rest frozen, in eval mode).
- ``--from-cache CACHE``: the frozen bottom was run once by ``mlc extract --image-cut/--text-cut``;
  only the encoders' top parts (above the cut) and the head run, over cached activations.

Each epoch validates (samples-F1 with thresholds tuned on held-out rows), keeps ``best.pt`` and
``last.pt`` (atomic), and ``--resume`` continues from ``last.pt`` with model, optimiser, scheduler,
sampler and RNG state, so a killed run ends where an uninterrupted one would. The finished run
folder has the layout of a fit-head run plus ``image_encoder.safetensors`` and ``text_encoder/``.
Under torchrun it runs DistributedDataParallel; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from .atomic import atomic_path, write_text
from .cache import CacheReader, check_compatible
from .data import DataDir, Record, load_image
from .device import autocast, distributed, is_main, rank, world_size
from .encoders import (
    IMAGE_ENCODERS,
    TEXT_ENCODERS,
    ImageEncoder,
    TextEncoder,
    create_image_encoder,
    create_text_encoder,
)
from .errors import ImageError, MismatchError, MlcError
from .extract import ExtractConfig
from .fit_head import cross_fitted_f1, evaluate
from .heads import HEADS, create_head
from .labels import COCO18
from .losses import LOSSES, create_loss, inverse_frequency_weights, pos_weight_from_labels
from .metrics import samples_f1
from .runs import Run, save_state, write_run_files
from .splits import train_val_split
from .thresholds import apply_thresholds

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of ``mlc finetune``; written to the run folder as config.json."""

    data_dir: Path | None = None
    out: Path = Path("runs/finetune")
    image_encoder: str = "resnet50"
    text_encoder: str = "bert-base-uncased"
    image_weights: str | None = None
    text_weights: str | None = None
    random_init: bool = False
    end_to_end: bool = False
    unfreeze: int = 2
    from_cache: Path | None = None
    init_head: Path | None = None
    head: str = "sum"
    hidden: int = 512
    dropout: float = 0.2
    loss: str = "bce"
    pos_weight: bool = True
    sampler: str = "weighted"
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-4
    encoder_lr: float | None = None
    weight_decay: float = 1e-5
    accumulate: int = 1
    clip: float | None = 1.0
    warmup: float = 0.05
    schedule: str = "cosine"
    val_fraction: float = 0.2
    max_rows: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    workers: int = 2
    augment: bool = True
    resume: bool = False
    image_cut: str | None = None
    text_cut: str | None = None

    def __post_init__(self) -> None:
        for name in ("data_dir", "out", "from_cache", "init_head"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, Path(v))
        checks = [
            (self.data_dir is not None or self.from_cache is not None, "give DATA_DIR or --from-cache"),
            (not (self.end_to_end and self.from_cache), "--end-to-end retrains the whole encoders from images; "
             "--from-cache trains only above the cached cut: choose one"),
            (self.image_encoder in IMAGE_ENCODERS, f"--image-encoder must be one of {sorted(IMAGE_ENCODERS)}"),
            (self.text_encoder in TEXT_ENCODERS, f"--text-encoder must be one of {sorted(TEXT_ENCODERS)}"),
            (self.head in HEADS, f"--head must be one of {sorted(HEADS)}"),
            (self.loss in LOSSES, f"--loss must be one of {sorted(LOSSES)}"),
            (self.sampler in ("uniform", "weighted"), "--sampler must be uniform or weighted"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}"),
            (self.epochs >= 1 and self.batch_size >= 1 and self.accumulate >= 1,
             "--epochs, --batch-size and --accumulate must be at least 1"),
            (self.unfreeze >= 0, "--unfreeze must be 0 or more"),
            (self.lr > 0 and (self.encoder_lr is None or self.encoder_lr >= 0), "learning rates must be positive"),
            (0.0 <= self.warmup < 1.0, "--warmup is a fraction of all steps, in [0, 1)"),
            (0.0 < self.val_fraction < 1.0, "--val-fraction must be in (0, 1)"),
            (self.max_rows is None or self.max_rows >= 10, "--max-rows must be at least 10"),
            (self.clip is None or self.clip > 0, "--clip must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MlcError(msg)

    @property
    def mode(self) -> str:
        return "from-cache" if self.from_cache else ("end-to-end" if self.end_to_end else "partial")

    @property
    def enc_lr(self) -> float:
        # Pretrained encoders want smaller steps than a freshly initialised head.
        return self.encoder_lr if self.encoder_lr is not None else self.lr * 0.1

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


class MultiModal(nn.Module):
    """Image encoder + text encoder + fusion head -> logits (B, C).

    ``cut`` set: inputs are cached activations at the encoders' trunk cuts and only the top parts run.
    """

    def __init__(self, image: ImageEncoder, text: TextEncoder, head: nn.Module,
                 image_cut: str | None = None, text_cut: str | None = None) -> None:
        super().__init__()
        self.image, self.text, self.head = image, text, head
        self.image_cut, self.text_cut = image_cut, text_cut

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.image_cut is None:
            zi = self.image(pixels)                               # (B, 3, H, W) -> (B, Di)
        else:
            zi = self.image.forward_top(pixels, self.image_cut)   # (B, *S) activations -> (B, Di)
        if self.text_cut is None:
            zt = self.text(input_ids, attention_mask)             # (B, T) ids -> (B, Dt)
        else:
            zt = self.text.forward_top(input_ids, attention_mask, self.text_cut)  # (B, T, H) states
        return self.head(zi, zt)


def seed_augmentations(pre: Any) -> v2.Compose:
    """The seed report's training transform: flips, colour and sharpness jitter, then the
    encoder's own resize / crop / normalisation (a random-resized crop to the same size)."""
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(pre.crop, scale=(0.6, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(p=0.1),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
        v2.RandomAdjustSharpness(sharpness_factor=2.0, p=0.3),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(pre.mean, pre.std),
    ])


class ImageCaptionRows(torch.utils.data.Dataset):
    """(pixels (3, H, W), caption, labels (C,), row) from the data folder, decoded in workers."""

    def __init__(self, data: DataDir, records: list[Record], transform: Callable, labels: np.ndarray) -> None:
        self.data, self.records, self.transform, self.labels = data, records, transform, labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple:
        r = self.records[i]
        try:
            img = load_image(self.data.image_path(r.image_id))
        except ImageError as exc:
            return None, (exc.path, exc.fault), None, i
        return self.transform(img), r.caption, torch.from_numpy(self.labels[i]), i


class Collate:
    """Tokenises captions in the worker; raises an image fault in the main process with its name."""

    def __init__(self, text: TextEncoder) -> None:
        self.tokenizer_owner = text

    def __call__(self, batch: list[tuple]) -> dict[str, Any]:
        bad = [b[1] for b in batch if b[0] is None]
        if bad:
            return {"error": bad[0]}
        tok = self.tokenizer_owner.tokenize([b[1] for b in batch])
        return {"pixels": torch.stack([b[0] for b in batch]), "input_ids": tok["input_ids"],
                "attention_mask": tok["attention_mask"], "labels": torch.stack([b[2] for b in batch]).float(),
                "rows": torch.tensor([b[3] for b in batch])}


class TrunkRows(torch.utils.data.Dataset):
    """Cached trunk activations: one random image view per draw (train) or view 0 (eval)."""

    def __init__(self, reader: CacheReader, rows: np.ndarray, train: bool, seed: int) -> None:
        self.inner = reader.dataset(["image_trunk", "text_trunk", "text_mask"], rows)
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.inner[i]
        views = item["image_trunk"].shape[0]
        v = 0
        if self.train and views > 1:
            # Deterministic in (seed, epoch, row): resumed and uninterrupted runs draw the same views.
            v = int(np.random.default_rng((self.seed, self.epoch, int(item["row"]))).integers(views))
        return {"pixels": item["image_trunk"][v].float(), "input_ids": item["text_trunk"].float(),
                "attention_mask": item["text_mask"].long(), "labels": item["labels"], "rows": item["row"]}


class EpochSampler(torch.utils.data.Sampler[int]):
    """Uniform or weighted (with replacement) sampling, identical on every rank, split by rank.

    The order depends only on (seed, epoch), so resuming at an epoch boundary reproduces it, and
    each rank takes every world_size-th index of the same draw (a distributed WeightedRandomSampler).
    """

    def __init__(self, weights: np.ndarray | None, n: int, seed: int) -> None:
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return math.ceil(self.n / world_size())

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        pad = len(self) * world_size() - self.n  # equal batches on every rank keep DDP in step
        order = torch.cat([order, order[:pad]])
        return iter(order[rank()::world_size()].tolist())


def _freeze_partial(model: MultiModal, cfg: FinetuneConfig) -> None:
    """Freeze all encoder weights but the top ``cfg.unfreeze`` blocks (or those above the cut)."""
    for enc, cut in ((model.image, model.image_cut), (model.text, model.text_cut)):
        if cfg.end_to_end:
            continue
        for p in enc.parameters():
            p.requires_grad_(False)
        params = enc.top_parameters(cut) if cut is not None else enc.top_block_parameters(cfg.unfreeze)
        for p in params:
            p.requires_grad_(True)


def _set_train_mode(model: MultiModal, cfg: FinetuneConfig) -> None:
    """Frozen parts stay in eval mode so BatchNorm statistics and dropout do not drift."""
    model.train()
    if not cfg.end_to_end:
        for enc in (model.image, model.text):
            for m in enc.modules():
                if not any(q.requires_grad for q in m.parameters()):
                    m.eval()


def _lr_lambda(cfg: FinetuneConfig, total_steps: int) -> Callable[[int], float]:
    warm = int(cfg.warmup * total_steps)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


@dataclass
class Prepared:
    model: MultiModal
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    sampler: EpochSampler
    y: np.ndarray
    ids: list[str]
    val_idx: np.ndarray
    cache_extract: dict[str, Any]


def _build(cfg: FinetuneConfig, device: torch.device) -> Prepared:
    """Encoders, head, data and loaders for the chosen mode."""
    gen = torch.Generator().manual_seed(cfg.seed)
    image_cut = text_cut = None
    if cfg.from_cache:
        reader = CacheReader(cfg.from_cache)
        meta = reader.meta
        if meta.split != "train" or not meta.image_cut or not meta.text_cut:
            raise MismatchError(f"{cfg.from_cache}: --from-cache needs a train cache extracted with "
                                "--image-cut and --text-cut")
        expect = {"image_encoder": cfg.image_encoder, "text_encoder": cfg.text_encoder}
        expect.update({k: getattr(cfg, k) for k in ("image_cut", "text_cut") if getattr(cfg, k) is not None})
        check_compatible(meta, expect, what=f"the trunk cache {cfg.from_cache}")
        image_cut, text_cut = meta.image_cut, meta.text_cut
        extract = meta.extra.get("extract_config", {})
        # The same weights the trunk cache was extracted with (random init is seeded 0 there).
        seed = 0 if meta.random_init else None
        weights = _extract_weights(extract)
        image = create_image_encoder(cfg.image_encoder, weights=weights[0], random_init=meta.random_init, seed=seed)
        text = create_text_encoder(cfg.text_encoder, weights=weights[1], random_init=meta.random_init, seed=seed)
        if (image.weights_hash, text.weights_hash) != (meta.image_weights_hash, meta.text_weights_hash):
            raise MismatchError(f"{cfg.from_cache}: the encoders' weights differ from those the trunk cache "
                                "was extracted with")
        ids, y = reader.image_ids, reader.labels()
    else:
        seed = cfg.seed if cfg.random_init else None
        image = create_image_encoder(cfg.image_encoder, weights=cfg.image_weights, random_init=cfg.random_init,
                                     seed=seed)
        text = create_text_encoder(cfg.text_encoder, weights=cfg.text_weights, random_init=cfg.random_init, seed=seed)
        data = DataDir.open(cfg.data_dir)
        records = data.records("train")
        ids, y = [r.image_id for r in records], COCO18.multi_hot([r.labels or () for r in records])
    n = len(ids) if cfg.max_rows is None else min(cfg.max_rows, len(ids))
    rows = np.arange(n)
    tr_local, va_local = train_val_split(y[:n], cfg.val_fraction, cfg.seed)
    train_idx, val_idx = rows[tr_local], rows[va_local]

    head = create_head(cfg.head, image_dim=image.dim, text_dim=text.dim, num_classes=y.shape[1],
                       hidden=cfg.hidden, dropout=cfg.dropout)
    if cfg.init_head:
        start = Run.load(cfg.init_head)
        check_compatible(_contract(image, text), start.cache["contract"], what=f"--init-head {cfg.init_head}")
        head = start.heads[0]
    model = MultiModal(image, text, head, image_cut, text_cut).to(device)

    weights = inverse_frequency_weights(y[train_idx]) if cfg.sampler == "weighted" else None
    sampler = EpochSampler(weights, len(train_idx), cfg.seed)
    loader_kw: dict[str, Any] = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                     persistent_workers=False, generator=gen)
    if cfg.workers:
        loader_kw["prefetch_factor"] = 2
    if cfg.from_cache:
        train_ds: torch.utils.data.Dataset = TrunkRows(reader, train_idx, True, cfg.seed)
        val_ds: torch.utils.data.Dataset = TrunkRows(reader, val_idx, False, cfg.seed)
        collate = None
        extract = {"image_encoder": cfg.image_encoder, "text_encoder": cfg.text_encoder}
    else:
        pre = image.preprocess
        train_tf = seed_augmentations(pre) if cfg.augment else pre.transform(0)
        # Records are indexed by local position: rows 0..n-1 of the CSV.
        train_ds = torch.utils.data.Subset(ImageCaptionRows(data, records[:n], train_tf, y[:n]), train_idx)
        val_ds = torch.utils.data.Subset(ImageCaptionRows(data, records[:n], pre.transform(0), y[:n]), val_idx)
        collate = Collate(text)
        extract = {"image_encoder": cfg.image_encoder, "text_encoder": cfg.text_encoder}
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                                               collate_fn=collate, drop_last=False, **loader_kw)
    # Each rank scores its own slice of the validation rows; the slices are gathered on every rank.
    val_part = torch.utils.data.Subset(val_ds, list(range(rank(), len(val_ds), world_size())))
    val_loader = torch.utils.data.DataLoader(val_part, batch_size=cfg.batch_size, shuffle=False,
                                             collate_fn=collate, **loader_kw)
    return Prepared(model, train_loader, val_loader, sampler, y, ids, val_idx, extract)


def _extract_weights(extract: dict[str, Any]) -> tuple[str | None, str | None]:
    """Image and text weights a cache was extracted with (a run's files for --from-run)."""
    if extract.get("from_run"):
        run = Path(extract["from_run"])
        return str(run / "image_encoder.safetensors"), str(run / "text_encoder")
    return extract.get("image_weights"), extract.get("text_weights")


def _contract(image: ImageEncoder, text: TextEncoder) -> Any:
    """A CacheMeta-like object with the fields a head run's contract names (for --init-head)."""
    d = {"image_encoder": image.name, "text_encoder": text.name, "image_weights_hash": image.weights_hash,
         "text_weights_hash": text.weights_hash, "image_preprocess": image.preprocess.to_dict(),
         "text_preprocess": text.preprocess.to_dict(), "image_dim": image.dim, "text_dim": text.dim,
         "label_ids": list(COCO18.ids)}
    return SimpleNamespace(to_dict=lambda: d)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if "error" in batch:
        path, fault = batch["error"]
        raise ImageError(path, fault)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def _validate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
              n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out probabilities (rows, scores), gathered from every rank."""
    model.eval()
    rows, scores = [], []
    for batch in loader:
        b = _to(batch, device)
        with autocast(device):
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


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, **state: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train, validate each epoch, checkpoint, and write the run folder. Returns metrics.json's content."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with distributed(cfg.device) as device:
        return _finetune(cfg, device)


def _finetune(cfg: FinetuneConfig, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    out = cfg.out
    last = out / "checkpoints" / "last.pt"
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and last.exists():
            raise MlcError(f"{out} already holds a finetune run; pass --resume to continue it or choose "
                           "another --out")
    p = _build(cfg, device)
    model = p.model
    _freeze_partial(model, cfg)
    enc_params = [q for m in (model.image, model.text) for q in m.parameters() if q.requires_grad]
    head_params = [q for q in model.head.parameters() if q.requires_grad]
    opt = torch.optim.Adam([{"params": head_params, "lr": cfg.lr},
                            {"params": enc_params, "lr": cfg.enc_lr}], weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(p.train_loader) / cfg.accumulate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps_per_epoch * cfg.epochs))
    pos_weight = pos_weight_from_labels(p.y[np.setdiff1d(np.arange(len(p.y)), p.val_idx)]).to(device) \
        if cfg.pos_weight else None
    loss_fn = create_loss(cfg.loss, pos_weight=pos_weight)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp)
    ddp: nn.Module = model
    if world_size() > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)

    start_epoch, history, best = 1, [], {"f1": -1.0, "epoch": 0}
    if cfg.resume:
        if not last.is_file():
            raise MlcError(f"--resume: {last} does not exist")
        ck = torch.load(last, map_location="cpu", weights_only=True)
        if ck["config"] != json.loads(json.dumps(cfg.to_dict())) | {"resume": ck["config"]["resume"]}:
            raise MismatchError(f"--resume: {last} was written with other options; rerun with the same ones")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"])
        p.train_loader.generator.set_state(ck["loader_rng"])
        start_epoch, history, best = ck["epoch"] + 1, ck["history"], ck["best"]
        if is_main():
            print(f"resuming {out} after epoch {ck['epoch']}", file=sys.stderr)

    log_lines: list[str] = []

    def log(msg: str) -> None:
        if is_main():
            log_lines.append(msg)
            print(msg, file=sys.stderr)

    log(f"finetune ({cfg.mode}): {len(p.sampler) * world_size()} train draws/epoch, {len(p.val_idx)} validation "
        f"rows, {sum(q.numel() for q in enc_params) / 1e6:.2f} M encoder + "
        f"{sum(q.numel() for q in head_params) / 1e6:.2f} M head parameters training, device {device}, "
        f"{world_size()} process(es)")
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        p.sampler.epoch = epoch
        if isinstance(p.train_loader.dataset, TrunkRows):
            p.train_loader.dataset.epoch = epoch
        _set_train_mode(model, cfg)
        total, seen = 0.0, 0
        bar = tqdm(p.train_loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not is_main(),
                   dynamic_ncols=True, file=sys.stderr, leave=False)
        opt.zero_grad(set_to_none=True)
        step_secs: list[float] = []  # wall time per step, data wait included (the first pays start-up)
        t_step = time.perf_counter()
        for i, batch in enumerate(bar):
            b = _to(batch, device)
            with autocast(device, cfg.amp):
                logits = ddp(b["pixels"], b["input_ids"], b["attention_mask"])
                loss = loss_fn(logits.float(), b["labels"])
            scaler.scale(loss / cfg.accumulate).backward()
            if (i + 1) % cfg.accumulate == 0 or i + 1 == len(p.train_loader):
                if cfg.clip:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], cfg.clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
            total += loss.item() * len(b["labels"])
            seen += len(b["labels"])
            bar.set_postfix(loss=f"{total / seen:.4f}")
            step_secs.append(time.perf_counter() - t_step)
            t_step = time.perf_counter()
        bar.close()
        train_secs = time.perf_counter() - t0
        rows, scores = _validate(model, p.val_loader, device, p.y.shape[1])
        order = np.argsort(rows)
        rows, scores = rows[order], scores[order]
        y_val = p.y[rows]
        f1_05 = samples_f1(y_val, apply_thresholds(scores, 0.5))
        f1_tuned = cross_fitted_f1(y_val, scores, "per-class", cfg.seed)
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_f1_at_0.5": f1_05,
                        "val_f1_tuned": f1_tuned, "train_seconds": round(train_secs, 1),
                        "train_rows_per_second": round(seen * world_size() / train_secs, 2),
                        "median_step_seconds": round(float(np.median(step_secs[1:] or step_secs)), 4)})
        log(f"epoch {epoch}: train loss {total / max(seen, 1):.4f}, val samples-F1 {f1_05:.4f} at 0.5, "
            f"{f1_tuned:.4f} tuned (cross-fitted), {seen * world_size() / train_secs:.1f} rows/s")
        is_best = f1_tuned > best["f1"]
        if is_best:
            best = {"f1": f1_tuned, "epoch": epoch}
        if is_main():
            state = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                         scaler=scaler.state_dict(), rng=_rng_state(), loader_rng=p.train_loader.generator.get_state(),
                         epoch=epoch, history=history, best=best, config=cfg.to_dict(),
                         val=dict(rows=torch.from_numpy(rows), scores=torch.from_numpy(scores)))
            # best.pt before last.pt: last.pt is the commit point a resume trusts, so a kill
            # between the two writes must not leave a last.pt whose best.pt is missing.
            if is_best:
                _save_checkpoint(out / "checkpoints" / "best.pt", **state)
            _save_checkpoint(last, **state)
    if world_size() > 1:
        torch.distributed.barrier()
    metrics: dict[str, Any] = {}
    if is_main():
        metrics = _write_run(cfg, p, history, best, log)
        write_text(out / "train.log", "\n".join(log_lines) + "\n")
    if world_size() > 1:
        torch.distributed.barrier()
    return metrics


def _write_run(cfg: FinetuneConfig, p: Prepared, history: list[dict], best: dict,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Best checkpoint -> a run folder that `mlc submit`, `report` and `extract --from-run` take."""
    out = cfg.out
    ck = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    model = p.model.cpu()
    model.load_state_dict(ck["model"])
    rows, scores = ck["val"]["rows"].numpy(), ck["val"]["scores"].numpy()
    y = p.y[rows]
    save_state(model.image, out / "image_encoder.safetensors")
    text_dir = out / "text_encoder"
    tmp_dir = out / ".text_encoder.tmp"
    # Written beside, then swapped in, so a crash never leaves a half-written text_encoder/.
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    model.text.save_pretrained(tmp_dir)
    if text_dir.exists():
        shutil.rmtree(text_dir)
    os.replace(tmp_dir, text_dir)
    # The contract names the weights as `mlc extract --from-run` will load them: reload to hash.
    image = create_image_encoder(cfg.image_encoder, weights=str(out / "image_encoder.safetensors"))
    text = create_text_encoder(cfg.text_encoder, weights=str(text_dir))
    contract = _contract(image, text).to_dict()
    metrics, th = evaluate(y, scores, "per-class", cfg.seed)
    metrics.update(best_epoch=best["epoch"], mode=cfg.mode)
    th["label_ids"] = list(COCO18.ids)
    extract = ExtractConfig(data_dir=cfg.data_dir or Path("."), image_encoder=cfg.image_encoder,
                            text_encoder=cfg.text_encoder, from_run=out).to_dict()
    write_run_files(out, config={"kind": "finetune", **cfg.to_dict()},
                    cache={"contract": contract, "extract": extract},
                    head_config=model.head.config(), heads=[model.head], thresholds=th, metrics=metrics,
                    history=history, val_ids=[p.ids[r] for r in rows], val_scores=scores, val_labels=y)
    log(f"best epoch {best['epoch']}: held-out samples-F1 {metrics['samples_f1']:.4f} (tuned, cross-fitted); "
        f"run folder {out}")
    return metrics


def launch(nproc: int, argv: list[str]) -> int:
    """``mlc finetune --nproc N``: re-run this command under torchrun with N processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "pipeline.cli", *argv]
    return subprocess.call(cmd)

