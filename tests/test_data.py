"""pipeline.records (the dirty-CSV reader) and pipeline.data (the data folder, image loading/checking,
the fingerprint)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import DataDir, fingerprint
from pipeline.errors import DataError, ImageError
from pipeline.images import check_images, load_image
from pipeline.labels import COCO18, LabelSpace
from pipeline.records import (
    CsvLayout,
    CsvProblems,
    Record,
    image_id_fault,
    parse_csv,
    read_csv,
    read_test_csv,
    read_train_csv,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "comp5329"
MINI = REPO / "examples" / "comp5329-mini"
skip_no_shared = pytest.mark.skipif(not (SHARED / "train.csv").is_file(), reason=f"{SHARED} not present")

SELTZER = ('A street sign labeled "Seltzer Way," with a red fire hydrant in the foreground and a street '
           "stretching into the background.")
TRAIN_HEADER = "ImageID,Labels,Caption\n"
TEST_HEADER = "ImageID,Caption\n"


def write(tmp_path: Path, text: str | bytes, name: str = "train.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


COCO_LAYOUT = CsvLayout(allowed=frozenset(str(i) for i in COCO18.ids))  # as with a labels file of COCO18


def one_problem(path: Path, labelled: bool = True, layout: CsvLayout = COCO_LAYOUT) -> DataError:
    """Parse, expect exactly one problem, and check read_csv raises that same one."""
    _, problems = parse_csv(path, labelled=labelled, layout=layout)
    assert len(problems) == 1, [str(p) for p in problems]
    with pytest.raises(DataError) as info:
        read_csv(path, labelled=labelled, layout=layout)
    assert str(info.value) == str(problems[0])
    return problems[0]


def assert_names(err: DataError, path: Path, line: int | None, *words: str) -> None:
    """The message names the file, the line and the fault."""
    msg = str(err)
    assert str(path) in msg
    assert err.file == str(path) and err.line == line
    if line is not None:
        assert f"{path}:{line}:" in msg
    for word in words:
        assert word in msg, msg


# ------------------------------------------------------------------------------------- quirks


def test_dirty_unescaped_quotes(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER
                 + '0.jpg,1,"Woman in swim suit holding parasol on sunny day."\n'
                 + f'9084.jpg,3 1 11,"{SELTZER}"\n'
                 + '9508.jpg,1,"A cow in street with writing that reads "oh no, not beef on the menu again!""\n'
                 + '5.jpg,1,""Stop" is written on it"\n')
    records = read_train_csv(path)
    assert [r.image_id for r in records] == ["0.jpg", "9084.jpg", "9508.jpg", "5.jpg"]
    assert records[1].caption == SELTZER
    assert records[2].caption == 'A cow in street with writing that reads "oh no, not beef on the menu again!"'
    assert records[3].caption == '"Stop" is written on it'
    assert [r.line for r in records] == [2, 3, 4, 5]


def test_newline_inside_caption(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER
                 + '1014.jpg,18,"Atop an oriental rug rests a dog and a taller one\n'
                 + 'full of very tidily arranged piles of jeans and tops."\n'
                 + '1015.jpg,9 1,"A man standing on the end of a pier next to a boat."\n'
                 + '2259.jpg,1 3,"Men loading up a van with bags and suitcases.\n."\n'
                 + '6751.jpg,4,"Red motor \nscooter parked on the sand, with "a sunset"\nin background."\n'
                 + '7.jpg,1,"last"\n'
                 + '8.jpg,1,"\nforeground,then more"\n')
    records = read_train_csv(path)
    assert [(r.image_id, r.line) for r in records] == [
        ("1014.jpg", 2), ("1015.jpg", 4), ("2259.jpg", 5), ("6751.jpg", 7), ("7.jpg", 10), ("8.jpg", 11)]
    # Inside an open caption, "word," at a line start is caption text, not a record.
    assert records[5].caption == "\nforeground,then more"
    assert records[0].caption == ("Atop an oriental rug rests a dog and a taller one\n"
                                  "full of very tidily arranged piles of jeans and tops.")
    assert records[2].caption == "Men loading up a van with bags and suitcases.\n."
    # A continuation line may follow a line that ends in an inner quote; the last quote still closes.
    assert records[3].caption == 'Red motor \nscooter parked on the sand, with "a sunset"\nin background.'


def test_crlf_line_ends(tmp_path: Path) -> None:
    text = (TRAIN_HEADER + '1.jpg,1 19,"A couple of men riding horses."\n'
            + '2.jpg,1,"two\nlines"\n' + f'3.jpg,3,"{SELTZER}"\n')
    path = write(tmp_path, text.replace("\n", "\r\n"))
    records = read_train_csv(path)
    assert [r.caption for r in records] == ["A couple of men riding horses.", "two\nlines", SELTZER]
    assert [r.line for r in records] == [2, 3, 5]


def test_properly_escaped_quotes(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER
                 + '9084.jpg,3 1 11,"A street sign labeled ""Seltzer Way,"" with a red fire hydrant"\n'
                 + '9508.jpg,1,"writing that reads ""oh no, not beef!"""\n'
                 + '10.jpg,1,"""Stop"" sign"\n'
                 + '11.jpg,1,"a dirty "quote" beside an escaped ""one"""\n')
    records = read_train_csv(path)
    assert records[0].caption == 'A street sign labeled "Seltzer Way," with a red fire hydrant'
    assert records[1].caption == 'writing that reads "oh no, not beef!"'
    assert records[2].caption == '"Stop" sign'
    # Not consistently doubled: a dirty caption, kept exactly as written.
    assert records[3].caption == 'a dirty "quote" beside an escaped ""one""'


