"""The bench/ scripts keep working: each smoke mode runs on tiny generated data (slow: whole scripts)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO


def _bench(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLC_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_extract_smoke_runs_on_a_symlinked_subset():
    """bench/_subset.py links the images into a scratch folder; the symlink policy must let extract read them."""
    out = _bench("bench/extract.py", "--smoke")
    assert "tiny-resnet+tiny-bert (12 images" in out and "max |onnx - torch|" in out


@pytest.mark.slow
def test_bench_faults_trust_cases_run():
    """Two cases of bench/faults.py --group trust (data only, so quick): the harness works and they end clear."""
    out = _bench("bench/faults.py", "--group", "trust", "--only", "trust_old_and_new_spelling,trust_labels_dev_zero")
    verdicts = [ln.split(None, 1) for ln in out.splitlines()[1:] if ln.strip()]
    assert [v[0] for v in verdicts] == ["trust_labels_dev_zero", "trust_old_and_new_spelling"], out
    assert all(v[1] == "clear" for v in verdicts), out


@pytest.mark.slow
def test_bench_mpnet_smoke_scores_three_heads_and_their_average():
    """bench/mpnet.py --smoke: two tiny caches, three 3-fold heads fitted on two thirds of the rows, the rest scored."""
    out = _bench("bench/mpnet.py", "--smoke")
    names = [ln.split()[0] for ln in out.splitlines() if ln.startswith(("concat-", "50/50"))]
    assert names == ["concat-minilm", "concat-mpnet", "concat-minilm-mpnet", "50/50"], out
    assert "peak memory" in out
