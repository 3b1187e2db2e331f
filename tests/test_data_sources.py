"""Data sources: every kind loads, bad rows are counted by reason, mixing, cache, CLI."""

from __future__ import annotations

import io
import json

import pytest
from data_helpers import data_cache, llava_collator, recipe_file, run_cli, save_image  # noqa: F401

from peftvlm.data.prepare.loading import load_rows, load_source, mix
from peftvlm.data.read.fixtures import write_fixture
from peftvlm.errors import DataError
from peftvlm.recipe.load import load_recipe
from peftvlm.recipe.schema import DataConfig, SourceConfig

QA = [{"image": "a.png", "question": f"What is {i}?", "answers": [f"ans{i}"]} for i in range(4)]


def png_bytes(colour=(0, 0, 200), size=(16, 16)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def answers(rows) -> list[str]:
    return ["".join(c["text"] for c in r["messages"][-1]["content"]) for r in rows]


def load(tmp_path, data_cfg=None, **src):
    cfg = data_cfg or DataConfig(template="vqa", cache=False)
    return load_source(SourceConfig(**src), cfg, tmp_path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


# --- every kind of source ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_file_kinds(kind, tmp_path):
    save_image(tmp_path / "a.png")
    path = tmp_path / f"qa.{kind}"
    if kind == "jsonl":
        write_jsonl(path, QA)
    elif kind == "json":
        path.write_text(json.dumps({"data": QA}))
    elif kind == "csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "question", "answers"])
            writer.writerows([r["image"], r["question"], json.dumps(r["answers"])] for r in QA)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(QA), path)
    rows = load(tmp_path, path=path.name).rows
    assert answers(rows) == [f"ans{i}" for i in range(4)]
    assert rows[0]["images"] == [str((tmp_path / "a.png").resolve())]


def test_parquet_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**r, "image": {"bytes": png_bytes(), "path": None}} for r in QA]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    out = load(tmp_path, path="qa.parquet").rows
    assert len(out) == 4 and out[0]["images"][0]["bytes"][:4] == b"\x89PNG"


def test_image_folder_is_classification_by_default(tmp_path):
    for cls in ("red", "blue_sky"):
        for k in range(2):
            save_image(tmp_path / "imgs" / cls / f"{k}.png")
    (tmp_path / "imgs" / "red" / "notes.txt").write_text("not an image")
    rows = load(tmp_path, DataConfig(cache=False), path="imgs").rows
    assert sorted(answers(rows)) == ["blue sky", "blue sky", "red", "red"]


def test_load_from_disk_with_split_slicing(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{**r, "image": {"bytes": png_bytes(), "path": None}}
                                     for r in QA]).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    rows = load(tmp_path, dataset="saved", split="train[1:3]").rows
    assert answers(rows) == ["ans1", "ans2"]
    assert load(tmp_path, path="saved", split="train[:50%]").records == 2


def test_streaming_dataset_stops_at_max_samples(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", QA * 5)
    result = load(tmp_path, dataset="hub", streaming=True, max_samples=3)
    assert result.records == 3 and answers(result.rows) == ["ans0", "ans1", "ans2"]


def test_coco_captions_and_vqav2_layouts(tmp_path):
    coco = write_fixture("coco-captions", tmp_path / "coco", train_size=5, eval_size=1)
    rows = load(tmp_path, DataConfig(template="caption", cache=False),
                path=str(coco["train"]["path"]), format="coco_captions").rows
    assert len(rows) == 5 and all(a.startswith("a ") for a in answers(rows))
    vqa = write_fixture("vqav2", tmp_path / "vqa", train_size=5, eval_size=1)
    result = load(tmp_path, path=str(vqa["train"]["path"]), format="vqav2",
                  annotations=str(vqa["train"]["annotations"]),
                  image_pattern="images/{image_id:06d}.png")
    truth = {a["question_id"]: a["multiple_choice_answer"] for a in json.loads(
        vqa["train"]["annotations"].read_text())["annotations"]}
    assert result.records == 10 and answers(result.rows) == list(truth.values())


def test_refcoco_layout_with_column_mapping(tmp_path):
    ref = write_fixture("refcoco", tmp_path / "ref", train_size=3, eval_size=1)
    cfg = DataConfig(template="grounding", cache=False, template_options={"box_input": "xywh"})
    rows = load(tmp_path, cfg, path=str(ref["train"]["path"]),
                columns={"image": "file_name", "expression": "sentences", "box": "bbox"}).rows
    assert len(rows) == 12  # 3 images x 2 shapes x 2 directions
    assert all(a.startswith("[") or "the " in a or a.count(" ") == 1 for a in answers(rows))


# --- bad rows ----------------------------------------------------------------------------------

def bad_rows_file(tmp_path):
    save_image(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "empty.png").write_bytes(b"")
    (tmp_path / "data" / "garbage.png").write_bytes(b"not a png at all" * 10)
    save_image(tmp_path / "outside.png")
    ok = {"image": "a.png", "question": "Q?", "answers": ["yes"]}
    rows = [ok, {**ok, "image": "nope.png"}, {**ok, "image": "empty.png"},
            {**ok, "image": "garbage.png"}, {**ok, "image": "../outside.png"},
            {**ok, "question": {"x": 1}}, {**ok, "answers": ["", " "]},
            {"image": "a.png", "answers": ["yes"]}, {**ok, "image": 123}, ok]
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, "{not json")
    (tmp_path / "data" / "bad.jsonl").write_text("\n".join(lines) + "\n")
    return "data/bad.jsonl"