@pytest.mark.parametrize("quoting", ["QUOTE_MINIMAL", "QUOTE_ALL"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_escaped_form_agrees_with_csv_module(tmp_path: Path, quoting: str, newline: str) -> None:
    """A file written by csv.writer (any quoting, any line end) reads back to the same captions."""
    import csv

    captions = [SELTZER, 'ends with "quote"', '"starts" with one', "plain, with comma", "multi\nline \"x\"",
                "plain caption"]
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator=newline, quoting=getattr(csv, quoting))
    writer.writerow(["ImageID", "Labels", "Caption"])
    for i, cap in enumerate(captions):
        writer.writerow([f"{i}.jpg", "1 3", cap])
    records = read_train_csv(write(tmp_path, buf.getvalue()))
    assert [r.caption for r in records] == captions
    assert all(r.labels == ("1", "3") for r in records)


def test_trailing_comma_variant(tmp_path: Path) -> None:
    path = write(tmp_path, 'ImageID,Labels,Caption,\r\n0.jpg,1,"a man, a plan",\r\n'
                 + f'1.jpg,3 1 11,"{SELTZER}",\r\n2.jpg,5,an unquoted one,\r\n')
    assert [r.caption for r in read_train_csv(path)] == ["a man, a plan", SELTZER, "an unquoted one"]
    test = write(tmp_path, 'ImageID,Caption,\n30000.jpg,"a caption",\n', "test.csv")
    assert read_test_csv(test) == [Record("30000.jpg", "a caption", None, 2)]


def test_utf8_bom(tmp_path: Path) -> None:
    path = write(tmp_path, b"\xef\xbb\xbf" + (TRAIN_HEADER + '0.jpg,1,"caf\xc3\xa9"\n').encode("latin-1"))
    assert read_train_csv(path) == [Record("0.jpg", "caf\u00e9", ("1",), 2)]


def test_unquoted_captions(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + "0.jpg,1,A dog on a mat\n1.jpg,2 3,A bike, and a car\n")
    assert [r.caption for r in read_train_csv(path)] == ["A dog on a mat", "A bike, and a car"]
    test = write(tmp_path, TEST_HEADER + "30000.jpg,A cat\n", "test.csv")
    assert read_test_csv(test)[0].caption == "A cat"


def test_labels_in_any_order(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + '0.jpg,8 3 13,"a"\n1.jpg,13 3 8,"b"\n2.jpg,"19 1","c"\n')
    records = read_train_csv(path)
    assert [r.labels for r in records] == [("8", "3", "13"), ("13", "3", "8"), ("19", "1")]  # kept as written
    y = COCO18.multi_hot([r.labels for r in records])
    assert (y[0] == y[1]).all() and y[0].sum() == 3


def test_test_rows_have_no_labels_and_blank_lines_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, TEST_HEADER + '30000.jpg,"one"\n\n30001.jpg,"two"\n\n\n', "test.csv")
    assert read_test_csv(path) == [Record("30000.jpg", "one", None, 2), Record("30001.jpg", "two", None, 4)]
    no_newline = write(tmp_path, TEST_HEADER + '30000.jpg,"one"', "t2.csv")
    assert len(read_test_csv(no_newline)) == 1


