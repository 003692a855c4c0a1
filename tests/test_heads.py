"""heads.py and losses.py: every head and loss learns a tiny two-modality problem; contracts hold."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from pipeline import metrics
from pipeline.errors import MlcError
from pipeline.heads import HEADS, create_head
from pipeline.losses import (
    LOSSES,
    AsymmetricLoss,
    create_loss,
    inverse_frequency_weights,
    pos_weight_from_labels,
)
from pipeline.thresholds import apply_thresholds, tune_global

DI, DT, C = 16, 12, 6


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread is faster than two fighting for a loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(seed: int = 0, n: int = 1200) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Label c is on when a linear score of the image plus one of the text clears a cut, so each
    modality alone is informative but only the pair determines the labels."""
    rng = np.random.default_rng(seed)
    xi, xt = rng.normal(size=(n, DI)), rng.normal(size=(n, DT))
    z = xi @ rng.normal(size=(DI, C)) / np.sqrt(DI) + xt @ rng.normal(size=(DT, C)) / np.sqrt(DT)
    y = (z > np.quantile(z, 0.7, axis=0)).astype(np.float32)  # ~30% positives per class
    return torch.tensor(xi, dtype=torch.float32), torch.tensor(xt, dtype=torch.float32), y


def _tokens(name: str) -> dict[str, int]:
    """The attention head reads token maps: here one token, the whole image vector."""
    return {"token_dim": DI} if HEADS[name].tokens else {}


