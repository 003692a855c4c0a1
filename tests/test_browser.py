"""mlc's web pages in a real browser, and `mlc serve` as its own process (100 concurrent requests). Headless
Chromium (Debian's ``chromium``, driven by Playwright; never
``playwright install``) opens `mlc serve`'s page, uploads a photo and types a caption, and the labels shown must be
`mlc predict`'s; then a run's report.html and the `mlc runs` leaderboard page (when that command exists). Every
page must load with no console error and no broken image or failed request. Screenshots are kept in
``artifacts/browser/`` (git-ignored; ``$MLC_ARTIFACTS`` moves it), and the test prints where.

Needs: ``apt-get install chromium`` and ``pip install 'mlc[browser]'`` (``.ci/browser-setup`` does both, bounded);
skipped, saying which is missing, otherwise."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = os.environ.get("MLC_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as root in a container: no sandbox; and nothing that reaches for the network or a GPU.
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-quic"]
ARTIFACTS = Path(os.environ.get("MLC_ARTIFACTS") or REPO / "artifacts") / "browser"
PHOTO = REPO / "examples" / "comp5329-mini" / "data" / "30000.jpg"
CAPTION = "A young girl holding a box of donuts next to a dog."


class Watched:
    """A page whose console errors, uncaught exceptions and failed requests (4xx/5xx, refused) are collected."""

    def __init__(self, page) -> None:
        self.page, self.errors = page, []
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url} {r.failure}"))
        page.on("response", lambda r: self.errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)

    def broken_images(self) -> list[str]:
        return self.page.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
                                  ".map(i => i.src)")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/browser-setup does it)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is not installed: pip install 'mlc[browser]'")
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory(prefix="mlc-chromium-") as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                   viewport={"width": 1280, "height": 900})
        yield ctx
        ctx.close()


def shoot(page, name: str, capsys) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


@pytest.fixture(scope="module")
def model(finetuned, tmp_path_factory) -> Path:
    """An ONNX export of the session's tiny finetuned run."""
    from pipeline.export import ExportConfig, export

    return export(ExportConfig.build(run=finetuned, out=tmp_path_factory.mktemp("browser") / "model"))[0]