# ------------------------------------------------------------------------------------- errors


def test_duplicate_image_id_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + '5.jpg,1,"a"\n6.jpg,1,"b"\n5.jpg,2,"c"\n')
    err = one_problem(path)
    assert_names(err, path, 4, "duplicate ImageID 5.jpg", "line 2")


def test_a_text_label_among_integer_labels_is_a_typo(tmp_path: Path) -> None:
    rows = "".join(f'{i}.jpg,{1 + i % 5},"c"\n' for i in range(8))
    write(tmp_path, TRAIN_HEADER + rows + '8.jpg,1 x3,"b"\n')
    with pytest.raises(DataError) as info:
        DataDir.open(tmp_path).label_space()
    assert_names(info.value, tmp_path / "train.csv", 10, "label 'x3' is not an integer", "--labels")
    write(tmp_path, TRAIN_HEADER + rows + '8.jpg,1.5,"a"\n')
    with pytest.raises(DataError, match="label '1.5' is not an integer"):
        DataDir.open(tmp_path).label_space()
    # Integer labels only: the space is what train.csv holds, sorted numerically, COCO names when COCO ids.
    write(tmp_path, TRAIN_HEADER + rows)
    space = DataDir.open(tmp_path).label_space()
    assert space.ids == (1, 2, 3, 4, 5) and space.names[:2] == ("person", "bicycle")


@pytest.mark.parametrize("label", ["12", "20", "0"])
def test_label_outside_label_space(tmp_path: Path, label: str) -> None:
    path = write(tmp_path, TRAIN_HEADER + f'0.jpg,1,"a"\n1.jpg,3 {label},"b"\n')
    assert_names(one_problem(path), path, 3, f"label '{label}' is not in the labels file", "1, 2, 3")


def test_custom_label_space(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + '0.jpg,12,"a"\n')
    labels = write(tmp_path, "id,name\n12,twelve\n1,one\n", "labels.csv")
    space = LabelSpace.from_file(labels)
    assert space.ids == (12, 1) and space.names == ("twelve", "one")  # the file's order, not sorted
    layout = CsvLayout(allowed=frozenset({"1", "12"}))
    assert read_csv(path, labelled=True, layout=layout)[0].labels == ("12",)
    assert_names(one_problem(write(tmp_path, TRAIN_HEADER + '0.jpg,3,"a"\n'), layout=layout),
                 tmp_path / "train.csv", 2, "label '3'", "1, 12")
    d = DataDir.open(tmp_path)  # labels.csv in the folder is found by default
    assert d.label_space() == space
    with pytest.raises(DataError, match="label '3' is not in the labels file"):
        d.records("train")


def test_train_row_without_labels(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + '0.jpg,1,"a"\n1.jpg,,"b"\n2.jpg, ,"c"\n')
    _, problems = parse_csv(path, labelled=True)
    assert [(p.line, "no labels" in p.fault) for p in problems] == [(3, True), (4, True)]


def test_repeated_label(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + '0.jpg,1 3 1,"a"\n')
    assert_names(one_problem(path), path, 2, "label '1' is repeated")


@pytest.mark.parametrize("caption", ['""', "", "   ", '"   "'])
def test_empty_caption(tmp_path: Path, caption: str) -> None:
    path = write(tmp_path, TRAIN_HEADER + '0.jpg,1,"a"\n' + f"1.jpg,1,{caption}\n")
    assert_names(one_problem(path), path, 3, "empty caption")


