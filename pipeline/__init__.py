"""mlc: multi-label image+caption classification as a feature-caching two-stage pipeline.

The Python API (docs/python.md)::

    import pipeline as mlc
    model = mlc.fit("path/to/data", preset="offline")   # or a DataFrame of paths, captions, labels
    model = mlc.load("runs/demo")                        # a run folder or an exported model
    model.predict("cat.jpg", "a cat on a bench")         # label names; ids=True, top_k=3, as_pandas=True
    model.predict_proba(paths, captions)                 # (N, C), columns = model.labels
    model.evaluate("path/to/data", split="train")        # samples/micro/macro F1, mAP, per label

Imported lazily, so ``import pipeline`` stays light (and torch-free until ``fit``).
"""

import logging
from typing import Any

__version__ = "0.2.0"
__all__ = ["Model", "Predictor", "fit", "load"]
_WHERE = {"Model": "api", "fit": "api", "load": "api", "Predictor": "predictor"}

# silent unless asked: a caller sees mlc's progress once it configures logging (the CLI does, pipeline/log.py)
logging.getLogger("mlc").addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
