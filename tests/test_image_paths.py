"""One image decoder: every path that hands an image to a model (generative training and eval,
predict, serve, the demo, CLIP/SigLIP training, retrieval training, `data filter`, CLIPScore)
gives its processor the pixels training's `load_rgb` makes: EXIF orientation applied,
transparency on white, 16-bit scaled. Otherwise a transparent PNG trained on white is served on
black, and a phone photo trained upright is scored sideways.

The list of paths is held against the code: a scan of `peftvlm/` finds every module that decodes
an image (calls the decoder, or PIL's `Image.open` / `.convert`), and each must be either a path
tested here or a header-only reader named below with why."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peftvlm.data.images import load_rgb

PACKAGE = Path(__file__).resolve().parent.parent / "peftvlm"


# --- the images: each one wrong in its own way through a plain `convert("RGB")` ----------------

def exif_rgba_png(path: Path) -> None:
    """40x20 RGBA, the right half transparent (hiding dark red), EXIF: rotate 90 to view."""
    pixels = np.zeros((20, 40, 4), np.uint8)
    pixels[..., 0] = np.arange(40, dtype=np.uint8) * 6
    pixels[..., 1] = 90
    pixels[:, :20, 3] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels, "RGBA").save(path, exif=exif)


def exif_16bit_png(path: Path) -> None:
    """40x20 16-bit greyscale (I;16), EXIF: rotate 270 to view."""
    values = (np.arange(800).reshape(20, 40) * 80).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(values).save(path, exif=exif)


IMAGES = {"exif_rgba.png": exif_rgba_png, "exif_16bit.png": exif_16bit_png}


@pytest.fixture(params=sorted(IMAGES))
def image(request, tmp_path) -> Path:
    path = tmp_path / "data" / request.param
    path.parent.mkdir()
    IMAGES[request.param](path)
    naive = np.asarray(Image.open(path).convert("RGB"))
    # The image has teeth: a plain decode differs from training's.
    assert naive.shape != np.asarray(load_rgb(path)).shape
    return path


@pytest.fixture
def received(monkeypatch) -> list:
    """The images every transformers image processor is called with, as uint8 arrays."""
    from transformers.image_processing_utils import BaseImageProcessor

    seen = []
    original = BaseImageProcessor.__call__

    def flatten(images):
        if isinstance(images, (list, tuple)):
            for item in images:
                yield from flatten(item)
        elif images is not None:
            yield images

    def spy(self, images=None, *args, **kwargs):
        seen.extend(np.asarray(im) for im in flatten(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(BaseImageProcessor, "__call__", spy)
    return seen


@pytest.fixture(scope="module")
def llava():
    from peftvlm.models import load_base
    from peftvlm.recipe import ModelConfig

    return load_base(ModelConfig(id="tiny-llava"))


@pytest.fixture(scope="module")
def clip():
    from peftvlm.models import load_base
    from peftvlm.recipe import ModelConfig

    return load_base(ModelConfig(id="tiny-clip"))


# --- each path, driven through its own code ------------------------------------------------------

def vqa_rows(image: Path):
    """The row training reads from a JSONL file naming the image (the real reader)."""
    from peftvlm.data.loading import load_rows
    from peftvlm.recipe import validate_recipe_dict

    data = image.parent / "t.jsonl"
    data.write_text(json.dumps({"messages": [
        {"role": "user", "content": "<image>What colour?"},
        {"role": "assistant", "content": "red"}], "images": [image.name]}) + "\n")
    recipe = validate_recipe_dict({"name": "i", "model": {"id": "tiny-llava"},
                                   "method": {"name": "lora"}, "data": {"train": str(data)}})
    recipe.source_path = image.parent / "r.yaml"
    return list(load_rows(recipe).train)


def generative_training(image, llava, received, tmp_path):
    from peftvlm.data.collate import ConversationCollator

    ConversationCollator(llava.processor, llava.family)(vqa_rows(image))
    return received


def generative_eval(image, llava, received, tmp_path):
    from peftvlm.data.collate import encode_prompts

    encode_prompts(llava.processor, llava.family, vqa_rows(image))
    return received


def predict(image, llava, received, tmp_path):
    """`peftvlm predict`: what it hands the predictor for each --image."""
    from peftvlm.serving.predict import open_images

    return [np.asarray(im) for _, im in open_images([image], warn=pytest.fail)]


# Where the server turns request images into PIL images (serving/inputs.py once split out).
SERVE_INPUTS = ("peftvlm.serving.inputs" if importlib.util.find_spec("peftvlm.serving.inputs")
                else "peftvlm.serving.openai_api")


def serve_data_url(image, llava, received, tmp_path):
    """`peftvlm serve`: the image of a chat request's data URL."""
    import base64

    inputs = importlib.import_module(SERVE_INPUTS)
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return [np.asarray(inputs.read_image_url(url, "messages[0]", inputs.ServerOptions()))]


def demo(image, llava, received, tmp_path):
    """The demo's button, given the image as gradio's `type="pil"` upload hands it over."""
    from peftvlm.serving.demo import responder

    class Predictor:  # records the rows the demo asks about
        kind, task, system_prompt = "generative", "question", None
        rows = []

        def answer(self, rows, base=False):
            self.rows += rows
            return ["red"] * len(rows)

    predictor = Predictor()
    with Image.open(image) as upload:
        responder(predictor, compare_base=False)(upload, "What colour?")
    return [np.asarray(im) for row in predictor.rows for im in row["images"]]