@pytest.mark.parametrize(
    ("image_id", "fault"),
    [
        ("sub/1.jpg", "path separator"),
        ("sub\\1.jpg", "path separator"),
        ("../1.jpg", "'..'"),
        ("..", "'..'"),
        ("/etc/1.jpg", "absolute path"),
        ("C:\\data\\1.jpg", "absolute path"),
        ("1.txt", "not an image file name"),
        ("abc", "not an image file name"),
    ],
)
def test_image_id_must_be_a_plain_file_name(tmp_path: Path, image_id: str, fault: str) -> None:
    assert fault in (image_id_fault(image_id) or "")
    path = write(tmp_path, TRAIN_HEADER + '0.jpg,1,"a"\n' + f'{image_id},1,"b"\n' + '2.jpg,1,"c"\n')
    records, problems = parse_csv(path, labelled=True)
    # The bad row is refused on its own line; it is never glued onto the caption before it.
    assert [r.image_id for r in records] == ["0.jpg", "2.jpg"]
    assert records[0].caption == "a"
    assert len(problems) == 1
    assert_names(problems[0], path, 3, fault)


def test_plain_file_names_pass() -> None:
    for name in ("0.jpg", "30000.JPG", "a b.png", "x.jpeg"):
        assert image_id_fault(name) is None


def test_missing_header(tmp_path: Path) -> None:
    path = write(tmp_path, '0.jpg,1,"a"\n1.jpg,30,"b"\n')
    records, problems = parse_csv(path, labelled=True, layout=COCO_LAYOUT)
    assert_names(problems[0], path, 1, "missing header", "ImageID,Labels,Caption")
    assert [p.line for p in problems] == [1, 2]  # the rows are still checked: every problem at once
    assert [r.image_id for r in records] == ["0.jpg"]


@pytest.mark.parametrize(
    ("header", "labelled"),
    [("ImageID,Caption", True), ("id,labels,caption", True), ("Image,Labels,Caption", True)],
)
def test_wrong_columns(tmp_path: Path, header: str, labelled: bool) -> None:
    path = write(tmp_path, f'{header}\n0.jpg,1,"a"\n')
    err = one_problem(path, labelled=labelled)
    assert_names(err, path, 1, "wrong columns", f"found '{header}'")


def test_extra_columns_and_a_labelled_test_file_are_read_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, 'ImageID,Labels,Caption,Extra\n0.jpg,1 3,"a, b",x\n1.jpg,2,"c"\n')
    records, problems = parse_csv(path, labelled=True)
    assert [r.image_id for r in records] == ["0.jpg"] and records[0].labels == ("1", "3")
    assert records[0].caption == "a, b"
    assert_names(problems[0], path, 3, "expected 4 fields (ImageID,Labels,Caption,Extra), found 3")
    swapped = write(tmp_path, 'ImageID,Caption,Labels\n0.jpg,"a cat",17\n', "swapped.csv")
    assert read_train_csv(swapped) == [Record("0.jpg", "a cat", ("17",), 2)]
    test = write(tmp_path, 'ImageID,Labels,Caption\n30000.jpg,1,"a"\n', "test.csv")  # labels kept for scoring
    assert read_test_csv(test) == [Record("30000.jpg", "a", ("1",), 2)]


def test_unterminated_quote(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + '0.jpg,1,"a\n1.jpg,1,"b"\n2.jpg,1,"c\n')
    records, problems = parse_csv(path, labelled=True)
    assert [r.image_id for r in records] == ["1.jpg"]  # the next record is not swallowed
    assert [(p.line, "unterminated quote" in p.fault) for p in problems] == [(2, True), (4, True)]
    assert_names(problems[0], path, 2, "unterminated quote")


def test_long_unterminated_caption_stays_fast(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + '0.jpg,1,"never closed\n' + "more words here\n" * 50_000
                 + '1.jpg,1,"ok"\n')
    records, problems = parse_csv(path, labelled=True)  # linear in the file size, not quadratic
    assert [r.image_id for r in records] == ["1.jpg"] and records[0].line == 50_003
    assert [p.line for p in problems] == [2]


def test_text_after_closing_quote(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + '0.jpg,1,"a" extra\n1.jpg,1,"b"\nstray words here\n')
    _, problems = parse_csv(path, labelled=True)
    assert [p.line for p in problems] == [2, 4]
    assert all("after the caption's closing quote" in p.fault for p in problems)


def test_extra_field_in_test_file(tmp_path: Path) -> None:
    path = write(tmp_path, TEST_HEADER + '30000.jpg,1 3,"a"\n', "test.csv")
    assert_names(one_problem(path, labelled=False), path, 2, "not quoted but contains a quote")


