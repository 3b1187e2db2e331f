"""`peftvlm serve RUN`: an OpenAI-compatible chat-completions server (FastAPI + uvicorn).

    peftvlm serve runs/quickstart                       # http://127.0.0.1:8000/v1
    python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1',
               api_key='-'); print(c.models.list())"

Endpoints: `GET /v1/models` (the run, and `<name>:base` for its base model),
`POST /v1/chat/completions` (text and `image_url` content parts as `data:` URLs, or `file://`
URLs under `--allowed-local-media-path`; `stream: true` sends server-sent events), `GET /health`
(status and batching counters, no key needed). Concurrent non-streaming requests are batched
(`batching.Batcher`); streaming ones generate alone, token by token. A bad request gets a 4xx
JSON body in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` and the
server carries on. Why not `transformers serve`: see docs/serve.md.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

from peftvlm.data.images import load_rgb
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


# --- the request schema (OpenAI's field names; unknown fields are ignored, as OpenAI does) ------

class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImageURL(_Part):
    url: str
    detail: str | None = None


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Union[TextPart, ImagePart]  # noqa: UP007


class Message(_Part):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[Part] = Field(..., union_mode="left_to_right")


class ChatRequest(_Part):
    model: str
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False


# --- turning a request into a row --------------------------------------------------------------

def read_image_url(url: str, where: str, opts: ServerOptions):
    """A `data:` URL or an allowed `file://` URL -> RGB PIL image; anything else is a 400."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or not payload:
            raise APIError(400, f"{where}: a data URL must be base64 (data:image/png;base64,...)",
                           where, "invalid_image_url")
        if len(payload) * 3 // 4 > opts.max_image_bytes:
            raise APIError(413, f"{where}: the image is over {opts.max_image_bytes // 2**20} MiB",
                           where, "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data URL is not valid base64", where,
                           "invalid_image_url") from None
        return decode_image(io.BytesIO(data), where, opts)
    if url.startswith("file://"):
        return decode_image(allowed_file(url, where, opts), where, opts)
    raise APIError(400, f"{where}: only data: URLs (and file:// URLs under "
                        "--allowed-local-media-path) are read; this server fetches nothing from "
                        "the network", where, "invalid_image_url")


def allowed_file(url: str, where: str, opts: ServerOptions) -> Path:
    root = opts.allowed_local_media_path
    if root is None:
        raise APIError(400, f"{where}: file:// URLs are off; start the server with "
                            "--allowed-local-media-path DIR to allow files under DIR", where,
                       "invalid_image_url")
    path = Path(unquote(urlparse(url).path)).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise APIError(403, f"{where}: {path} is outside the allowed folder", where,
                       "file_not_allowed")
    if not path.is_file():
        raise APIError(400, f"{where}: no such file {path}", where, "invalid_image_url")
    if path.stat().st_size > opts.max_image_bytes:
        raise APIError(413, f"{where}: the image is over {opts.max_image_bytes // 2**20} MiB",
                       where, "image_too_large")
    return path


def decode_image(source, where: str, opts: ServerOptions):
    """The image as training decoded it (`load_rgb`: EXIF, alpha on white, 16-bit scaled)."""
    try:
        return load_rgb(source, where, max_pixels=opts.max_image_pixels)
    except BadRow as exc:
        if exc.reason == "image_too_large":
            raise APIError(413, exc.detail, where, "image_too_large") from None
        raise APIError(400, f"{where}: not a readable image (PNG, JPEG, WebP, ...)", where,
                       "invalid_image") from None


def request_row(req: ChatRequest, opts: ServerOptions, system_prompt: str | None) -> dict:
    """The conversation as a training-format row (images in order), ending in an answer slot."""
    from peftvlm.data.loading import with_system_prompt
    from peftvlm.serving.predictor import with_answer_slot

    messages, images = [], []
    for i, message in enumerate(req.messages):
        parts = ([TextPart(type="text", text=message.content)]
                 if isinstance(message.content, str) else message.content)
        content = []
        for j, part in enumerate(parts):
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            else:
                images.append(read_image_url(part.image_url.url,
                                             f"messages[{i}].content[{j}].image_url", opts))
                content.append({"type": "image"})
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", "messages")
    if len(images) > opts.max_images:
        raise APIError(400, f"{len(images)} images: at most {opts.max_images} per request",
                       "messages", "too_many_images")
    row = with_system_prompt([{"messages": messages, "images": images}], system_prompt)[0]
    return with_answer_slot(row)


# --- the app -----------------------------------------------------------------------------------

