"""The image files of a dataset, checked when it is loaded. Every header is read (size and EXIF orientation only:
fast); unreadable files are refused, or left out with `skip_bad_images`; and the boxes of a JPEG whose EXIF
orientation turns it are moved to the frame people see, which training, evaluation and detect all use
(`to_rgb_image` applies the orientation), when the annotation was made on the stored pixels."""

import io
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor

from PIL import Image
from transformers.image_transforms import get_size_with_aspect_ratio

from ..utils.messages import listed
from .cache import cached_per_file

EXIF_ORIENTATION = 0x0112
SWAPS_AXES = {5, 6, 7, 8}  # transpose, rotate 270, transverse, rotate 90
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what PIL raises on bad files
SHOWN = 5  # files named in a message
PARALLEL_FROM = 4_000  # fewer headers than this are read in this process: starting a pool would cost more
CHUNK = 2_000  # headers a pool's task reads


def image_name(image) -> str:
    """A readable name for an image column's value: its path, or "<bytes>"."""
    if isinstance(image, dict):
        return image.get("path") or "<bytes>"
    return str(image)


def read_header(image) -> tuple[int, int, int]:
    """(width, height, EXIF orientation 1..8) of an image file as stored, from its header; `image` is a path or a
    datasets Image value ({"bytes", "path"}). Raises one of UNREADABLE for a file that PIL cannot identify or
    that is above its decompression-bomb limit."""
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    with Image.open(image) as opened:
        orientation = opened.getexif().get(EXIF_ORIENTATION, 1)
        return opened.width, opened.height, orientation if orientation in range(1, 9) else 1


def turn_box(box: list, orientation: int, width: int, height: int) -> list:
    """A COCO box [x, y, w, h] on the stored pixels (width x height) -> on the image that the EXIF
    `orientation` shows (PIL's exif_transpose)."""
    x, y, w, h = box
    corners = [(x, y), (x + w, y + h)]
    turn = {
        1: lambda u, v: (u, v),
        2: lambda u, v: (width - u, v),
        3: lambda u, v: (width - u, height - v),
        4: lambda u, v: (u, height - v),
        5: lambda u, v: (v, u),
        6: lambda u, v: (height - v, u),
        7: lambda u, v: (height - v, width - u),
        8: lambda u, v: (v, width - u),
    }[orientation]
    (u0, v0), (u1, v1) = (turn(*corner) for corner in corners)
    return [min(u0, u1), min(v0, v1), abs(u1 - u0), abs(v1 - v0)]


def header_or_error(image) -> tuple[tuple[int, int, int] | None, str | None]:
    """(read_header(image), None), or (None, why it cannot be read, naming the file)."""
    try:
        return read_header(image), None
    except UNREADABLE as error:
        return None, f"{image_name(image)} ({type(error).__name__}: {error})"