def _chance_f1(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Best constant prediction: the k most frequent training labels for every image, best k."""
    order = np.argsort(-y_train.sum(0))
    best = 0.0
    for k in range(1, y_train.shape[1] + 1):
        pred = np.zeros_like(y_test)
        pred[:, order[:k]] = 1
        best = max(best, metrics.samples_f1(y_test, pred))
    return best


def _train_eval(head_name: str, loss_name: str, steps: int = 200, **loss_kw: object) -> tuple[float, float]:
    """Full-batch Adam on 800 images; threshold tuned on train scores; samples-F1 on 400 held out."""
    torch.manual_seed(0)
    xi, xt, y = _data()
    tr, te = slice(0, 800), slice(800, None)
    head = create_head(head_name, image_dim=DI, text_dim=DT, num_classes=C, hidden=32, dropout=0.1,
                       **_tokens(head_name))
    loss_fn = create_loss(loss_name, **loss_kw)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    target = torch.from_numpy(y[tr])
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(head(xi[tr], xt[tr]), target)
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        s_tr = torch.sigmoid(head(xi[tr], xt[tr])).numpy()
        s_te = torch.sigmoid(head(xi[te], xt[te])).numpy()
    t = tune_global(y[tr], s_tr)
    return metrics.samples_f1(y[te], apply_thresholds(s_te, t)), _chance_f1(y[tr], y[te])


# attention: test_attention.py; blend (a best run's members, not layers): test_best.py
LAYERED = sorted(n for n in HEADS if n != "blend")


@pytest.mark.parametrize("name", [n for n in LAYERED if not HEADS[n].tokens])
def test_each_head_learns(name: str) -> None:
    f1, chance = _train_eval(name, "bce")
    # fusion heads see everything; single-modality ablations see half the signal
    margin = 0.2 if len(HEADS[name].modalities) == 2 else 0.05
    assert f1 > chance + margin, (name, f1, chance)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_loss_learns(loss: str) -> None:
    f1, chance = _train_eval("concat", loss)
    assert f1 > chance + 0.2, (loss, f1, chance)


def test_bce_with_pos_weight_learns() -> None:
    _, _, y = _data()
    f1, chance = _train_eval("sum", "bce", pos_weight=pos_weight_from_labels(y[:800]))
    assert f1 > chance + 0.2


def test_image_head_ignores_text() -> None:
    head = create_head("image", image_dim=DI, text_dim=DT, num_classes=C).eval()
    xi = torch.randn(5, DI)
    a = head(xi, torch.randn(5, DT))
    torch.testing.assert_close(a, head(xi, torch.randn(5, DT)))
    torch.testing.assert_close(a, head(xi, None))
    assert head.modalities == ("image",)
    text = create_head("text", image_dim=DI, text_dim=DT, num_classes=C).eval()
    xt = torch.randn(5, DT)
    torch.testing.assert_close(text(torch.randn(5, DI), xt), text(None, xt))


@pytest.mark.parametrize("name", LAYERED)
def test_config_round_trip_and_float16(name: str) -> None:
    torch.manual_seed(0)
    head = create_head(name, image_dim=DI, text_dim=DT, num_classes=C, hidden=24, dropout=0.3, **_tokens(name)).eval()
    cfg = json.loads(json.dumps(head.config()))  # survives a run folder's JSON
    rebuilt = create_head(**cfg).eval()
    rebuilt.load_state_dict(head.state_dict())
    assert rebuilt.config() == head.config()
    xi, xt = torch.randn(4, DI), torch.randn(4, DT)
    out = head(xi, xt)
    assert out.shape == (4, C) and out.dtype == torch.float32
    torch.testing.assert_close(rebuilt(xi, xt), out)
    out16 = head(xi.half(), xt.half())  # float16 straight from a cache
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out, atol=1e-2, rtol=1e-2)


def test_head_input_errors() -> None:
    with pytest.raises(MlcError, match="unknown head"):
        create_head("nope", image_dim=DI, text_dim=DT, num_classes=C)
    head = create_head("concat", image_dim=DI, text_dim=DT, num_classes=C)
    with pytest.raises(ValueError, match="text"):
        head(torch.randn(2, DI), None)
    with pytest.raises(ValueError, match="image"):
        head(torch.randn(2, DI + 1), torch.randn(2, DT))


def test_asl_matches_the_paper_formula() -> None:
    logits = torch.tensor([[2.0, -1.0, -4.0], [0.5, 1.5, -0.2]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    p = torch.sigmoid(logits)
    pm = (p - 0.05).clamp(min=0)  # shifted probability for negatives
    pos = y * (1 - p) ** 1 * torch.log(p)
    neg = (1 - y) * pm**4 * torch.log((1 - pm).clamp(min=1e-8))
    expected = -(pos + neg).sum()
    loss_sum = AsymmetricLoss(reduction="sum")(logits, y)
    torch.testing.assert_close(loss_sum, expected)
    torch.testing.assert_close(create_loss("asl")(logits, y), expected / 2)  # mean over the batch
    # a very easy negative (p < clip) contributes nothing, gradient included
    x = torch.tensor([[-5.0]], requires_grad=True)
    AsymmetricLoss(reduction="sum")(x, torch.zeros(1, 1)).backward()
    assert x.grad is not None and x.grad.abs().item() == 0.0


def test_asl_without_focusing_or_clip_is_bce() -> None:
    logits, y = torch.randn(8, C), (torch.rand(8, C) < 0.3).float()
    asl = create_loss("asl", gamma_neg=0, gamma_pos=0, clip=0)
    torch.testing.assert_close(asl(logits, y), torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y, reduction="sum") / 8)


def test_asl_float16_logits() -> None:
    out = create_loss("asl")(torch.randn(4, C).half(), (torch.rand(4, C) < 0.3).half())
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_soft_margin_equals_mean_bce_and_registry_errors() -> None:
    logits, y = torch.randn(8, C), (torch.rand(8, C) < 0.3).float()
    torch.testing.assert_close(create_loss("soft-margin")(logits, y), create_loss("bce")(logits, y))
    with pytest.raises(MlcError, match="unknown loss"):
        create_loss("focal")
    for name in ("asl", "soft-margin"):
        with pytest.raises(MlcError, match="pos_weight"):
            create_loss(name, pos_weight=torch.ones(C))


def test_pos_weight_from_labels() -> None:
    y = np.zeros((100, 4))
    y[:10, 0] = 1  # 10 pos, 90 neg -> 9
    y[:1, 1] = 1  # 1 pos -> 99, capped at 10
    y[:, 2] = 1  # all positive -> 0, floored at 1/10
    # column 3: no positives -> cap
    w = pos_weight_from_labels(y, cap=10.0)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([9.0, 10.0, 0.1, 10.0]))
    loss = create_loss("bce", pos_weight=w)
    assert torch.isfinite(loss(torch.randn(3, 4), torch.ones(3, 4)))


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_inverse_frequency_weights(reduce: str) -> None:
    y = np.zeros((10, 3))
    y[:, 0] = 1  # common (every image)
    y[:2, 1] = 1  # rare, always with the common one
    y[5, 2] = 1  # rarest
    w = inverse_frequency_weights(y, reduce=reduce)
    assert w.shape == (10,) and w.mean() == pytest.approx(1.0)
    assert w[5] > w[0] > 0 and w[0] > w[9] * 0.99  # rare beats common; plain rows equal
    assert w[0] > w[3]  # image 0 carries a rare label, image 3 only the common one
    if reduce == "max":  # image 0 counts as much as its rarest label, 5 / 1 of a common-only image
        assert w[0] / w[3] == pytest.approx(5.0)
    else:
        assert w[0] / w[3] == pytest.approx(3.0)  # mean of 1/1 and 1/0.2
    y[9] = 0  # an unlabelled image gets the smallest labelled weight
    assert inverse_frequency_weights(y)[9] == pytest.approx(inverse_frequency_weights(y).min())
