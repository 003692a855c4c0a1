"""Image token maps (``--image-pooling tokens``) and the attention head (``--head attention``) over them:
the encoder side, the head, fit-head / submit / mlc run, and an ONNX export of such a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_data_dir
from typer.testing import CliRunner

from pipeline.cache import CacheReader
from pipeline.cli import app
from pipeline.encoders import create_image_encoder, load_encoder
from pipeline.errors import MlcError
from pipeline.extract import ExtractConfig, extract
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.heads import create_head
from pipeline.metrics import samples_f1
from pipeline.predictor import load
from pipeline.runs import RunDir


def _tiny(pooling: str = "avg"):
    return create_image_encoder("tiny-resnet", random_init=True, seed=0, pooling=pooling)


def test_a_token_map_is_the_last_map_flattened_and_its_mean_is_the_pooled_vector(tmp_path):
    avg, tok = _tiny(), _tiny("tokens")
    crop = tok.preprocess.crop
    positions = (-(-crop // 32)) ** 2  # a ResNet's map: stride 32
    assert tok.dim == positions * avg.dim and tok.preprocess.token_dim == avg.dim
    x = torch.randn(3, 3, crop, crop)
    with torch.no_grad():
        pooled, tokens = avg(x), tok(x)
    assert tokens.shape == (3, positions * avg.dim)
    torch.testing.assert_close(tokens.view(3, positions, avg.dim).mean(1), pooled, atol=1e-5, rtol=1e-5)
    # recorded where caches and runs look, and only when set: pooled caches keep their old record (identity)
    assert tok.preprocess.to_dict()["pooling"] == "tokens" and "pooling" not in avg.preprocess.to_dict()
    assert tok.options() == {"pooling": "tokens"} and avg.options() == {}
    tok.save(tmp_path / "enc")
    again = load_encoder(tmp_path / "enc")
    assert again.dim == tok.dim and again.preprocess == tok.preprocess


def test_an_encoder_run_whole_has_no_token_map_and_says_so():
    with pytest.raises(MlcError, match="run whole.*step by step"):
        create_image_encoder("timm:resnet18", random_init=True, pooling="tokens")


def test_each_head_refuses_the_other_kind_of_image_features():
    with pytest.raises(MlcError, match="attention"):
        create_head("concat", image_dim=4 * 8, text_dim=6, num_classes=3, token_dim=8)
    with pytest.raises(MlcError, match="--image-pooling tokens"):
        create_head("attention", image_dim=8, text_dim=6, num_classes=3, hidden=16)
    with pytest.raises(ValueError, match="whole number"):
        create_head("attention", image_dim=30, text_dim=6, num_classes=3, hidden=16, token_dim=8)


@pytest.fixture
def one_thread():
    """A tiny model: one intra-op thread is faster than two fighting for a loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_the_attention_head_sees_where_things_are(one_thread):
    """Label k is on when the token at position k points along v: the mean of the tokens cannot tell which
    position did, the attention head (position embeddings, label queries) learns it."""
    g = torch.Generator().manual_seed(0)
    n, positions, dim = 384, 4, 8
    tokens = torch.randn(n, positions, dim, generator=g)
    v = torch.randn(dim, generator=g)
    y = (tokens @ v > 0).float()  # (n, 4): one label per position
    text = torch.zeros(n, 0)
    torch.manual_seed(0)
    head = create_head("attention", image_dim=positions * dim, text_dim=0, num_classes=positions, hidden=32,
                       dropout=0.0, token_dim=dim)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(250):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(tokens.flatten(1), text), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        pred = (head(tokens.flatten(1), text) > 0).numpy()
        moved = head(tokens.roll(1, dims=1).flatten(1), text)  # the same tokens, other positions
    assert samples_f1(y.numpy(), pred) > 0.9
    assert not torch.allclose(moved, head(tokens.flatten(1), text))


@pytest.fixture(scope="module")
def token_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    data = make_data_dir(root / "tiny", n_train=30, n_test=4)
    train, test = extract(ExtractConfig.build(data_dir=data, cache_dir=root / "cache", image_encoder="tiny-resnet",
                                        text_encoder="tiny-bert", random_init=True, workers=0, backend="torch",
                                        image_pooling="tokens"))
    return {"data": data, "train": train, "test": test, "root": root}