def build_app(predictor, opts: ServerOptions | None = None):
    """The FastAPI app serving `predictor` (a generative `Predictor`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from peftvlm.serving.batching import Batcher

    opts = opts or ServerOptions()
    model_ids = {predictor.name: False}
    if predictor.has_base:
        model_ids[f"{predictor.name}:base"] = True

    def run_batch(key, rows):
        base, options = key
        return predictor.answer(rows, base=base, generation=dict(options),
                                batch_size=opts.max_batch_size)

    batcher = Batcher(run_batch, opts.max_batch_size, opts.batch_wait_s)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"peftvlm: {predictor.name}", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def schema_error(_request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(APIError(400, f"{param or 'body'}: {first['msg']}", param or None,
                                     "invalid_request").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(),
                            status_code=exc.status_code)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """API key (on /v1/ routes) and body size, before any parsing."""
        if request.url.path.startswith("/v1/") and opts.api_key:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), opts.api_key.encode()):
                return JSONResponse(APIError(401, "invalid or missing API key (send "
                                                  "`Authorization: Bearer KEY`)", None,
                                             "invalid_api_key").body(), status_code=401)
        if int(request.headers.get("content-length") or 0) > opts.max_body_bytes:
            return JSONResponse(APIError(413, f"request body over "
                                              f"{opts.max_body_bytes // 2**20} MiB", None,
                                         "request_too_large").body(), status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": predictor.name, **batcher.stats.as_dict()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(m) for m in model_ids]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id not in model_ids:
            raise unknown_model(model_id, model_ids)
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        import asyncio

        prepared = await asyncio.to_thread(prepare, predictor, req, opts, model_ids)
        row, key, prompt_tokens = prepared
        if req.stream:
            return StreamingResponse(stream_events(predictor, req, row, key, prompt_tokens),
                                     media_type="text/event-stream")
        text = await batcher.submit(key, row)
        return completion(predictor, req, text, prompt_tokens, dict(key[1]))

    return app


def prepare(predictor, req: ChatRequest, opts: ServerOptions, model_ids: dict):
    """Check a request and build its row, batching key and prompt length (in a worker thread:
    image decoding and tokenizing stay off the event loop)."""
    if req.model not in model_ids:
        raise unknown_model(req.model, model_ids)
    if req.n != 1:
        raise APIError(400, "n: only one choice per request is generated", "n")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > opts.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of "
                            f"{opts.max_tokens_limit}", "max_tokens", "max_tokens_too_large")
    row = request_row(req, opts, predictor.system_prompt)
    options = predictor.generation(max_tokens, req.temperature, req.top_p)
    prompt_tokens = predictor.prompt_tokens(row)
    limit = predictor.context_length
    if limit and prompt_tokens + options["max_new_tokens"] > limit:
        raise APIError(400, f"the prompt ({prompt_tokens} tokens, images included) plus "
                            f"max_tokens ({options['max_new_tokens']}) exceeds the model's "
                            f"context of {limit} tokens", "messages", "context_length_exceeded")
    return row, (model_ids[req.model], tuple(sorted(options.items()))), prompt_tokens


def unknown_model(model_id: str, model_ids: dict) -> APIError:
    return APIError(404, f"the model {model_id!r} does not exist; this server has "
                         f"{', '.join(model_ids)}", "model", "model_not_found")


def model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "peftvlm"}


def completion(predictor, req: ChatRequest, text: str, prompt_tokens: int, options: dict) -> dict:
    """A chat.completion object; completion tokens are counted by re-tokenizing the answer."""
    tokens = predictor.count_tokens(text)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
        "created": int(time.time()), "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "length" if tokens >= options["max_new_tokens"] else "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                  "total_tokens": prompt_tokens + tokens},
    }


def stream_events(predictor, req: ChatRequest, row: dict, key, prompt_tokens: int):
    """Server-sent events: a role chunk, one chunk per generated piece, a finish chunk, [DONE].
    A sync generator: Starlette iterates it in a thread while `generate` runs in another."""
    base, options = key
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(delta: dict, finish: str | None = None) -> str:
        chunk = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                 "model": req.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    text = ""
    try:
        for piece in predictor.stream(row, base=base, generation=dict(options)):
            text += piece
            yield event({"content": piece})
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
        yield f"data: {json.dumps(APIError(500, str(exc), kind='server_error').body())}\n\n"
        return
    limit = dict(options)["max_new_tokens"]
    yield event({}, "length" if predictor.count_tokens(text) >= limit else "stop")
    yield "data: [DONE]\n\n"


def run_server(run: str | Path, opts: ServerOptions, host: str = "127.0.0.1", port: int = 8000,
               log=print) -> None:
    """Load the run and serve it until Ctrl-C."""
    import uvicorn

    from peftvlm.errors import RunError
    from peftvlm.serving.predictor import open_predictor

    predictor = open_predictor(run, log)
    if predictor.kind != "generative":
        raise RunError(f"{run} is a CLIP-family run: it ranks classes, it does not chat",
                       hint=f"use `peftvlm predict {run} --image ...` or `peftvlm demo {run}`")
    log(f"serving {predictor.name} at http://{host}:{port}/v1 (models: {predictor.name}"
        + (f", {predictor.name}:base" if predictor.has_base else "") + ")")
    uvicorn.run(build_app(predictor, opts), host=host, port=port, log_level="warning")
