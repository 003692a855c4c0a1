"""``mlc runs [FOLDER]``: every run folder under FOLDER as one row of a leaderboard, in the terminal and as a
self-contained HTML page (no external assets) that also sets each label's F1 side by side.

A row holds the recipe, encoders, head, folds, decision rule, the cross-fitted samples-F1 and its baselines
(F1 at 0.5, one global threshold, and a decision-rule chooser's candidates where the run recorded them), fit
time, size and date. Each run is read as every reader reads it (manifest, sizes and sha256 of its files,
schemas), so a damaged run is a row saying what is wrong, never a crash. Torch-free: listing runs is quick.
"""

from __future__ import annotations

import datetime
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import schemas
from .atomic import OutputOptions, claim_output, write_text
from .config import Config, group, opt, require
from .errors import MlcError
from .folders import RUN_LATER, check_listing, read_json
from .output_rules import is_runs_page

SORTS = ("f1", "date", "time", "size", "name")


@dataclass(frozen=True, kw_only=True)
class RunsConfig(Config):
    """Options of ``mlc runs``."""

    folder: Path = opt(Path("runs"), "A run folder, or a folder holding run folders (searched 3 levels deep).",
                       argument=True)
    sort: str = opt("f1", f"Order of the rows: one of {', '.join(SORTS)} (best, newest, slowest, largest first; "
                    "name A-Z).")
    out: Path | None = opt(None, "Also write the leaderboard as one self-contained HTML page (with each label's F1 "
                           "side by side): a new file, or an earlier leaderboard it replaces.")
    output: OutputOptions = group(OutputOptions)

    def __post_init__(self) -> None:
        super().__post_init__()
        require([(self.sort in SORTS, f"--sort must be one of {SORTS}, not {self.sort!r}")])


@dataclass
class Row:
    """One run as the leaderboard shows it; ``fault`` says what is wrong with a damaged one."""

    path: Path
    fault: str | None = None
    recipe: str = "-"
    encoders: str = "-"
    head: str = "-"
    folds: int | None = None
    rule: str = "-"
    f1: float | None = None
    baselines: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    size: int = 0
    date: str = "-"
    per_label: dict[str, float] = field(default_factory=dict)


