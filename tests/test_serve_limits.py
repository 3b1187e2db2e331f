"""`peftvlm serve` limits that hold under abuse: the body limit on the bytes received (chunked
too), cheap checks before any decoding or tokenising, a literal image token refused as a 400,
a disconnect that stops generation, SIGTERM that stops the server, error messages free of
server paths and pids, strict Bearer auth over the OpenAPI pages too, the [serve] install hint,
and a bounded loopback load test (bursts of bad requests while healthy clients keep getting
their answers, server RSS bounded).

A quickstart run trained for 3 steps serves (answers need not be right, only stable: a request
must get the answer the unloaded server gives). Servers bind 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, run_cli_in_process
from serve_helpers import data_url, free_port, noise_png, serve_process, served, wait_healthy

QUESTION = "What color is the shape?"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("limits") / "quickstart"
    res = run_cli_in_process("train", "recipes/quickstart.yaml", "train.max_steps=3",
                             "eval.before_training=false", "eval.max_samples=4", "-o", run)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def predictor(run):
    from peftvlm.serving.predictor import open_predictor

    return open_predictor(run, log=lambda *_: None)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


def app_for(predictor, **options):
    from peftvlm.serving.openai_api import ServerOptions, build_app

    return build_app(predictor, ServerOptions(**options))


def chat_body(*parts, model="quickstart", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": list(parts)}], **extra}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def raw_post(url: str, path: str, chunks, headers: dict | None = None,
             timeout: float = 30) -> tuple[int, bytes, int]:
    """POST with `Transfer-Encoding: chunked` over a raw socket, stopping as soon as the server
    answers: (status, body, bytes sent). No Content-Length is ever sent."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
            "Transfer-Encoding: chunked", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sent = 0
    try:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered before the body ended
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        else:
            sock.sendall(b"0\r\n\r\n")
        return (*read_response(sock, timeout), sent)
    finally:
        sock.close()


def read_response(sock, timeout: float) -> tuple[int, bytes]:
    data, deadline = b"", time.monotonic() + timeout
    while b"\r\n\r\n" not in data or len(data) < body_end(data):
        assert time.monotonic() < deadline, data[:200]
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            break
        if not piece:
            break
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def body_end(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(data) + 1 if b"\r\n\r\n" not in data else len(data)


def error_of(response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- the body limit ------------------------------------------------------------------------------

def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(predictor):
    limit = 2**20
    with served(app_for(predictor, max_body_bytes=limit)) as url:
        chunks = (b"x" * 65536 for _ in range(20 * 16))  # 20 MiB, no Content-Length
        status, body, sent = raw_post(url, "/v1/chat/completions", chunks)
        assert status == 413, body[:300]
        assert json.loads(body)["error"]["code"] == "request_too_large"
        assert sent < 8 * limit  # the server stopped reading soon after the limit
        declared = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (limit + 1))
        assert declared.status_code == 413
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


# --- cheap checks first --------------------------------------------------------------------------

def test_cheap_checks_refuse_before_any_image_is_decoded_or_text_tokenised(predictor, image,
                                                                          monkeypatch):
    import PIL.Image

    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    tokenised = []
    real_tokens = predictor.prompt_tokens
    monkeypatch.setattr(predictor, "prompt_tokens",
                        lambda row: tokenised.append(1) or real_tokens(row))
    small = data_url(image)
    with served(app_for(predictor, max_images=8, max_image_bytes=20_000,
                        max_text_chars=2_000)) as url:
        many = httpx.post(f"{url}/v1/chat/completions",
                          json=chat_body(*[image_part(small)] * 40, text_part(QUESTION)))
        assert many.status_code == 400 and error_of(many)["code"] == "too_many_images"
        big_last = httpx.post(f"{url}/v1/chat/completions", json=chat_body(
            image_part(small), image_part(small), image_part(data_url(noise_png(200))),
            text_part(QUESTION)))
        assert big_last.status_code == 413 and error_of(big_last)["code"] == "image_too_large"
        assert error_of(big_last)["param"] == "messages[0].content[2].image_url"
        long_text = httpx.post(f"{url}/v1/chat/completions",
                               json=chat_body(image_part(small), text_part("red " * 2_000)))
        assert long_text.status_code == 400 and error_of(long_text)["code"] == "text_too_long"
        assert opened == [] and tokenised == []
        fine = httpx.post(f"{url}/v1/chat/completions",
                          json=chat_body(image_part(small), text_part(QUESTION)), timeout=60)
        assert fine.status_code == 200 and opened and tokenised


def test_a_literal_image_token_in_text_is_a_400_in_openai_shape(predictor, image):
    tokens = predictor.family.literal_media_tokens()
    assert "<image>" in tokens
    with served(app_for(predictor)) as url:
        for token in tokens:
            reply = httpx.post(f"{url}/v1/chat/completions", json=chat_body(
                image_part(data_url(image)), text_part(f"{token} {QUESTION}")))
            assert reply.status_code == 400, reply.text
            error = error_of(reply)
            assert error["code"] == "invalid_content" and token in error["message"]
            assert error["param"] == "messages[0].content[1].text"
        plain = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "quickstart", "messages": [{"role": "user", "content": "<image>"}]})
        assert plain.status_code == 400 and error_of(plain)["param"] == "messages[0].content"


