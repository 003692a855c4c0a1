"""Photos: opening them safely (regular files inside the image folder), decoding them to RGB the one way (16-bit and
palette greyscale, CMYK, alpha, EXIF orientation; a path or a PIL image alike), and checking a whole folder of them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .log import progress_enabled
from .reading import kind as _kind
from .records import Record

if TYPE_CHECKING:  # check_images takes a DataDir; data imports this module
    from .data import DataDir

_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> a new RGB image; alpha is composited on white (not dropped to black)."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im.copy()
    if im.mode in _HIGH_BIT_MODES:
        # 16-bit/int/float grey: scale to 8 bits (convert("L") would clip everything above 255 to white).
        a = np.asarray(im, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if im.mode == "F" and top <= 1.0:
            a = a * 255.0
        elif top > 255.0:
            a = a / (65535.0 if top <= 65535.0 else top) * 255.0
        return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


ORIENTATION = "exif"  # every decode turns the photo as its EXIF Orientation tag says (recorded in preprocess)


def file_fault(path: Path, inside: Path | None = None) -> str | None:
    """Why ``path`` may not be read as an image, without opening it: missing, or not a regular file (a FIFO
    would block the reader forever, a device never ends). A symbolic link is followed wherever it points
    (a data folder of links into a shared image store is common; docs/data.md#symbolic-links): what it
    reaches must be a regular file. ``inside``, the folder the file was found in, is kept for callers."""
    del inside  # links out of the folder are allowed: an ImageID can never climb out (image_id_fault)
    try:
        st = os.stat(path)  # follows links: what a reader would get
    except FileNotFoundError:
        return "file not found" if not os.path.islink(path) else "a symbolic link to a missing file"
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({_kind(st.st_mode)})"
    return None


@contextlib.contextmanager
def open_image_file(path: Path, inside: Path | None = None) -> Iterator[IO[bytes]]:
    """``path`` opened for reading, after ``file_fault`` found nothing; ImageError otherwise. Opened without
    blocking and checked again on the descriptor, so a file swapped for a FIFO in between cannot hang."""
    if (why := file_fault(path, inside)) is not None:
        raise ImageError(str(path), why)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise ImageError(str(path), f"cannot read: {err.strerror or err}") from err
    fh = os.fdopen(fd, "rb")
    with fh:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(str(path), f"not a regular file ({_kind(mode)})")
        yield fh


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what a corrupt photo raises


def load_image(path: str | os.PathLike[str], draft: int | None = None, inside: Path | None = None) -> Image.Image:
    """Open, fully decode, turn upright and convert an image to RGB; ImageError if missing, corrupt,
    truncated, not a regular file, or (``inside``) a link out of that folder.

    ``draft``: the shorter side the caller will resize to. A JPEG at least twice that size is decoded
    at a reduced scale by libjpeg (``Image.draft``), never below ``draft``. Upright: as the EXIF
    Orientation tag says (``ImageOps.exif_transpose``; phones store portraits sideways with a tag).
    """
    path = Path(path)
    try:
        with open_image_file(path, inside) as fh, Image.open(fh) as im:
            return decode_image(im, draft)
    except DECODE_ERRORS as err:
        raise ImageError(str(path), decode_fault(path, err)) from err


def decode_fault(path: Path, err: Exception) -> str:
    """What Pillow's ``err`` (one of ``DECODE_ERRORS``) means for the photo at ``path``, in the user's words."""
    if isinstance(err, UnidentifiedImageError):  # Pillow names its file object (<_io.BufferedReader name=3>)
        size = path.stat().st_size if path.is_file() else -1
        return "cannot decode image: " + ("an empty file (0 bytes)" if size == 0 else
                                          f"no image format Pillow reads ({size:,} bytes)")
    return f"cannot decode image: {err}"


def decode_image(im: Image.Image, draft: int | None = None) -> Image.Image:
    """The one decode rule, for a photo opened from a file (``load_image``) or given as a Pillow image (the
    Python API): fully decoded, turned upright by its EXIF Orientation, converted to RGB (``_to_rgb``: 16-bit
    and palette greyscale scaled, CMYK converted, alpha composited on white). ``draft``: see ``load_image``;
    it applies to a JPEG not decoded yet (one fresh from ``Image.open``), as it does to a path. Raises what
    Pillow raises (``DECODE_ERRORS``) for a corrupt or truncated one."""
    if draft and im.format == "JPEG" and min(im.size) >= 2 * draft:
        scale = draft / min(im.size)
        im.draft("RGB", (math.ceil(im.width * scale), math.ceil(im.height * scale)))  # no-op once decoded
    im.load()  # decode now, so a truncated file fails here and not inside a DataLoader
    if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im)


def _quick_check(path: Path, inside: Path | None = None) -> str | None:
    """Why an image is unusable, or None. Decodes the whole compressed stream, cheaply.

    ``Image.verify()`` does not read JPEG scan data, so it misses truncated JPEGs. A JPEG decoded in
    draft mode at 1/8 scale still reads every byte (truncation is caught) at about half the cost
    of a full decode; other formats are decoded fully.
    """
    try:
        with open_image_file(path, inside) as fh, Image.open(fh) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            if im.width < 1 or im.height < 1:
                return "image has no pixels"
    except ImageError as err:
        return err.fault
    except DECODE_ERRORS as err:
        return decode_fault(path, err)
    return None


def check_images(
    data_dir: DataDir, records: Sequence[Record], *, skip_bad: bool, progress: bool = True
) -> tuple[list[Record], list[tuple[str, str]]]:
    """Check every record's image opens and decodes.

    Without ``skip_bad`` the first bad image (in record order) raises ImageError naming it. With it,
    returns the records whose images are good and the ``(image_id, fault)`` pairs left out.
    """
    from tqdm import tqdm

    paths = [data_dir.image_path(r.image_id) for r in records]
    # Pillow releases the GIL while decoding, so threads use every core without pickling.
    workers = max(1, min(8, os.cpu_count() or 1))
    kept: list[Record] = []
    skipped: list[tuple[str, str]] = []
    pool = ThreadPoolExecutor(workers)
    try:
        faults = pool.map(functools.partial(_quick_check, inside=data_dir.image_dir), paths)
        bar = tqdm(zip(records, paths, faults, strict=True), total=len(records), desc="images",
                   unit="img", disable=None if progress and progress_enabled() else True, leave=False)
        for record, path, why in bar:
            if why is None:
                kept.append(record)
            elif skip_bad:
                skipped.append((record.image_id, why))
            else:
                raise ImageError(str(path), why)
    finally:
        pool.shutdown(cancel_futures=True)  # on an early error, do not decode the rest first
    return kept, skipped