def find_runs(folder: Path, depth: int = 3) -> list[Path]:
    """Run folders at or under ``folder``: any folder holding an mlc run's files (manifest.json, metrics.json,
    config.json or head.json), so one whose manifest is gone still shows up, as damaged."""
    if not folder.is_dir():
        raise MlcError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: not a folder")
    marks = ("manifest.json", "metrics.json", "head.json")
    found, level = [], [folder]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            if any((d / m).is_file() for m in marks) and not (d / "export.json").is_file():
                found.append(d)  # a run: its own subfolders (report/, encoders/) are not runs
            else:
                nxt += sorted(p for p in d.iterdir()
                              if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
        level = nxt
    return found


def read_row(path: Path) -> Row:
    """A run folder as a row, read and checked like every reader does; a damaged one is a row with its fault."""
    row = Row(path, size=_size(path))
    try:
        _fill(row, path)
    except MlcError as e:
        row.fault = str(e).replace(str(path) + "/", "").replace(str(path) + ": ", "")  # the row names the run
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as e:  # a schema field of another type
        row.fault = f"unreadable ({type(e).__name__}: {e})"
    return row


def _fill(row: Row, path: Path) -> None:
    manifest = schemas.manifest(read_json(path / "manifest.json", "the run folder"), path / "manifest.json")
    check_listing(path, manifest["files"], RUN_LATER + ("manifest.json",), "refit the run")
    metrics = schemas.metrics(read_json(path / "metrics.json", "the run folder"), path / "metrics.json")
    features = schemas.features(read_json(path / "features.json", "the run folder"), path / "features.json")
    head = read_json(path / "head.json", "the run folder")
    th = schemas.thresholds(read_json(path / "thresholds.json", "the run folder"), path / "thresholds.json")
    recipes = [e.get("recipe") or {} for e in features]
    row.recipe = manifest["kind"] + "".join(sorted({f" +{k}" for r in recipes for k in ("crossfit", "image_cut",
                                                                                           "from_run") if r.get(k)}))
    row.encoders = " | ".join(f"{r.get('image_encoder', '?')} + {r.get('text_encoder', '?')}"
                              + (f" ({r['precision']})" if r.get("precision", "fp32") != "fp32" else "")
                              for r in recipes)
    row.head = str(head.get("name", "-")) if isinstance(head, dict) else "-"
    row.folds = sum(1 for n in manifest["files"] if n.startswith("head-") and n.endswith(".safetensors"))
    row.rule, row.baselines = _rule(metrics, th)
    row.f1 = float(metrics["samples_f1"]) if "samples_f1" in metrics else None
    row.seconds = metrics.get("seconds") if isinstance(metrics.get("seconds"), int | float) else None
    row.date = datetime.datetime.fromtimestamp((path / "manifest.json").stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    detail = (metrics.get("detail_with_final_thresholds_in_sample") or {}).get("per_class") or {}
    names = detail.get("name") or th.get("label_names") or th["label_ids"]
    f1s = detail.get("f1") or []
    row.per_label = {str(n): float(f) for n, f in zip(names, f1s, strict=False) if isinstance(f, int | float)}


def _rule(metrics: dict[str, Any], th: dict[str, Any]) -> tuple[str, dict[str, float]]:
    """The decision rule and the baselines beside it. Read defensively: a run that records a chosen rule and its
    candidates' scores (a ``decision`` object: rule, candidates) shows them; older runs show their threshold mode
    and the F1 at 0.5 / one global threshold."""
    base = {k: float(metrics[m]) for k, m in (("0.5", "samples_f1_at_0.5"), ("global", "samples_f1_global"),
                                              ("per-class", "samples_f1_per_class"))
            if isinstance(metrics.get(m), int | float)}
    decision = metrics.get("decision") if isinstance(metrics.get("decision"), dict) else {}
    cands = decision.get("candidates")
    if isinstance(cands, dict):
        base.update({str(k): float(v) for k, v in cands.items() if isinstance(v, int | float)})
    rule = decision.get("rule") or metrics.get("decision_rule") or metrics.get("threshold_mode") or th.get("mode")
    return str(rule or "-"), base


def _size(path: Path) -> int:
    try:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError:
        return 0


def leaderboard(folder: Path, sort: str = "f1", found: list[Path] | None = None) -> list[Row]:
    """Every run under ``folder`` (or ``found``, its runs when already listed) as a row, sorted (damaged runs last,
    in path order)."""
    rows = [read_row(p) for p in (find_runs(folder) if found is None else found)]
    keys = {"f1": lambda r: -(r.f1 or 0), "date": lambda r: _neg(r.date), "time": lambda r: -(r.seconds or 0),
            "size": lambda r: -r.size, "name": lambda r: str(r.path)}
    good = sorted((r for r in rows if r.fault is None), key=keys[sort])
    return good + sorted((r for r in rows if r.fault is not None), key=lambda r: str(r.path))


def _neg(date: str) -> str:
    return "".join(chr(0x10FFFF - ord(c)) for c in date)  # newest first, as a string key


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


COLUMNS = ("#", "run", "recipe", "encoders", "head", "folds", "rule", "samples-F1", "at 0.5", "global", "fit s",
           "size", "date")


def cells(i: int, r: Row, root: Path) -> list[str]:
    name = str(r.path.relative_to(root)) if r.path.is_relative_to(root) and r.path != root else str(r.path)
    if r.fault is not None:
        return [str(i), name, f"damaged: {r.fault}"] + [""] * (len(COLUMNS) - 3)
    return [str(i), name, r.recipe, r.encoders, r.head, str(r.folds or "-"), r.rule, _fmt(r.f1),
            _fmt(r.baselines.get("0.5")), _fmt(r.baselines.get("global")), _fmt(r.seconds, ".1f"), _mb(r.size),
            r.date]


def render_table(rows: list[Row], root: Path) -> str:
    """The terminal table: one line per run; a damaged run's line says what is wrong (not cut short)."""
    if not rows:
        return f"no runs under {root}"
    table = [list(COLUMNS)] + [cells(i, r, root) for i, r in enumerate(rows, 1)]
    width = [max(len(t[j]) for t in table if not (len(t) > 2 and t[2].startswith("damaged"))) for j in
             range(len(COLUMNS))]
    lines = []
    for t in table:
        if t[2].startswith("damaged"):
            lines.append(f"{t[0]:>{width[0]}}  {t[1]:<{width[1]}}  {t[2]}")
        else:
            lines.append("  ".join(c.ljust(w) if j in (1, 2, 3, 4, 6) else c.rjust(w)
                                   for j, (c, w) in enumerate(zip(t, width, strict=True))).rstrip())
    return "\n".join(lines)


def render_html(rows: list[Row], root: Path) -> str:
    """One self-contained page: the leaderboard (click a heading to sort) and each label's F1 side by side."""
    e = html.escape
    head = "".join(f"<th onclick='sortBy(this)'>{e(c)}</th>" for c in COLUMNS)
    body = "".join("<tr" + (" class='bad'" if r.fault else "") + ">" + "".join(
        f"<td>{e(c)}</td>" for c in cells(i, r, root)) + "</tr>" for i, r in enumerate(rows, 1))
    good = [(i, r) for i, r in enumerate(rows, 1) if r.fault is None and r.per_label]
    labels = list(dict.fromkeys(n for _, r in good for n in r.per_label))
    side = "".join(f"<th title='{e(str(r.path))}'>#{i}</th>" for i, r in good)
    per = "".join(f"<tr><td>{e(n)}</td>" + "".join(_f1_cell(r.per_label.get(n)) for _, r in good) + "</tr>"
                  for n in labels)
    return _PAGE.format(root=e(str(root)), when=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                        n=len(rows), head=head, body=body, side=side, per=per)


def _f1_cell(f: float | None) -> str:
    if f is None:
        return "<td>-</td>"
    return f"<td style='background:hsl({int(120 * f)},70%,85%)'>{f:.3f}</td>"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mlc runs: {root}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap}}