def start_server(model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`mlc serve MODEL --port 0` in its own process; its URL, read from the line it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", str(model), "--port", "0", *extra],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline, seen = time.monotonic() + 120, []
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if m := re.search(r"on (http://127\.0\.0\.1:\d+/)", line):
            return proc, m.group(1)
    proc.kill()
    raise AssertionError(f"mlc serve did not start: {''.join(seen)}")


@pytest.fixture
def server(model) -> Iterator[str]:
    proc, url = start_server(model)
    yield url
    proc.terminate()
    proc.wait(10)


def predicted(model: Path, photo: Path, caption: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(model), str(photo), "--caption",
                          caption, "--format", "json"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def drop(page, photo: Path) -> None:
    """Drop a file on the page's drop zone, as a user dragging it from their desktop."""
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
    }""", [base64.b64encode(photo.read_bytes()).decode(), photo.name])


def test_the_page_labels_a_photo_as_mlc_predict_does(browser, server, model, finetuned, capsys):
    want = predicted(model, PHOTO, CAPTION)
    tiny = sorted((finetuned.parent / "tiny" / "data").glob("*.jpg"))[0]
    want_tiny = predicted(model, tiny, "a dog")
    page = browser.new_page()
    seen = Watched(page)
    page.goto(server)
    page.wait_for_selector("body[data-ready=true]")
    assert "at least one label" in page.inner_text("[data-testid=rule]")
    assert "export" in page.inner_text("[data-testid=card]")

    page.set_input_files("[data-testid=photo]", str(PHOTO))  # choose
    page.fill("[data-testid=caption]", CAPTION)
    page.click("[data-testid=go]")
    page.wait_for_selector("body[data-predictions='1']")
    bars = page.eval_on_selector_all(".bar", "bs => bs.map(b => [b.dataset.id, Number(b.dataset.probability), "
                                             "b.dataset.chosen === 'true', b.querySelectorAll('.tick').length])")
    from pipeline.predictor import load as load_predictor

    # a threshold tick each where the rule reads thresholds; the expected-F1 rules choose a top-k per photo
    ticks_each = 0 if load_predictor(model).decision.rule.startswith("expected-f1") else 1
    assert len(bars) == len(want["probabilities"]) and all(ticks == ticks_each for *_, ticks in bars)
    # the legend names the tick only where there are ticks
    assert page.is_visible("[data-testid=tick-legend]") == bool(ticks_each)
    assert {i: p for i, p, *_ in bars} == pytest.approx(want["probabilities"], abs=1e-5)
    assert sorted(i for i, _, on, _ in bars if on) == sorted(map(str, want["labels"]))
    assert page.inner_text("[data-testid=chosen]").split(", ") == want["names"]

    drop(page, tiny)  # drop, another caption
    page.fill("[data-testid=caption]", "a dog")
    page.click("[data-testid=go]")
    page.wait_for_selector("body[data-predictions='2']")
    assert page.inner_text("[data-testid=chosen]").split(", ") == want_tiny["names"]
    history = page.eval_on_selector_all("[data-testid=history] li", "ls => ls.map(l => l.innerText)")
    assert len(history) == 2 and "a dog" in history[0] and CAPTION in history[1]
    assert not seen.broken_images() and not seen.errors, seen.errors
    shoot(page, "serve.png", capsys)

    page.set_input_files("[data-testid=photo]", {"name": "bad.jpg", "mimeType": "image/jpeg", "buffer": b"no jpeg"})
    page.click("[data-testid=go]")
    page.wait_for_selector("[data-testid=error]:not([hidden])")
    assert "'bad.jpg': cannot decode" in page.inner_text("[data-testid=error]")
    # the one error expected: the browser's own line for the 400 answer
    assert [e for e in seen.errors if "400" not in e] == [], seen.errors
    page.close()


def test_a_run_folder_is_served_too(finetuned, tmp_path):
    import urllib.request

    proc, url = start_server(finetuned)
    try:
        health = json.load(urllib.request.urlopen(url + "api/health", timeout=30))
        card = json.load(urllib.request.urlopen(url + "api/model", timeout=30))
        photo = sorted((finetuned.parent / "tiny" / "data").glob("*.jpg"))[0]
        boundary = "mlcboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"caption\"\r\n\r\na dog\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"{photo.name}\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(url + "api/predict", body, {"Content-Type": f"multipart/form-data; "
                                                                               f"boundary={boundary}"})
        got = json.load(urllib.request.urlopen(req, timeout=60))["predictions"][0]
    finally:
        proc.terminate()
        proc.wait(10)
    assert health["status"] == "ok" and card["kind"] == "run folder"
    want = predicted(finetuned, photo, "a dog")
    assert got["labels"] == want["labels"]
    assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)


def test_a_runs_report_has_no_broken_image_and_no_console_error(browser, fitted_once, tmp_path, capsys):
    from pipeline.report import make_report

    run = tmp_path / "run"
    shutil.copytree(fitted_once / "run", run)
    html = make_report(run)
    page = browser.new_page()
    seen = Watched(page)
    page.goto(html.resolve().as_uri())
    page.wait_for_load_state("load")
    images = page.eval_on_selector_all("img", "is => is.length")
    assert images >= 3 and not seen.broken_images(), seen.broken_images()
    assert not seen.errors, seen.errors
    shoot(page, "report.png", capsys)
    page.close()


def test_the_runs_leaderboard_page(browser, fitted_once, tmp_path, capsys):
    from pipeline.cli import COMMANDS

    if "runs" not in COMMANDS:
        pytest.skip("this mlc has no `mlc runs` yet (issue #29): its leaderboard page is checked once it lands")
    help_text = subprocess.run([sys.executable, "-m", "pipeline.cli", "runs", "--help"], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}).stdout
    flag = next((f for f in ("--html", "--out") if f in help_text), None)
    if flag is None:
        pytest.skip("`mlc runs` writes no HTML page this test knows how to ask for (--html or --out)")
    root = tmp_path / "runs"
    shutil.copytree(fitted_once / "run", root / "a")
    page_path = tmp_path / "leaderboard.html"
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "runs", str(root), flag, str(page_path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    page = browser.new_page()
    seen = Watched(page)
    page.goto(page_path.resolve().as_uri())
    page.wait_for_load_state("load")
    assert not seen.broken_images() and not seen.errors, seen.errors
    shoot(page, "runs.png", capsys)
    page.close()


def test_100_concurrent_requests_give_no_error_are_batched_and_the_server_stays_quiet(model, finetuned):
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    photos = sorted((finetuned.parent / "tiny" / "data").glob("*.jpg"))
    proc, url = start_server(model)

    def one(i: int) -> tuple[int, list]:
        photo = photos[i % len(photos)]
        boundary = f"b{i}"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"caption\"\r\n\r\na dog {i}\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"{photo.name}\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(url + "api/predict", body, {"Content-Type": f"multipart/form-data; "
                                                                               f"boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)["predictions"]

    said: list[str] = []  # what the server prints after its "serving ... on URL" line
    drain = threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    drain.start()
    try:
        with ThreadPoolExecutor(100) as pool:
            got = list(pool.map(one, range(100)))
        health = json.load(urllib.request.urlopen(url + "api/health", timeout=30))
        time.sleep(7)  # idle: a server is a quiet process (no progress lines: it is waiting, not working)
    finally:
        proc.terminate()
        proc.wait(10)
    drain.join(10)
    assert not said, said
    assert [s for s, _ in got] == [200] * 100
    assert [p[0]["caption"] for _, p in got] == [f"a dog {i}" for i in range(100)]  # each its own answer
    assert health["rows"] == 100 and health["batches"] < 100 and health["largest_batch"] > 1, health
