"""Test-only encoders, registered by the tests rather than shipped: ``tiny-resnet`` (image, 128-d) and
``tiny-bert`` (text, 32-d), random weights in a few hundred kB, so a whole pipeline runs in seconds.

conftest.py names this file in ``$MLC_PLUGINS`` (the registry imports it at the first encoder lookup),
so CLI subprocesses that the tests spawn know these names too.
"""

from __future__ import annotations

import functools
import string
import tempfile
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock

from pipeline.encoders import EncoderSpec, ImagePreprocess, TextPreprocess
from pipeline.encoders.image import ResNetEncoder, create_stepped
from pipeline.encoders.registry import register
from pipeline.encoders.text import create_bert
from pipeline.encoders.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.encoders.weights import NO_REMOTE_CODE, quiet_transformers


class _TinyResNet(ResNet):
    """A narrow ResNet-10 (BasicBlock, [1, 1, 1, 1], widths w..8w) for tests; torchvision hard-codes 64.

    Width 16, not 8: torch 2.14.1's CPU backward of an 8->16-channel 1x1 stride-2 convolution in
    channels_last corrupts the heap once the batch size changes (finetune's last, smaller batch).
    """

    def __init__(self, width: int = 16) -> None:
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
        with quiet_transformers():
            tok = BertTokenizerFast.from_pretrained(d, local_files_only=True, model_max_length=128, **NO_REMOTE_CODE)
    return tok, "generated:tiny-vocab"


def _tiny_config() -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=len(_tiny_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128)


register(EncoderSpec("tiny-resnet", "image", 128, ImagePreprocess(72, 64, IMAGENET_MEAN, IMAGENET_STD),
                     ("layer2", "layer3"), "none: random init for tests",
                     functools.partial(create_stepped, architecture=lambda: ResNetEncoder(_TinyResNet()), load=None,
                                       ignore=("fc.",))))
register(EncoderSpec("tiny-bert", "text", 32, TextPreprocess(128, True, "mean"), ("layer1",),
                     "none: random init for tests",
                     functools.partial(create_bert, locate=None, config=_tiny_config, tokenizer=_tiny_tokenizer)))


def _tiny_config_b() -> Any:
    """tiny-bert-b: another tiny text encoder (24-d), a best run's extra text encoder in tests."""
    from transformers import BertConfig

    return BertConfig(vocab_size=len(_tiny_vocab()), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=48, max_position_embeddings=128)


register(EncoderSpec("tiny-bert-b", "text", 24, TextPreprocess(128, True, "mean"), ("layer0",),
                     "none: random init for tests",
                     functools.partial(create_bert, locate=None, config=_tiny_config_b, tokenizer=_tiny_tokenizer)))
