"""The house rule of docs/DESIGN.md: stages import shared modules, never each other; shared modules
import no stage. Checked on the source (ast), so it holds for imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "pipeline"
STAGES = {"validate", "extract", "fit_head", "finetune", "crossfit", "submit", "report", "predict", "export",
          "evaluate", "serve"}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path, source: str | None = None) -> set[str]:
    """Top-level names of ``pipeline`` submodules that ``path`` imports (relative or absolute)."""
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [base + [a.name] for a in node.names]
            elif node.module and node.module.startswith("pipeline"):
                names = [node.module.split(".")[1:] or [a.name for a in node.names][:1]]
            else:
                continue
            found.update(n[0] for n in names if n)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline."))
    return found


def test_stages_never_import_each_other_and_shared_modules_import_no_stage():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        owner = _module(path).split(".")[0]
        if owner in ("cli", "workflow", "best", "best_route"):  # they sit above the stages and chain them
            continue
        for name in _imports(path) & STAGES:
            if name != owner:
                offences.append(f"{path.relative_to(REPO)} imports the stage {name}")
    assert not offences, offences


def test_the_checker_sees_relative_and_absolute_imports():
    source = ("from .fit_head import a\nfrom ..report.plots import b\nimport pipeline.submit\n"
              "from pipeline.extract import c\nfrom . import finetune\n")
    # resolved as if the file lived in pipeline/encoders/: ".fit_head" is pipeline.encoders.fit_head
    got = _imports(PACKAGE / "encoders" / "x.py", source)
    assert {"report", "submit", "extract", "encoders"} == got