def test_missing_caption_field(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + "0.jpg,1\n")
    assert_names(one_problem(path), path, 2, "missing caption field")


def test_unquoted_caption_cannot_continue(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER + "0.jpg,1,a cat\non a mat\n")
    assert_names(one_problem(path), path, 3, "does not start a record (ImageID,...)")
    # another layout: the message names its id column
    path = write(tmp_path, "file,tags,title\n0.jpg,cat,a cat\non a mat\n")
    layout = CsvLayout("file", "tags", "title", "|", True, None)
    assert_names(one_problem(path, layout=layout), path, 3, "does not start a record (file,...)")


def test_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER.encode() + b'0.jpg,1,"caf\xe9"\n1.jpg,1,"ok"\n')
    records, problems = parse_csv(path, labelled=True)
    assert [r.image_id for r in records] == ["1.jpg"]
    assert_names(problems[0], path, 2, "not valid UTF-8")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="file not found") as info:
        read_train_csv(missing)
    assert info.value.file == str(missing)
    with pytest.raises(DataError, match="empty file"):
        read_train_csv(write(tmp_path, ""))
    with pytest.raises(DataError, match="no records"):
        read_train_csv(write(tmp_path, TRAIN_HEADER + "\n"))


def test_all_problems_are_collected(tmp_path: Path) -> None:
    path = write(tmp_path, TRAIN_HEADER
                 + '0.jpg,1,"a"\n1.jpg,x,"b"\n2.jpg,1,""\n../3.jpg,1,"c"\n0.jpg,1,"d"\n4.jpg,20,"e"\n'
                 + '5.jpg,1,"f"\n6.jpg,,"g"\n')
    records, problems = parse_csv(path, labelled=True, layout=COCO_LAYOUT)
    assert [r.image_id for r in records] == ["0.jpg", "5.jpg"]
    assert [p.line for p in problems] == [3, 4, 5, 6, 7, 9]
    with pytest.raises(CsvProblems) as info:
        read_train_csv(path, COCO_LAYOUT)
    err = info.value
    assert isinstance(err, DataError) and err.line == 3 and len(err.problems) == 6
    assert f"{path}:3:" in str(err) and "5 more problems" in str(err) and "line 9" not in str(err)
    # Nothing dropped silently: every record line is either read or reported.
    assert {r.line for r in records} | {p.line for p in problems} == set(range(2, 10))


# ---------------------------------------------------------------------------------- data folder


def make_folder(root: Path, image_sub: str | None = "data", n_train: int = 4, n_test: int = 2) -> Path:
    """A tiny competition folder with real (small) JPEGs."""
    images = root / image_sub if image_sub else root
    images.mkdir(parents=True, exist_ok=True)
    rows = [f'{i}.jpg,{1 + i % 3},"caption {i}"' for i in range(n_train)]
    (root / "train.csv").write_text(TRAIN_HEADER + "\n".join(rows) + "\n")
    rows = [f'{100 + i}.jpg,"test caption {i}"' for i in range(n_test)]
    (root / "test.csv").write_text(TEST_HEADER + "\n".join(rows) + "\n")
    rng = np.random.default_rng(0)
    for i in [*range(n_train), *range(100, 100 + n_test)]:
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
    return root


@pytest.mark.parametrize("sub", ["data", "images", None])
def test_data_dir_finds_images(tmp_path: Path, sub: str | None) -> None:
    make_folder(tmp_path, sub)
    d = DataDir.open(tmp_path)
    assert d.image_dir == (tmp_path / sub if sub else tmp_path)
    assert len(d.records("train")) == 4 and len(d.records("test")) == 2
    assert d.image_path("3.jpg") == d.image_dir / "3.jpg"
    assert load_image(d.image_path("3.jpg")).size == (32, 24)


def test_data_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data folder not found"):
        DataDir.open(tmp_path / "absent")
    (tmp_path / "train.csv").write_text(TRAIN_HEADER + '0.jpg,1,"a"\n')
    d = DataDir.open(tmp_path)
    assert d.has("train") and not d.has("test")
    assert len(d.records("train")) == 1  # test.csv may be absent when not needed
    with pytest.raises(DataError, match="test.csv not found") as info:
        d.records("test")
    assert info.value.file == str(tmp_path / "test.csv")
    for bad in ("../0.jpg", "/etc/passwd.jpg", "a/0.jpg"):
        with pytest.raises(DataError, match="plain file name"):
            d.image_path(bad)


