"""The server's front door, in front of FastAPI: the API key, and the body limit on the bytes
that arrive.

A plain ASGI middleware rather than FastAPI's `@app.middleware("http")`: that wrapper reads
nothing itself, so a limit there can only trust `Content-Length`, and a chunked body (no
Content-Length) would stream past it into memory. Here `receive` itself counts: once the bytes
received pass `max_body_bytes`, the request ends with a 413, whatever the headers said.
(FastAPI's own `max_body_size` does the same from its most recent releases on; our supported
range starts earlier.)

With an API key, every path but `/health` needs `Authorization: Bearer KEY`: the exact scheme,
one space, the key, compared in constant time (`hmac.compare_digest`). That covers the OpenAPI
pages (/docs, /redoc, /openapi.json), which describe the server to whoever can read them.
"""

from __future__ import annotations

import hmac
import json

from starlette.exceptions import HTTPException

from peftvlm.serving.inputs import APIError

OPEN_PATHS = frozenset({"/health"})


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body is over the limit (FastAPI re-raises HTTPException
    from body reading, so the app's handler answers it in OpenAI's shape)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit // 2**20} MiB")
        self.api_error = APIError(413, f"the request body is over {limit // 2**20} MiB", None,
                                  "request_too_large")


class Guard:
    """ASGI middleware: API key, then the body limit (declared and received)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"] not in OPEN_PATHS and not self.authorized(headers):
            return await answer(send, APIError(401, "invalid or missing API key (send "
                                                    "`Authorization: Bearer KEY`)", None,
                                               "invalid_api_key"))
        declared = headers.get("content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await answer(send, BodyTooLarge(self.max_body_bytes).api_error)
        started = False
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as exc:  # read outside a route (no handler ran): answer here
            if started:
                raise
            await answer(send, exc.api_error)

    def authorized(self, headers: dict) -> bool:
        scheme, _, given = headers.get("authorization", b"").partition(b" ")
        return scheme == b"Bearer" and hmac.compare_digest(given, self.api_key.encode())


async def answer(send, error: APIError) -> None:
    """Send `error` as a JSON response (the connection closes after it)."""
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
