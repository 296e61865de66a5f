"""Opening image files with a size limit, the same for every command that reads images.

A few bytes of PNG header can declare 100000 x 100000 pixels (40 GB once decoded). Pillow refuses images
above twice ``Image.MAX_IMAGE_PIXELS`` (89,478,485 pixels by default, about 9459 x 9459) as possible
decompression bombs and only warns between the two limits. cnnkit refuses every image above
``Image.MAX_IMAGE_PIXELS`` before any pixel is decoded, with one line naming the file. A genuine larger
image is allowed by raising the limit with the environment variable ``CNNKIT_MAX_IMAGE_PIXELS``
(a number of pixels).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from cnnkit.errors import ConfigError, DataError

PIXELS_ENV = "CNNKIT_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int | None:
    """The largest image (in pixels) cnnkit opens: ``$CNNKIT_MAX_IMAGE_PIXELS``, else Pillow's limit."""
    text = os.environ.get(PIXELS_ENV)
    if text is None:
        return Image.MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{PIXELS_ENV}={text!r} is not a positive whole number of pixels; unset it or set "
                          f"e.g. {PIXELS_ENV}=400000000")
    return value


def _too_large(path: Path, what: str, pixels: int | None, limit: int) -> DataError:
    size = f"{pixels} pixels" if pixels else "too many pixels"
    allow = pixels or 2 * limit
    return DataError(f"cannot read {what} {path}: it has {size}, more than the limit of {limit} (a guard against "
                     f"decompression bombs); if the file is genuine, allow it with {PIXELS_ENV}={allow}, or "
                     "downscale or tile it")


@contextlib.contextmanager
def open_image(path: str | Path, what: str = "image") -> Iterator[Image.Image]:
    """``Image.open(path)``; an image of more than :func:`max_image_pixels` pixels is a DataError naming the
    file and how to allow it, raised before any pixel is decoded. Other read errors are Pillow's."""
    path = Path(path)
    limit = max_image_pixels()
    if limit != Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # Pillow's own guard must not refuse what the user allowed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, as one error line
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as exc:  # above twice the limit: Pillow says how large
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise _too_large(path, what, int(found.group(1)) if found else None, limit) from None
    with image:
        if limit is not None and image.width * image.height > limit:
            raise _too_large(path, what, image.width * image.height, limit)
        yield image