# --------------------------------------------------------------------------------------- images


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG"), ("1", "PNG"),
     ("I;16", "PNG"), ("RGB", "JPEG"), ("L", "JPEG")],
)
def test_load_image_converts_any_mode_to_rgb(tmp_path: Path, mode: str, fmt: str) -> None:
    base = Image.new("RGB", (20, 10), (200, 100, 50))
    if mode == "I;16":
        im = Image.fromarray(np.full((10, 20), 65535, dtype=np.uint16))
    elif mode in ("RGBA", "LA"):
        im = base.convert(mode)
        im.putpixel((0, 0), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))  # fully transparent black
    else:
        im = base.convert(mode)
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(_encode(im, fmt))
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)
    if mode in ("RGBA", "LA"):
        assert out.getpixel((0, 0)) == (255, 255, 255)  # alpha composited on white, not black
    if mode == "I;16":
        assert out.getpixel((0, 0)) == (255, 255, 255)  # 16-bit scaled to 8 bits, not clipped
    out.getpixel((19, 9))  # usable after the file is closed


def test_load_image_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    path = tmp_path / "p.png"
    im.save(path, transparency=0)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (255, 0, 0)


def test_load_image_errors(tmp_path: Path) -> None:
    good = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    for name, fault in [("trunc.jpg", "(?i)truncated"), ("junk.jpg", "cannot decode"), ("gone.jpg", "not found")]:
        with pytest.raises(ImageError, match=fault) as info:
            load_image(tmp_path / name)
        assert info.value.path == str(tmp_path / name)


def test_check_images(tmp_path: Path) -> None:
    make_folder(tmp_path, n_train=6)
    d = DataDir.open(tmp_path)
    records = d.records("train")
    kept, skipped = check_images(d, records, skip_bad=False, progress=False)
    assert kept == records and skipped == []
    path = d.image_path("2.jpg")
    path.write_bytes(path.read_bytes()[:-60])  # truncated: verify() alone would not notice
    d.image_path("4.jpg").unlink()
    kept, skipped = check_images(d, records, skip_bad=True, progress=False)
    assert [r.image_id for r in kept] == ["0.jpg", "1.jpg", "3.jpg", "5.jpg"]
    assert [i for i, _ in skipped] == ["2.jpg", "4.jpg"]
    assert "truncated" in skipped[0][1] and "not found" in skipped[1][1]
    with pytest.raises(ImageError, match="truncated") as info:
        check_images(d, records, skip_bad=False, progress=False)
    assert info.value.path == str(path)  # the first bad one, in record order


# ---------------------------------------------------------------------------------- fingerprint


def test_fingerprint(tmp_path: Path) -> None:
    make_folder(tmp_path)
    d = DataDir.open(tmp_path)
    records = d.records("train")
    base = fingerprint(records, d.image_dir)
    assert base == fingerprint(list(records), d.image_dir) and len(base) == 64
    assert fingerprint(records, None) != base
    r0 = records[0]
    changed = [
        [Record(r0.image_id, r0.caption + ".", r0.labels, r0.line), *records[1:]],
        [Record(r0.image_id, r0.caption, ("1", "3"), r0.line), *records[1:]],
        records[::-1],
    ]
    for other in changed:
        assert fingerprint(other, d.image_dir) != base
    # Label order within a row and line numbers carry no meaning.
    two = Record(r0.image_id, r0.caption, ("3", "1"), 99)
    swapped = Record(r0.image_id, r0.caption, ("1", "3"), 2)
    assert fingerprint([two], None) == fingerprint([swapped], None)
    # One byte of one image.
    path = d.image_path("1.jpg")
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(bytes(data))
    assert fingerprint(records, d.image_dir) != base
    path.unlink()
    with pytest.raises(ImageError, match="not found"):
        fingerprint(records, d.image_dir)


# ------------------------------------------------------------------------------- the real data


