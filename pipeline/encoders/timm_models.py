"""``timm:<model name>``: any image model of timm, frozen or finetuned, as an mlc image encoder.

Preprocessing comes from the model's pretrained config (``timm.data.resolve_data_config``); the
features are its pooled pre-logits (``forward_head(forward_features(x), pre_logits=True)``). Trunk
cuts are the model's ``feature_info`` stages, offered when its ``forward_features`` is a plain chain of
its top-level modules (checked on a probe batch at creation: ResNets, EfficientNets, ConvNeXts, ...);
models that add tensors between modules (ViTs' position embeddings) are used whole.

Pretrained weights come from timm's own cache (the Hugging Face hub cache; downloaded there when the
network allows and MLC_OFFLINE/HF_HUB_OFFLINE are unset), or a local file with ``--image-weights``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MlcError
from .base import ImageEncoder
from .registry import EncoderSpec, register_family
from .transforms import ImagePreprocess
from .weights import hf_cache_dir, hub_weights, load_weights, resolve_weights

_HEAD_CHILDREN = ("global_pool", "fc", "classifier", "head", "head_drop", "fc_norm", "pre_logits")


def _timm() -> Any:
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise MlcError("timm:<model> needs the timm package: pip install timm") from e
    return timm


class TimmEncoder(ImageEncoder):
    """A timm model without its classifier: (B, 3, H, W) -> (B, dim) pooled pre-logits."""

    def __init__(self, model: nn.Module, probe_size: int) -> None:
        super().__init__()
        self.model = model.eval()
        steps, modules, features = self._chain(probe_size, _cuts(model))
        self.steps, self._modules_of = steps, modules
        with torch.no_grad():  # the head over the probe's features: no third forward through the trunk
            self.dim = int(self.model.forward_head(features, pre_logits=True).shape[1])

    def weights_module(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def _chain(self, size: int, cuts: tuple[str, ...]) -> tuple[tuple[str, ...], list[nn.Module], Tensor]:
        """The steps of forward_features as (name, module) when it is a plain chain of top-level modules
        (a Sequential expanded where the model's stages are its items, so ``blocks.3`` can be a cut);
        else one opaque step. Also forward_features of the probe batch it checked that on."""
        names: list[str] = []
        modules: list[nn.Module] = []
        for name, child in self.model.named_children():
            if name in _HEAD_CHILDREN:
                continue
            if isinstance(child, nn.Sequential) and any(c.startswith(f"{name}.") for c in cuts):
                names += [f"{name}.{i}" for i in range(len(child))]
                modules += list(child)
            else:
                names.append(name)
                modules.append(child)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        want = self.model.forward_features(x)
        try:
            got = x
            for m in modules:
                got = m(got)
            plain = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        except Exception:  # noqa: BLE001 - any failure means the chain is not plain
            plain = False
        if not plain:
            return ("features",), [self.model], want
        return tuple(names), modules, want

    def run_step(self, i: int, x: Tensor) -> Tensor:
        if self.steps == ("features",):
            return self.model.forward_features(x)
        return self._modules_of[i](x)

    def step_modules(self, i: int) -> list[nn.Module]:
        if i == len(self.steps) - 1:  # the last step carries the head's parameters (norms of pre-logits)
            return [self._modules_of[i] if self.steps != ("features",) else self.model,
                    *(m for n, m in self.model.named_children() if n in _HEAD_CHILDREN)]
        return [self._modules_of[i]]

    def forward_top(self, h: Tensor, cut: str | None) -> Tensor:
        start = 0 if cut is None else self._cut_index(cut) + 1
        x = self._run(h, start, len(self.steps))
        return self.model.forward_head(x, pre_logits=True)  # (B, dim)


def _preprocess(model: nn.Module) -> ImagePreprocess:
    cfg = _timm().data.resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    interp = cfg.get("interpolation", "bicubic")
    return ImagePreprocess(resize=int(round(crop / cfg.get("crop_pct", 1.0))), crop=crop,
                           mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                           interpolation=interp if interp in ("nearest", "bilinear", "bicubic") else "bicubic")


def _create(spec: EncoderSpec, *, weights: str | os.PathLike[str] | None, random_init: bool,
             model_name: str) -> TimmEncoder:
    timm = _timm()
    try:  # random weights, seeded by registry.build_encoder; then filled from what resolve_weights finds
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    except RuntimeError as e:  # "Unknown model"
        raise MlcError(f"{spec.name}: timm has no model {model_name!r} (see timm.list_models()): {e}") from e
    resolved = resolve_weights(spec.name, weights=weights, random_init=random_init,
                               pretrained=lambda: _pretrained(spec.name, model_name, model))
    source = load_weights(model, spec.name, resolved, _classifier_keys(model))
    pre = _preprocess(model)
    enc = TimmEncoder(model, pre.crop)
    enc.preprocess = pre
    enc.finish(spec.name, source, random_init, tuple(c for c in _cuts(model) if c in enc.steps[:-1]))
    return enc


def _classifier_keys(model: nn.Module) -> tuple[str, ...]:
    clf = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    names = clf if isinstance(clf, list | tuple) else [clf] if clf else []
    return tuple(f"{n}." for n in names)


def _cuts(model: nn.Module) -> tuple[str, ...]:
    info = getattr(model, "feature_info", None)
    if info is None:
        return ()
    mods = info.module_name() if hasattr(info, "module_name") else [f.get("module") for f in info]
    return tuple(m for m in mods if m)


def _pretrained(name: str, model_name: str, model: nn.Module) -> tuple[Any, str]:
    """timm's pretrained weights for ``model``: the file in the Hugging Face cache, else a state dict
    downloaded when the network allows; a WeightsError saying what to fetch and where otherwise."""
    hub = model.pretrained_cfg.get("hf_hub_id") or f"timm/{model_name}"
    return hub_weights(
        hub, ("model.safetensors", "pytorch_model.bin"),
        lambda: _timm().create_model(model_name, pretrained=True, num_classes=0).state_dict(), f"timm:{hub}",
        lambda why: f"{name}: no pretrained weights: not in the Hugging Face cache {hf_cache_dir()} (models--"
        f"{hub.replace('/', '--')}) and not downloaded ({why}). Fetch them on a machine with network with "
        f"`hf download {hub} --local-dir DIR`, then pass --image-weights DIR/model.safetensors (or copy that "
        f"machine's cache folder models--{hub.replace('/', '--')} into {hf_cache_dir()}).")


def _family(model_name: str) -> EncoderSpec:
    import functools

    return EncoderSpec(f"timm:{model_name}", "image", None, None, (), f"timm:{model_name} (timm's cache)",
                       functools.partial(_create, model_name=model_name))


register_family("image", "timm", _family)
