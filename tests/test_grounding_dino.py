"""The detection kind on the tiny Grounding DINO: family and LoRA presets, detection records,
class scores and COCO mAP, one trained run through eval, export (merged, verified), predict
(drawn PNGs) and serve (`POST /v1/detections`), and LoRA alone (the `detector` preset)
adapting a pretrained twin to classes it never saw (scripts/detection_learning.py
--lora-after-pretraining; docs/benchmarks.md)."""

from __future__ import annotations

import json
import re
import sys

import httpx
import pytest
from serve_helpers import data_url, served

from conftest import REPO
from peftvlm import api
from peftvlm.data.prepare.detection import read_section
from peftvlm.errors import DataError, RecipeError
from peftvlm.families import FAMILIES, tiny_models
from peftvlm.kinds import get_kind, kind_for, kind_for_export
from peftvlm.recipe.load import load_recipe, validate_recipe_dict
from peftvlm.recipe.schema import SourceConfig

QUIET = {"log": lambda *_: None}
RECIPE = REPO / "recipes" / "grounding-dino-tiny.yaml"
SHORT = ["train.max_steps=3", "train.per_device_train_batch_size=4",
         "data.synthetic.train_size=16", "data.synthetic.eval_size=4"]


def test_family_is_listed_and_its_detector_preset_adapts_fusion_and_decoder_only(cli_in_process):
    from peftvlm.methods.lora import LoraMethod, target_regex
    from peftvlm.models import load_base

    spec = FAMILIES["grounding_dino"]
    assert spec.is_detector and not spec.is_generative and not spec.is_dual_encoder
    assert tiny_models()["tiny-grounding-dino"] is spec
    listed = cli_in_process("ls", "models")  # `ls` keeps subprocess tests (test_metrics)
    assert listed.returncode == 0 and "tiny-grounding-dino" in listed.stdout
    recipe = validate_recipe_dict({"model": {"id": "tiny-grounding-dino"},
                                   "method": {"name": "lora", "target": "detector"},
                                   "data": {"synthetic": {"name": "coco-instances"}}})
    model = load_base(recipe.model).model
    assert type(model).__name__ == "GroundingDinoForObjectDetection"
    pattern = re.compile(target_regex(spec, LoraMethod(target="detector")))
    hit = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    assert any(".fusion_layer.attn." in n for n in hit)
    assert any(n.startswith("model.decoder.layers.1.encoder_attn_text.") for n in hit)
    assert not [n for n in hit if n.startswith(("model.backbone", "model.text_backbone"))]
    assert kind_for(recipe) is get_kind("detection") and not get_kind("detection").generates
    assert kind_for_export(spec) is get_kind("detection")


def test_classification_methods_are_refused_for_the_detector(tmp_path):
    recipe = tmp_path / "coop.yaml"
    recipe.write_text("model: {id: tiny-grounding-dino}\nmethod: {name: coop}\n"
                      "data: {synthetic: {name: coco-instances}}\n")
    with pytest.raises(RecipeError, match="coop.*grounding_dino.*lora, dora or vera"):
        load_recipe(recipe, [])


def write_images(folder, n=2, side=40):
    from PIL import Image

    for i in range(n):
        Image.new("RGB", (side, side), (90, 90, 90)).save(folder / f"{i}.png")