def read_headers(paths: list[str]) -> list[list]:
    """[header, why] (`header_or_error`) of each image file, in a pool of processes (one per core) where there are
    many: PIL reads a header in Python, at some 10,000 a second per core."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if len(paths) < PARALLEL_FROM or workers < 2:
        return _headers_of(paths)
    # forked, a worker starts at once, with nothing to import (only PIL runs in it)
    context = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        parts = pool.map(_headers_of, [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)])
        return [entry for part in parts for entry in part]


def _headers_of(paths: list[str]) -> list[list]:
    return [list(header_or_error(path)) for path in paths]


def shown_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """(width, height) of an image stored as width x height, as its EXIF `orientation` shows it."""
    return (height, width) if orientation in SWAPS_AXES else (width, height)


def too_thin(width: int, height: int, sizes: tuple[int, int] | None) -> str | None:
    """Why an image of width x height shown cannot be resized to `sizes` (image_size, max_image_size: the
    shortest and longest side, as the image processor and the augmentation resize): its short side would round to
    0 pixels. None where it can (or without `sizes`). The augmentation's smaller sides only shrink the images that
    max_image_size does not cap, so image_size is the one to check."""
    if sizes is None or min(get_size_with_aspect_ratio((height, width), *sizes)) > 0:
        return None
    return f"{width}x{height}: its short side is 0 pixels resized to image_size {sizes[0]}, max_image_size {sizes[1]}"


def report_bad(bad: list[str], kind: str, where: str, skip_bad_images: bool, error: type = ValueError):
    """Raises `error` listing the images `bad` ("3 `kind`: a.jpg, ..."), or with `skip_bad_images` warns once
    listing them."""
    if bad and not skip_bad_images:
        raise error(
            f"{where}: {len(bad)} {kind}: {listed(bad, SHOWN)}; leave them out with skip_bad_images=True "
            "(--skip_bad_images)"
        )
    if bad:
        warnings.warn(f"{where}: {len(bad)} {kind} left out: {listed(bad, SHOWN)}", stacklevel=3)


def check_images(
    records: list[dict],
    where: str,
    skip_bad_images: bool = False,
    sizes: tuple[int, int] | None = None,
    boxes_as_shown: bool = False,
) -> list[dict]:
    """Reads the header of every record's image (`read_headers`, those of files kept in the cache, cache.py, by
    path, size and modification time); -> the records, each with its image as shown: `width` and
    `height` those people see and, for a JPEG turned by EXIF whose annotation gives the stored size, its boxes
    turned likewise (a square image, a 180-degree turn or a mirror cannot tell: the stored frame is assumed, as
    COCO tools write it; `boxes_as_shown`: the boxes are of the image as shown, never turned, as YOLO labels).
    Warns once for the turned images and once for images whose size is not their
    annotation's. Images missing on disk (FileNotFoundError), unreadable ones and those `too_thin` to resize to
    `sizes` (ValueError) are refused, listed, or with `skip_bad_images` left out with one warning for each kind
    listing them."""
    kept, bad, thin, turned, as_shown, other_size = [], [], [], [], 0, []  # as_shown: a count
    paths = [r["image"] for r in records if isinstance(r["image"], str)]
    headers = dict(zip(paths, cached_per_file(paths, read_headers, "headers")))  # None: not a file
    missing = [path for path in paths if headers[path] is None]
    report_bad(missing, "image(s) missing on disk", where, skip_bad_images, FileNotFoundError)
    for record in records:
        image = record["image"]
        if isinstance(image, str) and headers[image] is None:
            continue
        header, why = headers[image] if isinstance(image, str) else header_or_error(image)
        if header is None:
            bad.append(why)
            continue
        width, height, orientation = header
        shown = shown_size(width, height, orientation)
        if why := too_thin(*shown, sizes):
            thin.append(f"{image_name(record['image'])} ({why})")
            continue
        annotated = (record.get("width"), record.get("height"))
        if None in annotated:
            annotated = shown
        if orientation != 1 and annotated == (width, height) and not boxes_as_shown:
            objects = dict(record["objects"])
            objects["bbox"] = [turn_box(box, orientation, width, height) for box in objects["bbox"]]
            record = {**record, "objects": objects}
            turned.append(image_name(record["image"]))
        elif orientation != 1 and annotated == shown:
            as_shown += 1
        elif annotated != shown:
            other_size.append(
                f"{image_name(record['image'])} (annotated {annotated[0]}x{annotated[1]}, image {shown[0]}x{shown[1]})"
            )
        kept.append({**record, "width": shown[0], "height": shown[1]})
    report_bad(bad, "unreadable image(s)", where, skip_bad_images)
    report_bad(thin, "image(s) too thin to resize", where, skip_bad_images)
    _warn_of_frames(where, turned, as_shown, other_size)
    return kept


def _warn_of_frames(where: str, turned: list[str], as_shown: int, other_size: list[str]):
    """One warning for the JPEGs that EXIF turns (`turned`: those whose boxes were turned too; `as_shown`: how many
    were annotated as shown), one for the images whose size is not their annotation's (`other_size`)."""
    if turned or as_shown:
        warnings.warn(
            f"{where}: {len(turned) + as_shown} JPEG(s) are turned by their EXIF orientation and are used as shown; "
            f"{len(turned)} annotated on the stored pixels had their boxes turned too ({listed(turned, SHOWN)}), "
            f"{as_shown} were annotated as shown",
            stacklevel=3,
        )
    if other_size:
        warnings.warn(
            f"{where}: {len(other_size)} image(s) are not the size their annotation gives; their boxes are used as "
            f"they are: {listed(other_size, SHOWN)}",
            stacklevel=3,
        )
