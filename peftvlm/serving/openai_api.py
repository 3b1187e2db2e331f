"""`peftvlm serve RUN`: an OpenAI-compatible server (FastAPI + uvicorn).

    peftvlm serve runs/quickstart                       # http://127.0.0.1:8000/v1
    python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1',
               api_key='-'); print(c.models.list())"

Endpoints: `GET /v1/models` (the run, and `<name>:base` for its base model); for a generative
run `POST /v1/chat/completions` (text and `image_url` content parts as `data:` URLs, or `file://`
URLs under `--allowed-local-media-path`; `stream: true` sends server-sent events); for a
dual-encoder run `POST /v1/embeddings` (`embeddings.py`; chat is refused with a 400 saying
why); for a detection run `POST /v1/detections` (`detection.py`: an image and class names in,
boxes with labels and scores out; chat and embeddings refused with a 400); `GET /health` (status and batching counters, no key needed). Concurrent non-streaming
requests are batched (`batching.Batcher`); streaming ones generate alone, token by token, and
stop when the client goes away. A bad request gets a 4xx JSON body in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}` and the server carries on; the limits and
the order they are checked in are in `inputs.py` and `guard.py`. Why not `transformers serve`:
see docs/serve.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from peftvlm.data.rows import with_system_prompt
from peftvlm.serving.batching import Batcher
from peftvlm.serving.detection import DetectionRequest, answer_detection_request
from peftvlm.serving.embeddings import EmbeddingRequest, embed
from peftvlm.serving.guard import Guard
from peftvlm.serving.inputs import (APIError, ServerOptions, check_image_count, check_image_url,
                                    check_text, check_text_budget, read_image_url)
from peftvlm.serving.predictor import open_predictor, with_answer_slot

logger = logging.getLogger(__name__)


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

def parts_of(message: Message, i: int) -> list[tuple[str, Part]]:
    """(request field, part) of a message's content, a plain string being one text part."""
    if isinstance(message.content, str):
        return [(f"messages[{i}].content", TextPart(type="text", text=message.content))]
    return [(f"messages[{i}].content[{j}]", part) for j, part in enumerate(message.content)]


def check_messages(req: ChatRequest, opts: ServerOptions, media_tokens: tuple[str, ...]) -> None:
    """Everything about the messages that costs no decoding and no tokenising: the last role,
    the image count, each image URL (form, size, allow-list), the text's length and literal
    image tokens. A request with 40 large images is refused here, before any is decoded."""
    if req.messages[-1].role != "user":
        raise APIError(400, "messages: the last message must be the user's", "messages")
    parts = [(where, part) for i, m in enumerate(req.messages) for where, part in parts_of(m, i)]
    check_image_count(sum(isinstance(p, ImagePart) for _, p in parts), "messages", opts)
    check_text_budget(sum(len(p.text) for _, p in parts if isinstance(p, TextPart)), "messages",
                      opts)
    for where, part in parts:
        if isinstance(part, TextPart):
            check_text(part.text, f"{where}.text" if where.endswith("]") else where,
                       media_tokens)
        else:
            check_image_url(part.image_url.url, f"{where}.image_url", opts)


def request_row(req: ChatRequest, opts: ServerOptions, system_prompt: str | None) -> dict:
    """The conversation as a training-format row (images in order), ending in an answer slot
    (call `check_messages` first: this decodes the images)."""
    messages, images = [], []
    for i, message in enumerate(req.messages):
        content = []
        for where, part in parts_of(message, i):
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            else:
                images.append(read_image_url(part.image_url.url, f"{where}.image_url", opts))
                content.append({"type": "image"})
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    row = with_system_prompt([{"messages": messages, "images": images}], system_prompt)[0]
    return with_answer_slot(row)


# --- the app -----------------------------------------------------------------------------------