def test_coco_and_jsonl_records_clip_keep_crowd_and_name_bad_rows(tmp_path):
    write_images(tmp_path, 3)
    coco = {"images": [{"id": 1, "file_name": "0.png", "width": 40, "height": 40},
                       {"id": 2, "file_name": "1.png", "width": 40, "height": 40},
                       {"id": 3, "file_name": "2.png", "width": 40, "height": 40}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 7, "bbox": [30, 30, 20, 5]},
                {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 8, 8], "iscrowd": 1},
                {"id": 3, "image_id": 2, "category_id": 3, "bbox": [50, 50, 5, 5]}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]}
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    data = read_section([SourceConfig(path="inst.json")], tmp_path, {}, "skip", "data.train")
    assert data.classes == ["cat", "dog"]  # category id order
    first, empty = data.records
    assert first["boxes"] == [[30.0, 30.0, 40.0, 35.0], [0.0, 0.0, 8.0, 8.0]]  # clipped
    assert first["labels"] == ["dog", "cat"] and first["crowd"] == [0, 1]
    assert empty["boxes"] == []  # an image without objects is kept
    assert list(data.bad_rows) == ["box_outside_image"]
    assert "inst.json:image_id=2" in data.bad_rows["box_outside_image"]["first_rows"][0]
    with pytest.raises(DataError, match="1 bad row"):
        read_section([SourceConfig(path="inst.json")], tmp_path, {}, "error", "data.train")

    rows = [{"file": "0.png", "b": [[1, 2, 10, 10]], "l": ["red shape"]},
            {"file": "1.png", "b": [[1, 2, 3, 4]], "l": ["a.b"]},
            {"file": "2.png", "b": [[1, 2, 3, 4], [5, 5, 3, 3]], "l": ["red shape", "red shape"]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = SourceConfig(path="rows.jsonl", columns={"image": "file", "boxes": "b", "labels": "l"},
                       template_options={"box_input": "xywh"})
    data = read_section([src], tmp_path, {}, "skip", "data.train")
    assert data.records[0]["boxes"] == [[1.0, 2.0, 11.0, 12.0]]
    assert data.classes == ["red shape"]  # each class once, however many boxes carry it
    assert "rows.jsonl:2" in data.bad_rows["bad_label"]["first_rows"][0]

    # a YOLO folder is read by the same reader as generative detection data
    (tmp_path / "yolo" / "labels").mkdir(parents=True)
    (tmp_path / "yolo" / "images").mkdir()
    write_images(tmp_path / "yolo" / "images", 2)
    (tmp_path / "yolo" / "labels" / "0.txt").write_text("1 0.5 0.5 0.5 0.25\n")
    (tmp_path / "yolo" / "labels" / "1.txt").write_text("0 2.0 2.0 0.1 0.1\n")  # outside
    (tmp_path / "yolo" / "data.yaml").write_text("names: [dog, cat]\n")
    data = read_section([SourceConfig(path="yolo")], tmp_path, {}, "skip", "data.train")
    assert data.classes == ["dog", "cat"] and len(data.records) == 1
    assert data.records[0]["boxes"] == [[10.0, 15.0, 30.0, 25.0]]
    assert data.records[0]["labels"] == ["cat"] and data.records[0]["image"].endswith("0.png")
    assert list(data.bad_rows) == ["box_outside_image"]


def test_class_scores_group_a_class_s_tokens_and_coco_scores_rank_detections():
    import torch

    from peftvlm.trainers.detection import class_scores, coco_scores

    # [CLS] big cat . dog . [SEP]: class 0 = tokens 1-2, class 1 = token 4
    input_ids = torch.tensor([101, 1040, 1041, 1012, 1042, 1012, 102])
    logits = torch.full((2, 7), -10.0)
    logits[0, 1:3] = torch.tensor([0.0, 2.0])
    logits[1, 4] = 3.0
    scores = class_scores(logits, input_ids)
    assert scores.shape == (2, 2)
    assert scores[0, 0] == pytest.approx((0.5 + torch.sigmoid(torch.tensor(2.0)).item()) / 2)
    assert scores[1, 1] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())

    records = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": ["cat", "dog"],
                "crowd": [0, 0]}]
    right = [[(0, 0.9, [0, 0, 10, 10]), (1, 0.8, [20, 20, 30, 30])]]
    assert coco_scores(records, right, ["cat", "dog"])["detection_mAP"] == pytest.approx(1.0)
    swapped = [[(1, 0.9, [0, 0, 10, 10]), (0, 0.8, [20, 20, 30, 30])]]
    assert coco_scores(records, swapped, ["cat", "dog"])["detection_mAP50"] == 0.0


