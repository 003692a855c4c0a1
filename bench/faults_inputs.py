"""Issue 18, part B: inputs. The fault cases of ``bench/faults.py --group inputs``: data faults (label tokens,
numbers spelled twice, ids, a stray label, images that are not regular files in the folder), sideways phone
photos, model folders that ask to run code, and edited or out-of-folder files in runs, exports and caches.

Each case gets an ``Env`` of faults.py (set up by the case's own ``setup``: most need only a data folder) and
returns a verdict. Besides faults.py's verdicts:

  HANG      the command did not end (killed after 60 s)
  EXECUTED  code from a model folder ran
  found     ``mlc validate`` listed the fault (exit 1) / ``missed``: it said nothing
  warned    a warning naming the label, its lines and --labels (a likely typo, not an error)
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import make_data_dir, refresh_manifest
from faults import TINY, Env, classify

HANG_AFTER = 60


def data_only(e: Env) -> None:
    e.data = make_data_dir(e.root / "tiny", n_train=30, n_test=4)


def with_export(e: Env) -> None:
    e.setup()
    e.model = e.root / "model"
    code, out = e.mlc("export", e.run, "--out", e.model)
    assert code == 0, out


def _setup(fn: Callable[[Env], None]) -> Callable[[Callable[[Env], str]], Callable[[Env], str]]:
    def mark(case: Callable[[Env], str]) -> Callable[[Env], str]:
        case.setup = fn  # type: ignore[attr-defined]  # faults.main calls it instead of Env.setup
        return case
    return mark


def _mlc(e: Env, *args: object) -> tuple[int, str]:
    try:
        return e.mlc(*args, timeout=HANG_AFTER)
    except subprocess.TimeoutExpired:
        return -999, ""


def _verdict(code: int, out: str, names: str = "", right: bool | None = None) -> str:
    return f"HANG (killed after {HANG_AFTER} s)" if code == -999 else classify(code, out, names=names, right=right)


def _extract(e: Env, *args: object) -> str:
    return _verdict(*_mlc(e, "extract", e.data, *TINY, *e.extra, "--cache-dir", e.root / "cache", *args), names="")


def _validate(e: Env, fault: str, *args: object) -> str:
    code, out = _mlc(e, "validate", e.data, *args)
    return "found" if code == 1 and fault in out else ("HANG" if code == -999 else f"missed (exit {code})")


def _rows(e: Env, edit: Callable[[list[str]], None], name: str = "train.csv") -> None:
    lines = (e.data / name).read_text().splitlines()
    edit(lines)
    (e.data / name).write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------- data


def _swap_image(e: Env, make: Callable[[Path], None]) -> str:
    bad = e.data / "data" / "3.jpg"
    bad.unlink()
    make(bad)
    return _extract(e, "--split", "train")


@_setup(data_only)
def case_input_fifo_image(e: Env) -> str:
    return _swap_image(e, os.mkfifo)


@_setup(data_only)
def case_input_device_image(e: Env) -> str:
    return _swap_image(e, lambda p: p.symlink_to("/dev/zero"))


@_setup(data_only)
def case_input_link_out_of_folder(e: Env) -> str:
    outside = e.root / "elsewhere.jpg"
    outside.write_bytes((e.data / "data" / "4.jpg").read_bytes())
    verdict = _swap_image(e, lambda p: p.symlink_to(outside))
    return verdict.replace("SILENT", "SILENT (read a file outside the data folder)")


@_setup(data_only)
def case_input_label_with_space(e: Env) -> str:
    words = {"1": "person", "3": "car", "18": "dog"}

    def to_words(lines: list[str]) -> None:
        for i, line in enumerate(lines[1:], start=1):
            image, labels, caption = line.split(",", 2)
            lines[i] = f"{image},{';'.join(words[t] for t in labels.split())},{caption}"
        lines[7] = lines[7].replace(",", ",traffic light;", 1)
    _rows(e, to_words)
    found = _validate(e, "traffic light", "--csv-only", "--label-sep", ";")
    return f"validate: {found}, extract: {_extract(e, '--split', 'train', '--label-sep', ';')}"


@_setup(data_only)
def case_input_number_written_twice(e: Env) -> str:
    def zero(lines: list[str]) -> None:
        lines[3] = lines[3].replace(",3", ",03", 1) if ",3" in lines[3] else lines[3].replace(",", ",03 ", 1)
    _rows(e, zero)
    return f"validate: {_validate(e, '03', '--csv-only')}, extract: {_extract(e, '--split', 'train')}"


@_setup(data_only)
def case_input_id_with_comma(e: Env) -> str:
    (e.data / "data" / "1000.jpg").rename(e.data / "data" / "a,b.jpg")
    rows = ["Caption,ImageID"]  # a proper CSV (other column order): quoted ids may hold commas
    for line in (e.data / "test.csv").read_text().splitlines()[1:]:
        image, caption = line.split(",", 1)
        image = '"a,b.jpg"' if image == "1000.jpg" else image
        rows.append(f'"{caption.strip(chr(34)).replace(chr(34), chr(34) * 2)}",{image}')
    (e.data / "test.csv").write_text("\n".join(rows) + "\n")
    return f"validate: {_validate(e, 'a,b.jpg', '--csv-only')}, extract test: {_extract(e, '--split', 'test')}"


@_setup(data_only)
def case_input_id_too_long(e: Env) -> str:
    _rows(e, lambda lines: lines.__setitem__(3, lines[3].replace("2.jpg", "x" * 300 + ".jpg", 1)))
    return f"validate: {_validate(e, 'bytes long', '--csv-only')}, extract: {_extract(e, '--split', 'train')}"


@_setup(data_only)
def case_input_stray_label(e: Env) -> str:
    _rows(e, lambda lines: lines.__setitem__(8, lines[8].replace(",", ",12 ", 1)))
    code, out = _mlc(e, "validate", e.data, "--csv-only")
    names = "COCO names kept" if "person" in out else "COCO names dropped"
    if "warning:" in out and "label 12" in out and "--labels" in out:
        return f"warned (its line and --labels named), {names}"
    return f"SILENT (12 became a class, {names})" if code == 0 else _verdict(code, out)


@_setup(data_only)
def case_input_sideways_photo(e: Env) -> str:
    code = ("import sys; from PIL import Image; from pipeline.data import load_image\n"
            "up = Image.new('RGB', (20, 40)); exif = Image.Exif(); exif[0x0112] = 6\n"
            "up.rotate(90, expand=True).save(sys.argv[1], exif=exif); print(load_image(sys.argv[1]).size)")
    rc, out = e.python(code, e.data / "data" / "0.jpg")
    return "correct (upright)" if "(20, 40)" in out else ("SILENT (decoded sideways)" if rc == 0 else _verdict(rc, out))


# ---------------------------------------------------------------------------------- model folders


@_setup(data_only)
def case_input_hf_folder_with_code(e: Env) -> str:
    from pipeline.encoders import create_text_encoder

    folder = e.root / "evil-bert"
    enc = create_text_encoder("tiny-bert", random_init=True, seed=0)
    enc.model.save_pretrained(str(folder))
    enc.tokenizer.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evil-bert", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                 "AutoModel": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "modeling_evil.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').touch()\n")
    code, out = _mlc(e, "extract", e.data, "--image-encoder", "tiny-resnet", "--text-encoder", f"hf:{folder}",
                     "--random-init", "--workers", 0, *e.extra, "--split", "train", "--cache-dir", e.root / "cache")
    if (folder / "RAN").exists():
        return "EXECUTED"
    if "Do you wish to run the custom code" in out:
        return "PROMPTED (asked on stdin whether to run the folder's code)"
    verdict = _verdict(code, out, names="code")
    named = "auto_map" in out or "trust_remote_code" in out
    return verdict if verdict != "clear" or named else "clear (but misleading)"


def _resign_export(model: Path, edit: Callable[[dict], None]) -> None:
    """Edit export.json as a writer that knows the format would: file hashes (and its own checksum) redone."""
    from pipeline.folders import sha256_file

    path = model / "export.json"
    d = json.loads(path.read_text())
    edit(d)
    d["files"] = {name: {"bytes": (model / name).stat().st_size, "sha256": sha256_file(model / name)}
                  for name in d["files"] if (model / name).is_file()}
    if "sha256" in d:  # the after checkout's self-check
        from pipeline.schemas import checksum

        d["sha256"] = checksum(d)
    path.write_text(json.dumps(d))


def _predict(e: Env, folder: Path, names: str, right: bool | None = None) -> str:
    photo = e.data / "data" / "1000.jpg"
    return _verdict(*_mlc(e, "predict", folder, photo, "--caption", "a dog", *e.extra), names=names, right=right)


@_setup(with_export)
def case_input_export_path_out(e: Env) -> str:
    outside = "../run/head-0.safetensors"
    _resign_export(e.model, lambda d: d.update(heads=[outside], files={**d["files"], outside: {}}))
    verdict = _predict(e, e.model, names="export.json")
    return verdict.replace("SILENT", "SILENT (read a head outside the export)")


@_setup(with_export)
def case_input_export_json_edited(e: Env) -> str:
    path = e.model / "export.json"
    d = json.loads(path.read_text())
    d["thresholds"] = [0.99] * len(d["thresholds"])  # valid values, no hash redone
    path.write_text(json.dumps(d))
    return _predict(e, e.model, names="export.json").replace("SILENT", "SILENT (edited thresholds used)")


@_setup(with_export)
def case_input_encoder_json_option(e: Env) -> str:
    def edit(_: dict) -> None:
        enc = e.model / "encoders" / "0-text" / "encoder.json"
        enc.write_text(json.dumps({**json.loads(enc.read_text()), "options": {"evil": 1}}))
    _resign_export(e.model, edit)
    return _predict(e, e.model, names="encoder.json")


@_setup(Env.setup)
def case_input_huge_head(e: Env) -> str:
    head = e.run / "head.json"
    head.write_text(json.dumps({**json.loads(head.read_text()), "hidden": 10 ** 9}))
    refresh_manifest(e.run)
    return _verdict(*_mlc(e, "submit", e.run, e.data, "--cache-dir", e.root / "cache", "--workers", 0,
                          *e.extra), names="head.json")


@_setup(Env.setup)
def case_input_cache_meta_edited(e: Env) -> str:
    import h5py

    with h5py.File(e.cache, "r+") as f:
        meta = json.loads(f.attrs["meta"])
        meta["label_names"] = ["cat", "bus", "boat"]
        f.attrs["meta"] = json.dumps(meta, sort_keys=True)
    code, out = _mlc(e, "fit-head", e.cache, "--out", e.root / "run2", "--epochs", 1)
    return _verdict(code, out, names=e.cache.name).replace("SILENT", "SILENT (edited label names used)")


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_input_")}
