"""THE image decoder: every path that hands an image to a model (training, eval, predict, serve,
the demo, CLIP/SigLIP and retrieval training, `data filter`, CLIPScore) decodes it here, so the
pixels a model was trained on are the pixels it is asked about.

`load_rgb` follows `transformers.image_utils.load_image` (open, EXIF orientation applied, RGB)
with two deliberate differences where `load_image` loses the picture:
- transparency is composited onto white, as transformers' image processors do
  (`image_transforms.convert_to_rgb`) for an image that still has alpha; `load_image` itself
  drops the alpha channel, exposing whatever colour the transparent pixels store (often black);
- 16-bit images (PNG `I;16`, `I`) are scaled to 8 bits; `load_image` clips them, which turns
  almost every pixel white.
Everything else (palette, greyscale, CMYK, EXIF-rotated JPEGs) is pixel-for-pixel `load_image`.

The protections live here too, once: an image above `MAX_IMAGE_PIXELS` (or the caller's lower
limit) is refused from its header alone, before decoding (decompression bombs); truncated files
and undecodable bytes fail while decoding (PIL's `LOAD_TRUNCATED_IMAGES` stays off). Both raise
`BadRow` with a stable reason (`image_too_large`, `corrupt_image`): data loading counts it as a
bad row, predict and serve turn it into their own clear errors. `check_image` decodes an image
whole before training, so a broken file fails at load time, not at step N.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from contextlib import contextmanager
from pathlib import Path

from peftvlm.data.rows import BadRow
from peftvlm.safe_yaml import regular_file_problem

# 64 megapixels: above any photo or document scan a VLM processor would keep at full size (an
# 8K frame is 33 MP), far below what a crafted PNG can declare (20000 x 20000 = 400 MP).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "I;16N")


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 `data:` URL (`data:image/png;base64,...`), or `BadRow` saying why."""
    header, _, payload = url.partition(",")
    if ";base64" not in header or not payload:
        raise BadRow("invalid_image_url",
                     "a data URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRow("invalid_image_url", "the data URL is not valid base64") from None


def open_file(source):
    """`PIL.Image.open` on a path, raw bytes, a `data:` URL, a file object or a `{"bytes"}` /
    `{"path"}` dict (the Arrow image struct)."""
    from PIL import Image

    if isinstance(source, dict):
        source = source.get("bytes") or source["path"]
    if isinstance(source, str) and source.startswith("data:"):
        source = data_url_bytes(source)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        problem = regular_file_problem(source)  # open() on a FIFO would block forever
        if problem:
            raise BadRow("bad_image", f"{source} {problem}")
    return Image.open(source)


def to_rgb(image):
    """EXIF orientation applied; alpha composited onto white; 16-bit scaled to 8 bits; RGB."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        import numpy as np

        # 16-bit samples span 0..65535; scale (not clip) into 0..255.
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels * 255.0 / top + 0.5, 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def describe(source) -> str:
    """How an error names an image: its path, else what kind of in-memory image it is."""
    if isinstance(source, dict):
        source = source.get("path") or b""
    if isinstance(source, (str, Path)) and not str(source).startswith("data:"):
        return str(source)
    return "the image data URL" if isinstance(source, str) else "the image bytes"


@contextmanager
def decoding(name: str, max_pixels: int):
    """Open the image checked against `max_pixels` from its header; PIL's decoding errors (and
    a missing file) become `BadRow` naming `name`."""
    from PIL import Image, UnidentifiedImageError

    def opened(source):
        im = open_file(source)
        width, height = im.size
        if width * height > max_pixels:
            im.close()
            raise BadRow("image_too_large",
                         f"{name} declares {width}x{height} pixels, over the {max_pixels:,}-pixel "
                         "limit (a decompression bomb, or an image to downscale first)")
        return im

    try:
        yield opened
    except Image.DecompressionBombError as exc:
        raise BadRow("image_too_large", f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadRow("corrupt_image", f"{name} is not an image PIL can decode") from exc
    except FileNotFoundError as exc:
        raise BadRow("missing_image", f"{name} not found") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated / broken data
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadRow("corrupt_image", f"{name} does not decode: {detail}") from exc


def load_rgb(source, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """THE decoder: the normalised RGB PIL image of a path, bytes, `data:` URL, file object,
    `{"bytes"|"path"}` dict or PIL image (see the module docstring); `BadRow` (named `name`, by
    default the path) if it is over `max_pixels` or does not decode."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return to_rgb(source)
    with decoding(name or describe(source), max_pixels) as opened:
        with opened(source) as im:
            return to_rgb(im)


def check_image(source, name: str) -> None:
    """Decode `source` fully as training will, or raise `BadRow` saying why (named `name`)."""
    with decoding(name, MAX_IMAGE_PIXELS) as opened:
        with opened(source) as im:
            im.load()


def image_size(image) -> tuple[int, int]:
    """(width, height) of a resolved image as training sees it, reading only the header."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, dict):
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    with Image.open(image) as im:
        width, height = im.size
        # EXIF orientations 5-8 rotate by 90 degrees: training sees the transposed image.
        rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    return (height, width) if rotated else (width, height)
