"""``open_clip:<arch>:<pretrained tag>``: the image tower or the text tower of an OpenCLIP model.

CLIP features are strong frozen features for COCO-like labels. The image encoder is the model's
``visual`` tower (its projected embedding), preprocessed as the model's config says; the text encoder
is the rest (``encode_text``), with OpenCLIP's own tokenizer. Weights come from the Hugging Face cache
(downloaded there when the network allows), or a local checkpoint file (``--image-weights`` /
``--text-weights``). open_clip_torch is optional: ``pip install 'mlc[openclip]'``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import MlcError, WeightsError
from .base import TextEncoder, WholeImageEncoder
from .registry import EncoderSpec, register_family
from .transforms import ImagePreprocess, TextPreprocess
from .weights import (
    hf_cache_dir,
    hub_weights,
    load_strict,
    load_weights,
    read_state_dict,
    resolve_weights,
)


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise MlcError("open_clip:<arch>:<tag> encoders need open_clip_torch: pip install 'mlc[openclip]' "
                       "(or pip install open-clip-torch)") from e
    return open_clip


def _no_pickle(oc: Any) -> dict[str, bool]:
    """create_model's switch for torch.load(weights_only=True): ``weights_only`` (open_clip 3),
    ``load_weights_only`` (2.29-2.32); older ones have none, and torch >= 2.6 (mlc pins 2.14) defaults to it."""
    params = inspect.signature(oc.create_model).parameters
    return {k: True for k in ("weights_only", "load_weights_only") if k in params}


def _parse(rest: str) -> tuple[str, str | None]:
    arch, _, tag = rest.partition(":")
    return arch, (tag or None)


def _model(name: str, arch: str, tag: str | None, weights: Any, random_init: bool) -> tuple[nn.Module, str]:
    """The whole CLIP model (both towers) with its weights, and their source in words."""
    oc = _open_clip()
    if arch not in oc.list_models():
        raise MlcError(f"{name}: open_clip has no architecture {arch!r}; see open_clip.list_models()")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "initialized randomly" before any weights are loaded
    try:
        model = oc.create_model(arch, pretrained=None, **_no_pickle(oc))  # seeded by registry.build_encoder
    finally:
        root.setLevel(level)
    resolved = resolve_weights(name, weights=weights, random_init=random_init,
                               pretrained=lambda: _pretrained(name, arch, tag))
    return model.eval(), load_weights(model, name, resolved)


def _pretrained(name: str, arch: str, tag: str | None) -> tuple[Any, str]:
    """The weights ``tag`` names: the file in the Hugging Face cache, else a state dict downloaded when the
    network allows; a WeightsError saying what to fetch and where otherwise."""
    if tag is None:
        raise WeightsError(f"{name}: name the pretrained weights, open_clip:{arch}:<tag> (see "
                           f"open_clip.list_pretrained_tags_by_model({arch!r})), or pass --random-init")
    oc = _open_clip()
    cfg = oc.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise WeightsError(f"{name}: open_clip knows no weights {tag!r} for {arch}; see "
                           f"open_clip.list_pretrained_tags_by_model({arch!r})")
    hub = (cfg.get("hf_hub") or "").strip("/")
    return hub_weights(
        hub, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        lambda: oc.create_model(arch, pretrained=tag, **_no_pickle(oc)).state_dict(), f"open_clip:{arch}:{tag}",
        lambda why: f"{name}: no pretrained weights: not in the Hugging Face cache {hf_cache_dir()} and not "
        f"downloaded ({why}). Fetch them on a machine with network with `hf download {hub or arch} --local-dir DIR`, "
        f"then pass the checkpoint file (DIR/open_clip_model.safetensors) with --image-weights / --text-weights.")


class OpenClipImageEncoder(WholeImageEncoder):
    """The visual tower: (B, 3, H, W) -> (B, embed_dim) projected image embedding."""

    steps = ("visual",)

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.dim = int(getattr(visual, "output_dim", 0) or 0)

    def weights_module(self) -> nn.Module:
        return self.visual

    def pooled(self, x: Tensor) -> Tensor:
        return self.visual(x)


class OpenClipTextEncoder(TextEncoder):
    """The text tower: OpenCLIP token ids -> (B, embed_dim) projected caption embedding."""

    def __init__(self, clip: nn.Module, tokenizer: Any, tokenizer_source: str) -> None:
        super().__init__()
        clip.visual = None  # the text side only (encode_text never touches it)
        self.clip, self.tokenizer, self.tokenizer_source = clip, tokenizer, tokenizer_source
        self.context = int(clip.context_length)
        self.dim = int(clip.text_projection.shape[1] if isinstance(clip.text_projection, Tensor)
                       else clip.text_projection.out_features)
        self.preprocess = TextPreprocess(max_length=self.context, lowercase=True, pooling="cls")

    def weights_module(self) -> nn.Module:
        return self.clip

    def options(self) -> dict[str, Any]:
        return {}

    def tokenize(self, captions: Sequence[str]) -> dict[str, Tensor]:
        ids = self.tokenizer([str(c) for c in captions])  # (B, context) int64, 0-padded
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # encode_text adds positional embeddings for the full context: pad a trimmed batch back with 0s
        pad = self.context - input_ids.shape[1]
        if pad > 0:
            input_ids = nn.functional.pad(input_ids, (0, pad))
        return self.clip.encode_text(input_ids)

    def top_block_parameters(self, n: int) -> Any:
        blocks = list(self.clip.transformer.resblocks)
        params = [p for b in blocks[max(0, len(blocks) - n):] for p in b.parameters()] if n > 0 else []
        if n > 0:
            params += list(self.clip.ln_final.parameters())
            params += [self.clip.text_projection] if isinstance(self.clip.text_projection, nn.Parameter) else []
        return iter(params)

    def save_extra(self, folder: Path) -> None:
        pass  # the tokenizer is OpenCLIP's own, rebuilt from the architecture name


def _preprocess(visual: nn.Module) -> ImagePreprocess:
    cfg = visual.preprocess_cfg
    size = cfg["size"][0] if isinstance(cfg["size"], list | tuple) else int(cfg["size"])
    interp = cfg.get("interpolation", "bicubic")
    return ImagePreprocess(resize=size, crop=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                           interpolation=interp if interp in ("nearest", "bilinear", "bicubic") else "bicubic")


def _tower(spec: EncoderSpec, weights: Any, random_init: bool, rest: str,
           wrap: Callable[[Any, str], Any], module: Callable[[Any], nn.Module]) -> tuple[Any, str]:
    """(encoder, weights source): the open_clip model built, ``wrap``ped into one tower's encoder, and the
    tower's weights loaded from a folder an mlc encoder was saved in (its model.safetensors holds the tower alone;
    ``module`` picks what they fill)."""
    arch, tag = _parse(rest)
    saved = weights is not None and Path(weights).is_dir()
    model, source = _model(spec.name, arch, tag, None if saved else weights, random_init or saved)
    enc = wrap(model, arch)
    if saved:
        load_strict(module(enc), read_state_dict(weights), (), f"{spec.name}: {weights}")
        source = f"file:{Path(weights).resolve()}"
    return enc, source


def _create_image(spec: EncoderSpec, *, weights: Any, random_init: bool, rest: str) -> OpenClipImageEncoder:
    enc, source = _tower(spec, weights, random_init, rest, lambda m, _: OpenClipImageEncoder(m.visual),
                         lambda e: e.visual)
    enc.preprocess = _preprocess(enc.visual)
    enc.finish(spec.name, source, random_init, ())
    return enc


def _create_text(spec: EncoderSpec, *, weights: Any, random_init: bool, rest: str) -> OpenClipTextEncoder:
    enc, source = _tower(spec, weights, random_init, rest,
                         lambda m, arch: OpenClipTextEncoder(m, _open_clip().get_tokenizer(arch), f"open_clip:{arch}"),
                         lambda e: e.clip)
    enc.finish(spec.name, source, random_init, ())
    return enc


def _family(kind: str, rest: str) -> EncoderSpec:
    build = _create_text if kind == "text" else _create_image
    return EncoderSpec(f"open_clip:{rest}", kind, None, None, (),
                       f"open_clip:{rest} (Hugging Face cache or a file)", functools.partial(build, rest=rest))


register_family("image", "open_clip", functools.partial(_family, "image"))
register_family("text", "open_clip", functools.partial(_family, "text"))
