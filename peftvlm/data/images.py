"""Decode images the one way training and checks both use, close to how transformers loads them.

`load_rgb` follows `transformers.image_utils.load_image` (open, EXIF orientation applied, RGB)
with two deliberate differences where `load_image` loses the picture:
- transparency is composited onto white, as transformers' image processors do
  (`image_transforms.convert_to_rgb`) for an image that still has alpha; `load_image` itself
  drops the alpha channel, exposing whatever colour the transparent pixels store (often black);
- 16-bit images (PNG `I;16`, `I`) are scaled to 8 bits; `load_image` clips them, which turns
  almost every pixel white.
Everything else (palette, greyscale, CMYK, EXIF-rotated JPEGs) is pixel-for-pixel `load_image`.

`check_image` decodes the whole image before training (truncated files and undecodable bytes
fail here, not at step N) and refuses images above `MAX_IMAGE_PIXELS` from their header alone,
before decoding (decompression bombs).
"""

from __future__ import annotations

import io
import os

from peftvlm.data.rows import BadRow
from peftvlm.safe_yaml import regular_file_problem

# 64 megapixels: above any photo or document scan a VLM processor would keep at full size (an
# 8K frame is 33 MP), far below what a crafted PNG can declare (20000 x 20000 = 400 MP).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def open_file(source):
    """`PIL.Image.open` on a path, raw bytes or a `{"bytes"}` / `{"path"}` dict."""
    from PIL import Image

    if isinstance(source, dict):
        source = source.get("bytes") or source["path"]
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
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
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


def load_rgb(source):
    """The RGB image training sees (a PIL image passes through `to_rgb` too)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return to_rgb(source)
    with open_file(source) as im:
        return to_rgb(im)


def check_image(source, name: str) -> None:
    """Decode `source` fully as training will, or raise `BadRow` saying why (named `name`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_file(source) as im:
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadRow("image_too_large",
                             f"{name} declares {width}x{height} pixels, over the "
                             f"{MAX_IMAGE_PIXELS:,}-pixel limit (a decompression bomb, or an "
                             "image to downscale first)")
            im.load()
    except Image.DecompressionBombError as exc:
        raise BadRow("image_too_large", f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadRow("corrupt_image", f"{name} is not an image PIL can decode") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated / broken data
        raise BadRow("corrupt_image", f"{name} does not decode: {exc}") from exc
