"""What the server says about its model: labels with thresholds, the decision rule, and a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..decision import RULES
from ..errors import MlcError
from ..predictor import Predictor


def thresholds(pred: Predictor) -> list[float] | None:
    """Each label's threshold, or None for a model whose decision rule has none per label (the expected-F1 rules
    choose a top-k per photo; their stored 0.5s are not read: decision.Decision.reads_thresholds)."""
    if not pred.decision.reads_thresholds:
        return None
    return [round(float(t), 6) for t in pred.thresholds]


def labels(pred: Predictor, rule: str) -> dict[str, Any]:
    """``/api/labels``: ids, names and thresholds in the model's column order, and the decision rule in words."""
    th = thresholds(pred)
    return {"labels": [{"id": lid, "name": name, "threshold": None if th is None else th[j]}
                       for j, (lid, name) in enumerate(zip(pred.labels.ids, pred.labels.names, strict=True))],
            "decision_rule": rule}


def rule_of(pred: Predictor) -> str:
    """The decision rule in words: the rule the model applies, in decision.RULES' own help (a loaded model's rule is
    always a registered one: predictor.load checks it)."""
    rule = pred.decision.rule
    return f"{rule}: {RULES[rule].help} (every photo gets at least one label)"


def card(pred: Predictor, path: Path, meta: dict[str, Any] | None) -> dict[str, Any]:
    """``/api/model``: where the model comes from, what it reads, how it was checked and how it decides."""
    reads = " and ".join(w for w, on in (("photos", pred.needs_images), ("captions", pred.needs_captions)) if on)
    out: dict[str, Any] = {"model": str(path), "kind": "export" if meta else "run folder", "reads": reads,
                           "labels": len(pred.labels), "decision_rule": rule_of(pred)}
    if meta:
        out.update(_export_card(meta))
    else:
        out.update(_run_card(path))
    return out


def _export_card(meta: dict[str, Any]) -> dict[str, Any]:
    graph, image, text = meta.get("graph") or {}, meta.get("image") or {}, meta.get("text") or {}
    out = {"mlc_version": meta.get("mlc_version"), "source_run": meta.get("source_run"),
           "format": meta.get("kind"), "dtype": meta.get("dtype")}
    if graph:
        out["runtime"] = "ONNX Runtime (no torch)"
        out["max_abs_diff_vs_torch"] = graph.get("probe_max_abs_diff_vs_torch")
    if image:
        out["image"] = f"shorter side {image['resize']['shorter_side']}, centre crop {image['crop']['size']}"
    if text:
        out["captions"] = f"tokenizer.json, at most {text.get('max_length')} tokens"
    return {k: v for k, v in out.items() if v is not None}


def _run_card(path: Path) -> dict[str, Any]:
    """A run folder's validation scores and recipe (read through runs.RunDir, which checks them)."""
    from ..runs import RunDir

    run = RunDir(path)
    out: dict[str, Any] = {"runtime": "torch (the run's encoders and fold heads)"}
    try:
        metrics = run.read_metrics()
        out.update({f"validation_{k}": round(float(v), 4) for k, v in metrics.items()
                    if isinstance(v, int | float) and not isinstance(v, bool) and "f1" in k})
        cfg = run.read_config()
    except MlcError as e:  # the card is informative; the model itself loaded and was verified
        out["card_fault"] = str(e)
        return out
    flat = {k: v for group in cfg.values() if isinstance(group, dict) for k, v in group.items()} | cfg
    for key in ("image_encoder", "text_encoder", "head", "loss", "folds", "epochs"):
        if key in flat and not isinstance(flat[key], dict):
            out[key] = flat[key]
    return out