EXPECTED_BAD = {"missing_image": ["bad.jsonl:2"], "corrupt_image": ["bad.jsonl:3", "bad.jsonl:4"],
                "path_escapes_root": ["bad.jsonl:5"], "invalid_json": ["bad.jsonl:6"],
                "bad_column_type": ["bad.jsonl:7"], "empty_answer": ["bad.jsonl:8"],
                "missing_column": ["bad.jsonl:9"], "bad_image": ["bad.jsonl:10"]}


def test_each_bad_row_reason_is_counted(tmp_path):
    result = load(tmp_path, path=bad_rows_file(tmp_path))
    report = result.report.as_dict()
    assert {r: i["count"] for r, i in report.items()} == \
        {r: len(v) for r, v in EXPECTED_BAD.items()}
    for reason, ids in EXPECTED_BAD.items():
        assert [row.split(" ")[0] for row in report[reason]["first_rows"]] == ids
    assert result.records == 11 and len(result.rows) == 2


def test_bad_boxes_are_counted(tmp_path):
    save_image(tmp_path / "a.png")  # 40 x 20
    rows = [{"image": "a.png", "expression": "x", "box": b}
            for b in ([1, 1, 10, 10], [50, 0, 60, 10], [5, 5, 1, 1], "oops", [0, 0, 100, 100])]
    write_jsonl(tmp_path / "g.jsonl", rows)
    result = load(tmp_path, DataConfig(template="grounding", cache=False,
                                       template_options={"direction": "locate"}), path="g.jsonl")
    assert dict(result.report.counts) == {"box_outside_image": 1, "bad_box": 2}
    assert answers(result.rows) == ["[0.03, 0.05, 0.25, 0.50]", "[0.00, 0.00, 1.00, 1.00]"]


def test_on_bad_row_error_stops_before_training_naming_rows(tmp_path):
    path = bad_rows_file(tmp_path)
    recipe = load_recipe(recipe_file(tmp_path, {"train": path, "template": "vqa",
                                                "on_bad_row": "error"}))
    with pytest.raises(DataError, match=r"9 bad row\(s\).*bad.jsonl:2"):
        load_rows(recipe)
    recipe = load_recipe(recipe_file(tmp_path, {"train": path, "template": "vqa"}))
    assert load_rows(recipe).bad_rows["train"]["corrupt_image"]["count"] == 2


# --- mixing, cache, parallel -------------------------------------------------------------------

def test_mix_follows_weights():
    a, b = [{"s": "a", "i": i} for i in range(100)], [{"s": "b", "i": i} for i in range(300)]
    rows, used = mix([a, b], [3.0, 1.0], seed=0)
    assert used == [300, 100] and len(rows) == 400
    share = sum(r["s"] == "a" for r in rows) / len(rows)
    assert abs(share - 0.75) < 0.01
    assert len({r["i"] for r in rows if r["s"] == "b"}) == 100  # sampled without repeats
    assert mix([a, b], [3.0, 1.0], seed=0) == (rows, used)


def test_weighted_sources_in_a_recipe(tmp_path):
    save_image(tmp_path / "a.png")
    write_jsonl(tmp_path / "small.jsonl", [{**QA[0], "answers": ["small"]}] * 20)
    write_jsonl(tmp_path / "big.jsonl", [{**QA[0], "answers": ["big"]}] * 80)
    plain = recipe_file(tmp_path, {"template": "vqa", "train": [{"path": "small.jsonl"},
                                                                {"path": "big.jsonl"}]})
    assert answers(load_rows(load_recipe(plain)).train).count("small") == 20
    weighted = recipe_file(tmp_path, {"template": "vqa", "train": [
        {"path": "small.jsonl", "weight": 1}, {"path": "big.jsonl", "weight": 1}]})
    data = load_rows(load_recipe(weighted))
    assert answers(data.train).count("small") == 50 and len(data.train) == 100
    assert [s["used"] for s in data.sources] == [50, 50]


