"""Push an export folder to the Hugging Face Hub with clear errors and retries.

The token comes from where huggingface_hub looks (HF_TOKEN, then the `hf auth login` cache) and
is handed to the client only: it is never printed, logged, or written into any file, and it is
scrubbed from every error message we build. Transient failures (connection errors, timeouts,
429 and 5xx answers) are retried with back-off; everything else stops with one `ExportError`.
"""

from __future__ import annotations

import time
from pathlib import Path

from peftvlm.errors import ExportError

ATTEMPTS = 4
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def require_token() -> str:
    """The Hub token, or a clear error saying where it is looked for."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ExportError("no Hugging Face token found for --push-to-hub",
                          hint="set HF_TOKEN, or run `hf auth login` (a write token)")
    return token


def push_folder(folder: Path, repo_id: str, *, private: bool = True, commit_message: str,
                log=print, backoff_s: float = 2.0) -> dict:
    """Create `repo_id` if needed and upload every file of `folder` in one commit."""
    from huggingface_hub import HfApi

    token = require_token()
    api = HfApi(token=token)
    with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True,
                                         repo_type="model"),
                 f"create repo {repo_id}", token, api.endpoint, backoff_s, log)
    commit = with_retries(lambda: api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                                    repo_type="model",
                                                    commit_message=commit_message),
                          f"upload to {repo_id}", token, api.endpoint, backoff_s, log)
    url = f"{api.endpoint}/{repo_id}"
    log(f"pushed {folder} to {url} ({'private' if private else 'public'})")
    return {"repo_id": repo_id, "url": url, "private": private,
            "commit": getattr(commit, "oid", None), "commit_message": commit_message}


def with_retries(call, what: str, token: str, endpoint: str, backoff_s: float, log):
    """Run `call`, retrying transient failures; map the rest to one clear ExportError."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:  # classified below; unknown errors are re-raised unchanged
            status = http_status(exc)
            transient = is_connection_error(exc) or status in TRANSIENT_STATUS
            if transient and attempt < ATTEMPTS:
                wait = backoff_s * 2 ** (attempt - 1)
                log(f"{what}: {describe(exc, status)}; retrying in {wait:.0f} s "
                    f"({attempt}/{ATTEMPTS - 1})")
                time.sleep(wait)
                continue
            raise hub_error(exc, status, what, token, endpoint) from None
    raise AssertionError("unreachable")


def http_status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_connection_error(exc) -> bool:
    """Connection refused, DNS failure, timeout: by class name, since huggingface_hub's HTTP
    client (httpx or its httpx2 fork, depending on the version) defines its own classes."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return bool({c.__name__ for c in type(exc).__mro__} & {"TransportError", "TimeoutException"})


def describe(exc, status: int | None) -> str:
    return f"HTTP {status}" if status else type(exc).__name__


def hub_error(exc, status, what: str, token: str, endpoint: str) -> Exception:
    """The user-facing error for a failed Hub call (token scrubbed from any server text)."""
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    detail = detail.replace(token, "***")
    if is_connection_error(exc):
        return ExportError(f"{what}: cannot reach {endpoint} ({type(exc).__name__})",
                           hint="check the network (or HF_ENDPOINT), then run the export again")
    if status == 401:
        return ExportError(f"{what}: the Hub rejected the token (HTTP 401)",
                           hint="the token is invalid or expired: `hf auth login` again")
    if status == 403:
        return ExportError(f"{what}: the token has no permission to write there (HTTP 403)",
                           hint="use a write token, and a namespace you (or your org) own")
    if status is not None:
        return ExportError(f"{what}: the Hub answered HTTP {status}: {detail}",
                           hint="transient errors were retried; try again later" if
                           status in TRANSIENT_STATUS else None)
    return exc
