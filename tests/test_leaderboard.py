"""``mlc runs``: a leaderboard of run folders, in the terminal and as a self-contained HTML page."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.leaderboard import find_runs, leaderboard, read_row


def test_runs_lists_every_run_and_a_damaged_one_as_a_row(fitted):
    runs = fitted["tmp"] / "runs"
    runs.mkdir()
    for name in ("demo", "other", "broken"):
        shutil.copytree(fitted["run"], runs / name)
    (runs / "broken" / "head-1.safetensors").unlink()
    (runs / "demo" / "report").mkdir()  # a run's own subfolders are not runs
    (runs / "notes").mkdir()
    assert [p.name for p in find_runs(runs)] == ["broken", "demo", "other"]
    good = read_row(runs / "demo")
    assert good.fault is None and good.folds == 3 and good.head == "concat" and good.recipe == "head"
    chosen = json.loads((runs / "demo" / "thresholds.json").read_text())["mode"]  # the rule fit-head chose (issue 26)
    assert good.encoders == "tiny-resnet + tiny-bert" and 0 <= good.f1 <= 1 and good.rule == chosen
    assert {"0.5", "global"} <= set(good.baselines) and set(good.per_label) == {"person", "car", "dog"}
    assert good.seconds is not None and good.size > 0 and good.date != "-"
    rows = leaderboard(runs)
    assert [r.path.name for r in rows][-1] == "broken" and "head-1.safetensors" in rows[-1].fault

    page = fitted["tmp"] / "board.html"
    res = CliRunner().invoke(app, ["runs", str(runs), "--out", str(page), "--sort", "name"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["#", "run", "recipe"]
    assert [ln.split()[1] for ln in lines[1:4]] == ["demo", "other", "broken"]
    assert "damaged:" in lines[3] and "head-1.safetensors" in lines[3]
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "src=" not in text  # self-contained
    tags: list[str] = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append(tag)

    Tags().feed(text)
    assert tags.count("table") == 2 and "script" in tags and text.count("<tr") == 1 + 3 + 1 + 3  # 3 runs, 3 labels
    again = CliRunner().invoke(app, ["runs", str(runs), "--out", str(page)])  # its own page is replaced
    assert again.exit_code == 0, again.output
    foreign = fitted["tmp"] / "mine.html"
    foreign.write_text("<p>my notes</p>")
    refused = CliRunner().invoke(app, ["runs", str(runs), "--out", str(foreign)])
    assert refused.exit_code == 2 and foreign.read_text() == "<p>my notes</p>"
    inside = CliRunner().invoke(app, ["runs", str(runs), "--out", str(runs / "demo" / "x.html")])
    assert inside.exit_code == 2 and not (runs / "demo" / "x.html").exists()


def test_runs_on_a_missing_folder_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["runs", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such folder" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["runs", str(tmp_path / "empty")])
    assert res.exit_code == 0 and "no runs under" in res.output


def test_the_leaderboard_reads_runs_without_torch():
    """leaderboard.py checks manifests with the run folder's own list of what is written later (folders.RUN_LATER),
    without importing runs.py, which imports torch: mlc runs stays quick."""
    code = ("import sys; import pipeline.leaderboard as lb; from pipeline.folders import RUN_LATER; "
            "assert 'members' in RUN_LATER; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