def test_large_sources_are_cached_and_parallel_matches_serial(tmp_path, data_cache):
    save_image(tmp_path / "a.png")
    rows = [{**QA[i % 4], "question": f"q{i}?"} for i in range(2100)]
    rows[7]["image"] = "missing.png"
    write_jsonl(tmp_path / "big.jsonl", rows)
    cfg = DataConfig(template="vqa", cache=True)
    first = load(tmp_path, cfg, path="big.jsonl")
    again = load(tmp_path, cfg, path="big.jsonl")
    assert not first.cached and again.cached
    assert again.rows == first.rows and dict(again.report.counts) == {"missing_image": 1}
    parallel = load(tmp_path, DataConfig(template="vqa", cache=False, num_proc=2), path="big.jsonl")
    assert parallel.rows == first.rows and parallel.report.as_dict() == first.report.as_dict()
    write_jsonl(tmp_path / "big.jsonl", rows[:-1])  # changed file: the cache no longer applies
    changed = load(tmp_path, cfg, path="big.jsonl")
    assert not changed.cached and len(changed.rows) == len(first.rows) - 1


# --- lengths and CLI ---------------------------------------------------------------------------

def test_fast_token_lengths_match_the_collator(tmp_path, llava_collator):
    from peftvlm.data.prepare.lengths import collator_lengths, token_lengths

    save_image(tmp_path / "a.png", size=(64, 48))
    rows = list(load(tmp_path, DataConfig(template="vqa", cache=False, system_prompt="Be brief.",
                                          template_options={"group_by_image": True}),
                     path=write_jsonl(tmp_path / "q.jsonl", QA)).rows)
    rows += [{"messages": [{"role": "user", "content": [{"type": "image"},
                                                        {"type": "text", "text": "hi"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
              "images": [{"bytes": png_bytes(size=(20, 30))}]}]
    assert token_lengths(llava_collator, rows) == collator_lengths(llava_collator, rows)


def vqa_recipe(tmp_path, n=12):
    save_image(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "What color is the shape?", "answers": ["red"]}] * n
    rows += [{"image": "gone.png", "question": "Q?", "answers": ["x"]}]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    return recipe_file(tmp_path, {"train": "qa.jsonl", "template": "vqa"}, name="cli")


def test_data_preview_cli(tmp_path, data_cache):
    out = run_cli("data", "preview", str(vqa_recipe(tmp_path)), "-n", "2", cache=data_cache)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("carry loss, 16 image tokens") == 2
    assert "red</s>" in out.stdout and "single word or phrase" in out.stdout


def test_data_stats_cli(tmp_path, data_cache, cli_in_process):
    plot = tmp_path / "hist.png"  # in-process: `data preview` above goes through the entry point
    out = cli_in_process("data", "stats", str(vqa_recipe(tmp_path)), "train.max_length=30",
                         "--plot", str(plot), "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["train_rows"] == 12 and stats["sources"][0]["bad_rows"] == 1
    assert stats["bad_rows"]["train"]["missing_image"]["count"] == 1
    assert stats["token_lengths"]["min"] > 30 and stats["over_max_length"]["count"] == 12
    assert stats["over_max_length"]["first_rows"][0].startswith("qa.jsonl:1 (")
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_data_cli_stops_on_bad_rows_naming_them(tmp_path, data_cache, cli_in_process):
    failed = cli_in_process("data", "stats", str(vqa_recipe(tmp_path)), "data.on_bad_row=error")
    assert failed.returncode == 2 and "qa.jsonl:13" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_paths_and_bytes_sources_mix_into_one_trainable_dataset(tmp_path, llava_collator):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    save_image(tmp_path / "a.png")
    write_jsonl(tmp_path / "paths.jsonl", QA)
    pq.write_table(pa.Table.from_pylist([{**r, "image": {"bytes": png_bytes(), "path": None}}
                                         for r in QA]), tmp_path / "bytes.parquet")
    recipe = load_recipe(recipe_file(tmp_path, {"template": "vqa", "train": [
        {"path": "paths.jsonl"}, {"path": "bytes.parquet"}]}))
    rows = load_rows(recipe).train
    dataset = rows.dataset  # what the trainer reads: the Arrow table, decoded per batch
    assert isinstance(dataset, datasets.Dataset)
    batch = llava_collator([dataset[0], dataset[len(rows) - 1]])
    assert batch["pixel_values"].shape[0] == 2 and len(rows) == 8
