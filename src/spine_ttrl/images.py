"""Images of a question: the ``image`` field of a record, checked when the data loads.

A record may carry ``image`` (or ``images``): a path relative to the data file, or a list of them
(a JSON-encoded list in a CSV cell); a saved Hugging Face dataset may hold the images themselves
(``datasets.Image`` gives PIL images). :func:`parse_image_field` turns the field into the
question's image sources -- absolute path strings, or encoded bytes for in-memory images -- and
checks each one before any model loads: the file exists, PIL can read it, it is PNG or JPEG, and it
is at most :data:`MAX_IMAGE_BYTES` bytes and :data:`MAX_IMAGE_PIXELS` pixels. A problem raises
:class:`~spine_ttrl.example.DataError` naming the record and the file. :func:`load_image` opens a
source as an RGB PIL image for the model's processor.

PIL is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .example import DataError

IMAGE_FIELDS = ("image", "images")
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_IMAGE_BYTES = 50 * 2**20
"""Largest image file accepted (50 MiB)."""
MAX_IMAGE_PIXELS = 40_000_000
"""Largest image accepted, in pixels (about 6300 x 6300); processors downscale far below this."""


def parse_image_field(record: dict, where: str, base_dir: Path | None) -> tuple:
    """The checked image sources of ``record`` (``()`` when it has no image field).

    ``where`` names the record in messages (``file:line``); relative paths resolve against
    ``base_dir`` (the data file's directory).
    """
    name = next((f for f in IMAGE_FIELDS if f in record), None)
    if name is None:
        return ()
    value = record[name]
    if isinstance(value, str) and value.strip().startswith("["):  # a list JSON-encoded in a CSV cell
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(f"{where}: field '{name}': expected a path or a JSON list of paths") from None
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    items = value if isinstance(value, (list, tuple)) else [value]
    return tuple(_source(item, where, f"field '{name}'" + (f" item {i}" if len(items) > 1 else ""), base_dir)
                 for i, item in enumerate(items))


def _source(item: Any, where: str, field: str, base_dir: Path | None):
    if isinstance(item, dict) and ("bytes" in item or "path" in item):  # datasets.Image without decoding
        item = item.get("bytes") or item.get("path")
    if isinstance(item, str):
        path = Path(item).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        check_image_file(path, f"{where}: {field}: {item}")
        return str(path.resolve())
    if isinstance(item, (bytes, bytearray)):
        check_image_bytes(bytes(item), f"{where}: {field}")
        return bytes(item)
    if hasattr(item, "save") and hasattr(item, "size"):  # a PIL image (datasets.Image decoded)
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        check_image_bytes(buf.getvalue(), f"{where}: {field}")
        return buf.getvalue()
    raise DataError(f"{where}: {field}: expected an image path, got {type(item).__name__}")


def check_image_file(path: Path, where: str) -> None:
    """Raise DataError (prefixed by ``where``) unless ``path`` is a readable PNG/JPEG within the limits."""
    if not path.is_file():
        raise DataError(f"{where}: no such image file ({path})")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise DataError(f"{where}: image file too large ({size / 2**20:.1f} MiB, at most {MAX_IMAGE_BYTES // 2**20} MiB)")
    check_image_bytes(path.read_bytes(), where)


def check_image_bytes(data: bytes, where: str) -> None:
    """Raise DataError unless ``data`` is a PNG or JPEG image of at most MAX_IMAGE_PIXELS pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"{where}: image too large ({w} x {h} pixels, at most {MAX_IMAGE_PIXELS:,})")
            im.verify()
    except DataError:
        raise
    except Exception as e:  # PIL raises many types for a broken or non-image file
        raise DataError(f"{where}: not a readable image ({type(e).__name__})") from None
    if fmt not in IMAGE_FORMATS:
        raise DataError(f"{where}: unsupported image format {fmt} (PNG or JPEG)")


def load_image(source):
    """An RGB PIL image from a source of :func:`parse_image_field` (a path string or bytes)."""
    from PIL import Image

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return im.convert("RGB")
