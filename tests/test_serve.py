"""`mlc serve`: the JSON endpoints (through Starlette's TestClient), their 4xx answers, micro-batching, the page's
static files, and a real ONNX export served as `pipeline.load` predicts it. The browser test is test_browser.py."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app as cli_app
from pipeline.errors import MlcError
from pipeline.labels import LabelSpace
from pipeline.predictor import Predictor
from pipeline.serve import ServeConfig, bind, build, url_of
from pipeline.serve.batcher import MicroBatcher

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

STATIC = REPO / "pipeline" / "serve" / "static"


class FakeScorer:
    """Probabilities from the photo's mean red/green/blue and the caption's words: known answers, no model."""

    needs_images, needs_captions, draft = True, True, None

    def __init__(self, sleep: float = 0.0, fail: bool = False) -> None:
        self.sleep, self.fail, self.batches = sleep, fail, []

    def proba(self, images, captions, batch_size=32):
        self.batches.append(len(captions))
        if self.fail:
            raise RuntimeError("the scorer broke")
        time.sleep(self.sleep)
        rgb = np.array([np.asarray(im, np.float32).mean(axis=(0, 1)) / 255 for im in images])
        words = np.array([[w in c for w in ("person", "car", "dog")] for c in captions], np.float32)
        return np.clip(0.6 * rgb + 0.35 * words, 0, 1).astype(np.float32)


def fake_predictor(tmp_path: Path, **scorer) -> Predictor:
    return Predictor(tmp_path, LabelSpace((1, 3, 18), ("person", "car", "dog")), np.array([0.5, 0.4, 0.6], np.float32),
                     FakeScorer(**scorer))


def jpeg(colour: tuple[int, int, int], size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def client(tmp_path: Path, pred: Predictor | None = None, **options) -> TestClient:
    cfg = ServeConfig.build(model=tmp_path, **options)
    return TestClient(build(cfg, pred or fake_predictor(tmp_path)), raise_server_exceptions=False)


def test_health_labels_and_model_card(tmp_path):
    with client(tmp_path) as c:
        assert c.get("/api/health").json()["status"] == "ok"
        labels = c.get("/api/labels").json()
        assert [(x["id"], x["name"], x["threshold"]) for x in labels["labels"]] == \
            [(1, "person", 0.5), (3, "car", 0.4), (18, "dog", 0.6)]
        assert "at least one" in labels["decision_rule"]  # the model's own decide(), in words
        card = c.get("/api/model").json()
        assert card["reads"] == "photos and captions" and card["labels"] == 3 and card["kind"] == "run folder"


def test_predict_one_photo_applies_thresholds_and_the_decision_rule(tmp_path):
    pred = fake_predictor(tmp_path)
    with client(tmp_path, pred) as c:
        r = c.post("/api/predict", files={"photo": ("red.jpg", jpeg((250, 40, 10)), "image/jpeg")},
                   data={"caption": "a car"})
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    want = pred.scorer.proba([Image.open(io.BytesIO(jpeg((250, 40, 10))))], ["a car"])[0]
    assert p["photo"] == "red.jpg" and p["caption"] == "a car"
    assert [p["probabilities"][k] for k in ("1", "3", "18")] == pytest.approx(want, abs=1e-5)
    # person 0.59 >= 0.5; car 0.44 >= its own 0.4 (under person's 0.5); dog 0.02 < 0.6
    assert p["labels"] == [1, 3] and p["names"] == ["person", "car"]


def test_a_photo_under_every_threshold_still_gets_its_closest_label(tmp_path):
    with client(tmp_path) as c:
        (p,) = c.post("/api/predict", files={"photo": ("grey.jpg", jpeg((60, 60, 60)), "image/jpeg")},
                      data={"caption": "nothing"}).json()["predictions"]
    assert p["labels"] == [3]  # 0.14 - 0.4 is the least far below


def test_a_batch_of_photos_with_a_caption_each_or_one_for_all(tmp_path):
    photos = [("photo", (f"{i}.jpg", jpeg(c), "image/jpeg")) for i, c in enumerate([(250, 0, 0), (0, 250, 0)])]
    with client(tmp_path) as c:
        each = c.post("/api/predict", files=photos, data={"caption": ["a person", "a car"]}).json()["predictions"]
        one = c.post("/api/predict", files=photos, data={"caption": "a dog"}).json()["predictions"]
    assert [p["caption"] for p in each] == ["a person", "a car"] and [p["photo"] for p in each] == ["0.jpg", "1.jpg"]
    assert [p["caption"] for p in one] == ["a dog", "a dog"]
    assert each[1]["names"] == ["car"]


@pytest.mark.parametrize(("files", "data", "status", "says"), [
    ([("photo", ("bad.jpg", b"not a jpeg at all", "image/jpeg"))], {"caption": "x"}, 400, "'bad.jpg': cannot decode"),
    ([("photo", ("empty.jpg", b"", "image/jpeg"))], {"caption": "x"}, 400, "'empty.jpg': the file is empty"),
    ([("photo", ("a.jpg", jpeg((1, 2, 3)), "image/jpeg"))], {}, 400, "'a.jpg' has no caption"),
    ([("photo", ("a.jpg", jpeg((1, 2, 3)), "image/jpeg"))], {"caption": "  "}, 400, "has no caption"),
    ([], {"caption": "a cat"}, 400, "no photo given"),
    ([("photo", ("a.jpg", jpeg((1, 2, 3)), "image/jpeg"))] * 2, {"caption": ["a", "b", "c"]}, 400,
     "2 photos and 3 captions"),
    ([("photo", ("a.jpg", jpeg((1, 2, 3)), "image/jpeg"))] * 3, {"caption": "a"}, 400, "at most 2 (--max-photos)"),
])
def test_bad_requests_are_4xx_with_one_clear_line(tmp_path, files, data, status, says):
    with client(tmp_path, max_photos=2) as c:
        r = c.post("/api/predict", files=files or None, data=data)
        assert r.status_code == status and says in r.json()["error"], r.text
        assert c.get("/api/health").json()["status"] == "ok"  # and the server goes on


def test_text_field_as_photo_and_other_content_types_are_refused(tmp_path):
    with client(tmp_path) as c:
        r = c.post("/api/predict", data={"photo": "cat.jpg", "caption": "a cat"})
        assert r.status_code == 400 and "must be a file" in r.json()["error"]
        r = c.post("/api/predict", content=b"hello", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
        r = c.post("/api/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not JSON" in r.json()["error"]
        assert c.get("/api/predict").status_code == 405
        r = c.get("/nowhere")
        assert r.status_code == 404 and "/nowhere" in r.json()["error"]


def test_uploads_over_the_limit_are_413_announced_or_streamed(tmp_path):
    big = jpeg((9, 9, 9), size=(2000, 2000)) + b"\0" * 2**20
    with client(tmp_path, max_upload_mb=0.5) as c:
        r = c.post("/api/predict", files={"photo": ("big.jpg", big, "image/jpeg")}, data={"caption": "x"})
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]
        chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # no content-length: counted as it comes
        r = c.post("/api/predict", content=chunks, headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413


def test_photos_by_path_only_under_allow_dir(tmp_path):
    inside, outside = tmp_path / "photos", tmp_path / "private"
    inside.mkdir(), outside.mkdir()
    (inside / "a.jpg").write_bytes(jpeg((0, 0, 250)))
    (outside / "b.jpg").write_bytes(jpeg((0, 0, 250)))
    (inside / "link.jpg").symlink_to(outside / "b.jpg")
    item = {"items": [{"path": str(inside / "a.jpg"), "caption": "a dog"}]}
    with client(tmp_path) as c:
        r = c.post("/api/predict", json=item)
        assert r.status_code == 403 and "--allow-dir" in r.json()["error"]
    with client(tmp_path, allow_dir=[inside]) as c:
        r = c.post("/api/predict", json=item)
        assert r.status_code == 200 and r.json()["predictions"][0]["names"] == ["dog"]
        for bad in (outside / "b.jpg", inside / "link.jpg", inside / ".." / "private" / "b.jpg"):
            r = c.post("/api/predict", json={"path": str(bad), "caption": "a dog"})
            assert r.status_code == 403 and "not under a folder" in r.json()["error"]
        r = c.post("/api/predict", json={"path": str(inside / "missing.jpg"), "caption": "a dog"})
        assert r.status_code == 400 and "file not found" in r.json()["error"]
        r = c.post("/api/predict", json={"items": [{"caption": "a dog"}]})
        assert r.status_code == 400 and "items[0] has no 'path'" in r.json()["error"]


def test_a_slow_request_is_504_and_a_scorer_failure_is_one_line_500(tmp_path):
    files = {"photo": ("a.jpg", jpeg((1, 2, 3)), "image/jpeg")}
    with client(tmp_path, fake_predictor(tmp_path, sleep=1.0), timeout=0.2) as c:
        r = c.post("/api/predict", files=files, data={"caption": "x"})
        assert r.status_code == 504 and "--timeout" in r.json()["error"]
    with client(tmp_path, fake_predictor(tmp_path, fail=True)) as c:
        r = c.post("/api/predict", files=files, data={"caption": "x"})
        assert r.status_code == 500 and "the scorer broke" in r.json()["error"]
        assert c.get("/api/health").status_code == 200


def test_requests_that_arrive_together_are_scored_as_one_batch():
    seen = []

    def score(photos, captions):
        seen.append(list(captions))
        return np.arange(len(captions), dtype=np.float32)[:, None] + np.zeros((1, 2), np.float32)

    async def main():
        b = MicroBatcher(score, max_rows=8, wait_s=0.05)
        outs = await asyncio.gather(*(b.submit([None] * n, [f"{i}"] * n) for i, n in enumerate([1, 2, 3, 4])))
        more = await b.submit([None], ["alone"])
        await b.close()
        return outs, more, b.stats

    outs, more, stats = asyncio.run(main())
    # 1 + 2 + 3 rows fit in a batch of 8; the 4 rows of the last would pass it, so they wait for the next batch
    assert seen == [["0", "1", "1", "2", "2", "2"], ["3"] * 4, ["alone"]]
    assert [o[:, 0].tolist() for o in outs] == [[0.0], [1.0, 2.0], [3.0, 4.0, 5.0], [0.0, 1.0, 2.0, 3.0]]
    assert more[:, 0].tolist() == [0.0] and stats.requests == 5 and stats.rows == 11


def test_the_page_and_its_files_are_served_and_reach_for_no_cdn(tmp_path):
    with client(tmp_path) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for src in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert c.get(src).status_code == 200, src
        assert c.get("/static/../app.py").status_code == 404
    for f in STATIC.iterdir():  # offline machine: every file the page needs is served by mlc itself
        assert not re.search(r"(?:src|href|url|import|fetch)\W+(?:https?:)?//", f.read_text()), f.name


def test_the_page_ships_as_package_data():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"pipeline.serve" = \["static/\*"\]', text)
    assert {"index.html", "app.js", "style.css"} <= {f.name for f in STATIC.iterdir()}


def test_cli_help_and_bad_options():
    runner = CliRunner()
    r = runner.invoke(cli_app, ["serve", "--help"])
    assert r.exit_code == 0 and "--allow-dir" in r.output and "--max-upload-mb" in r.output
    r = runner.invoke(cli_app, ["serve", "somewhere", "--port", "70000"])
    assert r.exit_code == 2 and "--port must be 0-65535" in r.output


def test_a_port_in_use_is_one_line_and_port_0_gives_a_real_one():
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port > 0 and url_of(sock) == f"http://127.0.0.1:{port}/"
        with pytest.raises(MlcError, match=f"cannot listen on 127.0.0.1:{port}: "):
            bind("127.0.0.1", port)
    finally:
        sock.close()


def test_allow_dir_must_exist(tmp_path):
    with pytest.raises(MlcError, match="--allow-dir .*: no such folder"):
        ServeConfig.build(model=tmp_path, allow_dir=[tmp_path / "nope"])


@pytest.mark.slow  # a whole export (25 s): the fast suite keeps its 2 minutes
def test_an_onnx_export_is_served_as_load_predicts_it(finetuned, tmp_path_factory):
    from pipeline.export import ExportConfig, export
    from pipeline.predictor import load

    model = export(ExportConfig.build(run=finetuned, out=tmp_path_factory.mktemp("srv") / "model"))[0]
    data = finetuned.parent / "tiny"
    rows = [line.split(",", 2) for line in (data / "train.csv").read_text().splitlines()[1:5]]
    paths, captions = [data / "data" / r[0] for r in rows], [r[2].strip('"') for r in rows]
    pred = load(model)
    want = pred.predict_proba([str(p) for p in paths], captions)
    cfg = ServeConfig.build(model=model)
    with TestClient(build(cfg)) as c:
        r = c.post("/api/predict", files=[("photo", (p.name, p.read_bytes(), "image/jpeg")) for p in paths],
                   data={"caption": captions})
        card = c.get("/api/model").json()
    assert r.status_code == 200, r.text
    got = np.array([[p["probabilities"][str(i)] for i in pred.labels.ids] for p in r.json()["predictions"]])
    assert got == pytest.approx(want, abs=1e-5)
    assert [p["labels"] for p in r.json()["predictions"]] == pred.predict([str(p) for p in paths], captions)
    assert card["kind"] == "export" and card["runtime"].startswith("ONNX Runtime") and json.dumps(card)
    probe = ("import sys; from pipeline.serve import ServeConfig, build; "
             f"build(ServeConfig.build(model={str(model)!r})); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr  # an export is served without torch
