"""Decision rules that describe themselves (pipeline/decision.py's RULES): a rule defined here, in one test module
and registered as the package's rules are, reaches `--decision`'s help and choices, the auto choice, the run's
thresholds.json and the export (its client.py, or a clear refusal for a rule the client cannot carry) with no
edit elsewhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import _load, app
from pipeline.decision import (
    RULES,
    Decision,
    Rule,
    choose,
    client_source,
    decide,
    decisions,
    fit_rule,
    register,
    simplest_first,
)
from pipeline.errors import MlcError
from pipeline.evaluation import evaluate
from pipeline.fit_head import FitHeadConfig, fit_head
from pipeline.metrics import samples_f1
from pipeline.predictor import load
from pipeline.registries import document
from pipeline.schemas import decision as check_decision

runner = CliRunner()


# --- the toy rule module: what a new rule family's file holds -------------------------------------------------


def apply_top_k(probs, decision):
    """(N, C) -> (N, C) uint8: each image's k most probable labels. Numpy only: the client carries it."""
    p = np.asarray(probs, dtype=np.float64)
    k = int(decision["params"]["k"])
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    out = np.zeros(p.shape, dtype=np.uint8)
    np.put_along_axis(out, order, 1, axis=1)
    return out


def _fit_top_k(y: np.ndarray, probs: np.ndarray) -> Decision:
    ks = range(1, probs.shape[1] + 1)
    best = max(ks, key=lambda k: (samples_f1(y, apply_top_k(probs, {"params": {"k": k}})), -k))
    return Decision("top-k", (0.5,) * probs.shape[1], params={"k": best})


TOP_K = Rule("top-k", "each image's k most probable labels, k tuned for samples-F1", _fit_top_k, apply_top_k,
             rank=25, tuned=("k",), reads_thresholds=False)
# The same rule, declaring no numpy source: an ONNX export's client.py cannot carry it.
OPAQUE = Rule("top-k-opaque", "top-k without a client", lambda y, p: Decision("top-k-opaque", (0.5,) * p.shape[1],
                                                                              params={"k": 1}),
              apply_top_k, rank=26, client=None, reads_thresholds=False)


@pytest.fixture
def toy() -> Iterator[Rule]:
    """The toy rules registered as a rule module registers them, and gone after the test."""
    for rule in (TOP_K, OPAQUE):
        register(rule)
    yield TOP_K
    for rule in (TOP_K, OPAQUE):
        del RULES[rule.name], RULES.about[rule.name]


