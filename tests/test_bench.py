"""The bench/ scripts keep working: each one's --smoke mode runs on tiny generated data (slow: whole scripts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# Every script under bench/ (helpers, whose names start with "_", and modules without a __main__ excepted):
# a new script without a --smoke mode fails here.
SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py")
                 if not p.name.startswith("_") and 'if __name__ == "__main__"' in p.read_text())

# What each script's smoke run must print (its figures, at least their heading); a script not listed must print
# something and exit 0.
PRINTS = {
    "best.py": "blend head vs the members' weighted mix",
    "defaults.py": "shared         bce     chosen",
    "export.py": "int8 ",
    "extract.py": "max |onnx - torch|",
    "faults.py": "trust_old_and_new_spelling",
    "finetune.py": "end-to-end finetune (1 epoch)",
    "fit_head.py": "default head (concat, bce) fit + threshold tuning",
    "int8_calibration.py": "fit s  by seed",
    "precision.py": "medians",
    "predict.py": "export / run: time",
    "pseudo.py": "round two (pseudo)",
    "recipes.py": "trunk layer3 + MiniLM layer1",
    "serve.py": "mlc predict in a loop",
    "silence.py": "longest silence",
    "suite.py": "median wall",
}


def _bench(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLC_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_every_bench_script_is_listed():
    """The discovery finds the scripts (and no helper): the smoke test below cannot pass by finding none."""
    assert {"extract.py", "faults.py", "export.py", "best.py"} <= set(SCRIPTS), SCRIPTS
    assert not {"_subset.py", "_smoke.py", "faults_trust.py"} & set(SCRIPTS), SCRIPTS
    assert all(Path(REPO / "bench" / s).is_file() for s in PRINTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_smoke_mode_runs(script: str):
    """Each script's real code path, end to end, on tiny generated data and tiny random encoders: exit 0 and its
    figures printed. bench/extract.py's subset links its images into a scratch folder: the symlink policy lets
    extract read them."""
    out = _bench(f"bench/{script}", "--smoke")
    assert out.strip(), f"bench/{script} --smoke printed nothing"
    assert PRINTS.get(script, "") in out, out[-3000:]
    if script == "extract.py":
        assert "tiny-resnet+tiny-bert (12 images" in out
    if script == "faults.py":  # two data-only trust cases: the harness works and they end clear
        verdicts = [ln.split(None, 1) for ln in out.splitlines()[1:] if ln.strip()]
        assert [v[0] for v in verdicts] == ["trust_labels_dev_zero", "trust_old_and_new_spelling"], out
        assert all(v[1] == "clear" for v in verdicts), out
    if script == "mpnet.py":  # two tiny caches, three 3-fold heads on two thirds of the rows, the rest scored
        names = [ln.split()[0] for ln in out.splitlines() if ln.startswith(("concat-", "50/50"))]
        assert names == ["concat-minilm", "concat-mpnet", "concat-minilm-mpnet", "50/50"], out
        assert "peak memory" in out