@pytest.mark.shared_data
@skip_no_shared
def test_shared_data_reads_every_row() -> None:
    train = read_train_csv(SHARED / "train.csv")
    test = read_test_csv(SHARED / "test.csv")
    assert len(train) == 12_000 and len(test) == 1_001
    by_id = {r.image_id: r for r in train}
    assert by_id["9084.jpg"].caption == SELTZER
    assert by_id["9084.jpg"].labels == ("3", "1", "11")
    assert by_id["1014.jpg"].caption.count("\n") == 1
    assert "36889.jpg" in {r.image_id for r in test}
    assert {r.image_id for r in train} == {f"{i}.jpg" for i in range(12_000)}


@pytest.mark.shared_data
@skip_no_shared
def test_mini_sample_matches_shared_records() -> None:
    d = DataDir.open(MINI)
    for split in ("train", "test"):
        # Byte for byte: the sample's lines are the shared file's header plus a run of its lines.
        mini_lines = (MINI / f"{split}.csv").read_bytes().splitlines(keepends=True)
        shared_lines = (SHARED / f"{split}.csv").read_bytes().splitlines(keepends=True)
        assert mini_lines[0] == shared_lines[0]
        it = iter(shared_lines[1:])
        assert all(line in it for line in mini_lines[1:])  # an in-order subsequence
        mini = d.records(split)
        shared = {r.image_id: r for r in DataDir.open(SHARED).records(split)}
        assert [(r.caption, r.labels) for r in mini] == [
            (shared[r.image_id].caption, shared[r.image_id].labels) for r in mini]


def test_mini_sample_is_complete() -> None:
    d = DataDir.open(MINI)
    train, test = d.records("train"), d.records("test")
    assert 780 <= len(train) <= 850 and 190 <= len(test) <= 220
    ids = {r.image_id for r in train}
    assert {"1014.jpg", "2259.jpg", "6751.jpg", "9084.jpg", "9508.jpg"} <= ids
    assert "36889.jpg" in {r.image_id for r in test}
    assert next(r for r in train if r.image_id == "9084.jpg").caption == SELTZER
    counts = COCO18.multi_hot([r.labels for r in train]).sum(0)
    assert counts.min() >= 5, dict(zip(COCO18.names, counts, strict=True))
    files = sorted(p.name for p in d.image_dir.iterdir())
    assert files == sorted(r.image_id for r in train + test)
    size = sum(p.stat().st_size for p in MINI.rglob("*") if p.is_file())
    assert size <= 15e6
    assert os.path.getsize(MINI / "SOURCE.md") > 0


def test_label_tokens_are_integers_only_when_every_one_is() -> None:
    from pipeline.data import fingerprint
    from pipeline.labels import typed_ids

    assert typed_ids(["3", "-1", "19"]) == [3, -1, 19]
    assert typed_ids(["--5", "3"]) == ["--5", "3"] and typed_ids(["³", "3"]) == ["³", "3"]  # never int("--5")
    assert LabelSpace.from_tokens(["10", "9", "10"]).ids == (9, 10)  # numerically, not "10" < "9"
    # hostile case V04: a stray 0 or 25 among COCO ids no longer strips every label of its COCO name
    stray = LabelSpace.from_tokens(["1", "3", "15", "0", "25"])
    assert stray.names == ("0", "person", "car", "bench", "25")
    assert LabelSpace.from_tokens(["100", "200", "1"]).names == ("1", "100", "200")  # not COCO: numbers
    rec = Record(image_id="1.jpg", labels=("--5", "3"), caption="c", line=2)
    assert len(fingerprint([rec], None)) == 64


def test_each_csv_is_parsed_once_per_data_folder(tmp_path, monkeypatch):
    from conftest import make_data_dir

    from pipeline import data as data_module

    calls = []
    real = data_module.read_csv
    monkeypatch.setattr(data_module, "read_csv", lambda path, **kw: calls.append(Path(path).name) or real(path, **kw))
    dd = DataDir.open(make_data_dir(tmp_path / "d", n_train=6, n_test=2))
    first = dd.records("train")
    assert dd.label_space().ids == (1, 3, 18)
    again = dd.records("train")
    assert calls == ["train.csv"] and again == first
    assert dd.records("test") == dd.records("test") and calls == ["train.csv", "test.csv"]
    first.clear()  # each caller gets its own list
    assert len(dd.records("train")) == 6