def test_detection_batches_get_the_one_decoder_s_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    from peftvlm.data.read.images import load_rgb
    from peftvlm.trainers.detection import encode

    path = tmp_path / "clear.png"
    Image.new("RGBA", (8, 6), (255, 0, 0, 0)).save(path)  # transparent: white, not black
    seen = []

    class Processor:
        def image_processor(self, images, return_tensors, **kwargs):
            seen.extend(images)
            return {}

        def tokenizer(self, texts, padding, return_tensors):
            return {}

    encode(Processor(), [{"image": str(path)}], ["red"], "cpu", labels=False)
    assert np.array_equal(np.asarray(seen[0]), np.asarray(load_rgb(path)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run of the shipped tiny recipe, through the kind-agnostic api."""
    recipe = load_recipe(RECIPE, SHORT)
    run = tmp_path_factory.mktemp("gdino") / "run"
    summary = api.train(recipe, run, **QUIET)
    return recipe, run, summary


def test_a_run_trains_evaluates_exports_merged_and_predicts(trained, tmp_path):
    from peftvlm.serving.predictor import open_predictor

    recipe, run, summary = trained
    assert summary["kind"] == "detection" and summary["global_step"] == 3
    assert summary["classes"] == ["red", "green", "blue", "yellow"]
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert {"detection_mAP", "detection_mAP50"} <= set(summary["eval"])

    result = api.evaluate(recipe, run, **QUIET)
    assert result["metrics"]["detection_mAP50"]["base"] is not None
    assert len(list((run / "eval" / "images").glob("*.png"))) == 4
    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").open()]
    assert rows[0]["references"] and all(0 <= d["score"] <= 1 for d in rows[0]["prediction"])

    report = api.export(run, out=tmp_path / "merged", merge=True, **QUIET)
    checks = report["checks"]
    assert report["passed"] and checks["outputs"]["passed"]
    assert checks["outputs"]["max_abs_diff"] <= checks["outputs"]["tolerance"]
    assert checks["weights_changed"]["changed_after_merge"] > 0

    predictor = open_predictor(tmp_path / "merged", **QUIET)
    image = rows[0]["image"]
    merged = predictor.detect([image], threshold=0.0)[0]
    adapter = open_predictor(run, **QUIET).detect([image], threshold=0.0)[0]
    assert [d["label"] for d in merged[:5]] == [d["label"] for d in adapter[:5]]
    assert merged[0]["score"] == pytest.approx(adapter[0]["score"], abs=1e-4)


def test_predict_cli_draws_boxes_and_takes_class_names(trained, tmp_path, cli_in_process):
    _, run, _ = trained
    image = json.loads((run / "eval" / "predictions.jsonl").open().readline())["image"] \
        if (run / "eval").exists() else None
    if image is None:
        from peftvlm.trainers.detection import load_data

        image = str(load_data(trained[0], 1)[1].records[0]["image"])
    out = tmp_path / "d.jsonl"
    # in-process: `predict` keeps its subprocess tests (test_predict_retrieval, test_serve)
    res = cli_in_process("predict", run, "--image", image, "--text", "red . blue .", "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[0])
    assert row["prompt"] == "red . blue ." and {d["label"] for d in row["detections"]} <= \
        {"red", "blue"}
    drawn = tmp_path / "d_images"
    assert [p.name for p in drawn.glob("*.png")] == [row["drawn"].rsplit("/", 1)[1]]
    bad = cli_in_process("predict", run, "--image", image, "--caption", "a red square")
    assert bad.returncode == 2 and "detection run" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_answers_detections_and_refuses_chat(trained):
    from peftvlm.serving.openai_api import build_app
    from peftvlm.serving.predictor import open_predictor
    from peftvlm.trainers.detection import load_data

    recipe, run, _ = trained
    predictor = open_predictor(run, **QUIET)
    image = load_data(recipe, 1)[1].records[0]["image"]
    with served(build_app(predictor)) as url:
        got = httpx.post(f"{url}/v1/detections", json={
            "model": predictor.name, "image": data_url(image), "classes": ["green", "red"],
            "threshold": 0.0}, timeout=60).json()
        assert got["prompt"] == "green . red ." and got["image_size"] == [64, 64]
        expected = predictor.detect([image], ["green", "red"], threshold=0.0)[0]
        assert [d["box"] for d in got["data"]] == [d["box"] for d in expected]
        base = httpx.post(f"{url}/v1/detections", json={
            "model": f"{predictor.name}:base", "image": data_url(image), "classes": "red ."},
            timeout=60)
        assert base.status_code == 200 and base.json()["prompt"] == "red ."
        chat = httpx.post(f"{url}/v1/chat/completions", json={
            "model": predictor.name, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "chat_not_supported"
        assert "/v1/detections" in chat.json()["error"]["message"]
        bad = httpx.post(f"{url}/v1/detections", json={
            "model": predictor.name, "image": data_url(image), "classes": ["a.b"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "classes"


@pytest.mark.slow
def test_lora_alone_adapts_a_pretrained_twin_to_colours_it_never_saw(tmp_path):
    """The practitioner's case: a detector already trained (the twin trained in full on red,
    green, blue and yellow squares, saved with save_pretrained) loaded as `model.id: <folder>`,
    and LoRA alone, the family's `detector` preset, trained through `api.train` on orange,
    purple, white and black squares. Held-out mAP50 must rise far above the new task's
    colour-blind baseline (perfect boxes, classes scored at random): the adapter learnt to
    read the new classes, which the pretrained detector cannot."""
    sys.path.insert(0, str(REPO / "scripts"))
    from detection_learning import lora_after_pretraining, parse_args

    args = parse_args(["--lora-after-pretraining", "--train", "64", "--test", "32"])
    pre, result = lora_after_pretraining(args, tmp_path)
    saved = tmp_path / "pretrained-twin"
    assert (saved / "model.safetensors").is_file() and (saved / "config.json").is_file()
    assert pre["map50"] >= pre["baseline"] + 0.2, pre  # the stand-in checkpoint detects
    run = tmp_path / "new-task" / "run"
    assert json.loads((run / "summary.json").read_text())["model"] == str(saved)
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(saved)
    assert adapter["modules_to_save"] is None and "fusion_layer" in adapter["target_modules"]
    assert result["trainable"] < 50_000, result  # the adapters alone
    before, after = result["map50"]
    assert result["baseline"] <= 0.4 and after >= result["baseline"] + 0.4, result
    assert after >= before + 0.3, result  # the adapter's doing, not the pretrained detector's
