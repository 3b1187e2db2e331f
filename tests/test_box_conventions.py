"""Box conventions per family: writer and parser are inverses (every registry family, several
labelled objects), published examples parse and are reproduced, Qwen2.5-VL's pixel grid is
its processor's resize, the grounding template writes and the grounding metric parses with the
family's convention, and unsound reference boxes are named errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import data_cache, recipe_file, run_cli, save_image  # noqa: F401

from peftvlm.data.boxes import (BOX_FORMATS, CONVENTIONS, answer_text, bind_convention,
                                box_format_for, get_convention)
from peftvlm.data.render.templates import TemplateRenderer, load_template, merged_options
from peftvlm.data.rows import BadRow
from peftvlm.errors import MetricsError
from peftvlm.families import FAMILIES
from peftvlm.metrics.files import score_files
from peftvlm.metrics.grounding import grounding_accuracy, reference_boxes

FIXTURES = Path(__file__).parent / "fixtures" / "box_conventions"
EXAMPLES = json.loads((FIXTURES / "examples.json").read_text())
OBJECTS = [("the dog", (10.0, 20.0, 300.0, 200.0)), ("a cat", (50.5, 60.2, 70.9, 90.1)),
           ("a cat", (100.0, 100.0, 120.0, 130.0)), ("sky, far: blue", (0.0, 0.0, 640.0, 90.0))]
SIZES = [(640, 480), (333, 1000), (1280, 720)]


def _within_one_bin(conv, got, want, width, height):
    sx, sy = conv.units(width, height)
    for g, w, unit in zip(got, want, (sx, sy, sx, sy)):
        assert abs(g - w) <= 1.0 / unit + 1e-9, (conv.name, got, want)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("size", SIZES)
def test_every_family_round_trips_several_labelled_objects(family, size):
    width, height = size
    conv = get_convention(box_format_for(FAMILIES[family]))
    objects = [(label, (min(b[0], width - 2), min(b[1], height - 2), min(b[2], width),
                        min(b[3], height))) for label, b in OBJECTS]
    text = conv.write(objects, width, height)
    back = conv.parse(text, width, height)
    assert [label for label, _ in back] == [label for label, _ in objects], text
    for (_, got), (_, want) in zip(back, objects):
        _within_one_bin(conv, got, want, width, height)
    # one labelled object, as a grounding answer: the label is kept where the family's own
    # answers name their objects, the bare box otherwise
    single = conv.parse(answer_text(objects[:1], width, height, conv.key), width, height)
    assert single[0][0] == ("the dog" if conv.names_objects else None)
    _within_one_bin(conv, single[0][1], objects[0][1], width, height)


def test_families_name_their_published_conventions():
    expected = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl",
                "qwen3_vl_moe": "qwen3_vl", "paligemma": "paligemma", "internvl": "internvl",
                "florence2": "florence2"}
    for family, name in expected.items():
        assert FAMILIES[family].box_format == name
    # every family names a known convention (the rest: the documented norm1 choice)
    assert {s.box_format for s in FAMILIES.values()} <= set(BOX_FORMATS)
    assert all(s.box_format == "norm1" for n, s in FAMILIES.items() if n not in expected)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e['convention']}-{e['source']}")
def test_published_examples_parse_and_are_written_back(example):
    conv = CONVENTIONS[example["convention"]]
    parsed = conv.parse(example["text"])
    assert [(label, list(box)) for label, box in parsed] == \
        [(label, [float(v) for v in box]) for label, box in example["objects"]]
    objects = [(label, tuple(float(v) for v in box)) for label, box in example["objects"]]
    bare = len(objects) == 1 and objects[0][0] is None  # a region, as questions write it
    written = conv.box_only(objects[0][1], None) if bare else conv.write_text(objects, None)
    assert conv.parse(written) == parsed
    if example["exact"]:
        assert written == example["text"]


def test_every_named_convention_has_a_published_example():
    documented = {e["convention"] for e in EXAMPLES}
    published = {s.box_format for s in FAMILIES.values()} - {"norm1"}
    assert published <= documented
    sources = (FIXTURES / "SOURCES.md").read_text()
    assert all(f"`{e['source']}`" in sources for e in EXAMPLES)


def test_paligemma_refuses_labels_it_cannot_separate():
    with pytest.raises(BadRow, match="PaliGemma separates objects"):
        answer_text([("salt; pepper", (0, 0, 5, 5))], 10, 10, "paligemma")


def test_paligemma_writes_y_first_in_1024_bins():
    conv = CONVENTIONS["paligemma"]
    text = conv.write([("cat", (0, 0, 100, 50)), ("dog", (50, 25, 100, 50))], 100, 50)
    assert text == ("<loc0000><loc0000><loc1023><loc1023> cat ; "
                    "<loc0512><loc0512><loc1023><loc1023> dog")


def test_qwen2_5_vl_writes_pixels_of_the_image_its_processor_resizes():
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
        Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}, patch_size=14,
        merge_size=2)
    processor = type("P", (), {"image_processor": image_processor})()
    key = bind_convention("qwen2_5_vl", processor)
    assert key == "qwen2_5_vl:factor=28,min_pixels=3136,max_pixels=50176"
    width, height = 640, 480
    grid = image_processor(Image.fromarray(np.zeros((height, width, 3), np.uint8)),
                           return_tensors="np")["image_grid_thw"][0]
    resized_w, resized_h = int(grid[2]) * 14, int(grid[1]) * 14
    assert (resized_w, resized_h) != (width, height)
    text = get_convention(key).write([("all", (0, 0, width, height)),
                                      ("half", (0, 0, width / 2, height / 2))], width, height)
    assert json.loads(text) == [{"bbox_2d": [0, 0, resized_w, resized_h], "label": "all"},
                                {"bbox_2d": [0, 0, round(resized_w / 2), round(resized_h / 2)],
                                 "label": "half"}]
    # not the 0-1000 relative grid it was given before
    assert get_convention(key).write([(None, (0, 0, width, height))], width, height) != \
        '[{"bbox_2d": [0, 0, 1000, 1000]}]'


@pytest.mark.parametrize("box_format, answer, question", [
    ("qwen2_vl", "<|object_ref_start|>the red square<|object_ref_end|><|box_start|>(100,100),"
                 "(400,500)<|box_end|>", "<|box_start|>(100,100),(400,500)<|box_end|>"),
    ("qwen3_vl", '[{"bbox_2d": [100, 100, 400, 500], "label": "the red square"}]',
     "[100, 100, 400, 500]"),
    ("internvl", "<ref>the red square</ref><box>[[100, 100, 400, 500]]</box>",
     "<box>[[100, 100, 400, 500]]</box>"),
    ("paligemma", "<loc0102><loc0102><loc0512><loc0410> the red square",
     "<loc0102><loc0102><loc0512><loc0410>"),
    ("norm1", "[0.10, 0.10, 0.40, 0.50]", "[0.10, 0.10, 0.40, 0.50]"),
])
def test_grounding_template_writes_with_the_family_convention(tmp_path, box_format, answer,
                                                              question):
    template = load_template("grounding")
    options = merged_options(template.spec, {"direction": "both"}, "test")
    renderer = TemplateRenderer(template, options, {}, tmp_path, box_format, 0, "src")
    record = {"image": "a.png", "expression": "the red square", "box": [20, 10, 80, 50],
              "width": 200, "height": 100}
    save_image(tmp_path / "a.png", (200, 100))
    piece = renderer.render("row1", record)
    (locate_q, locate_a), (describe_q, describe_a) = piece.turns
    assert locate_a == answer
    assert question in describe_q and describe_a == "the red square"
    if box_format == "paligemma":  # its own task prefix, not a phrasing
        assert locate_q == "detect the red square"


@pytest.mark.parametrize("box_format", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma",
                                        "internvl", "norm1"])
def test_grounding_metric_parses_with_the_family_convention(box_format):
    conv = get_convention(box_format)
    ref = conv.write([("dog", (10, 10, 110, 110))], 200, 200)
    near = conv.write([("dog", (12, 10, 112, 110))], 200, 200)
    far = conv.write([("dog", (150, 150, 190, 190))], 200, 200)
    out = grounding_accuracy([near, far, "no box here"], [[ref]] * 3, [box_format] * 3)
    assert out["grounding_accuracy"] == pytest.approx(1 / 3)
    assert out["box_parse_rate"] == pytest.approx(2 / 3)
    assert 0.9 < out["mean_iou"] * 3 < 1.0


def test_grounding_metric_against_numeric_references_converts_the_grid():
    pred = CONVENTIONS["paligemma"].write([("dog", (0, 0, 50, 100))], 100, 100)
    out = grounding_accuracy([pred], [[0.0, 0.0, 0.5, 1.0]], ["paligemma"])
    assert out["grounding_accuracy"] == 1.0
    with pytest.raises(MetricsError, match="writes pixels.*width and height"):
        grounding_accuracy(['[{"bbox_2d": [0, 0, 5, 5]}]'], [[0, 0, 0.5, 1]], ["qwen2_5_vl"])


@pytest.mark.parametrize("box, message", [
    ([0.1, float("nan"), 0.5, 0.5], "row 1: reference box .* has a NaN"),
    ([-0.1, 0.1, 0.5, 0.5], "row 1: reference box .* negative coordinate"),
    ([0.5, 0.1, 0.2, 0.5], r"row 1: reference box .* swapped corners \(x2 < x1\)"),
    ([0.1, 0.6, 0.5, 0.2], r"swapped corners \(y2 < y1\)"),
    ([10, 20, 300, 200], "row 1: reference box .* values above 1: pixel coordinates where 0-1"),
    (["a", 1, 2, 3], r"is not \[x1, y1, x2, y2\]"),
])
def test_unsound_reference_boxes_are_named_errors_not_iou_zero(box, message):
    with pytest.raises(MetricsError, match=message):
        grounding_accuracy(["[0.1, 0.1, 0.5, 0.5]"], [box])
    with pytest.raises(MetricsError, match=message.replace("row 1", "row 1")):
        reference_boxes(box, "row 1")


def test_unsound_text_references_are_named_errors():
    with pytest.raises(MetricsError, match="row 2: reference 'nothing' holds no box in the "
                                           "qwen2_vl box convention"):
        grounding_accuracy(["x", "y"], [["<|box_start|>(1,2),(3,4)<|box_end|>"], ["nothing"]],
                           ["qwen2_vl", "qwen2_vl"])
    with pytest.raises(MetricsError, match=r"row 1: .* swapped corners"):
        grounding_accuracy(["x"], [["<ref>a</ref><box>[[500, 10, 100, 20]]</box>"]], ["internvl"])
    with pytest.raises(MetricsError, match="values above 1000"):
        grounding_accuracy(["x"], [["[{\"bbox_2d\": [0, 0, 1500, 20]}]"]], ["qwen3_vl"])


def test_metrics_files_name_the_line_and_field_of_a_bad_reference(tmp_path):
    preds, refs = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    preds.write_text('{"id": 1, "prediction": "[0, 0, 0.5, 1]"}\n'
                     '{"id": 2, "prediction": "[0, 0, 0.5, 1]"}\n')
    refs.write_text('{"id": 1, "references": [0, 0, 0.5, 1]}\n'
                    '{"id": 2, "references": [0, 0, 320, 240]}\n')
    with pytest.raises(MetricsError, match=r"r.jsonl line 2, field `references`: reference box "
                                           r"\[0, 0, 320, 240\] has values above 1"):
        score_files(preds, refs, ["grounding_accuracy"])
    # a references file may name the convention answers are written in
    refs.write_text('{"id": 1, "references": [0, 0, 0.5, 1], "box_format": "internvl"}\n'
                    '{"id": 2, "references": [0, 0, 0.5, 1], "box_format": "internvl"}\n')
    preds.write_text('{"id": 1, "prediction": "<ref>a</ref><box>[[0, 0, 500, 1000]]</box>"}\n'
                     '{"id": 2, "prediction": "<ref>a</ref><box>[[500, 0, 1000, 1000]]</box>"}\n')
    scores = score_files(preds, refs, ["grounding_accuracy"])["scores"]
    assert scores["grounding_accuracy"] == 0.5 and scores["box_parse_rate"] == 1.0


def test_cli_metrics_reports_a_bad_reference_without_a_traceback(tmp_path, cli):
    (tmp_path / "p.jsonl").write_text('{"id": 1, "prediction": "[0, 0, 0.5, 1]"}\n')
    (tmp_path / "r.jsonl").write_text('{"id": 1, "references": [0.5, 0, 0.1, 1]}\n')
    out = cli("metrics", "--predictions", tmp_path / "p.jsonl", "--references",
              tmp_path / "r.jsonl", "--metrics", "grounding_accuracy")
    assert out.returncode != 0
    assert "line 1, field `references`" in out.stdout + out.stderr
    assert "swapped corners" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.slow
def test_data_preview_writes_qwen2_5_vl_boxes_in_resized_pixels(tmp_path, data_cache):
    """The user's path: `peftvlm data preview` on a grounding source for the tiny Qwen2.5-VL,
    whose processor (min = max = 1024 pixels, factor 16) resizes a 60x40 image to 32x16."""
    save_image(tmp_path / "a.png", (60, 40))
    (tmp_path / "g.jsonl").write_text(json.dumps(
        {"image": "a.png", "expression": "the left half", "box": [0, 0, 30, 40]}) + "\n")
    recipe = recipe_file(tmp_path, {"train": [{"path": "g.jsonl"}], "template": "grounding",
                                    "template_options": {"direction": "locate"}})
    text = recipe.read_text().replace("tiny-llava", "tiny-qwen2.5-vl")
    recipe.write_text(text)
    out = run_cli("data", "preview", str(recipe), "-n", "1", cache=data_cache, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert '[{"bbox_2d": [0, 0, 16, 16], "label": "the left half"}]' in out.stdout


def test_eval_scores_answers_with_the_runs_convention(monkeypatch):
    """`evaluate_rows` (eval during / after training, `peftvlm eval`) hands the family's bound
    convention to the grounding and detection metrics: Qwen2.5-VL pixel JSON is read as such."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
        Qwen2VLImageProcessorPil

    import peftvlm.eval.generate as evaluate
    from peftvlm.recipe.schema import EvalConfig

    processor = type("P", (), {"image_processor": Qwen2VLImageProcessorPil(
        size={"shortest_edge": 1024, "longest_edge": 1024}, patch_size=8, merge_size=2)})()
    family = FAMILIES["qwen2_5_vl"]
    conv = get_convention(box_format_for(family, processor))
    answers = [conv.write([("dog", (0, 0, 30, 40))], 60, 40),
               conv.write([("cat", (30, 0, 60, 20)), ("dog", (0, 0, 30, 40))], 60, 40)]
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "find"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": a}]}]}
            for a in answers]
    predictions = [answers[0], conv.write([("cat", (30, 0, 60, 20))], 60, 40)]
    monkeypatch.setattr(evaluate, "generate_answers", lambda *a, **k: predictions)
    out = evaluate.evaluate_rows(None, processor, family, rows,
                                 EvalConfig(metrics=["grounding_accuracy", "detection_map"]))
    assert out["scores"]["box_parse_rate"] == 1.0
    assert out["scores"]["grounding_accuracy"] == 1.0  # first boxes match
    assert out["scores"]["AP/cat"] == pytest.approx(1.0)
    assert out["scores"]["AP/dog"] == pytest.approx(0.5, abs=0.01)  # one of two dogs found
