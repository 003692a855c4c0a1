"""The HDF5 cache on its own: round trip, resumable chunks, self-description, refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.cache import CacheMeta, CacheReader, CacheWriter, check_compatible, read_meta
from pipeline.errors import MismatchError, MlcError
from pipeline.identity import EncoderId, differences
from pipeline.labels import COCO18
from pipeline.runs import Contract


def make_meta(n: int, **kw) -> CacheMeta:
    base = dict(
        split="train", image_encoder="tiny-resnet", text_encoder="tiny-bert", image_weights="random-init",
        image_weights_hash="a" * 64, text_weights="random-init", text_weights_hash="b" * 64, random_init=True,
        image_preprocess={"crop": 64}, text_preprocess={"max_length": 32}, views=2, image_dim=8, text_dim=4,
        label_ids=COCO18.ids, label_names=COCO18.names, data_fingerprint="f" * 64, num_records=n,
    )
    base.update(kw)
    return CacheMeta.from_dict(base)  # the flat fields, as a cache stores them


def rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 2, 8)).astype(np.float16), "text": rng.normal(size=(n, 4)).astype(np.float16)}


def write_all(target, n=10, chunk=4, stop_after=None):
    ids = [f"{i}.jpg" for i in range(n)]
    labels = np.eye(len(COCO18), dtype=np.float32)[np.arange(n) % len(COCO18)]
    w = CacheWriter(target, make_meta(n), ids, labels, chunk_rows=chunk)
    data = rows(n)
    for k, c in enumerate(w.pending()):
        if stop_after is not None and k >= stop_after:
            return w, data
        s, e = w.bounds(c)
        w.commit(c, {name: arr[s:e] for name, arr in data.items()})
    w.finalize()
    return w, data


def test_round_trip(tmp_path):
    target = tmp_path / "c.h5"
    _, data = write_all(target)
    assert target.is_file() and not (tmp_path / "c.h5.partial").exists()
    with CacheReader(target) as r:
        assert r.meta == read_meta(target)
        assert r.meta.labels == COCO18
        assert r.image_ids == [f"{i}.jpg" for i in range(10)]
        np.testing.assert_array_equal(r.array("image"), data["image"])
        np.testing.assert_array_equal(r.array("text"), data["text"])
        assert r.array("image").dtype == np.float16
        # Rows in any order, repeats too: h5py alone refuses unsorted fancy indexes.
        np.testing.assert_array_equal(r.array("text", np.array([7, 2, 2, 9])), data["text"][[7, 2, 2, 9]])
        assert r.labels().shape == (10, 18)
        item = r.dataset(["image", "text"])[3]
        assert item["image"].shape == (2, 8) and item["labels"].shape == (18,)


def test_dataset_survives_dataloader_workers(tmp_path):
    target = tmp_path / "c.h5"
    _, data = write_all(target)
    r = CacheReader(target)
    r.labels()  # open the handle in the parent first: workers must not reuse it
    loader = torch.utils.data.DataLoader(r.dataset(["text"]), batch_size=3, num_workers=2)
    got = torch.cat([b["text"] for b in loader]).numpy()
    np.testing.assert_array_equal(got, data["text"])


def test_resume_keeps_committed_chunks(tmp_path):
    target = tmp_path / "c.h5"
    w, data = write_all(target, stop_after=2)
    assert not target.exists(), "an unfinished cache must never look finished"
    with pytest.raises(MlcError, match="unfinished extraction"):
        read_meta(target)
    w2 = CacheWriter(target, w.meta, w.image_ids, w.labels, chunk_rows=4)
    assert w2.resumed == 2 and w2.pending() == [2]
    s, e = w2.bounds(2)
    w2.commit(2, {k: v[s:e] for k, v in data.items()})
    w2.finalize()
    np.testing.assert_array_equal(CacheReader(target).array("image"), data["image"])


def test_stale_partial_of_other_plan_is_discarded(tmp_path):
    target = tmp_path / "c.h5"
    w, _ = write_all(target, stop_after=2)
    other = dataclasses.replace(w.meta, data_fingerprint="0" * 64)
    w2 = CacheWriter(target, other, w.image_ids, w.labels, chunk_rows=4)
    assert w2.resumed == 0 and w2.pending() == [0, 1, 2]


def test_commit_checks_rows_and_finalize_needs_all(tmp_path):
    w, data = write_all(tmp_path / "c.h5", stop_after=1)
    with pytest.raises(ValueError, match="rows"):
        w.commit(1, {"text": data["text"][:1]})
    with pytest.raises(MlcError, match="missing"):
        w.finalize()


def test_identity_and_compatibility():
    a = make_meta(5)
    b = dataclasses.replace(a, created="later", mlc_version="9", extra={"x": 1})
    assert a.differences(b) == []
    c = a.replace(text_weights_hash="c" * 64)
    assert c.text.weights_hash == "c" * 64 and c.image == a.image
    assert a.differences(c) == [f"text_weights_hash: this cache has {'b' * 64!r}, that one has {'c' * 64!r}"]
    check_compatible(a, {"image_encoder": "tiny-resnet", "label_ids": list(COCO18.ids)}, what="x")
    with pytest.raises(MismatchError, match="image_encoder"):
        check_compatible(a, {"image_encoder": "resnet50"}, what="x")
    with pytest.raises(MismatchError, match="label_ids"):
        check_compatible(a, {"label_ids": [1, 2, 3]}, what="x")


def test_the_meta_holds_two_identities_and_stores_them_flat_as_before():
    """A cache's meta is two EncoderIds in memory and mlc 0.2's flat fields on disk: old caches read alike."""
    a = make_meta(5, image_cut="stage3", precision="int8")
    flat = a.to_dict()
    assert list(flat)[:4] == ["split", "image_encoder", "text_encoder", "image_weights"]
    assert (flat["image_cut"], flat["text_cut"], flat["precision"], flat["random_init"]) == ("stage3", None, "int8",
                                                                                             True)
    assert a.image == EncoderId("tiny-resnet", "random-init", "a" * 64, True, {"crop": 64}, 8, "stage3", "int8")
    assert a.text.name == "tiny-bert" and a.text.precision == "int8" and a.text_dim == a.text.dim == 4
    assert CacheMeta.from_dict(flat) == a
    old = {k: v for k, v in flat.items() if k not in ("precision", "image_cut", "text_cut")}  # an older cache
    assert CacheMeta.from_dict(old).image.precision == "fp32" and CacheMeta.from_dict(old).image.cut is None
    with pytest.raises(AttributeError, match="no attribute 'image_nothing'"):
        _ = a.image_nothing
    assert {k: getattr(a, k) for k in flat} == {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}


def test_a_run_contract_is_the_compared_part_of_the_cache_identities():
    meta = make_meta(5)
    contract = Contract.of_cache(meta)
    stored = contract.to_dict()
    assert list(stored) == ["image_encoder", "text_encoder", "image_weights_hash", "text_weights_hash",
                            "image_preprocess", "text_preprocess", "image_dim", "text_dim", "label_ids", "precision"]
    assert Contract.from_dict(stored) == contract and contract.image_dim == 8
    contract.check(meta, what="the cache")
    with pytest.raises(MismatchError, match=r"the cache does not match the run: image_dim: the run has 8, it has 9"):
        contract.check(meta.replace(image_dim=9), what="the cache")
    assert differences({"a": 1, "b": (1, 2)}, {"a": 1, "b": [1, 2]}) == []  # as JSON reads them
    assert differences({"a": 1}, {"a": 2}, ("mine", "yours")) == ["a: mine has 1, yours has 2"]


def test_not_a_cache(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(MlcError, match="not an mlc feature cache"):
        read_meta(bad)
    with pytest.raises(MlcError, match="no such cache"):
        read_meta(tmp_path / "missing.h5")
