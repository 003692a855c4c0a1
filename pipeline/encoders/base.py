"""The one contract every encoder keeps, image or text.

An ``Encoder`` is an ``nn.Module`` in eval mode that knows its registry ``name``, its output
``dim``, its ``preprocess``ing, where its weights came from (``weights_source``) and their sha256
(``weights_hash``, over exactly what :meth:`Encoder.save` writes), and its named trunk ``cuts``:
``forward_trunk`` runs the bottom up to a cut, ``forward_top`` the rest, so a cache of trunk
activations plus the top equals the whole forward. ``trunk_parameters``/``top_parameters``/
``top_block_parameters`` give the parameter groups to freeze or train.

``save(folder)`` writes ``encoder.json`` + ``model.safetensors`` (+ tokenizer files for text);
:func:`pipeline.encoders.load_encoder` reads such a folder back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..atomic import write_json, write_safetensors
from ..errors import MlcError, OutputError
from ..identity import EncoderId
from ..reading import JSON_BYTES, read_text
from .transforms import ImagePreprocess, TextPreprocess
from .weights import WEIGHTS_FILE, state_dict_hash

ENCODER_FILE = "encoder.json"


class Encoder(nn.Module):
    """Base of image and text encoders: identity, weights hash, save, cuts."""

    kind: ClassVar[str]  # "image" | "text"
    name: str
    dim: int
    cuts: tuple[str, ...]
    weights_source: str
    weights_hash: str
    random_init: bool

    def finish(self, name: str, weights_source: str, random_init: bool, cuts: Sequence[str]) -> None:
        """Record identity and hash the weights; called once the weights are loaded."""
        self.name, self.weights_source, self.random_init, self.cuts = name, weights_source, random_init, tuple(cuts)
        self.rehash()
        self.eval()

    def rehash(self) -> str:
        """Hash the weights again (after training changed them); returns the new hash."""
        self.weights_hash = state_dict_hash(self.weights_module())
        return self.weights_hash

    def weights_module(self) -> nn.Module:
        """The module whose state dict is saved and hashed."""
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``create_*_encoder`` that rebuild this encoder (beyond its weights)."""
        return {}

    def describe(self) -> EncoderId:
        """What a cache or run records about this encoder (uncut, fp32)."""
        return EncoderId.of(self)

    def save(self, folder: str | os.PathLike[str]) -> None:
        """``encoder.json`` + ``model.safetensors`` (and whatever else the encoder needs) into ``folder``."""
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_safetensors(folder / WEIGHTS_FILE, self.weights_module())
            self.save_extra(folder)
            write_json(folder / ENCODER_FILE, {"kind": self.kind, "name": self.name, "options": self.options(),
                                               "weights_hash": state_dict_hash(self.weights_module())})
        except OSError as e:  # mkdir, and the tokenizer's / model config's own writers (ours raise OutputError)
            raise OutputError(str(folder), e) from e

    def save_extra(self, folder: Path) -> None:
        """Files besides the weights (tokenizer, model config)."""

    def no_cut(self, cut: str, hint: str = "") -> MlcError:
        return MlcError(f"{self.name} has no trunk cut {cut!r}; offered: {', '.join(self.cuts) or 'none'}{hint}")

    def trunk_parameters(self, cut: str) -> Iterator[nn.Parameter]:
        """Parameters up to and including ``cut`` (the ones a trunk cache freezes)."""
        raise self.no_cut(cut)

    def top_parameters(self, cut: str) -> Iterator[nn.Parameter]:
        """Parameters after ``cut``."""
        raise self.no_cut(cut)

    def top_block_parameters(self, n: int) -> Iterator[nn.Parameter]:
        """Parameters of the last ``n`` blocks (``mlc finetune --unfreeze N``)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={getattr(self, 'name', '?')}, dim={self.dim}, weights={getattr(self, 'weights_source', '?')}"


class ImageEncoder(Encoder):
    """(B, 3, H, W) normalised images -> (B, dim) globally average-pooled features, no classifier.

    The network is a chain of named steps (``steps``); a cut is a step name, and the trunk runs the
    steps up to and including it. Submodules keep the names of the original architecture, so its
    ``state_dict()`` (minus the classifier) loads unchanged.
    """

    kind = "image"
    preprocess: ImagePreprocess
    steps: tuple[str, ...]

    def run_step(self, i: int, x: Tensor) -> Tensor:
        raise NotImplementedError

    def step_modules(self, i: int) -> list[nn.Module]:
        raise NotImplementedError

    def _cut_index(self, cut: str) -> int:
        if cut not in self.steps[:-1]:
            raise self.no_cut(cut, f" (any of {', '.join(self.steps[:-1])} works)")
        return self.steps.index(cut)

    def _run(self, x: Tensor, start: int, stop: int) -> Tensor:
        for i in range(start, stop):
            x = self.run_step(i, x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, dim) features."""
        return self.forward_top(x, None)

    def forward_trunk(self, x: Tensor, cut: str) -> Tensor:
        """(B, 3, H, W) -> (B, C, h, w) activations after the step named ``cut``."""
        return self._run(x, 0, self._cut_index(cut) + 1)

    def forward_top(self, h: Tensor, cut: str | None) -> Tensor:
        """Activations at ``cut`` (None: the input images) -> (B, dim) features: the last map average-pooled,
        or with ``preprocess.pooling == "tokens"`` its h'*w' positions flattened position-major."""
        start = 0 if cut is None else self._cut_index(cut) + 1
        x = self._run(h, start, len(self.steps))  # (B, C, h', w')
        if self.preprocess.pooling == "tokens":
            return x.flatten(2).transpose(1, 2).flatten(1)  # (B, C, h'w') -> (B, h'w', C) -> (B, h'w' * C)
        return x.mean(dim=(2, 3))  # global average pool -> (B, C); fine for channels_last too

    def options(self) -> dict[str, Any]:
        return {"pooling": "tokens"} if self.preprocess.pooling == "tokens" else {}

    @torch.no_grad()
    def use_tokens(self) -> None:
        """Output the last map's positions (``pooling="tokens"``): ``dim`` becomes h'*w' * C at the crop size."""
        p = next(self.parameters())
        x = torch.zeros(1, 3, self.preprocess.crop, self.preprocess.crop, device=p.device, dtype=p.dtype)
        c, h, w = self._run(x, 0, len(self.steps)).shape[1:]  # (C, h', w'): eval mode (finish() set it)
        self.preprocess = dataclasses.replace(self.preprocess, pooling="tokens", token_dim=int(c))
        self.dim = int(c * h * w)

    def _step_parameters(self, steps: range) -> Iterator[nn.Parameter]:
        for i in steps:
            for m in self.step_modules(i):
                yield from m.parameters()

    def trunk_parameters(self, cut: str) -> Iterator[nn.Parameter]:
        return self._step_parameters(range(self._cut_index(cut) + 1))

    def top_parameters(self, cut: str) -> Iterator[nn.Parameter]:
        return self._step_parameters(range(self._cut_index(cut) + 1, len(self.steps)))

    def top_block_parameters(self, n: int) -> Iterator[nn.Parameter]:
        """E.g. n=2 is ResNet's layer3 + layer4, or EfficientNet-Lite's last MBConv block + head conv."""
        return self._step_parameters(range(max(0, len(self.steps) - n), len(self.steps)))

    @torch.no_grad()
    def trunk_shape(self, cut: str) -> tuple[int, ...]:
        """(C, h, w) of ``forward_trunk`` for one image of the preprocess crop size."""
        p = next(self.parameters())
        x = torch.zeros(1, 3, self.preprocess.crop, self.preprocess.crop, device=p.device, dtype=p.dtype)
        was_training = self.training
        self.eval()
        try:
            return tuple(self.forward_trunk(x, cut).shape[1:])
        finally:
            self.train(was_training)


