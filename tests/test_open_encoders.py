"""Open encoder names: timm:<model>, hf:<folder>, open_clip:<arch>:<tag>, through extract -> fit-head ->
submit; cuts equal the whole forward; missing weights say what to fetch; caches fuse."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_data_dir

from pipeline import encoders as E
from pipeline.cache import CacheReader
from pipeline.errors import MismatchError, MlcError, WeightsError
from pipeline.extract import ExtractConfig, extract
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.runs import RunDir
from pipeline.submit import SubmitConfig, submit

has_open_clip = pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip_torch absent")
BASE = dict(random_init=True, workers=0, encode_batch=8, backend="torch")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("open") / "tiny", n_train=24, n_test=4)


def round_trip(data: Path, tmp: Path, image: str, text: str, **kw) -> tuple[Path, Path]:
    """extract train -> fit-head -> submit; returns (train cache, submission)."""
    (train,) = extract(ExtractConfig.build(data_dir=data, cache_dir=tmp / "c", splits=("train",), image_encoder=image,
                                           text_encoder=text, **{**BASE, **kw}))
    fit_head(FitHeadConfig.build(caches=train, out=tmp / "run", epochs=2, folds=2), quiet=True)
    path, _ = submit(SubmitConfig.build(run=tmp / "run", data_dir=data, cache_dir=tmp / "c", workers=0,
                                        backend="torch"))
    assert len(path.read_text().splitlines()) == 5
    return train, path


# -------------------------------------------------------------------------------------------- timm


def test_timm_model_round_trip_and_cuts(data, tmp_path):
    enc = E.create_image_encoder("timm:test_resnet", random_init=True, seed=0)
    assert enc.cuts == ("act1", "layer1", "layer2", "layer3") and enc.dim == 96
    assert enc.preprocess.crop == 160  # from the model's pretrained config
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        whole = enc(x)
        for cut in enc.cuts:
            torch.testing.assert_close(enc.forward_top(enc.forward_trunk(x, cut), cut), whole)
    assert set(map(id, enc.trunk_parameters("layer2"))).isdisjoint(map(id, enc.top_parameters("layer2")))
    train, _ = round_trip(data, tmp_path, "timm:test_resnet", "tiny-bert")
    assert train.name.startswith("train__timm-test_resnet-")  # ':' kept out of file names
    assert CacheReader(train).meta.image_encoder == "timm:test_resnet"


def test_timm_models_without_a_plain_chain_offer_no_cuts():
    vit = E.create_image_encoder("timm:test_vit", random_init=True, seed=0)
    assert vit.cuts == () and vit.dim == 64
    with torch.inference_mode():
        assert vit(torch.randn(1, 3, 160, 160)).shape == (1, 64)
    with pytest.raises(MlcError, match="no trunk cut"):
        vit.forward_trunk(torch.randn(1, 3, 160, 160), "blocks.2")


def test_timm_saved_encoder_round_trips(tmp_path):
    enc = E.create_image_encoder("timm:test_efficientnet", random_init=True, seed=3)
    enc.save(tmp_path / "e")
    back = E.load_encoder(tmp_path / "e")
    assert back.weights_hash == enc.weights_hash and back.name == "timm:test_efficientnet"


def test_timm_missing_weights_say_what_to_fetch():
    with pytest.raises(WeightsError) as err:
        E.create_image_encoder("timm:test_convnext")
    msg = str(err.value)
    assert "hf download timm/test_convnext" in msg and "--image-weights" in msg
    with pytest.raises(MlcError, match="timm has no model"):
        E.create_image_encoder("timm:no_such_model_xyz", random_init=True)


# ---------------------------------------------------------------------------------- hugging face


@pytest.fixture(scope="module")
def hf_text_folder(tmp_path_factory) -> Path:
    """A tiny BERT saved as a Hugging Face folder (config, weights, tokenizer)."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("hf") / "tiny-bert-hf"
    tok = E.create_text_encoder("tiny-bert", random_init=True, seed=0).tokenizer
    config = BertConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_hf_text_folder_round_trip(data, tmp_path, hf_text_folder):
    name = f"hf:{hf_text_folder}"
    enc = E.create_text_encoder(name)
    assert enc.dim == 24 and enc.cuts == ("layer1",) and not enc.random_init
    assert enc.weights_source == f"file:{hf_text_folder}"
    cls = E.create_text_encoder(name, pooling="cls")
    batch = enc.tokenize(["a dog", "two cats on a sofa"])
    with torch.inference_mode():
        assert not torch.allclose(enc(**batch), cls(**batch))
        h = enc.forward_trunk(batch["input_ids"], batch["attention_mask"], "layer1")
        torch.testing.assert_close(enc.forward_top(h, batch["attention_mask"], "layer1"), enc(**batch))
    (train, _) = round_trip(data, tmp_path, "tiny-resnet", name, random_init=False,
                            image_weights=str(_tiny_resnet_file(tmp_path)))
    assert CacheReader(train).meta.text_encoder == name


