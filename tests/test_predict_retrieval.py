"""Dual-encoder runs used as what they are: `peftvlm predict` ranks captions (and images) on a
retrieval run, `peftvlm serve` answers `/v1/embeddings` with the adapted model's features
(checked against plain transformers + peft) and refuses chat, the demo ranks captions.

One `clip-retrieval-tiny` run is trained per module through the real CLI (a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO, run_cli
from serve_helpers import (app_for, cli_trained, data_url, free_port, quiet_predictor,
                           serve_process, served, server_output, wait_healthy)

pytestmark = pytest.mark.slow  # trains the retrieval recipe once (shared by the tests here)


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    return cli_trained(tmp_path_factory.mktemp("retrieval") / "clip-retrieval-tiny",
                       "recipes/clip-retrieval-tiny.yaml")


@pytest.fixture(scope="module")
def predictor(retrieval_run):
    return quiet_predictor(retrieval_run)


@pytest.fixture(scope="module")
def plain(retrieval_run):
    """The run's adapter on its base with plain transformers + peft, as a user would load it:
    (adapted model, base model (same object, adapter off), processor)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoProcessor

    from peftvlm.models import tiny_model_path

    base = AutoModel.from_pretrained(tiny_model_path("tiny-clip"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, retrieval_run / "adapter").eval()
    return model, AutoProcessor.from_pretrained(retrieval_run / "adapter")


def plain_features(plain, texts=(), images=(), base=False):
    """Normalised text or image features the plain way (one call per input: padding-free)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from PIL import Image

    model, processor = plain
    switch = model.disable_adapter() if base else contextlib.nullcontext()
    out = []
    with switch, torch.no_grad():
        for text in texts:
            out.append(model.get_text_features(**processor.tokenizer([text], return_tensors="pt"))
                       .pooler_output)
        for path in images:
            pixels = processor.image_processor(images=[Image.open(path).convert("RGB")],
                                               return_tensors="pt")["pixel_values"]
            out.append(model.get_image_features(pixel_values=pixels).pooler_output)
    return F.normalize(torch.cat(out).float(), dim=-1).numpy()


@pytest.fixture(scope="module")
def held_out(predictor, tmp_path_factory):
    """Four held-out images with distinct first captions, as PNG files, and those captions."""
    from peftvlm.data.images import load_rgb

    folder = tmp_path_factory.mktemp("images")
    paths, captions = [], []
    for i, pair in enumerate(predictor.examples):
        if pair["captions"][0] in captions or len(paths) == 4:
            continue
        path = folder / f"img{i}.png"
        load_rgb(pair["images"][0]).save(path)
        paths.append(path)
        captions.append(pair["captions"][0])
    assert len(captions) == 4, captions
    return paths, captions


def test_open_predictor_gives_a_retrieval_predictor_that_ranks_as_plain_peft(predictor, plain,
                                                                            held_out):
    from peftvlm.serving.retrieval import RetrievalPredictor

    paths, captions = held_out
    assert isinstance(predictor, RetrievalPredictor) and predictor.has_base
    ranked = predictor.rank_texts(paths, captions)
    image_f, text_f = plain_features(plain, images=paths), plain_features(plain, texts=captions)
    sims = image_f @ text_f.T
    for row, ranking in zip(sims, ranked):
        assert [c for c, _ in ranking] == [captions[j] for j in np.argsort(-row)]
        assert np.allclose([s for _, s in ranking], np.sort(row)[::-1], atol=1e-4)
    by_text = predictor.rank_images(captions[0], paths)
    assert [i for i, _ in by_text] == list(np.argsort(-sims[:, 0]))
    base = predictor.embed_images(paths, base=True).numpy()
    assert np.allclose(base, plain_features(plain, images=paths, base=True), atol=1e-5)
    assert not np.allclose(base, image_f, atol=1e-3)  # the adapter changes the features
    # after training, most held-out images rank their own caption first among the four
    assert sum(r[0][0] == captions[i] for i, r in enumerate(ranked)) >= 2, ranked


def test_predict_cli_ranks_captions_per_image_and_images_for_a_text(retrieval_run, held_out,
                                                                   tmp_path):
    paths, captions = held_out
    listed = tmp_path / "captions.txt"
    listed.write_text("\n".join(captions[2:]) + "\n\n")
    out = tmp_path / "ranked.jsonl"
    res = run_cli("predict", retrieval_run, "--image", paths[0], "--image", paths[1],
                  "--caption", captions[0], "-c", captions[1], "--captions", listed, "--base",
                  "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in paths[:2]]
    for row in rows:
        assert sorted(r["caption"] for r in row["ranking"]) == sorted(captions)
        scores = [r["score"] for r in row["ranking"]]
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
        assert row["prediction"] == row["ranking"][0]["caption"] and "base_ranking" in row
    out_text = tmp_path / "images.jsonl"
    res = run_cli("predict", retrieval_run, "--text", captions[3], "--image", paths[0],
                  "--image", paths[3], "--out", out_text)
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = [json.loads(line) for line in out_text.read_text().splitlines()]
    assert row["text"] == captions[3]
    assert sorted(r["image"] for r in row["ranking"]) == sorted([str(paths[0]), str(paths[3])])


def test_predict_cli_on_a_retrieval_run_without_captions_says_what_to_pass(retrieval_run,
                                                                          held_out):
    res = run_cli("predict", retrieval_run, "--image", held_out[0][0])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "retrieval run" in res.stderr and "--caption" in res.stderr


def test_embeddings_equal_plain_peft_features_and_chat_is_refused(predictor, plain, held_out,
                                                                 tmp_path):
    import openai
    from openai import OpenAI

    paths, captions = held_out
    (tmp_path / "media").mkdir()
    local = tmp_path / "media" / "img.png"
    local.write_bytes(paths[1].read_bytes())
    app = app_for(predictor, allowed_local_media_path=tmp_path / "media")
    name = predictor.name
    with served(app) as url:
        oa = OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        assert [m.id for m in oa.models.list().data] == [name, f"{name}:base"]
        # the openai client asks for base64 by default and decodes it
        got = oa.embeddings.create(model=name, input=[captions[0], data_url(paths[0]),
                                                      f"file://{local}", captions[1]])
        vectors = np.array([d.embedding for d in got.data])
        expected = np.concatenate([plain_features(plain, texts=[captions[0]]),
                                   plain_features(plain, images=[paths[0], paths[1]]),
                                   plain_features(plain, texts=[captions[1]])])
        assert np.abs(vectors - expected).max() < 1e-5
        assert got.usage.prompt_tokens == sum(predictor.count_tokens(c) for c in captions[:2])
        as_floats = httpx.post(f"{url}/v1/embeddings", json={
            "model": f"{name}:base", "input": captions[2], "encoding_format": "float"}).json()
        assert np.abs(np.array(as_floats["data"][0]["embedding"])
                      - plain_features(plain, texts=[captions[2]], base=True)[0]).max() < 1e-5
        parts = httpx.post(f"{url}/v1/embeddings", json={"model": name, "input": [
            {"type": "image_url", "image_url": {"url": data_url(paths[2])}},
            {"type": "text", "text": captions[2]}]}).json()
        assert np.abs(np.array(parts["data"][0]["embedding"])
                      - plain_features(plain, images=[paths[2]])[0]).max() < 1e-5
        with pytest.raises(openai.BadRequestError) as err:
            oa.chat.completions.create(model=name, messages=[{"role": "user",
                                                              "content": "hello"}])
        assert err.value.body["code"] == "chat_not_supported"
        assert "dual-encoder" in err.value.body["message"]
        assert "/v1/embeddings" in err.value.body["message"]
        too_long = httpx.post(f"{url}/v1/embeddings", json={"model": name,
                                                           "input": "red " * 500})
        assert too_long.status_code == 400
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        assert too_long.json()["error"]["param"] == "input[0]"


def test_serve_cli_on_a_retrieval_run_offers_embeddings_not_chat(retrieval_run, predictor,
                                                                 held_out):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_process(retrieval_run, port)
    try:
        wait_healthy(proc, url)
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == [predictor.name, f"{predictor.name}:base"]
        got = httpx.post(f"{url}/v1/embeddings", json={"model": predictor.name,
                                                       "input": held_out[1][0]}).json()
        expected = predictor.embed_texts([held_out[1][0]])[0].numpy()
        assert np.abs(np.array(got["data"][0]["embedding"]) - expected).max() < 1e-5
        chat = httpx.post(f"{url}/v1/chat/completions", json={
            "model": predictor.name, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "chat_not_supported"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "(embeddings)" in server_output(proc)


def test_classification_run_serves_its_methods_image_features(tmp_path):
    import torch
    import torch.nn.functional as F

    from peftvlm import api
    from peftvlm.data.collate import open_image
    from peftvlm.methods.dual_encoder import load_method
    from peftvlm.recipe import load_recipe
    from peftvlm.trainers.clip import load_dual_encoder

    recipe = load_recipe(REPO / "recipes" / "clip-adapter.yaml",
                         ["train.max_steps=3", "data.synthetic.eval_size=8"])
    run = tmp_path / "run"
    api.train(recipe, run, log=lambda *_: None)
    predictor = quiet_predictor(run)
    image = predictor.examples[0]["images"][0]
    loaded = load_dual_encoder(recipe)
    method = load_method(loaded.model, loaded.family, loaded.processor.tokenizer,
                         run / "adapter").eval()

    pixels = loaded.processor.image_processor(images=[open_image(image)],
                                              return_tensors="pt")["pixel_values"]
    text = "a photo of a red shape"
    tokens = loaded.processor.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(method.image_features(pixels).float(), dim=-1)[0].numpy()
        text_expected = F.normalize(loaded.model.get_text_features(**tokens).pooler_output,
                                    dim=-1)[0].numpy()
    with served(app_for(predictor)) as url:
        body = httpx.post(f"{url}/v1/embeddings", json={
            "model": predictor.name, "input": [data_url(Path(image)), text]}).json()
        chat = httpx.post(f"{url}/v1/chat/completions", json={
            "model": predictor.name, "messages": [{"role": "user", "content": "hi"}]})
    assert np.abs(np.array(body["data"][0]["embedding"]) - expected).max() < 1e-5
    assert np.abs(np.array(body["data"][1]["embedding"]) - text_expected).max() < 1e-5
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "chat_not_supported"


def test_merged_export_of_a_retrieval_run_embeds_alike(retrieval_run, predictor, held_out):
    from peftvlm.export import export_run
    from peftvlm.serving.retrieval import RetrievalPredictor

    export_run(retrieval_run, merge=True, log=lambda *_: None)
    merged = quiet_predictor(retrieval_run / "merged")
    assert isinstance(merged, RetrievalPredictor) and not merged.has_base
    paths, captions = held_out
    assert (merged.embed_images(paths) - predictor.embed_images(paths)).abs().max() < 1e-5
    assert (merged.embed_texts(captions) - predictor.embed_texts(captions)).abs().max() < 1e-5


def test_demo_ranks_the_listed_captions_for_an_uploaded_image(predictor, held_out):
    from PIL import Image

    from peftvlm.serving.demo import build_demo, default_captions, responder

    paths, captions = held_out
    assert len(default_captions(predictor).splitlines()) == 4
    best, probs, base_best, base_probs = responder(predictor, True)(Image.open(paths[0]),
                                                                    "\n".join(captions))
    assert set(probs) == set(captions) and abs(sum(probs.values()) - 1) < 1e-3
    ranked = predictor.rank_texts([paths[0]], captions)[0]
    assert best == ranked[0][0] == max(probs, key=probs.get)
    assert base_best in captions and set(base_probs) == set(captions)
    assert build_demo(predictor) is not None
