"""mlc: multi-label image+caption classification as a feature-caching two-stage pipeline.

The Python API (``from pipeline import load``): ``load(path)`` -> ``Predictor`` (a run folder or an exported
model) with ``predict(photos, captions)``, ``predict_proba(photos, captions)`` and ``labels``; ``evaluate(model,
data_dir)`` scores it on a labelled CSV. Imported lazily, so ``import pipeline`` stays light (and torch-free).
"""

from typing import Any

__version__ = "0.2.0"
__all__ = ["Predictor", "evaluate", "load"]


def __getattr__(name: str) -> Any:
    if name in ("Predictor", "load"):
        from . import predictor

        return getattr(predictor, name)
    if name == "evaluate":
        from .evaluate import evaluate_model

        return evaluate_model
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