def _tiny_resnet_file(tmp: Path) -> Path:
    path = tmp / "tiny-resnet"
    E.create_image_encoder("tiny-resnet", random_init=True, seed=0).save(path)
    return path


def test_hf_image_folder(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path / "tiny-vit"
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder)
    enc = E.create_image_encoder(f"hf:{folder}")
    assert enc.dim == 32 and enc.preprocess.crop == 32 and enc.preprocess.mean == (0.5, 0.5, 0.5)
    with torch.inference_mode():
        assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_hf_missing_hub_id_says_what_to_fetch(monkeypatch):
    monkeypatch.setenv("MLC_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"hf download sentence-transformers/no-such-model --local-dir DIR"):
        E.create_text_encoder("hf:sentence-transformers/no-such-model")


# -------------------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    import open_clip

    folder = tmp_path_factory.mktemp("clipcfg")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16,
                                           "head_width": 16},
           "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "mlc-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "open_clip:mlc-tiny-clip"


@has_open_clip
def test_open_clip_towers_round_trip(data, tmp_path, tiny_clip):
    image = E.create_image_encoder(tiny_clip, random_init=True, seed=0)
    text = E.create_text_encoder(tiny_clip, random_init=True, seed=0)
    assert image.dim == text.dim == 16 and image.preprocess.crop == 32
    batch = text.tokenize(["a dog", "two cats on a red sofa"])
    assert batch["input_ids"].shape == (2, 24)
    with torch.inference_mode():
        full = text(**batch)
        trimmed = text(batch["input_ids"][:, :8], batch["attention_mask"][:, :8])  # the encode loop trims padding
    torch.testing.assert_close(trimmed, full)
    round_trip(data, tmp_path, tiny_clip, tiny_clip)
    with pytest.raises(WeightsError, match="name the pretrained weights"):
        E.create_image_encoder(tiny_clip)


# ------------------------------------------------------------------------------------ fused caches


def test_two_caches_fuse_and_a_mismatched_pair_is_refused(data, tmp_path):
    common = dict(data_dir=data, cache_dir=tmp_path / "c", splits=("train",), text_encoder="tiny-bert", **BASE)
    (a,) = extract(ExtractConfig.build(image_encoder="tiny-resnet", **common))
    (b,) = extract(ExtractConfig.build(image_encoder="timm:test_resnet", **common))
    out = tmp_path / "fused"
    fit_head(FitHeadConfig.build(caches=(a, b), out=out, epochs=2, folds=2), quiet=True)
    head = json.loads((out / "head.json").read_text())
    assert (head["image_dim"], head["text_dim"]) == (128 + 96, 32)  # the shared tiny-bert feeds once
    entries = json.loads((out / "features.json").read_text())
    assert [(e["image"], e["text"]) for e in entries] == [(True, True), (True, False)]
    path, _ = submit(SubmitConfig.build(run=out, data_dir=data, cache_dir=tmp_path / "c", workers=0, backend="torch"))
    assert len(list((tmp_path / "c").rglob("test__*.h5"))) == 2 and len(path.read_text().splitlines()) == 5
    run = RunDir(out).load()
    assert run.heads[0].image_dim == 224
    # Another data folder's cache: other rows
    other = make_data_dir(tmp_path / "other", n_train=20, n_test=2, seed=1)
    (c,) = extract(ExtractConfig.build(**{**common, "data_dir": other}, image_encoder="timm:test_resnet"))
    with pytest.raises(MismatchError, match=r"cannot be fused with .*: other rows \(20 vs 24"):
        fit_head(FitHeadConfig.build(caches=(a, c), out=tmp_path / "bad", epochs=1, folds=2), quiet=True)
    assert not (tmp_path / "bad").exists()
    np.testing.assert_array_equal(CacheReader(a).labels(), CacheReader(b).labels())


def test_a_load_error_becomes_one_line_even_without_a_message():
    from pipeline.encoders.weights import one_line

    assert one_line(OSError()) == "OSError: "  # an empty message once raised IndexError in the handler
    assert one_line(ValueError("  first line\nsecond line")) == "ValueError: first line"
    assert one_line(RuntimeError("x" * 500)) == "RuntimeError: " + "x" * 200
