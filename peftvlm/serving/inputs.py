"""What a request may hold, checked cheaply before anything is decoded or tokenised.

`peftvlm serve` answers untrusted clients, so the order of work is fixed: the body's bytes are
counted as they arrive (`guard.Guard`); then the request's shape is checked with no decoding
(`check_text`, `check_image_url`: image count, data-URL sizes, text length, a model's literal
image tokens, the `file://` allow-list); only then are images decoded (`read_image_url`) and
texts tokenised. Every refusal is an `APIError`: OpenAI's error shape, naming the request field
(`messages[0].content[1].image_url`), never a server path or process id.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from peftvlm.data.read.images import load_rgb
from peftvlm.data.rows import BadRow


@dataclass
class ServerOptions:
    """Limits and access of the server (the CLI's options)."""

    api_key: str | None = None
    allowed_local_media_path: Path | None = None
    max_batch_size: int = 8
    batch_wait_s: float = 0.01
    max_tokens_limit: int = 1024
    max_images: int = 8
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_body_bytes: int = 64 * 2**20
    max_text_chars: int = 100_000  # all text of one request, before it is tokenised
    max_embedding_inputs: int = 256
    shutdown_grace_s: float = 3.0  # after SIGTERM, in-flight requests get this long


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                        code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


# --- cheap checks: no decoding, no tokenising --------------------------------------------------

def check_text(text: str, where: str, media_tokens: tuple[str, ...]) -> None:
    """A text part must not hold the model's image tokens: the processor would read them as
    images (and fail, or misplace the real ones)."""
    for token in media_tokens:
        if token in text:
            raise APIError(400, f"{where}: the text holds {token!r}, which this model reads as "
                                "an image; send images as image_url parts, and remove the "
                                "token from the text", where, "invalid_content")


def check_text_budget(chars: int, param: str, opts: ServerOptions) -> None:
    if chars > opts.max_text_chars:
        raise APIError(400, f"{param}: {chars:,} characters of text, over this server's limit "
                            f"of {opts.max_text_chars:,}", param, "text_too_long")


def check_image_count(count: int, param: str, opts: ServerOptions) -> None:
    if count > opts.max_images:
        raise APIError(400, f"{param}: {count} images, at most {opts.max_images} per request",
                       param, "too_many_images")


def check_image_url(url: str, where: str, opts: ServerOptions) -> None:
    """The URL's scheme, a data URL's size and form, a file's place and size: all without
    decoding anything."""
    if url.startswith("data:"):
        data_url_payload(url, where, opts)
    elif url.startswith("file://"):
        allowed_file(url, where, opts)
    else:
        raise APIError(400, f"{where}: only data: URLs (and file:// URLs under "
                            "--allowed-local-media-path) are read; this server fetches nothing "
                            "from the network", where, "invalid_image_url")


def data_url_payload(url: str, where: str, opts: ServerOptions) -> str:
    """The base64 payload of a data URL, refused when malformed or over the image size limit."""
    header, _, payload = url.partition(",")
    if ";base64" not in header or not payload:
        raise APIError(400, f"{where}: a data URL must be base64 (data:image/png;base64,...)",
                       where, "invalid_image_url")
    if len(payload) * 3 // 4 > opts.max_image_bytes:
        raise APIError(413, f"{where}: the image is over {opts.max_image_bytes // 2**20} MiB",
                       where, "image_too_large")
    return payload


def allowed_file(url: str, where: str, opts: ServerOptions) -> Path:
    """The file a `file://` URL names, if it lies under the allowed folder once links are
    resolved. Messages name the request field only: the resolved path could show where a
    link points, or a process id (/proc/self)."""
    root = opts.allowed_local_media_path
    if root is None:
        raise APIError(400, f"{where}: file:// URLs are off; start the server with "
                            "--allowed-local-media-path DIR to allow files under DIR", where,
                       "invalid_image_url")
    path = Path(unquote(urlparse(url).path)).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise APIError(403, f"{where}: the file is outside the folder this server may read",
                       where, "file_not_allowed")
    if not path.is_file():
        raise APIError(400, f"{where}: no such file in the folder this server may read", where,
                       "invalid_image_url")
    if path.stat().st_size > opts.max_image_bytes:
        raise APIError(413, f"{where}: the image is over {opts.max_image_bytes // 2**20} MiB",
                       where, "image_too_large")
    return path


# --- decoding (after every cheap check passed) -------------------------------------------------

def read_image_url(url: str, where: str, opts: ServerOptions):
    """A `data:` URL or an allowed `file://` URL -> RGB PIL image; anything else is a 4xx."""
    check_image_url(url, where, opts)
    if url.startswith("file://"):
        return decode_image(allowed_file(url, where, opts), where, opts)
    try:
        data = base64.b64decode(data_url_payload(url, where, opts), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data URL is not valid base64", where,
                       "invalid_image_url") from None
    return decode_image(io.BytesIO(data), where, opts)


def decode_image(source, where: str, opts: ServerOptions):
    """The image as training decoded it (`load_rgb`: EXIF, alpha on white, 16-bit scaled),
    refused when over the pixel limit (read from the header, before the pixels are decoded)
    or unreadable (the decoder's message is not repeated: it can hold the path)."""
    try:
        return load_rgb(source, where, max_pixels=opts.max_image_pixels)
    except BadRow as exc:
        if exc.reason == "image_too_large":
            raise APIError(413, exc.detail, where, "image_too_large") from None
        raise APIError(400, f"{where}: not a readable image (PNG, JPEG, WebP, ...)", where,
                       "invalid_image") from None
