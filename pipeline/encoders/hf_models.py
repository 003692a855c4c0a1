"""``hf:<hub id or local folder>``: Hugging Face models as mlc encoders.

Text: ``AutoModel`` + ``AutoTokenizer``, caption vectors pooled by ``mean`` over the tokens (default),
``cls`` or ``pooler`` (``--text-pooling``); BERT-type models (MiniLM, BERT, ...) also offer trunk cuts
``layerN``. Image: ``AutoModel`` + ``AutoImageProcessor`` (ViT, DINOv2, ConvNeXt, a SigLIP vision
tower, ...), preprocessing taken from the processor, features = the model's pooled output (or the mean
of its last hidden states when it has none).

Weights come from a local folder or the Hugging Face cache; downloaded there only when the network
allows and MLC_OFFLINE/HF_HUB_OFFLINE are unset. Never random weights unless asked for.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import WeightsError
from .base import WholeImageEncoder
from .registry import EncoderSpec, register_family
from .text import BertTextEncoder
from .transforms import ImagePreprocess, TextPreprocess
from .weights import (
    NO_REMOTE_CODE,
    custom_code_error,
    download_blocked,
    hf_cache_dir,
    one_line,
    quiet_transformers,
    refuse_custom_code,
    resolve_weights,
    strict_pretrained,
)

_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample codes the processors store


def _source(spec_name: str, ref: str, weights: str | os.PathLike[str] | None) -> tuple[str, bool, str]:
    """(where from_pretrained reads, local_files_only, source in words) for ``hf:ref`` or ``weights``."""
    if weights is None and Path(ref).expanduser().is_dir():
        weights = ref  # hf:FOLDER is a local folder like --text-weights FOLDER
    where, source = resolve_weights(spec_name, weights=weights, random_init=False, folder=True,
                                    pretrained=lambda: (ref, f"hf:{ref}"))
    if weights is not None:
        refuse_custom_code(Path(where), spec_name)
    return where, weights is not None or download_blocked("https://huggingface.co") is not None, source


def _missing(spec_name: str, ref: str, e: Exception) -> WeightsError:
    refused = custom_code_error(f"{spec_name}: {ref}", e)
    if refused is not None:
        return refused
    return WeightsError(
        f"{spec_name}: cannot load {ref!r} ({one_line(e)}). A hub id "
        f"is read from the Hugging Face cache {hf_cache_dir()} (downloaded there when a network allows): fetch it "
        f"on a machine with network with `hf download {ref} --local-dir DIR` and use hf:DIR, or copy that machine's "
        f"cache folder into {hf_cache_dir()}."
    )


def _load(spec_name: str, ref: str, weights: Any, random_init: bool) -> tuple[nn.Module, str, str, bool]:
    """(model, source, where its processor/tokenizer files are, whether to read them from local files
    only) from a hub id or folder."""
    from transformers import AutoConfig, AutoModel

    where, local_only, source = _source(spec_name, ref, weights)
    if random_init:
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(where, local_files_only=local_only, **NO_REMOTE_CODE)
                model = AutoModel.from_config(config, **NO_REMOTE_CODE)  # seeded by registry.build_encoder
        except Exception as e:  # noqa: BLE001 - OSError (not cached), ValueError (unknown architecture), ...
            raise _missing(spec_name, ref, e) from e
        source = "random-init"
    else:  # a model saved without pooler weights (sentence-transformers') is taken: mean or cls pooling reads none
        model = strict_pretrained(AutoModel, where, f"{spec_name}: {where}", local_only=local_only, checked=True,
                                  optional=("pooler",), failed=lambda e: _missing(spec_name, ref, e))
    if getattr(model.config, "auto_map", None):  # a hub repository asking for its code: refused like a folder
        raise WeightsError(f"{spec_name}: {ref}: config.json: auto_map: asks to run code of its own, and mlc never "
                           "runs code from a model folder or hub repository")
    return model.float().eval(), source, where, local_only


# -------------------------------------------------------------------------------------------- text


class HFTextEncoder(BertTextEncoder):
    """Any AutoModel text encoder; the BERT machinery (cuts, pooler) where the architecture is BERT's."""

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess: TextPreprocess, tokenizer_source: str) -> None:
        super().__init__(model, tokenizer, preprocess, tokenizer_source)
        self.bert_like = getattr(model.config, "model_type", "") == "bert"

    def _pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        if self.preprocess.pooling == "pooler" and getattr(self.model, "pooler", None) is None:
            raise WeightsError(f"{self.name} has no pooler; use --text-pooling mean or cls")
        return super()._pool(hidden, attention_mask)