th{{background:#f3f3f3;cursor:pointer}} #board td:nth-child(n+2):nth-child(-n+5),.per td:first-child{{text-align:left}}
tr.bad td{{color:#a00;text-align:left}} .note{{color:#666}}
</style></head><body>
<h1>mlc runs</h1>
<p class="note">{n} run(s) under <code>{root}</code>, {when}. samples-F1 is cross-fitted on held-out rows (thresholds
tuned on one half, scored on the other); "at 0.5" and "global" are its baselines. Click a heading to sort.</p>
<table id="board"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>F1 per label</h2>
<p class="note">Each run's per-label F1 with its final thresholds, in sample (columns: the rows above).</p>
<table class="per"><thead><tr><th>label</th>{side}</tr></thead><tbody>{per}</tbody></table>
<script>
function sortBy(th){{
  const t=th.closest('table'), i=[...th.parentNode.children].indexOf(th), b=t.tBodies[0];
  const dir=th.dataset.dir==='asc'?-1:1; th.dataset.dir=dir===1?'asc':'desc';
  const v=c=>{{const s=c.children[i].textContent, x=parseFloat(s); return isNaN(x)?s:x;}};
  [...b.rows].sort((a,c)=>{{const p=v(a),q=v(c); return (p>q?1:p<q?-1:0)*dir;}}).forEach(r=>b.appendChild(r));
}}
</script>
</body></html>
"""


def runs(cfg: RunsConfig) -> tuple[list[Row], str]:
    """The leaderboard's rows and its terminal table; with ``cfg.out`` the HTML page written too."""
    root = Path(cfg.folder)
    out, found = None, find_runs(root)
    if cfg.out is not None:  # proved safe before any reading: never inside a run, never a foreign file
        out = claim_output(cfg.out, what="an mlc runs page", folder=False, force=cfg.output.force,
                           ours=is_runs_page,
                           sealed=found)
    rows = leaderboard(root, cfg.sort, found)
    if out is not None:
        write_text(out, render_html(rows, root))  # the CLI says "wrote OUT"
    return rows, render_table(rows, root)
