"""No silence over 5 s: the heartbeat says what is going on whenever nothing was printed for a while."""

from __future__ import annotations

import io
import runpy
import sys
import time

import pytest

from pipeline.heartbeat import Heartbeat, stage


def test_a_quiet_stretch_gets_lines_naming_the_last_thing_said(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    said: list[str] = []
    with Heartbeat(said.append, every=0.3, what="starting"):
        time.sleep(0.9)  # quiet: "starting" is what is going on
        print("fitting the head", file=sys.stderr)
        time.sleep(0.9)
        stage("writing the report")
        time.sleep(0.9)
        for _ in range(8):  # busy: a line every 0.1 s, no heartbeat needed
            print("epoch", flush=True)
            time.sleep(0.1)
        n = len(said)
        assert not any("epoch" in s for s in said)
    assert sys.stdout is out and sys.stderr is err  # the streams given back
    assert said[0].startswith("still: starting (") and any(s.startswith("still: fitting the head") for s in said)
    assert said[-1].startswith("still: writing the report") and n == len(said)
    assert "epoch\n" * 8 in out.getvalue() and "fitting the head" in err.getvalue()
    stage("no heartbeat runs: nothing happens")


def test_stop_ends_a_heartbeat_before_its_context_does():
    from pipeline.heartbeat import stop

    said: list[str] = []
    with Heartbeat(said.append, every=0.2):
        stop()
        time.sleep(0.6)
    assert said == []


@pytest.mark.slow  # a whole `mlc run` in a subprocess
def test_mlc_run_is_never_silent_for_5_seconds(tmp_path):
    """Every line of a whole `mlc run` (tiny data, in a fresh process: imports included) stamped as it comes."""
    from conftest import REPO, make_data_dir

    stamped = runpy.run_path(str(REPO / "bench" / "silence.py"))["stamped"]
    data = make_data_dir(tmp_path / "tiny", n_train=30, n_test=4)
    code, lines = stamped([sys.executable, "-m", "pipeline.cli", "run", str(data), "--image-encoder", "tiny-resnet",
                           "--text-encoder", "tiny-bert", "--random-init", "--workers", "0", "--backend", "torch",
                           "--folds", "2", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, lines
    # from the start to the last line; the interpreter's exit after it (torch's teardown) is not the command's work
    gaps = [(b[0] - a[0], a[1], b[1]) for a, b in zip(lines[:-1], lines[1:-1], strict=False)]
    assert max(g[0] for g in gaps) <= 5.0, max(gaps)
    assert any("submission:" in text for _, text in lines)
