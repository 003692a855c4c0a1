"""Preprocessing: how a photo or a caption becomes an encoder's input.

``ImagePreprocess`` carries what the weights expect (resize, crop, mean/std, interpolation) and
makes both the evaluation views cached by ``mlc extract`` and the training augmentation of
``mlc finetune``; ``TextPreprocess`` says how captions are tokenised and pooled. Both are recorded
in caches and runs (``to_dict``), so features made differently are never mixed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as TF

from ..images import ORIENTATION

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite weights are converted from TensorFlow, which feeds (pixel - 127) / 128.
# Checked on 200 single-label COCO photos: top-1 ImageNet hits 53% with this vs 43% with ImageNet stats.
TF_LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
TF_LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
IMAGE_POOLINGS = ("avg", "tokens")


@dataclass(frozen=True)
class ImagePreprocess:
    """How a photo becomes the (3, crop, crop) float tensor an image encoder expects."""

    resize: int  # shorter side resized to this
    crop: int  # square centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    # Decode JPEGs at a reduced scale (libjpeg's DCT-domain downscaling, PIL's Image.draft) when the
    # photo's shorter side is at least twice ``resize``: several times faster, nearly the same pixels.
    jpeg_draft: bool = True
    # What the encoder outputs: "avg", one globally average-pooled vector (B, C); or "tokens", the last
    # map's h*w positions of ``token_dim`` channels each, flattened (B, h*w*C) for an attention head.
    pooling: str = "avg"
    token_dim: int = 0  # C of a "tokens" encoder (0 for "avg")

    def __post_init__(self) -> None:
        if self.pooling not in IMAGE_POOLINGS or (self.pooling == "tokens") != (self.token_dim > 0):
            raise ValueError(f"pooling must be one of {IMAGE_POOLINGS} (tokens with their token_dim), got "
                             f"{self.pooling!r} with token_dim {self.token_dim}")
        if self.interpolation not in {"nearest", "bilinear", "bicubic"}:
            raise ValueError(f"interpolation must be nearest, bilinear or bicubic, not {self.interpolation!r}")
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop {self.crop}, resize {self.resize}")

    def transform(self, view: int = 0) -> Callable[[Image.Image], Tensor]:
        """A picklable PIL -> (3, crop, crop) float32 transform: ``pixels(view)`` then ``normalize``.

        view 0: evaluation (resize, centre crop, to tensor, normalise); view 1: view 0 flipped
        horizontally; view k >= 2: a mild augmentation (random-resized crop of scale (0.7, 1), flip,
        +-10% brightness/contrast/saturation) whose parameters are drawn once from a generator seeded
        with k, so view k is the same for every image and every rerun, whatever the worker order.
        """
        return _Normalized(self.pixels(view), self)

    def pixels(self, view: int = 0) -> Callable[[Image.Image], Tensor]:
        """The geometric and colour part of ``transform(view)``: PIL -> (3, crop, crop) uint8. Decode workers
        run this and ship uint8 (4x less to copy); ``normalize`` then runs on whole batches."""
        if view < 0:
            raise ValueError(f"view must be >= 0, not {view}")
        return _ImageTransform(self, view)

    def normalize(self, pixels: Tensor) -> Tensor:
        """(..., 3, H, W) uint8 -> float32 ``(x / 255 - mean) / std``: the same float32 operations as
        torchvision's to_tensor + normalize, so a batch comes out bit-identical to per-image transforms."""
        x = pixels.to(torch.float32).div(255)
        mean = torch.as_tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return x.sub_(mean).div_(std)

    def train_transform(self) -> v2.Compose:
        """The seed report's training augmentation: flips, colour and sharpness jitter, then this
        preprocessing's normalisation (a random-resized crop to the same size)."""
        return v2.Compose([
            v2.PILToTensor(),
            v2.RandomResizedCrop(self.crop, scale=(0.6, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(p=0.1),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
            v2.RandomAdjustSharpness(sharpness_factor=2.0, p=0.3),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.mean, self.std),
        ])

    def draft_size(self) -> int | None:
        """The shorter side a JPEG may be decoded down to before the transforms, or None (full decode)."""
        return self.resize if self.jpeg_draft else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for the cache metadata."""
        # orientation: how data.load_image turns the decoded photo (the same for every encoder); recorded so
        # features of photos decoded before it (sideways portraits) are never mixed with these
        d = {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
             "interpolation": self.interpolation, "jpeg_draft": self.jpeg_draft, "orientation": ORIENTATION}
        if self.pooling != "avg":  # recorded only when set: pooled caches keep the record (and identity) they had
            d.update(pooling=self.pooling, token_dim=self.token_dim)
        return d


@dataclass(frozen=True)
class _ViewParams:
    """The fixed augmentation of one view k >= 2 (fractions, so they apply to any image size)."""

    scale: float  # fraction of the image area kept
    log_ratio: float  # log of the crop's width/height
    x: float  # crop position in [0, 1] along the free width / height
    y: float
    flip: bool
    brightness: float
    contrast: float
    saturation: float

    @classmethod
    def draw(cls, view: int) -> _ViewParams:
        g = torch.Generator().manual_seed(view)
        u = torch.rand(8, generator=g, dtype=torch.float64).tolist()
        lo, hi = math.log(3 / 4), math.log(4 / 3)
        return cls(scale=0.7 + 0.3 * u[0], log_ratio=lo + (hi - lo) * u[1], x=u[2], y=u[3], flip=u[4] < 0.5,
                   brightness=0.9 + 0.2 * u[5], contrast=0.9 + 0.2 * u[6], saturation=0.9 + 0.2 * u[7])

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop in a width x height image."""
        area = self.scale * width * height
        ratio = math.exp(self.log_ratio)
        w = min(width, max(1, round(math.sqrt(area * ratio))))
        h = min(height, max(1, round(math.sqrt(area / ratio))))
        return round(self.y * (height - h)), round(self.x * (width - w)), h, w


class _ImageTransform:
    """A plain class (not a lambda) so DataLoader workers can pickle it."""

    def __init__(self, pre: ImagePreprocess, view: int) -> None:
        self.pre, self.view = pre, view
        self.params = _ViewParams.draw(view) if view >= 2 else None

    def __call__(self, img: Image.Image) -> Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        pre, interp = self.pre, InterpolationMode(self.pre.interpolation)
        if self.params is None:
            img = TF.resize(img, pre.resize, interpolation=interp)
            img = TF.center_crop(img, [pre.crop, pre.crop])
            if self.view == 1:
                img = TF.hflip(img)
        else:
            p = self.params
            top, left, h, w = p.box(*img.size)
            img = TF.resized_crop(img, top, left, h, w, [pre.crop, pre.crop], interpolation=interp)
            if p.flip:
                img = TF.hflip(img)
            img = TF.adjust_brightness(img, p.brightness)
            img = TF.adjust_contrast(img, p.contrast)
            img = TF.adjust_saturation(img, p.saturation)
        return TF.pil_to_tensor(img)  # (3, crop, crop) uint8

    def __repr__(self) -> str:
        return f"ImageTransform(view={self.view}, {self.pre})"


class _Normalized:
    """pixels then normalize, for one image (picklable)."""

    def __init__(self, pixels: Callable[[Image.Image], Tensor], pre: ImagePreprocess) -> None:
        self.pixels, self.pre = pixels, pre

    def __call__(self, img: Image.Image) -> Tensor:
        return self.pre.normalize(self.pixels(img))


@dataclass(frozen=True)
class TextPreprocess:
    """How captions are tokenised and token states pooled into one vector."""

    max_length: int  # tokens, [CLS] and [SEP] included; longer captions are truncated
    lowercase: bool
    pooling: str  # "mean" (over the attention mask), "cls" (first token) or "pooler" (BERT's tanh(W h_cls))

    def __post_init__(self) -> None:
        if self.pooling not in {"mean", "cls", "pooler"}:
            raise ValueError(f"pooling must be mean, cls or pooler, not {self.pooling!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for the cache metadata."""
        return {"max_length": self.max_length, "lowercase": self.lowercase, "pooling": self.pooling}