def clip_training(image, clip, received, tmp_path):
    """CLIP/SigLIP classification training and eval (`ImageSet.pixels`)."""
    import torch

    from peftvlm.trainers.clip import image_set
    from peftvlm.trainers.clip_data import Split

    image_set(Split([str(image)], [0]), clip.processor).pixels(torch.tensor([0]))
    return received


def retrieval_training(image, clip, received, tmp_path):
    """Contrastive (retrieval) training and eval (`Encoder.pixels`)."""
    from peftvlm.trainers.contrastive import Encoder

    Encoder(clip.model, clip.family, clip.processor).pixels([str(image)], "cpu")
    return received


def data_filter(image, clip, received, tmp_path):
    """`peftvlm data filter`: the images scored, batch by batch."""
    from peftvlm.data.filter import FilterSettings, Pair, score_pairs

    out = tmp_path / "filtered"
    out.mkdir()
    (out / "scores.jsonl").write_text("")
    score_pairs([Pair(str(image), "a photo", "t", 0)], FilterSettings(0.0, "tiny-clip", 4, out),
                {"pairs_done": 0, "bytes": 0}, log=lambda *_: None)
    return received


def clipscore(image, clip, received, tmp_path):
    from peftvlm.metrics.clipscore import clip_score

    clip_score(clip.model, clip.processor, [str(image)], ["a photo"])
    return received


GENERATIVE_PATHS = {"peftvlm.data.collate": generative_training,
                    "peftvlm.eval.generate": generative_eval,
                    "peftvlm.serving.predict": predict,
                    SERVE_INPUTS: serve_data_url,
                    "peftvlm.serving.demo": demo}
DUAL_ENCODER_PATHS = {"peftvlm.trainers.clip": clip_training,
                      "peftvlm.trainers.contrastive": retrieval_training,
                      "peftvlm.data.filter": data_filter,
                      "peftvlm.metrics.clipscore": clipscore}

# Modules the scan finds that are not a path of their own (header readers, helpers), with why.
NOT_DECODING = {
    "peftvlm.data.images": "the decoder itself",
    "peftvlm.data.sources": "image_size reads the header (and EXIF tag) for length checks",
    "peftvlm.data.preview": "draws boxes on the image the collator opened (open_image: the "
                            "training path above) or on load_rgb's",
    "peftvlm.trainers.objectives.grpo_trainer": "rollouts open images with the collator's "
                                                "open_image (the training path above)",
    "peftvlm.metrics.detection": "segmentation masks (PNG) are label maps for IoU, not images "
                                 "for a model",
    "peftvlm.data.video": "video frames (GIF/WebP) are decoded as frames, not as images",
    "peftvlm.serving.predictor": "classify() gets predict's / serve's decoded images",
    "peftvlm.trainers.clip_data": "open_image: load_rgb for trainers.clip (tested above)",
    "peftvlm.trainers.detection": "load_rgb for the detection kind's batches (its pixels: "
                                  "tests/test_grounding_dino.py)",
    "peftvlm.serving.detection": "load_rgb on predict's / serve's images and for drawing",
}


def assert_pixels_match(image: Path, got: list) -> None:
    expected = np.asarray(load_rgb(image))
    assert got, "no image reached the processor"
    for pixels in got:
        assert pixels.shape == expected.shape, "EXIF orientation not applied"
        assert np.array_equal(pixels, expected), "pixels differ from training's load_rgb"


@pytest.mark.parametrize("path", GENERATIVE_PATHS)
def test_generative_paths_see_training_pixels(path, image, llava, received, tmp_path):
    assert_pixels_match(image, GENERATIVE_PATHS[path](image, llava, received, tmp_path))


@pytest.mark.parametrize("path", DUAL_ENCODER_PATHS)
def test_dual_encoder_paths_see_training_pixels(path, image, clip, received, tmp_path):
    assert_pixels_match(image, DUAL_ENCODER_PATHS[path](image, clip, received, tmp_path))


# --- the list of paths, held against the code -------------------------------------------------

DECODER_CALLS = {"load_rgb", "open_image", "to_rgb"}


def decoding_modules() -> dict[str, set[str]]:
    """module -> how it decodes: calls of the decoder, `Image.open`, `.convert("RGB")`."""
    found = {}
    for file in PACKAGE.rglob("*.py"):
        module = ".".join(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            rgb = name == "convert" and any(isinstance(a, ast.Constant) and a.value == "RGB"
                                            for a in node.args)
            if name in DECODER_CALLS or (name == "open" and owner == "Image") or rgb:
                found.setdefault(module, set()).add("convert('RGB')" if rgb else name)
    return found


def test_every_decoding_module_is_a_tested_path():
    tested = set(GENERATIVE_PATHS) | set(DUAL_ENCODER_PATHS) | set(NOT_DECODING)
    found = decoding_modules()
    assert "peftvlm.serving.predict" in found and "peftvlm.data.collate" in found  # scan works
    untested = {m: sorted(how) for m, how in found.items() if m not in tested}
    assert not untested, f"modules decoding images outside the tested paths: {untested}"


def test_only_the_decoder_opens_images_for_models():
    """Outside data/images.py, PIL's own `Image.open` / `convert("RGB")` appear only where an
    image is not handed to a model (NOT_DECODING says why)."""
    plain = {m: sorted(how - DECODER_CALLS) for m, how in decoding_modules().items()
             if how - DECODER_CALLS and m not in NOT_DECODING}
    assert not plain, f"plain PIL decoding next to the one decoder: {plain}"
