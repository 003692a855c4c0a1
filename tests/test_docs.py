"""Docs that stay true: every module, function, class and file that docs/DESIGN.md names exists; every
local link in README.md and docs/*.md leads to a file."""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import tomllib

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_NAME = re.compile(r"^(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)(?:\(.*\))?$")  # name, A.b, name(args)
FILE_NAME = re.compile(r"^[\w./-]+(?:\.py|/)$")  # module.py, folder/, tests/x.py
DATA_FILE = re.compile(r"^[\w.-]+\.(?:json|csv|npz|h5|pt|safetensors|onnx|log|html)$")  # files a run or cache holds


def _defined() -> set[str]:
    """Every name the code defines: modules, packages, functions, classes, module and class attributes."""
    names: set[str] = set(dir(builtins))
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "tests").glob("*.py")]:
        names.update({path.stem, path.parent.name})
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return names


def _not_code() -> set[str]:
    """Backticked words that name no Python object: pytest markers and the console script."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    markers = {m.split(":")[0] for m in project["tool"]["pytest"]["ini_options"]["markers"]}
    return markers | set(project["project"]["scripts"]) | _cli_words()


def _cli_words() -> set[str]:
    """The CLI's argument names (DATA_DIR, RUN, MODEL) and option values (the precisions), as the code has them."""
    from pipeline.cli import COMMANDS
    from pipeline.device import PRECISIONS
    from pipeline.export import PRECISIONS as STORED
    from pipeline.quantize import FEATURE_PRECISIONS

    words = {*PRECISIONS, *STORED, *FEATURE_PRECISIONS}
    for _, where in COMMANDS.values():
        module, _, cls = where.partition(":")
        options = getattr(importlib.import_module(module), cls).options()
        words |= {n.upper() for n, o in options.items() if o.field.metadata.get("argument")}
    return words


def unknown_names(text: str, defined: set[str], not_code: set[str]) -> list[str]:
    """The backticked code names and files of ``text`` that do not exist."""
    missing = []
    for token in re.findall(r"`([^`\n]+)`", text):
        if DATA_FILE.match(token):
            continue
        if FILE_NAME.match(token):
            if not (REPO / token).exists() and not any((REPO / "pipeline").rglob(token.rstrip("/"))):
                missing.append(token)
        elif (m := CODE_NAME.match(token)) and token not in not_code:
            missing.extend(p for p in m["name"].split(".") if p not in defined)
    return missing


def test_design_names_only_what_exists():
    assert unknown_names((REPO / "docs" / "DESIGN.md").read_text(), _defined(), _not_code()) == []


def test_the_name_check_catches_a_renamed_function():
    defined, text = _defined(), "locks (`locked`), `swap_in`, `Run.nothing`, `nowhere.py`, `slow`, `lock(x)`"
    assert unknown_names(text, defined, _not_code()) == ["locked", "nothing", "nowhere.py"]


def test_local_links_lead_to_files():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")) and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert broken == []


def misplaced(text: str) -> list[str]:
    """The classes a row of DESIGN.md's module table names that its module(s) neither define nor import: a class
    the table puts in the wrong module. Only CamelCase names that the package defines as classes are checked."""
    classes = {n.name for p in (REPO / "pipeline").rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.ClassDef)}
    faults = []
    for line in text.splitlines():
        cells = line.split("|")[1:-1]
        if len(cells) != 2 or not (files := re.findall(r"`([\w/]+\.py|[\w]+/)`", cells[0])):
            continue
        modules = [importlib.import_module("pipeline." + f.removesuffix(".py").removesuffix("/").replace("/", "."))
                   for f in files]
        inside = {n.name for f in files if f.endswith("/") for p in (REPO / "pipeline" / f).rglob("*.py")
                  for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)}  # a package's modules
        for name in re.findall(r"`([A-Z]\w*)[`(.]", cells[1]):
            if name in classes and name not in inside and not any(hasattr(m, name) for m in modules):
                faults.append(f"{cells[0].strip()}: {name}")
    return faults


def test_design_puts_each_class_in_its_module():
    assert misplaced((REPO / "docs" / "DESIGN.md").read_text()) == []


def test_the_module_check_catches_a_class_in_the_wrong_module():
    assert misplaced("| `heads.py` | `CacheMeta` (what a cache holds), `HeadOptions` |\n") == ["`heads.py`: CacheMeta"]