def _two_labels_each(n: int = 300, c: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two true labels per image, ranked first but at a scale of its own per image: no threshold and no
    calibrated top-k finds them, the top 2 always does."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, c), dtype=np.uint8)
    for i in range(n):
        y[i, rng.choice(c, 2, replace=False)] = 1
    scale = rng.uniform(0.05, 1.0, (n, 1))
    probs = scale * np.where(y == 1, 0.6 + 0.4 * rng.random((n, c)), 0.5 * rng.random((n, c)))
    return y, probs


# --- the tests ------------------------------------------------------------------------------------------------


def _help_of(command: str, option: str) -> str:
    cmd = _load(command)
    cmd = cmd.commands[command] if hasattr(cmd, "commands") else cmd
    return next(p.help for p in cmd.params if p.name == option)


def test_a_rule_in_one_module_reaches_help_choices_and_the_simplicity_order(toy):
    for command in ("fit-head", "run"):  # generated when shown: the toy, registered after import, is there
        assert "top-k: each image's k most probable labels, k tuned for samples-F1" in _help_of(command, "decision")
    assert "top-k" in decisions() and FitHeadConfig.build(caches=(Path("x.h5"),), decision="top-k").decision == "top-k"
    assert simplest_first().index("fixed") < simplest_first().index("top-k") < simplest_first().index("global")
    assert "| `top-k` | each image's k most probable labels, k tuned for samples-F1 | k | 25 | yes |" in document()
    assert "| `top-k-opaque` | top-k without a client | nothing | 26 | no: export it with --format safetensors |" \
        in document()
    with pytest.raises(MlcError, match="--decision must be one of auto, .*top-k"):
        FitHeadConfig.build(caches=(Path("x.h5"),), decision="top-j")


def test_without_its_module_the_rule_is_unknown():
    assert "top-k" not in decisions()
    with pytest.raises(ValueError, match="unknown decision rule 'top-k'"):
        decide(np.ones((1, 2)), {"rule": "top-k", "thresholds": [0.5, 0.5], "params": {"k": 1}})


def test_auto_scores_the_toy_cross_fitted_and_keeps_it_when_it_wins(toy):
    y, probs = _two_labels_each()
    choice = choose(y, probs, seed=1)
    assert set(choice.scores) == set(RULES) and "top-k" in choice.scores
    assert choice.rule == "top-k" and choice.scores["top-k"] == pytest.approx(1.0)
    assert choice.decision.params == {"k": 2} and max(v for k, v in choice.scores.items() if k != "top-k") < 0.95
    metrics, th = evaluate(y, probs, "auto", seed=1)
    assert th["mode"] == "top-k" and th["decision"] == {"rule": "top-k", "thresholds": [0.5] * 6, "params": {"k": 2}}
    assert metrics["decision"]["candidates"].keys() == set(RULES)
    assert check_decision(json.loads(json.dumps(th["decision"])), Path("thresholds.json"), "decision", 6)


def test_a_saved_toy_decision_round_trips_and_the_client_source_decides_alike(toy):
    y, probs = _two_labels_each(n=120, seed=2)
    d = fit_rule("top-k", y, probs)
    saved = json.loads(json.dumps(d.to_dict()))
    assert Decision.from_dict(saved) == d and (decide(probs, saved) == d.apply(probs)).all()
    ns: dict = {"np": np}
    exec(compile(client_source("top-k"), "client.py", "exec"), ns)  # noqa: S102 - our own source
    assert (ns["apply_decision"](probs.astype(np.float32), saved) == d.apply(probs.astype(np.float32))).all()
    with pytest.raises(ValueError, match="'top-k-opaque' declares no numpy source"):
        client_source("top-k-opaque")
    with pytest.raises(MlcError, match=r"decision\.params: expected an object of finite numbers"):
        check_decision({**saved, "params": {"k": "two"}}, Path("thresholds.json"), "decision", 6)


def _fit(cache: Path, out: Path, decision: str) -> Path:
    fit_head(FitHeadConfig.build(caches=(cache,), out=out, epochs=1, folds=2, decision=decision), quiet=True)
    return out


@pytest.mark.slow  # two fits and an export (~30 s here): the fast suite keeps to its 2 minutes
def test_a_run_forced_to_the_toy_records_it_and_exports_it_or_refuses(toy, fitted, tmp_path):
    run = _fit(fitted["cache"], tmp_path / "run", "top-k")
    th = json.loads((run / "thresholds.json").read_text())
    assert th["mode"] == "top-k" and th["decision"]["rule"] == "top-k" and "k" in th["decision"]["params"]
    model = tmp_path / "model"
    out = runner.invoke(app, ["export", str(run), "--out", str(model), "--format", "safetensors"])
    assert out.exit_code == 0, out.output
    meta = json.loads((model / "export.json").read_text())
    assert meta["decision"]["rule"] == "top-k" and meta["decision"]["help"] == TOP_K.summary
    assert meta["decision"]["params"] == th["decision"]["params"]
    pred = load(model)  # the issue-25 check (predictor.honoured) passes for a registered rule
    probs = np.random.default_rng(0).random((5, len(pred.labels)))
    assert (pred.decide(probs).sum(1) == th["decision"]["params"]["k"]).all()

    opaque = _fit(fitted["cache"], tmp_path / "opaque", "top-k-opaque")
    out = runner.invoke(app, ["export", str(opaque), "--out", str(tmp_path / "onnx")])
    assert out.exit_code == 2 and "'top-k-opaque' declares no numpy source" in out.output
    assert "--format safetensors" in out.output and not (tmp_path / "onnx").exists()


@pytest.mark.slow  # a whole ONNX export (~6 s)
def test_an_onnx_export_of_the_toy_carries_its_source_in_client_py(toy, fitted, tmp_path):
    run = _fit(fitted["cache"], tmp_path / "run", "top-k")
    model = tmp_path / "model"
    out = runner.invoke(app, ["export", str(run), "--out", str(model)])
    assert out.exit_code == 0, out.output
    client = (model / "client.py").read_text()
    assert client_source("top-k") in client and "def apply_top_k(" in client and "expected_f1_sets" not in client
    meta = json.loads((model / "export.json").read_text())
    ns: dict = {"np": np}
    exec(compile(client_source("top-k"), "client.py", "exec"), ns)  # noqa: S102 - the client's own decision step
    probs = np.random.default_rng(1).random((7, len(meta["label_ids"]))).astype(np.float32)
    assert (ns["apply_decision"](probs, meta["decision"]) == load(model).decide(probs)).all()