class WholeImageEncoder(ImageEncoder):
    """An image network mlc does not cut (a Hugging Face or OpenCLIP tower): one step, the whole network.

    Subclasses give ``weights_module()`` (the network) and ``pooled(x)``: (B, 3, H, W) -> (B, dim)."""

    def pooled(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def run_step(self, i: int, x: Tensor) -> Tensor:
        return x  # never reached: with one step there is no cut, and forward_top runs the whole network

    def step_modules(self, i: int) -> list[nn.Module]:
        return [self.weights_module()]

    def forward_top(self, h: Tensor, cut: str | None) -> Tensor:
        if cut is not None:
            raise self.no_cut(cut)
        return self.pooled(h)


class TextEncoder(Encoder):
    """Captions -> (B, dim) vectors: ``tokenize`` then ``forward(input_ids, attention_mask)``."""

    kind = "text"
    preprocess: TextPreprocess
    tokenizer: Any
    tokenizer_source: str

    def tokenize(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """input_ids and attention_mask, (B, T) int64, padded to the longest caption, cut at max_length."""
        texts = [str(c) for c in captions]
        if self.preprocess.lowercase:
            texts = [t.lower() for t in texts]
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.preprocess.max_length,
                             return_tensors="pt", return_token_type_ids=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_trunk(self, input_ids: Tensor, attention_mask: Tensor, cut: str) -> Tensor:
        """(B, T) -> (B, T, H) token states at ``cut``."""
        raise self.no_cut(cut)

    def forward_top(self, hidden: Tensor, attention_mask: Tensor, cut: str) -> Tensor:
        """(B, T, H) token states at ``cut`` -> (B, dim)."""
        raise self.no_cut(cut)

    def options(self) -> dict[str, Any]:
        return {"pooling": self.preprocess.pooling}

    def save_extra(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


def read_encoder_json(folder: Path) -> dict[str, Any]:
    """``encoder.json`` of a saved encoder, checked; MlcError naming the file otherwise."""
    path = Path(folder) / ENCODER_FILE
    try:
        d = json.loads(read_text(path, limit=JSON_BYTES, what="encoder.json"))
    except (OSError, ValueError) as e:
        raise MlcError(f"{path}: not a saved mlc encoder ({e})") from e
    if not isinstance(d, dict) or d.get("kind") not in ("image", "text") or not isinstance(d.get("name"), str) \
            or not isinstance(d.get("options", {}), dict):
        raise MlcError(f"{path}: expected {{kind: image|text, name: str, options: {{}}}}")
    return d
