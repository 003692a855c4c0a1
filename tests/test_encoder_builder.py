"""The one encoder builder (registry.build_encoder): every family goes through it; it seeds random init, refuses random
weights unless asked, takes a folder an encoder was saved in as weights (one message when the folder is not one), and
keeps every identity that caches and runs record byte for byte (tests/encoder_cases.py recorded them from main)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from encoder_cases import FAST, IDENTITIES, PRETRAINED, SLOW, Case, build, hf_text_folder, identity
from safetensors.torch import load_file, save_file

from pipeline.errors import WeightsError


def _identity_of(case: Case, tmp_path: Path) -> None:
    assert identity(build(case, tmp_path), tmp_path) == IDENTITIES[case[0]], case[0]


@pytest.mark.parametrize("case", FAST, ids=[c[0] for c in FAST])
def test_the_identity_of_every_family_is_mains(case, tmp_path):
    _identity_of(case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=[c[0] for c in SLOW])
def test_the_identity_of_the_large_registered_encoders_is_mains(case, tmp_path):
    _identity_of(case, tmp_path)


@pytest.mark.real_weights
@pytest.mark.parametrize("case", PRETRAINED, ids=[c[0] for c in PRETRAINED])
def test_the_identity_of_the_pretrained_offline_encoders_is_mains(case, tmp_path):
    _identity_of(case, tmp_path)


def test_the_identity_check_can_fail(tmp_path):
    case = ("tiny-resnet", "image", "tiny-resnet", {"random_init": True, "seed": 1})  # another seed, other weights
    assert identity(build(case, tmp_path), tmp_path) != IDENTITIES["tiny-resnet"]


# ------------------------------------------------------------------------------------------------ seeding


def test_random_init_is_seeded_and_leaves_the_callers_random_state_alone():
    from pipeline import encoders as E

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = E.create_image_encoder("tiny-resnet", random_init=True)  # no seed: seed 0
    b = E.create_image_encoder("tiny-resnet", random_init=True, seed=0)
    c = E.create_image_encoder("tiny-resnet", random_init=True, seed=1)
    assert a.weights_hash == b.weights_hash != c.weights_hash
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_family_that_falls_back_to_random_weights_is_refused(monkeypatch):
    from pipeline import encoders as E
    from pipeline.encoders import registry

    spec = E.get_spec("image", "tiny-resnet")
    sneaky = dataclasses.replace(spec, build=lambda s, **kw: spec.build(s, **{**kw, "random_init": True}),
                                 weights="pypi:x")
    with pytest.raises(WeightsError, match="got random weights without random_init=True"):
        registry.build_encoder(sneaky)
    assert registry.build_encoder(sneaky, random_init=True).random_init  # asked for: fine


# ------------------------------------------------------------------------------- a saved folder is weights

# one case per family that saves (each ``Encoder.save`` writes what its family reads back)
SAVED = [c for c in FAST if c[0] in ("tiny-resnet", "tiny-resnet tokens", "tiny-bert cls", "lstm seed 2",
                                     "timm:test_resnet", "hf text folder", "hf image folder", "open_clip image",
                                     "open_clip text")]


def _saved(case: Case, tmp_path: Path) -> tuple[Any, Path, str]:
    enc = build(case, tmp_path)
    enc.save(tmp_path / "saved")
    return enc, tmp_path / "saved", enc.name


@pytest.mark.parametrize("case", SAVED, ids=[c[0] for c in SAVED])
def test_a_saved_encoder_folder_is_valid_weights_for_every_family(case, tmp_path):
    from pipeline import encoders as E
    from pipeline.encoders.registry import build_encoder

    enc, folder, name = _saved(case, tmp_path)
    again = build_encoder(E.get_spec(enc.kind, name), weights=folder, **enc.options())  # as --image-weights DIR
    assert (again.weights_hash, again.dim, again.random_init) == (enc.weights_hash, enc.dim, False)
    assert again.weights_source == f"file:{folder.resolve()}"
    assert E.load_encoder(folder).weights_hash == enc.weights_hash


def _not_valid(name: str, kind: str, folder: Path) -> str:
    return f"{name}: {folder.resolve()} is not a valid saved {kind} encoder"


@pytest.mark.parametrize("case", SAVED, ids=[c[0] for c in SAVED])
def test_a_damaged_saved_folder_is_one_message_for_every_family(case, tmp_path):
    from pipeline import encoders as E
    from pipeline.encoders.registry import build_encoder

    enc, folder, name = _saved(case, tmp_path)
    spec = E.get_spec(enc.kind, name)
    head = re.escape(_not_valid(name, enc.kind, folder))
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    sd = load_file(str(weights))
    key = sorted(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)[0]
    sd[key] = sd[key] + 1.0  # the same shapes, other numbers: loads, and is not what was saved
    save_file(sd, str(weights))
    with pytest.raises(WeightsError, match=head + ".*model.safetensors hashes to .*, not the .* encoder.json records"):
        build_encoder(spec, weights=folder, **enc.options())
    weights.write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(WeightsError, match=head):
        build_encoder(spec, weights=folder, **enc.options())
    weights.unlink()
    with pytest.raises(WeightsError, match=head + ".*model.safetensors is missing"):
        build_encoder(spec, weights=folder, **enc.options())
    (folder / "encoder.json").write_text("{not json")
    with pytest.raises(WeightsError, match=head + ".*not a saved mlc encoder"):
        build_encoder(spec, weights=folder, **enc.options())


def test_a_saved_folder_of_the_other_kind_is_refused(tmp_path):
    from pipeline import encoders as E

    E.create_text_encoder("tiny-bert", random_init=True, seed=0).save(tmp_path / "text")
    with pytest.raises(WeightsError, match=re.escape(_not_valid("tiny-resnet", "image", tmp_path / "text")) +
                       r".*it holds a text encoder \(tiny-bert\)"):
        E.create_image_encoder("tiny-resnet", weights=tmp_path / "text")


def test_a_saved_mpnet_folder_is_valid_weights(tmp_path):
    from test_mpnet import _tiny_model_folder

    from pipeline import encoders as E
    from pipeline.encoders.registry import build_encoder

    (tmp_path / "hf").mkdir()
    spec = dataclasses.replace(E.get_spec("text", "mpnet-base"), dim=None)  # the tiny model is 32-d, not 768
    enc = build_encoder(spec, weights=_tiny_model_folder(tmp_path / "hf"))
    enc.save(tmp_path / "saved")
    again = build_encoder(spec, weights=tmp_path / "saved")
    assert again.weights_hash == enc.weights_hash and not again.random_init
    (tmp_path / "saved" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=re.escape(_not_valid("mpnet-base", "text", tmp_path / "saved"))):
        build_encoder(spec, weights=tmp_path / "saved")


def test_a_hugging_face_model_saved_without_its_pooler_gets_none_not_a_random_one(tmp_path):
    """sentence-transformers' folders hold no pooler weights: transformers would make a random pooler, hashed
    differently at each load (so no cache of the model was ever reused); it is dropped instead."""
    from transformers import BertConfig, BertModel

    from pipeline import encoders as E

    folder = hf_text_folder(tmp_path / "hf")
    config = BertConfig.from_pretrained(folder)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)  # the same folder, no pooler weights
    a, b = E.create_text_encoder(f"hf:{folder}"), E.create_text_encoder(f"hf:{folder}")
    assert a.weights_hash == b.weights_hash and a.model.pooler is None
    batch = a.tokenize(["a dog"])
    with pytest.raises(WeightsError, match="has no pooler; use --text-pooling mean or cls"):
        E.create_text_encoder(f"hf:{folder}", pooling="pooler")(**batch)


def test_a_folder_its_caller_verified_is_not_hashed_again(tmp_path):
    """Inside a run or export whose manifest's sha256 the caller has just checked (RunDir.load, read_export), a
    saved encoder is read once, to build: the recorded-hash check is the manifest's there. Everywhere else the
    folder's own hash is checked (the damaged-folder test above)."""
    from pipeline import encoders as E

    enc = E.create_text_encoder("tiny-bert", random_init=True, seed=0)
    enc.save(tmp_path / "text")
    weights = tmp_path / "text" / "model.safetensors"
    sd = load_file(str(weights))
    key = sorted(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)[0]
    sd[key] = sd[key] + 1.0
    save_file(sd, str(weights))
    with pytest.raises(WeightsError, match="hashes to"):
        E.load_encoder(tmp_path / "text")
    loaded = E.load_encoder(tmp_path / "text", verified=True)  # the caller's manifest would have refused this file
    assert loaded.weights_hash != enc.weights_hash
