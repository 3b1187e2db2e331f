"""Detection data: COCO instances / YOLO / JSONL sources rendered by the `detection` template in
each family's box convention; crowd, empty images, boxes outside the image; mAP of answers;
the tiny PaliGemma learning to detect and name coloured squares (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import data_cache, save_image  # noqa: F401

from peftvlm.data.boxes import get_convention
from peftvlm.data.detection import NO_OBJECTS
from peftvlm.data.loading import load_source
from peftvlm.data.preview import PREDICTION_COLOUR, REFERENCE_COLOUR
from peftvlm.data.readers import open_source
from peftvlm.metrics.detection import detection_map
from peftvlm.recipe import DataConfig, SourceConfig

W, H = 200, 100


def coco_file(folder):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        save_image(folder / name, size=(W, H))
    data = {
        "images": [{"id": i, "file_name": f"{n}.png", "width": W, "height": H}
                   for i, n in enumerate("abcd", start=1)],
        "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 30], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [100, 50, 60, 40], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [150, 0, 50, 50], "iscrowd": 1},
            # partly outside: clipped to the image
            {"id": 4, "image_id": 3, "category_id": 7, "bbox": [180, 80, 40, 40], "iscrowd": 0},
            # wholly outside: image 4 is a named bad row
            {"id": 5, "image_id": 4, "category_id": 1, "bbox": [300, 10, 20, 20], "iscrowd": 0},
        ]}  # image 2 has no object
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return path


def rows_of(folder, path, box_format="norm1", **options):
    src = SourceConfig(path=str(path.relative_to(folder)), template="detection",
                       template_options=options)
    return load_source(src, DataConfig(train=[src], cache=False), folder, box_format)


def answer(row):
    return row["messages"][-1]["content"][0]["text"]


def question(row):
    return "".join(c.get("text", "") for c in row["messages"][-2]["content"])


def test_coco_instances_are_detected_and_read_per_image(tmp_path):
    coco_file(tmp_path)
    opened = open_source(SourceConfig(path="instances.json"), tmp_path)
    assert opened.layout == "coco_instances" and opened.default_template == "detection"
    records = dict(opened.records)
    first = records["instances.json:image_id=1"]
    assert first["boxes"] == [[10, 10, 50, 40], [100, 50, 160, 90], [150, 0, 200, 50]]
    assert first["labels"] == ["cat", "dog", "cat"] and first["crowd"] == [0, 0, 1]
    assert first["categories"] == ["cat", "dog"]
    assert records["instances.json:image_id=2"]["boxes"] == []


def test_answers_skip_crowd_clip_outside_and_say_none_for_empty_images(tmp_path):
    loaded = rows_of(tmp_path, coco_file(tmp_path))
    rows = {r["row_id"]: r for r in loaded.rows}
    one = rows["instances.json:image_id=1"]
    # norm1 on a 200x100 image, the crowd region (cat at 150,0) left out of the answer ...
    assert answer(one) == "cat: [0.05, 0.10, 0.25, 0.40]; dog: [0.50, 0.50, 0.80, 0.90]"
    assert one["crowd"] == "cat: [0.75, 0.00, 1.00, 0.50]"  # ... and kept for evaluation
    assert answer(rows["instances.json:image_id=2"]) == NO_OBJECTS
    assert answer(rows["instances.json:image_id=3"]) == "dog: [0.90, 0.80, 1.00, 1.00]"
    assert "instances.json:image_id=4" not in rows
    bad = loaded.report.as_dict()
    assert "image_id=4" in bad["box_outside_image"]["first_rows"][0]


def test_per_category_mode_asks_each_present_class(tmp_path):
    rows = rows_of(tmp_path, coco_file(tmp_path), mode="per_category").rows
    first = [r for r in rows if r["row_id"] == "instances.json:image_id=1"]
    assert [answer(r) for r in first] == ["cat: [0.05, 0.10, 0.25, 0.40]",
                                          "dog: [0.50, 0.50, 0.80, 0.90]"]
    assert "cat" in question(first[0]) and "dog" in question(first[1])
    assert first[0]["crowd"] == "cat: [0.75, 0.00, 1.00, 0.50]" and "crowd" not in first[1]


@pytest.mark.parametrize("box_format", ["qwen2_5_vl", "qwen3_vl", "paligemma", "florence2",
                                        "internvl", "qwen2_vl"])
def test_each_family_convention_parses_back_to_the_boxes(tmp_path, box_format):
    rows = {r["row_id"]: r for r in rows_of(tmp_path, coco_file(tmp_path), box_format).rows}
    found = get_convention(box_format).parse(answer(rows["instances.json:image_id=1"]), W, H)
    assert [label for label, _ in found] == ["cat", "dog"]
    for (_, got), want in zip(found, [(10, 10, 50, 40), (100, 50, 160, 90)]):
        assert max(abs(g - w) for g, w in zip(got, want)) <= 1.0


def test_family_task_prompts_replace_the_phrasings(tmp_path):
    path = coco_file(tmp_path)
    pali = {r["row_id"]: r for r in rows_of(tmp_path, path, "paligemma").rows}
    assert question(pali["instances.json:image_id=1"]) == "detect cat ; dog"
    flo = {r["row_id"]: r for r in rows_of(tmp_path, path, "florence2").rows}
    assert question(flo["instances.json:image_id=1"]) == "<OD>"
    per = rows_of(tmp_path, path, "florence2", mode="per_category").rows
    assert question(per[0]) == "<CAPTION_TO_PHRASE_GROUNDING>cat"


def test_yolo_folder_reads_normalised_centre_boxes(tmp_path):
    folder = tmp_path / "yolo"
    save_image(folder / "images" / "x.png", size=(W, H))
    save_image(folder / "images" / "empty.png", size=(W, H))
    (folder / "labels").mkdir()
    (folder / "labels" / "x.txt").write_text("1 0.25 0.5 0.1 0.2\n0 0.5 0.5 1.0 1.0\n")
    (folder / "data.yaml").write_text("names: [cat, dog]\n")
    opened = open_source(SourceConfig(path="yolo"), tmp_path)
    assert opened.layout == "yolo"
    records = dict(opened.records)
    x = records["yolo/images/x.png"]
    assert x["labels"] == ["dog", "cat"]
    assert [[round(v, 6) for v in b] for b in x["boxes"]] == [[40, 40, 60, 60], [0, 0, 200, 100]]
    assert records["yolo/images/empty.png"]["boxes"] == []
    rows = {r["row_id"]: r for r in rows_of(tmp_path, folder).rows}
    assert answer(rows["yolo/images/x.png"]) == \
        "dog: [0.20, 0.40, 0.30, 0.60]; cat: [0.00, 0.00, 1.00, 1.00]"
    assert answer(rows["yolo/images/empty.png"]) == NO_OBJECTS


def test_yolo_bad_class_is_a_named_bad_row(tmp_path):
    folder = tmp_path / "yolo"
    save_image(folder / "images" / "x.png", size=(W, H))
    (folder / "labels").mkdir()
    (folder / "labels" / "x.txt").write_text("5 0.5 0.5 0.1 0.1\n")
    (folder / "classes.txt").write_text("cat\ndog\n")
    loaded = rows_of(tmp_path, folder)
    assert not loaded.rows and "class 5 is not in the 2 class names" in loaded.report.describe()


def test_jsonl_rows_with_boxes_and_labels(tmp_path):
    save_image(tmp_path / "a.png", size=(W, H))
    rows = [{"image": "a.png", "boxes": [[0, 0, 100, 50]], "labels": ["cat"]},
            {"image": "a.png", "boxes": [[10, 10, 10, 30]], "labels": ["cat"]},  # no area
            {"image": "a.png", "boxes": [[0, 0, 1, 1]], "labels": ["a", "b"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    loaded = rows_of(tmp_path, tmp_path / "d.jsonl", "qwen3_vl")
    assert [answer(r) for r in loaded.rows] == ['[{"bbox_2d": [0, 0, 500, 500], "label": "cat"}]']
    report = loaded.report.as_dict()
    assert report["bad_box"]["first_rows"][0].startswith("d.jsonl:2 (object 0 (cat)")
    assert report["bad_column_type"]["first_rows"][0].startswith("d.jsonl:3")


def test_detection_map_reads_crowd_and_empty_answers():
    fmt = ["norm1"] * 3
    refs = [["cat: [0.05, 0.10, 0.25, 0.40]"], [NO_OBJECTS], ["dog: [0.50, 0.50, 0.80, 0.90]"]]
    crowd = ["cat: [0.75, 0.00, 1.00, 0.50]", None, None]
    perfect = [refs[0][0] + "; cat: [0.75, 0.00, 1.00, 0.50]", NO_OBJECTS, refs[2][0]]
    # a detection on a crowd region is ignored, not a false positive
    assert detection_map(perfect, refs, fmt, crowd)["detection_mAP"] == pytest.approx(1.0)
    without_crowd = detection_map(perfect, refs, fmt)["detection_mAP"]
    assert without_crowd < 1.0
    # a box on the empty image is a false positive
    spurious = [refs[0][0], "cat: [0.1, 0.1, 0.3, 0.3]", refs[2][0]]
    assert detection_map(spurious, refs, fmt, crowd)["detection_mAP"] < 1.0


def test_data_preview_cli_renders_detection(tmp_path, data_cache, cli_in_process):
    coco_file(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "det", "model": {"id": "tiny-qwen2.5-vl"}, "method": {"name": "lora", "r": 4},
        "data": {"train": [{"path": "instances.json"}], "template": "detection"},
        "train": {"max_length": 512}}))
    # in-process: `data preview` keeps its subprocess tests (test_box_conventions, test_data_sources)
    out = cli_in_process("data", "preview", str(recipe), "-n", "2")
    assert out.returncode == 0, out.stderr
    assert '"bbox_2d"' in out.stdout
    said = out.stdout.replace("\n", "").split("drawn on its image: ")[1]
    picture = Path(said[:said.index(".png") + 4])
    from PIL import Image

    with Image.open(picture) as im:  # the first object (cat 10,10-50,40) outlined in green,
        assert im.size == (W, H)     # within one unit of the resized-pixel grid
        assert REFERENCE_COLOUR in [im.getpixel((30, y)) for y in range(6, 15)]
        assert im.getpixel((30, 25)) == (200, 0, 0)  # inside: the image itself


def test_demo_and_predict_draw_boxes_with_the_family_parser(tmp_path):
    from PIL import Image

    from peftvlm.serving.demo import draw_box
    from peftvlm.serving.predict import draw_answer_boxes

    image = Image.new("RGB", (W, H), (255, 255, 255))
    fmt = "qwen2_5_vl:factor=28,min_pixels=3136,max_pixels=12845056"
    text = get_convention(fmt).write([("cat", (10, 10, 50, 40)), ("dog", (100, 50, 160, 90))],
                                     W, H)
    _, boxes = draw_box(image, text, fmt)
    assert [label for _, label in boxes] == ["cat", "dog"]
    assert all(abs(a - b) <= 2 for a, b in zip(boxes[0][0], (10, 10, 50, 40)))
    assert draw_box(image, "no box here", fmt)[1] == []
    rows = [{"boxes": [{"label": "cat", "box": [10, 10, 50, 40]}]}, {"answer": "none"}]
    draw_answer_boxes(rows, [(Path("a.png"), image), (Path("b.png"), image)], tmp_path / "p")
    assert rows[0]["picture"] == str(tmp_path / "p" / "a.png") and "picture" not in rows[1]
    with Image.open(rows[0]["picture"]) as im:
        assert im.getpixel((30, 10)) == PREDICTION_COLOUR


def test_hub_style_nested_columns_and_class_ids(tmp_path):
    """A Hub detection set (cppe-5) keeps COCO xywh boxes and class ids inside `objects`."""
    save_image(tmp_path / "a.png", size=(W, H))
    row = {"image": "a.png", "objects": {"bbox": [[10, 10, 40, 30]], "category": [1]}}
    (tmp_path / "d.jsonl").write_text(json.dumps(row))
    src = SourceConfig(path="d.jsonl", template="detection",
                       columns={"boxes": "objects.bbox", "labels": "objects.category"},
                       template_options={"box_input": "xywh", "class_names": ["cat", "dog"]})
    rows = load_source(src, DataConfig(train=[src], cache=False), tmp_path).rows
    assert answer(rows[0]) == "dog: [0.05, 0.10, 0.25, 0.40]"


@pytest.mark.slow
def test_tiny_paligemma_learns_to_detect_and_name_coloured_squares(tmp_path, data_cache):
    """scripts/detection_learning.py on tiny-paligemma: held-out mAP50 rises from 0 (the base
    writes no box) far above the colour-blind baseline (perfect boxes, colour not read from the
    image), so the twin learnt the class as well as the format and the place. The prompt lists
    every class (`detect red ; green ; blue ; yellow`): it names no answer."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from detection_learning import parse_args, run

    args = parse_args(["--models", "tiny-paligemma", "--steps", "50", "--batch", "8",
                       "--train", "64", "--test", "16"])
    result = run("tiny-paligemma", args, tmp_path)
    before, after = result["map50"]
    assert result["baseline"] <= 0.2, result
    assert before == 0.0 and result["parse"][1] == 1.0, result
    assert after >= result["baseline"] + 0.4, result
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").open()]
    assert all(row["categories"] == ["red", "green", "blue", "yellow"] for row in rows)