@pytest.fixture(scope="module")
def attention_run(token_caches):
    run = token_caches["root"] / "run"
    metrics = fit_head(FitHeadConfig.build(caches=(token_caches["train"],), out=run, head="attention", hidden=32,
                                           epochs=1, folds=2), quiet=True)
    assert 0.0 <= metrics["samples_f1"] <= 1.0
    return run


def test_fit_head_attention_over_a_token_cache_then_submit(token_caches, attention_run, tmp_path):
    meta = CacheReader(token_caches["train"]).meta
    assert "img-tokens" in token_caches["train"].name and meta.image_preprocess["token_dim"] == 128
    loaded = RunDir(attention_run).load()
    assert loaded.head_config["name"] == "attention" and loaded.head_config["token_dim"] == 128
    out = CliRunner().invoke(app, ["submit", str(attention_run), str(token_caches["data"]), "--cache-dir",
                                   str(token_caches["root"] / "cache"), "--out", str(tmp_path / "sub.csv"),
                                   "--backend", "torch"])
    assert out.exit_code == 0, out.output
    assert len((tmp_path / "sub.csv").read_text().splitlines()) == 1 + 4
    # the pooled heads refuse a token cache, naming what to do
    with pytest.raises(MlcError, match="--head attention"):
        fit_head(FitHeadConfig.build(caches=(token_caches["train"],), out=tmp_path / "concat", epochs=1, folds=0),
                 quiet=True)


def test_a_token_cache_is_not_fused_with_other_image_features(token_caches, tmp_path):
    (pooled,) = extract(ExtractConfig.build(data_dir=token_caches["data"], cache_dir=tmp_path / "cache",
                                      image_encoder="tiny-resnet", text_encoder="none", random_init=True,
                                      workers=0, backend="torch", splits=("train",), views=1,
                                      image_weights=None))
    with pytest.raises(MlcError, match="cannot be fused"):
        fit_head(FitHeadConfig.build(caches=(token_caches["train"], pooled), out=tmp_path / "run", head="attention",
                               hidden=32, epochs=1, folds=0), quiet=True)


@pytest.mark.slow  # two ONNX exports (~10 s): the fast suite keeps to 2 minutes
def test_an_attention_run_exports_to_onnx_and_predicts_the_same(token_caches, attention_run, tmp_path):
    from pipeline.export import ExportConfig, export

    photos = sorted((token_caches["data"] / "data").glob("*.jpg"))[:3]
    caps = ["a dog on a mat", "two cats", "a red bus"]
    want = load(attention_run, backend="torch").predict_proba(photos, caps)
    path, _ = export(ExportConfig.build(run=attention_run, out=tmp_path / "model"))
    got = load(path).predict_proba(photos, caps)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow  # the whole job again; test_workflow covers mlc run, this its --head attention
def test_mlc_run_head_attention_extracts_token_maps_itself(tmp_path):
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    out = tmp_path / "runs" / "attn"
    args = ["run", str(data), "--image-encoder", "tiny-resnet", "--text-encoder", "tiny-bert", "--random-init",
            "--workers", "0", "--backend", "torch", "--folds", "2", "--head", "attention",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert any("img-tokens" in p.name for p in (tmp_path / "cache").rglob("train__*.h5"))
    assert RunDir(out).load().head_config["name"] == "attention" and (out / "submission.csv").is_file()
    assert RunDir(out).load().config["train"]["batch_size"] == 16  # 30 rows: small batches, enough steps


def test_attention_batches_give_small_datasets_enough_steps():
    """The attention head is sized like every head (training.sized_training), from its training rows."""
    from pipeline.fit_head import FitHeadConfig, sized
    from pipeline.heads import HEADS

    def batch(rows: int) -> int:
        recipe = HEADS.about["attention"].recipe  # what mlc run --head attention trains with
        return sized(FitHeadConfig.build(caches=("x.h5",), folds=5, **recipe), rows).train.batch_size

    assert batch(808) == 40  # the 808-row sample: 646 rows a fold, ~16 steps an epoch, not 3
    assert batch(100) == 16 and batch(50000) == 256


def test_the_head_help_states_the_settings_mlc_run_trains_attention_with():
    import re

    from pipeline.heads import HEADS, HeadOptions

    made = HeadOptions.__dataclass_fields__["head"].metadata["help"]  # made from the head registry when shown
    text = made()
    for name, value in HEADS.about["attention"].recipe.items():
        said = re.search(rf"--{name.replace('_', '-')} ([^ ).]+(?:\.\d+)?)", text)
        assert said, name
        assert (said.group(1) == value) if isinstance(value, str) else float(said.group(1)) == value, name
