"""Decoding: an image file (a path, or its bytes) to a uint8 ``[C, H, W]`` array.

The first stage of the input pipeline (:mod:`lit_meta.data.preprocessing` has the rest):
PIL opens the file and converts it to ``"L"`` (``channels=1``) or ``"RGB"``
(``channels=3``), whatever its own colour mode. An unreadable file is a one-line
ValueError naming it (``cannot read image ...``), which the cache builders
(:mod:`lit_meta.data.image_cache`) stop on or skip (``on_bad_image``).
"""
from __future__ import annotations

import io
import os

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes with one channel of colour


def decode_image(source: str | os.PathLike | bytes, channels: int, name: str | None = None) -> np.ndarray:
    """One image file (path or bytes) as uint8 ``[C, H, W]``; a one-line ValueError naming it if unreadable."""
    return decode_image_and_mode(source, channels, name)[0]


def decode_image_and_mode(source: str | os.PathLike | bytes, channels: int,
                          name: str | None = None) -> tuple[np.ndarray, bool]:
    """:func:`decode_image`, and whether the file's own colour mode had another channel count."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(source)
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
        with handle, Image.open(handle) as image:
            converted = (image.mode in GRAY_MODES) == (channels == 3)
            image = image.convert("L" if channels == 1 else "RGB")
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot read image {name}: {reason}") from None
    return (array[None] if channels == 1 else array.transpose(2, 0, 1)), converted