def build_app(predictor, opts: ServerOptions | None = None):
    """The FastAPI app serving `predictor`: chat completions for a generative run, embeddings for
    a dual-encoder run (retrieval or CLIP-family classification); `/v1/models` lists either."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    opts = opts or ServerOptions()
    model_ids = {predictor.name: False}
    if predictor.has_base:
        model_ids[f"{predictor.name}:base"] = True
    chats, embeds = hasattr(predictor, "answer"), hasattr(predictor, "embed_texts")
    detects = hasattr(predictor, "detect")
    shutdown = threading.Event()  # set when the server stops: every generation ends early

    def run_batch(key, rows):
        base, options = key
        generation = {**dict(options), "stopping_criteria": stopping_on(shutdown)}
        return predictor.answer(rows, base=base, generation=generation,
                                batch_size=opts.max_batch_size)

    batcher = Batcher(run_batch, opts.max_batch_size, opts.batch_wait_s)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        shutdown.set()
        await batcher.stop()

    app = FastAPI(title=f"peftvlm: {predictor.name}", lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(Guard, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes)

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
        error = getattr(exc, "api_error", None) or APIError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def server_error(_request, exc: Exception):
        # The traceback goes to the server's log; the client learns only that it failed.
        logger.error("request failed", exc_info=exc)
        return JSONResponse(APIError(500, "the server failed to answer this request",
                                     kind="server_error").body(), status_code=500)

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
        if req.model not in model_ids:
            raise unknown_model(req.model, model_ids)
        if detects:
            raise APIError(400, f"{req.model!r} is a detection run: it finds boxes for class "
                                "names and generates no text, so it has no chat; use POST "
                                "/v1/detections (or `peftvlm predict`)", "model",
                           "chat_not_supported")
        if not chats:
            raise APIError(400, f"{req.model!r} is a dual-encoder (CLIP-family) run: it embeds "
                                "images and texts into one space and generates no text, so it "
                                "has no chat; use POST /v1/embeddings (or `peftvlm predict` to "
                                "rank captions)", "model", "chat_not_supported")
        row, key, prompt_tokens = await asyncio.to_thread(prepare, predictor, req, opts,
                                                          model_ids)
        if req.stream:
            return StreamingResponse(stream_events(predictor, req, row, key, prompt_tokens,
                                                   shutdown),
                                     media_type="text/event-stream")
        text = await batcher.submit(key, row)
        return completion(predictor, req, text, prompt_tokens, dict(key[1]))

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        if req.model not in model_ids:
            raise unknown_model(req.model, model_ids)
        if not embeds:
            other = "/v1/detections" if detects else "/v1/chat/completions"
            raise APIError(400, f"{req.model!r} is a {'detection' if detects else 'generative'} "
                                f"run: it has no embeddings; use POST {other}", "model",
                           "embeddings_not_supported")
        return await asyncio.to_thread(embed, predictor, req, opts, model_ids[req.model])

    @app.post("/v1/detections")
    async def detections(req: DetectionRequest):
        if req.model not in model_ids:
            raise unknown_model(req.model, model_ids)
        if not detects:
            raise APIError(400, f"{req.model!r} is not a detection run: it finds no boxes; use "
                                f"POST {'/v1/chat/completions' if chats else '/v1/embeddings'}",
                           "model", "detections_not_supported")
        return await asyncio.to_thread(answer_detection_request, predictor, req, opts,
                                       model_ids[req.model])

    return app


def prepare(predictor, req: ChatRequest, opts: ServerOptions, model_ids: dict):
    """Check a request and build its row, batching key and prompt length (in a worker thread:
    image decoding and tokenizing stay off the event loop). Cheap checks come first."""
    if req.n != 1:
        raise APIError(400, "n: only one choice per request is generated", "n")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > opts.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of "
                            f"{opts.max_tokens_limit}", "max_tokens", "max_tokens_too_large")
    check_messages(req, opts, predictor.family.literal_media_tokens())
    row = request_row(req, opts, predictor.system_prompt)
    options = predictor.generation(max_tokens, req.temperature, req.top_p)
    prompt_tokens = predictor.prompt_tokens(row)
    limit = predictor.context_length
    if limit and prompt_tokens + options["max_new_tokens"] > limit:
        raise APIError(400, f"the prompt ({prompt_tokens} tokens, images included) plus "
                            f"max_tokens ({options['max_new_tokens']}) exceeds the model's "
                            f"context of {limit} tokens", "messages", "context_length_exceeded")
    return row, (model_ids[req.model], tuple(sorted(options.items()))), prompt_tokens


def stopping_on(*events: threading.Event):
    """transformers stopping criteria that end generation once any of `events` is set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class OnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            stop = any(event.is_set() for event in events)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([OnEvent()])


def unknown_model(model_id: str, model_ids: dict) -> APIError:
    return APIError(404, f"model: {model_id!r} does not exist; this server has "
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


async def stream_events(predictor, req: ChatRequest, row: dict, key, prompt_tokens: int,
                        shutdown: threading.Event):
    """Server-sent events: a role chunk, one chunk per generated piece, a finish chunk, [DONE].
    `generate` runs in a worker thread. When the client goes away, Starlette cancels this
    generator (its `finally` runs); when the server stops, `shutdown` is set: either ends the
    generation at its next token, so the model is free again at once."""
    from starlette.concurrency import iterate_in_threadpool

    base, options = key
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stop = threading.Event()

    def event(delta: dict, finish: str | None = None) -> str:
        chunk = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                 "model": req.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n"

    generation = {**dict(options), "stopping_criteria": stopping_on(stop, shutdown)}
    pieces = predictor.stream(row, base=base, generation=generation)
    yield event({"role": "assistant", "content": ""})
    text = ""
    try:
        async for piece in iterate_in_threadpool(pieces):
            text += piece
            yield event({"content": piece})
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
        logger.error("streamed generation failed", exc_info=exc)
        error = APIError(500, "generation failed on the server", kind="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
        return
    finally:
        stop.set()
    limit = dict(options)["max_new_tokens"]
    yield event({}, "length" if predictor.count_tokens(text) >= limit else "stop")
    yield "data: [DONE]\n\n"


def run_server(run: str | Path, opts: ServerOptions, host: str = "127.0.0.1", port: int = 8000,
               log=print) -> None:
    """Load the run and serve it until Ctrl-C or SIGTERM (in-flight requests get
    `opts.shutdown_grace_s`, then are cancelled and their generations stopped)."""
    import uvicorn

    predictor = open_predictor(run, log)
    endpoint = ("chat completions" if hasattr(predictor, "answer") else
                "detections" if hasattr(predictor, "detect") else "embeddings")
    log(f"serving {predictor.name} ({endpoint}) at http://{host}:{port}/v1 (models: "
        + ", ".join([predictor.name] + ([f"{predictor.name}:base"] if predictor.has_base
                                        else [])) + ")")
    uvicorn.run(build_app(predictor, opts), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=opts.shutdown_grace_s)
