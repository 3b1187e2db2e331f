"""OpenAI's `POST /v1/embeddings` for dual-encoder runs (retrieval and CLIP-family classification).

    client.embeddings.create(model="clip-retrieval-tiny", input=["a red square", "a blue circle"])
    client.embeddings.create(model="clip-retrieval-tiny",
                             input=["data:image/png;base64,...", "file:///srv/media/cat.png"])

`input` is a string or a list; each item is a text, or an image given as a `data:image/...`
URL or a `file://` URL under `--allowed-local-media-path` (also accepted in chat's content-part
form, `{"type": "image_url", "image_url": {"url": ...}}` / `{"type": "text", "text": ...}`).
Texts and images share one space: each vector is the adapted model's projected feature,
L2-normalised (`predictor.embed_texts` / `embed_images`), so a text and an image compare by dot
product. `model: "<run>:base"` gives the base model's vectors. `encoding_format: "base64"` (what
the openai client asks for by default) sends little-endian float32 bytes.
"""

from __future__ import annotations

import base64
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from peftvlm.serving.inputs import (APIError, ServerOptions, check_image_count, check_image_url,
                                    check_text_budget, read_image_url)

IMAGE_URL_PREFIXES = ("data:image/", "file://")


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextItem(_Item):
    type: Literal["text"]
    text: str


class ImageURL(_Item):
    url: str


class ImageItem(_Item):
    type: Literal["image_url"]
    image_url: ImageURL


Item = Union[str, TextItem, ImageItem]  # noqa: UP007


class EmbeddingRequest(_Item):
    model: str
    input: Union[str, list[Item]] = Field(..., union_mode="left_to_right")  # noqa: UP007
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def split_inputs(req: EmbeddingRequest, opts: ServerOptions) -> list[tuple[str, str]]:
    """[("text", text) | ("image", url)] in order, checked cheaply: count, text length, image
    count, each image URL's form and size; nothing decoded or tokenised yet."""
    items = [req.input] if isinstance(req.input, str) else req.input
    if not items:
        raise APIError(400, "input: give at least one text or image", "input", "invalid_request")
    if len(items) > opts.max_embedding_inputs:
        raise APIError(400, f"input: {len(items)} items, at most {opts.max_embedding_inputs} "
                            "per request", "input", "too_many_inputs")
    parsed = []
    for i, item in enumerate(items):
        if isinstance(item, ImageItem):
            parsed.append(("image", item.image_url.url))
        elif isinstance(item, TextItem):
            parsed.append(("text", item.text))
        else:
            parsed.append(("image" if item.startswith(IMAGE_URL_PREFIXES) else "text", item))
    check_text_budget(sum(len(v) for k, v in parsed if k == "text"), "input", opts)
    check_image_count(sum(k == "image" for k, _ in parsed), "input", opts)
    for i, (kind, value) in enumerate(parsed):
        if kind == "image":
            check_image_url(value, f"input[{i}]", opts)
        elif not value:
            raise APIError(400, f"input[{i}]: an empty text has no embedding", f"input[{i}]",
                           "invalid_request")
    return parsed


def embed(predictor, req: EmbeddingRequest, opts: ServerOptions, base: bool) -> dict:
    """The embeddings response (run in a worker thread: decoding and the model call)."""
    import torch

    parsed = split_inputs(req, opts)
    tokens = text_tokens(predictor, parsed)
    images = {i: read_image_url(v, f"input[{i}]", opts)
              for i, (k, v) in enumerate(parsed) if k == "image"}
    texts = {i: v for i, (k, v) in enumerate(parsed) if k == "text"}
    vectors = [None] * len(parsed)
    if texts:
        for i, vector in zip(texts, predictor.embed_texts(list(texts.values()), base=base)):
            vectors[i] = vector
    if images:
        for i, vector in zip(images, predictor.embed_images(list(images.values()), base=base)):
            vectors[i] = vector
    if req.dimensions is not None and req.dimensions != len(vectors[0]):
        raise APIError(400, f"dimensions: this model's vectors have {len(vectors[0])} "
                            "dimensions and are not shortened", "dimensions", "invalid_request")
    return {"object": "list", "model": req.model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v, req)}
                     for i, v in enumerate(torch.stack(vectors))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def text_tokens(predictor, parsed: list[tuple[str, str]]) -> int:
    """Tokens of all texts; a text longer than the text tower's context is refused (OpenAI
    refuses it too) rather than embedded truncated."""
    total = 0
    for i, (kind, value) in enumerate(parsed):
        if kind != "text":
            continue
        count = predictor.count_tokens(value)
        if count > predictor.max_text_tokens:
            raise APIError(400, f"input[{i}]: {count} tokens, over the text encoder's context "
                                f"of {predictor.max_text_tokens}", f"input[{i}]",
                           "context_length_exceeded")
        total += count
    return total


def encode(vector, req: EmbeddingRequest):
    if req.encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()
