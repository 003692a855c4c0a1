"""No silence over 5 s: the heartbeat says what is going on whenever nothing was printed for a while."""

from __future__ import annotations

import io
import sys
import time

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