# --- disconnects and shutdown --------------------------------------------------------------------

def test_a_client_that_disconnects_mid_stream_stops_the_generation(predictor, image,
                                                                   monkeypatch):
    forwards = []

    def slow_step(*_):
        forwards.append(time.monotonic())
        time.sleep(0.03)

    real_generation = predictor.generation

    def no_early_stop(max_new_tokens=None, temperature=None, top_p=None):
        options = real_generation(max_new_tokens, temperature, top_p)
        return {**options, "min_new_tokens": options["max_new_tokens"]}  # EOS cannot end it

    monkeypatch.setattr(predictor, "generation", no_early_stop)
    hook = predictor.model.get_base_model().register_forward_hook(slow_step)
    try:
        with served(app_for(predictor)) as url:
            body = chat_body(image_part(data_url(image)), text_part(QUESTION), stream=True,
                             max_tokens=400)
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                              timeout=60) as reply:
                lines = reply.iter_lines()
                while len(forwards) < 5:
                    next(lines)
            # the client is gone; 400 steps would take 12 s more
            time.sleep(1.5)
            settled = len(forwards)
            time.sleep(1.0)
            assert len(forwards) == settled < 100, len(forwards)
            assert predictor.lock.acquire(timeout=5)
            predictor.lock.release()
    finally:
        hook.remove()


def test_sigterm_stops_the_server_within_seconds_even_mid_upload(run):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_process(run, port)
    try:
        wait_healthy(proc, url)
        upload = socket.create_connection(("127.0.0.1", port))
        upload.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
                       b"4\r\n{\"mo\r\n")  # and then nothing: a client that never finishes
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.monotonic() - started < 10
        upload.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- what errors say -----------------------------------------------------------------------------

