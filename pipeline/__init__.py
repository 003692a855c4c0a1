"""mlc: multi-label image+caption classification as a feature-caching two-stage pipeline.

The Python API (``from pipeline import load``): ``load(path)`` -> ``Predictor`` (a run folder or an exported
model) with ``predict(photos, captions)``, ``predict_proba(photos, captions)``, ``evaluate(data)`` and ``labels``.
Imported lazily, so ``import pipeline`` stays light (and torch-free).
"""

import logging
from typing import Any

__version__ = "0.2.0"
__all__ = ["Predictor", "load"]

# silent unless asked: a caller sees mlc's progress once it configures logging (the CLI does, pipeline/log.py)
logging.getLogger("mlc").addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