def _create_text(spec: EncoderSpec, *, weights: Any, random_init: bool, ref: str,
                 pooling: str | None = None) -> HFTextEncoder:
    from transformers import AutoTokenizer

    model, source, where, local_only = _load(spec.name, ref, weights, random_init)
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(where, local_files_only=local_only, **NO_REMOTE_CODE)
    except Exception as e:  # noqa: BLE001
        raise _missing(spec.name, ref, e) from e
    pre = TextPreprocess(max_length=min(512, int(getattr(tok, "model_max_length", 512) or 512)),
                         lowercase=bool(getattr(tok, "do_lower_case", False)), pooling=pooling or "mean")
    enc = HFTextEncoder(model, tok, pre, source)
    layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    cuts = tuple(f"layer{i}" for i in range(1, layers)) if enc.bert_like else ()
    enc.finish(spec.name, source, random_init, cuts)
    return enc


# ------------------------------------------------------------------------------------------- image


class HFImageEncoder(WholeImageEncoder):
    """An AutoModel vision model: (B, 3, H, W) -> its pooled output (or mean of the last hidden states)."""

    steps = ("model",)

    def __init__(self, model: nn.Module, crop: int) -> None:
        super().__init__()
        self.model = model
        with torch.no_grad():
            self.dim = int(self.forward(torch.zeros(1, 3, crop, crop)).shape[-1])

    def weights_module(self) -> nn.Module:
        return self.model

    def save_extra(self, folder: Path) -> None:
        self.model.config.save_pretrained(str(folder))
        if getattr(self, "processor", None) is not None:
            self.processor.save_pretrained(str(folder))

    def pooled(self, x: Tensor) -> Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)  # (B, D); ConvNeXt's is (B, D, 1, 1) in some versions
        hidden = out.last_hidden_state
        return hidden.mean(dim=1) if hidden.ndim == 3 else hidden.mean(dim=(2, 3))


def _image_preprocess(processor: Any) -> ImagePreprocess:
    size = dict(processor.size) if not isinstance(processor.size, int) else {"shortest_edge": processor.size}
    crop_cfg = dict(getattr(processor, "crop_size", None) or {})
    resize = int(size.get("shortest_edge") or size.get("height") or size.get("width"))
    crop = int(crop_cfg.get("height") or size.get("height") or resize)
    if not getattr(processor, "do_center_crop", False):
        crop = min(crop, resize)
    return ImagePreprocess(resize=max(resize, crop), crop=crop, mean=tuple(processor.image_mean),
                           std=tuple(processor.image_std),
                           interpolation=_RESAMPLE.get(int(getattr(processor, "resample", 3)), "bicubic"))


def _create_image(spec: EncoderSpec, *, weights: Any, random_init: bool, ref: str) -> HFImageEncoder:
    from transformers import AutoImageProcessor

    model, source, where, local_only = _load(spec.name, ref, weights, random_init)
    try:
        processor = AutoImageProcessor.from_pretrained(where, local_files_only=local_only, **NO_REMOTE_CODE)
    except Exception as e:  # noqa: BLE001
        raise _missing(spec.name, ref, e) from e
    pre = _image_preprocess(processor)
    if hasattr(model, "vision_model"):  # a CLIP/SigLIP pair: the vision tower alone
        model = model.vision_model
    enc = HFImageEncoder(model, pre.crop)
    enc.preprocess, enc.processor = pre, processor
    enc.finish(spec.name, source, random_init, ())
    return enc


def _family(kind: str, ref: str) -> EncoderSpec:
    build = _create_text if kind == "text" else _create_image
    return EncoderSpec(f"hf:{ref}", kind, None, None, (), f"hf:{ref} (Hugging Face cache or folder)",
                       functools.partial(build, ref=ref))


register_family("text", "hf", functools.partial(_family, "text"))
register_family("image", "hf", functools.partial(_family, "image"))