def test_errors_name_the_field_never_server_paths_or_pids(predictor, image, tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    secret = tmp_path / "private" / "secret-name.png"
    secret.parent.mkdir()
    secret.write_bytes(image.read_bytes())
    (allowed / "link.png").symlink_to(secret)
    (allowed / "notes.png").write_text("not an image")
    pid = str(os.getpid())  # the server runs in this process
    with served(app_for(predictor, allowed_local_media_path=allowed)) as url:
        cases = {f"file://{allowed}/link.png": 403, "file:///proc/self/environ": 403,
                 f"file://{allowed}/notes.png": 400, f"file://{allowed}/missing.png": 400}
        for image_url, status in cases.items():
            reply = httpx.post(f"{url}/v1/chat/completions",
                               json=chat_body(image_part(image_url), text_part(QUESTION)))
            error = error_of(reply)
            assert reply.status_code == status, (image_url, error)
            assert error["message"].startswith("messages[0].content[0].image_url: ")
            assert error["param"] == "messages[0].content[0].image_url"
            for leak in ("secret-name", str(tmp_path), "/proc", pid):
                assert leak not in error["message"], (leak, error["message"])


# --- access --------------------------------------------------------------------------------------

def test_bearer_auth_is_strict_and_covers_the_openapi_pages(predictor):
    with served(app_for(predictor, api_key="s3cret")) as url:
        def status(path, authorization=None):
            headers = {"Authorization": authorization} if authorization is not None else {}
            return httpx.get(f"{url}{path}", headers=headers).status_code

        assert status("/v1/models", "Bearer s3cret") == 200
        for wrong in (None, "s3cret", "Basic s3cret", "Bearer  s3cret", "bearer s3cret",
                      "Bearer s3cre", "Token s3cret", "Bearer s3cretx"):
            assert status("/v1/models", wrong) == 401, wrong
        for page in ("/docs", "/openapi.json", "/redoc"):
            assert status(page) == 401, page
        assert status("/openapi.json", "Bearer s3cret") == 200
        assert status("/health") == 200
    with served(app_for(predictor)) as url:  # without a key the pages stay open
        assert httpx.get(f"{url}/openapi.json").status_code == 200


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Block())
sys.argv = ["peftvlm", *{args!r}]
from peftvlm.cli import main
main()
"""


@pytest.mark.parametrize("command,blocked", [("serve", {"fastapi", "uvicorn"}),
                                             ("demo", {"gradio"})])
def test_serve_and_demo_without_the_extra_say_how_to_install_it(run, command, blocked):
    code = BLOCKER.format(blocked=blocked, args=[command, str(run)])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert 'pip install "peftvlm[serve]"' in res.stderr
    assert "Traceback" not in res.stderr


# --- load ----------------------------------------------------------------------------------------

def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_bursts_of_bad_requests_leave_healthy_clients_served_and_memory_bounded(run, image):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_process(run, port, "--max-body-mb", "2", "--max-images", "4",
                         "--max-batch-size", "1")
    healthy = chat_body(image_part(data_url(image)), text_part(QUESTION))
    try:
        wait_healthy(proc, url)
        expected = httpx.post(f"{url}/v1/chat/completions", json=healthy, timeout=60).json()
        expected = expected["choices"][0]["message"]["content"]
        baseline, peak = rss_mib(proc.pid), 0.0
        answers, refusals, stop = [], [], threading.Event()

        def healthy_client():
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    reply = client.post(f"{url}/v1/chat/completions", json=healthy)
                    answers.append(reply.json()["choices"][0]["message"]["content"]
                                   if reply.status_code == 200 else reply.status_code)

        def oversize():
            chunks = (b"x" * 65536 for _ in range(32 * 16))  # 32 MiB, chunked
            refusals.append(("oversize", raw_post(url, "/v1/chat/completions", chunks)[0]))

        def too_many_images():
            body = chat_body(*[image_part(data_url(image))] * 40, text_part(QUESTION))
            refusals.append(("images", httpx.post(f"{url}/v1/chat/completions", json=body,
                                                  timeout=60).status_code))

        def bad_json():
            reply = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": [', timeout=60,
                               headers={"content-type": "application/json"})
            refusals.append(("json", reply.status_code))

        clients = [threading.Thread(target=healthy_client) for _ in range(2)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 120
        for _burst in range(3):
            attackers = [threading.Thread(target=f) for f in (oversize, too_many_images,
                                                              bad_json) for _ in range(4)]
            for t in attackers:
                t.start()
            while any(t.is_alive() for t in attackers):
                assert time.monotonic() < deadline, "the load test ran too long"
                peak = max(peak, rss_mib(proc.pid))
                time.sleep(0.05)
        stop.set()
        for t in clients:
            t.join(timeout=60)
        assert sorted(set(refusals)) == [("images", 400), ("json", 400), ("oversize", 413)]
        assert len(refusals) == 36
        assert len(answers) >= 3 and set(answers) == {expected}, answers
        assert peak - baseline < 400, (baseline, peak)  # 12 x 32 MiB bodies were thrown at it
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
