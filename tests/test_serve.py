"""`peftvlm serve` through the `openai` client, and `peftvlm predict`, on a trained quickstart.

One quickstart run is trained per session (serve_helpers.trained_quickstart, shared with the
demo test); servers bind 127.0.0.1 on a free port in a thread and stop after each test.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from conftest import run_cli_in_process
from serve_helpers import (COLOURS, app_for, data_url, held_out_by_colour, noise_png,
                           quickstart_predictor, quiet_predictor, served,
                           trained_quickstart)

pytestmark = pytest.mark.slow  # trains the quickstart once (shared by every test here)


@pytest.fixture(scope="module")
def predictor():
    return quickstart_predictor()


@pytest.fixture(scope="module")
def images():
    return held_out_by_colour()


def client(url: str, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def ask(oa, image_url: str, model: str = "quickstart", **kwargs):
    return oa.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": "What color is the shape?"}]}], **kwargs)


def test_openai_client_gets_the_right_colours_and_the_base_model(predictor, images):
    with served(app_for(predictor)) as url:
        oa = client(url)
        assert [m.id for m in oa.models.list().data] == ["quickstart", "quickstart:base"]
        for colour, path in images.items():
            reply = ask(oa, data_url(path))
            assert reply.choices[0].message.content == colour
            assert reply.choices[0].finish_reason == "stop"
            assert reply.usage.prompt_tokens > 16  # 16 image tokens + the question
            assert reply.model == "quickstart"
        base = [ask(oa, data_url(p), model="quickstart:base").choices[0].message.content
                for p in images.values()]
        assert base != list(images)  # the random base model has not learned colours


def test_streaming_sends_the_same_answer_in_pieces(predictor, images):
    with served(app_for(predictor)) as url:
        oa = client(url)
        for colour, path in list(images.items())[:2]:
            chunks = list(ask(oa, data_url(path), stream=True, max_tokens=4))
            pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
            assert "".join(pieces) == colour
            assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_clients_are_batched_and_all_answered(predictor, images):
    jobs = [(c, data_url(p)) for c, p in images.items()] * 3
    answers = [None] * len(jobs)
    with served(app_for(predictor, batch_wait_s=0.05)) as url:
        def one(i):
            answers[i] = ask(client(url), jobs[i][1]).choices[0].message.content

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        health = httpx.get(f"{url}/health").json()
    assert answers == [c for c, _ in jobs]
    assert health["requests"] == len(jobs) and health["max_batch_size"] >= 2, health


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(predictor, images,
                                                                     tmp_path):
    import openai

    text_file = tmp_path / "not-an-image.png"
    text_file.write_text("hello")
    with served(app_for(predictor, max_image_bytes=50_000,
                        allowed_local_media_path=tmp_path)) as url:
        oa = client(url)
        bad = {
            "invalid_image": dict(image_url=data_url(b"not a png")),
            "invalid_image_url": dict(image_url="data:image/png;base64,@@@"),
            "image_too_large": dict(image_url=data_url(noise_png(200))),
            "max_tokens_too_large": dict(image_url=data_url(images["red"]), max_tokens=10**6),
            "model_not_found": dict(image_url=data_url(images["red"]), model="gpt-4o"),
            "file_not_allowed": dict(image_url=f"file://{images['red']}"),
        }
        for code, kwargs in bad.items():
            with pytest.raises(openai.APIStatusError) as err:
                ask(oa, **kwargs)
            assert 400 <= err.value.status_code < 500, (code, err.value)
            assert err.value.body["code"] == code, err.value.body
            assert err.value.body["message"]
        with pytest.raises(openai.BadRequestError, match="not a readable image"):
            ask(oa, f"file://{text_file}")
        with pytest.raises(openai.BadRequestError, match="fetches nothing from the network"):
            ask(oa, "https://example.com/cat.png")
        schema = httpx.post(f"{url}/v1/chat/completions",
                            json={"model": "quickstart", "messages": "hi"})
        assert schema.status_code == 400 and schema.json()["error"]["param"] == "messages"
        with pytest.raises(openai.BadRequestError) as err:  # ~40-token prompt + 1024 > 1024
            ask(oa, data_url(images["blue"]), max_tokens=1024)
        assert err.value.body["code"] == "context_length_exceeded"
        # still healthy, answering right, and file:// URLs under the allowed folder work
        image = tmp_path / "blue.png"
        image.write_bytes(images["blue"].read_bytes())
        assert ask(oa, f"file://{image}").choices[0].message.content == "blue"
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_api_key_is_checked(predictor, images):
    import openai

    with served(app_for(predictor, api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert ask(client(url, "s3cret"), data_url(images["green"])).choices[0].message \
            .content == "green"


def test_predict_cli_answers_folders_and_skips_a_bad_image(images, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for colour, path in images.items():
        (folder / f"{colour}.png").write_bytes(path.read_bytes())
    (folder / "broken.png").write_text("not an image")
    out = tmp_path / "pred.jsonl"
    res = run_cli_in_process("predict", trained_quickstart(), "--image", folder, "--base",
                             "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipped" in res.stderr and "broken.png" in res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["image"].rsplit("/", 1)[1][:-4]: r["answer"] for r in rows} == \
        {c: c for c in COLOURS}
    assert all(r["prompt"] == "What color is the shape?" and "base_answer" in r for r in rows)


def test_serve_cli_refuses_a_folder_that_is_not_a_run(tmp_path):
    res = run_cli_in_process("serve", tmp_path)
    assert res.returncode == 2 and "neither a run folder" in res.stderr
    assert "Traceback" not in res.stderr


def test_merged_export_answers_alike_and_carries_what_vllm_reads(images):
    from PIL import Image
    from transformers import AutoProcessor

    from peftvlm.export import export_run
    from peftvlm.serving.predictor import question_row

    export_run(trained_quickstart(), merge=True, log=lambda *_: None)
    merged = trained_quickstart() / "merged"
    predictor = quiet_predictor(merged)
    rows = [question_row(Image.open(p), predictor.default_prompt) for p in images.values()]
    assert predictor.name == "quickstart-merged" and predictor.has_base
    assert predictor.answer(rows) == list(images)
    assert predictor.answer(rows[:1], base=True) != [next(iter(images))]
    # the template that trained: the checkpoint's own (llava-hf's, generation markers and all)
    trained = AutoProcessor.from_pretrained(trained_quickstart() / "adapter").chat_template
    assert AutoProcessor.from_pretrained(merged).chat_template == trained
    assert "ASSISTANT:" in trained
    generation = json.loads((merged / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 4 and generation["do_sample"] is False
