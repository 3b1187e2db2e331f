"""Row formats (messages, `<image>` placeholders, `image`, OpenAI `image_url`, LLaVA
`conversations`) on tiny-llava and tiny-qwen2-vl: detection, equality of the encoded batch with
the native format, interleaving, counted bad rows with their original line, file encodings."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from rich.console import Console

from data_helpers import data_cache, save_image  # noqa: F401
from peftvlm.data.prepare.loading import load_rows
from peftvlm.errors import DataError
from peftvlm.recipe.load import validate_recipe_dict

QUESTION = "What color is the shape?"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220)}
FAMILIES = {"llava": "tiny-llava", "qwen2_vl": "tiny-qwen2-vl"}


@pytest.fixture(scope="session")
def collators(data_cache):  # noqa: F811
    """The trainer's collator per family, on the processor alone."""
    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.models import load_processor_only
    from peftvlm.recipe.schema import ModelConfig

    out = {}
    for family, model_id in FAMILIES.items():
        processor, spec = load_processor_only(ModelConfig(id=model_id))
        out[family] = ConversationCollator(processor, spec)
    return out


def task_images(folder) -> list[tuple[str, str]]:
    """Three 32x32 images (relative paths) with their colour answers."""
    for colour, rgb in COLOURS.items():
        save_image(folder / "img" / f"{colour}.png", (32, 32), rgb)
    return [(f"img/{c}.png", c) for c in COLOURS]


def native(rel, colour):
    return {"messages": [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": QUESTION}]},
                         {"role": "assistant", "content": [{"type": "text", "text": colour}]}],
            "images": [rel]}


def openai(url, colour):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": QUESTION}]},
                         {"role": "assistant", "content": colour}]}


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


# format name -> (file name, expected detected format, rows from (folder, rel, colour))
FORMATS = {
    "native": ("n.jsonl", "messages", lambda f, rel, c: native(rel, c)),
    "placeholder": ("p.jsonl", "messages", lambda f, rel, c: {
        "messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                     {"role": "assistant", "content": c}], "images": [rel]}),
    "placeholder_list": ("pl.jsonl", "messages", lambda f, rel, c: {
        "messages": [{"role": "user", "content": [{"type": "text", "text": f"<image>\n{QUESTION}"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": c}]}],
        "images": [rel]}),
    "image_singular": ("s.jsonl", "messages", lambda f, rel, c: {
        "image": rel, "messages": [{"role": "user", "content": QUESTION},
                                   {"role": "assistant", "content": c}]}),
    "llava_json": ("llava.json", "llava_conversations", lambda f, rel, c: {
        "id": c, "image": rel, "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                                 {"from": "gpt", "value": c}]}),
    "openai_path": ("o.jsonl", "openai_messages", lambda f, rel, c: openai(rel, c)),
    "openai_file_url": ("of.jsonl", "openai_messages",
                        lambda f, rel, c: openai(f"file://{(f / rel).resolve()}", c)),
    "openai_data_url": ("od.jsonl", "openai_messages",
                        lambda f, rel, c: openai(data_url(f / rel), c)),
    "llamafactory_v1": ("lf1.jsonl", "llamafactory_v1", lambda f, rel, c: {
        "messages": [{"role": "user", "content": [{"type": "image_url", "value": rel},
                                                  {"type": "text", "value": QUESTION}],
                      "loss_weight": 0.0},
                     {"role": "assistant", "content": [{"type": "text", "value": c}],
                      "loss_weight": 1.0}]}),
    "placeholder_parquet": ("p.parquet", "messages", lambda f, rel, c: {
        "messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                     {"role": "assistant", "content": c}], "images": [rel]}),
}


def write_rows(path, rows) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_format(folder, name) -> tuple:
    file_name, detected, make = FORMATS[name]
    rows = [make(folder, rel, c) for rel, c in task_images(folder)]
    write_rows(folder / file_name, rows)
    return folder / file_name, detected


def rows_of(folder, source, model_id="tiny-llava", **data):
    recipe = validate_recipe_dict({"name": "f", "model": {"id": model_id},
                                   "method": {"name": "lora"},
                                   "data": {"train": source, **data}})
    recipe.source_path = folder / "r.yaml"
    return load_rows(recipe)


@pytest.fixture
def recipe_at(tmp_path):
    def make(source, model_id="tiny-llava", **data):
        return rows_of(tmp_path, source, model_id, **data)
    return make


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "native"])
def test_every_format_encodes_exactly_like_the_native_rows(fmt, family, tmp_path, collators):
    """The quickstart's colour task in each format gives the IDENTICAL batch (token ids, label
    masks, pixels) as the native rows, so it trains exactly like the native format by
    construction (`test_the_quickstart_task_as_llava_json_trains_exactly_like_native` also
    runs the training once); the native batch's labels are the answers alone."""
    path, detected = write_format(tmp_path, fmt)
    native_path, _ = write_format(tmp_path, "native")
    got, want = rows_of(tmp_path, path.name), rows_of(tmp_path, native_path.name)
    assert got.sources[0]["format"] == detected and got.sources[0]["records"] == 3
    assert not got.bad_rows["train"]
    collator = collators[family]
    a, b = collator(got.train), collator(want.train)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Placeholder text is gone: the only image tokens are the processor's expansion.
    text = collator.processor.tokenizer.decode(a["input_ids"][0])
    expansion = {"llava": 16, "qwen2_vl": 4}[family]
    assert text.count(collator.family.image_token) == expansion
    assert family == "llava" or "<image>" not in text
    tokenizer = collator.processor.tokenizer
    answers = [tokenizer.decode(ids[labels != -100]) for ids, labels in
               zip(b["input_ids"], b["labels"])]
    assert all(a.strip().startswith(c) for a, c in zip(answers, COLOURS)), answers  # + end of turn
    assert (b["labels"] != -100).sum(dim=1).tolist() == [2, 2, 2]


def test_base_dir_is_the_recipe_folder(tmp_path):
    # rows_of relies on recipe.source_path deciding where paths are relative to.
    path, _ = write_format(tmp_path, "native")
    assert rows_of(tmp_path, path.name).train[0]["images"][0].startswith(str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_preview_names_the_format_and_counts_images_and_loss(family, tmp_path, data_cache):  # noqa: F811
    """Every format as one source each of one recipe: `data preview` names each source's
    format and shows each row with its one image, its image tokens and loss on the answer."""
    from peftvlm.data.report import preview

    files = {name: write_format(tmp_path, name) for name in FORMATS}
    recipe = validate_recipe_dict({"name": "p", "model": {"id": FAMILIES[family]},
                                   "method": {"name": "lora"},
                                   "data": {"train": [{"path": p.name}
                                                      for p, _ in files.values()]}})
    recipe.source_path = tmp_path / "r.yaml"
    console = Console(record=True, width=200)
    shown = preview(recipe, n=3 * len(FORMATS), console=console)
    out = console.export_text()
    for path, detected in files.values():
        assert f"train {path.name}: format: {detected}, 3 rows" in out
    assert "train llava.json: format: llava_conversations, 3 rows" in out
    per_image = {"llava": 16, "qwen2_vl": 4}[family]
    assert [s["image_tokens"] for s in shown] == [per_image] * 3 * len(FORMATS)
    assert [s["images"] for s in shown] == [1] * 3 * len(FORMATS)
    # Loss only on the one-word answer and its end-of-turn token.
    assert [s["trained_tokens"] for s in shown] == [2] * 3 * len(FORMATS)
    assert family == "llava" or "<image>" not in out
    assert "example 0 (n.jsonl:1)" in out and "(llava.json:" in out and "(p.parquet:row 2)" in out


def test_interleaved_images_stand_where_the_tags_are_on_qwen_and_first_on_llava(tmp_path,
                                                                                 collators):
    task_images(tmp_path)
    row = {"messages": [{"role": "user", "content": "Left <image> right <image> which is red?"},
                        {"role": "assistant", "content": "left"}],
           "images": ["img/red.png", "img/blue.png"]}
    write_rows(tmp_path / "i.jsonl", [row])
    data = rows_of(tmp_path, "i.jsonl")
    content = data.train[0]["messages"][0]["content"]
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text"]
    assert content[0]["text"] == "Left " and content[2]["text"] == " right "
    qwen = collators["qwen2_vl"]
    text = qwen.processor.tokenizer.decode(qwen(data.train)["input_ids"][0])
    pad = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
    assert f"Left {pad} right {pad} which is red?" in text
    llava = collators["llava"]
    text = llava.processor.tokenizer.decode(llava(data.train)["input_ids"][0])
    assert text.index("Left") > text.rindex("<image>")  # llava-1.5 renders images first
    from peftvlm.data.read.formats import interleaving_note

    assert interleaving_note(data.train, llava.family).startswith("1 row(s) place images")
    assert interleaving_note(data.train, qwen.family) is None


def test_placeholder_mismatches_are_bad_rows_named_by_original_line(tmp_path, recipe_at):
    task_images(tmp_path)
    good = {"messages": [{"role": "user", "content": "<image>Q"},
                         {"role": "assistant", "content": "red"}], "images": ["img/red.png"]}
    two_tags = {"messages": [{"role": "user", "content": "<image><image>Q"},
                             {"role": "assistant", "content": "red"}], "image": "img/red.png"}
    no_image = {"messages": [{"role": "user", "content": "<image>Q"},
                             {"role": "assistant", "content": "red"}]}
    lines = [json.dumps(good), "", json.dumps(two_tags), json.dumps(good), json.dumps(no_image)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    data = recipe_at("m.jsonl")
    assert len(data.train) == 2
    bad = data.bad_rows["train"]["image_count"]
    assert bad["count"] == 2
    assert bad["first_rows"][0].startswith("m.jsonl:3 (2 image placeholder(s)")
    assert bad["first_rows"][1].startswith("m.jsonl:5 (1 image placeholder(s)")
    # The same in a LLaVA JSON list: rows are named by the line they start on.
    rows = [{"image": "img/red.png", "conversations": [
        {"from": "human", "value": tags + "Q"}, {"from": "gpt", "value": "red"}]}
        for tags in ("<image>\n", "<image>\n<image>\n", "")]
    # One row per line with a blank line between: row i starts on line 2 + 2 i.
    (tmp_path / "l.json").write_text("[\n" + ",\n\n".join(map(json.dumps, rows)) + "\n]\n")
    data = recipe_at("l.json")
    assert data.sources[0]["format"] == "llava_conversations" and len(data.train) == 2
    assert data.bad_rows["train"]["image_count"]["first_rows"][0].startswith("l.json:4 (2 image")


def test_remote_urls_wrong_formats_and_unknown_speakers_are_counted(tmp_path, recipe_at):
    task_images(tmp_path)
    rows = [openai("img/red.png", "red"), openai("https://example.com/x.png", "red"),
            {"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt",
                                                                      "value": "red"}],
             "image": "img/red.png"},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64,!!!"}}, {"type": "text", "text": "Q"}]},
                {"role": "assistant", "content": "red"}]}]
    write_rows(tmp_path / "o.jsonl", rows)
    data = recipe_at("o.jsonl")
    bad = data.bad_rows["train"]
    assert data.sources[0]["format"] == "openai_messages" and len(data.train) == 1
    assert "o.jsonl:2 (image https://example.com/x.png is a remote URL" in \
        bad["remote_url"]["first_rows"][0]
    assert bad["format_mismatch"]["first_rows"][0].startswith("o.jsonl:3 (no `messages`")
    assert bad["bad_image"]["first_rows"][0].startswith("o.jsonl:4 ")
    # Forcing the format reads conversations; ShareGPT's other speaker names are understood.
    sharegpt = [{"conversations": [{"from": "system", "value": "Be brief."},
                                   {"from": "user", "value": "Q"}, {"from": "bot", "value": "a"}]},
                {"conversations": [{"from": "user", "value": "Q"},
                                   {"from": "assistant", "value": "a"}]}]
    write_rows(tmp_path / "g.jsonl", sharegpt)
    data = recipe_at({"path": "g.jsonl", "format": "sharegpt"})
    assert data.sources[0]["format"] == "llava_conversations" and len(data.train) == 1
    assert "speaker 'bot'" in data.bad_rows["train"]["bad_messages"]["first_rows"][0]
    assert [m["role"] for m in data.train[0]["messages"]] == ["user", "assistant"]


def test_llamafactory_v1_items_it_cannot_train_are_named_bad_rows(tmp_path, recipe_at):
    save_image(tmp_path / "a.png")
    user = {"role": "user", "content": [{"type": "image_url", "value": "a.png"},
                                        {"type": "text", "value": "What is it?"}]}
    rows = [{"messages": [user, {"role": "assistant", "content": [{"type": "text",
                                                                    "value": "a square"}]}]},
            {"messages": [user, {"role": "assistant", "content": [
                {"type": "reasoning", "value": "hm"}, {"type": "text", "value": "a square"}]}]},
            {"messages": [user, {"role": "assistant", "loss_weight": 0.0,
                                 "content": [{"type": "text", "value": "a square"}]}]},
            {"messages": [user, {"role": "assistant", "content": [{"type": "text"}]}]}]
    write_rows(tmp_path / "lf.jsonl", rows)
    data = recipe_at("lf.jsonl")
    assert data.sources[0]["format"] == "llamafactory_v1" and len(data.train) == 1
    bad = data.bad_rows["train"]["bad_messages"]
    assert bad["count"] == 3
    assert "lf.jsonl:2" in bad["first_rows"][0] and "'reasoning'" in bad["first_rows"][0]
    assert "lf.jsonl:3" in bad["first_rows"][1] and "loss_weight" in bad["first_rows"][1]
    assert "lf.jsonl:4" in bad["first_rows"][2] and "`value`" in bad["first_rows"][2]


def test_rows_without_conversations_are_a_source_error(tmp_path, recipe_at):
    write_rows(tmp_path / "q.jsonl", [{"question": "Q", "answer": "a", "image": "x.png"}])
    with pytest.raises(DataError, match=r"q.jsonl: rows have neither `messages` nor "
                                        r"`conversations` \(first row's keys: question, answer"):
        recipe_at("q.jsonl")


def test_csv_with_bom_and_a_jsonl_with_a_bad_byte(tmp_path, recipe_at):
    task_images(tmp_path)
    messages = json.dumps(native("img/red.png", "red")["messages"]).replace('"', '""')
    (tmp_path / "b.csv").write_bytes(
        b"\xef\xbb\xbfimages,messages\n" + f'img/red.png,"{messages}"\n'.encode())
    data = recipe_at("b.csv")
    assert len(data.train) == 1 and data.train[0]["images"][0].endswith("red.png")
    good = json.dumps(native("img/red.png", "red")).encode()
    (tmp_path / "e.jsonl").write_bytes(good + b"\n" + good.replace(b"red\"}", b"r\xe9d\"}") + b"\n"
                                       + good + b"\n")
    data = recipe_at("e.jsonl")
    assert len(data.train) == 2
    assert data.bad_rows["train"]["bad_encoding"]["first_rows"] == [
        "e.jsonl:2 (byte 0xe9 at column " + str(good.index(b"red\"}") + 2) + " is not UTF-8)"]
    (tmp_path / "e.json").write_bytes(b'[\n{"a": 1},\n{"a": "\xff"}\n]')
    with pytest.raises(DataError, match=r"e.json:3: byte 0xff is not UTF-8"):
        recipe_at("e.json")


def test_stats_report_formats(tmp_path, data_cache):  # noqa: F811
    from peftvlm.data.report import print_stats, stats

    path, _ = write_format(tmp_path, "llava_json")
    write_format(tmp_path, "openai_path")
    recipe = validate_recipe_dict({"name": "s", "model": {"id": "tiny-llava"},
                                   "method": {"name": "lora"},
                                   "data": {"train": [{"path": path.name}, {"path": "o.jsonl"}]}})
    recipe.source_path = tmp_path / "r.yaml"
    console = Console(record=True, width=120)
    print_stats(stats(recipe, tmp_path / "hist.png"), console)
    out = console.export_text()
    assert "train llava.json: format: llava_conversations, 3 rows" in out
    assert "train o.jsonl: format: openai_messages, 3 rows" in out
    assert "images between text" not in out


def test_the_quickstart_task_as_llava_json_trains_exactly_like_native(tmp_path):
    """Same rows in LLaVA-Instruct JSON: the same batches, so the same (falling) loss curve."""
    from peftvlm import api
    from peftvlm.data.read.synthetic import write_synthetic
    from peftvlm.recipe.schema import SyntheticConfig

    paths = write_synthetic(SyntheticConfig(train_size=32, eval_size=4), tmp_path)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    llava = [{"id": i, "image": r["images"][0], "conversations": [
        {"from": "human", "value": "<image>\n" + r["messages"][0]["content"][1]["text"]},
        {"from": "gpt", "value": r["messages"][1]["content"][0]["text"]}]}
        for i, r in enumerate(rows)]
    write_rows(paths["train"].parent / "llava.json", llava)
    curves = {}
    for name in ("train.jsonl", "llava.json"):
        recipe = validate_recipe_dict({
            "name": "q", "model": {"id": "tiny-llava"},
            "method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
            "data": {"train": str(paths["train"].parent / name)},
            "train": {"max_steps": 8, "per_device_train_batch_size": 4, "logging_steps": 1,
                      "learning_rate": 5e-3, "max_length": 64, "save_steps": 1000}})
        summary = api.train(recipe, tmp_path / name.split(".")[1], log=lambda *_: None)
        assert summary["data"]["sources"][0]["format"] == (
            "llava_conversations" if name == "llava.json" else "messages")
        curves[name] = [loss for _, loss in summary["loss_curve"]]
    assert curves["llava.json"] == pytest.approx(curves["train.jsonl"], abs=1e-5)
    assert len(curves["llava.json"]) == 8 and curves["llava.json"][-1] < curves["llava.json"][0]


def write_one_per_line(path, rows) -> None:
    """Like `write_rows`, but a JSON list with one row per line (row i starts on line i + 2)."""
    if path.suffix == ".json":
        path.write_text("[\n" + ",\n".join(map(json.dumps, rows)) + "\n]\n")
    else:
        write_rows(path, rows)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_wrong_placeholder_count_is_a_bad_row_named_by_its_line_in_every_format(fmt, tmp_path,
                                                                                   recipe_at):
    file_name, detected, make = FORMATS[fmt]
    (rel, colour), *_ = task_images(tmp_path)
    good = make(tmp_path, rel, colour)
    # Two more <image> tags than images, in whatever text the format carries the question in.
    bad = json.loads(json.dumps(good).replace(QUESTION, "<image><image>" + QUESTION))
    write_one_per_line(tmp_path / file_name, [good, bad, good])
    data = recipe_at(file_name)
    assert data.sources[0]["format"] == detected and len(data.train) == 2
    name = {".json": f"{file_name}:3", ".parquet": f"{file_name}:row 1"}.get(
        (tmp_path / file_name).suffix, f"{file_name}:2")
    assert data.bad_rows["train"]["image_count"]["first_rows"][0].startswith(f"{name} (")


def test_parquet_and_dataset_rows_are_named_by_their_place_in_the_file(tmp_path, collators):
    """Bad-row, overflow and preview reports name a Parquet row by its position in the file
    and a `datasets` row by its index in the whole split, also when the split is sliced."""
    import datasets

    from peftvlm.data.pipeline import prepare_data
    from peftvlm.data.report import preview

    task_images(tmp_path)
    make = FORMATS["placeholder_parquet"][2]
    rows = [make(tmp_path, f"img/{c}.png", c) for c in ["red", "green", "blue", "red", "green"]]
    rows[2] = make(tmp_path, "img/missing.png", "blue")                         # a bad row
    rows[3]["messages"][0]["content"] = "<image>" + "very long question " * 40  # over max_length
    write_rows(tmp_path / "t.parquet", rows)
    recipe = validate_recipe_dict({"name": "pq", "model": {"id": "tiny-llava"},
                                   "method": {"name": "lora"}, "data": {"train": "t.parquet"},
                                   "train": {"max_length": 100}})
    recipe.source_path = tmp_path / "r.yaml"
    data = prepare_data(recipe, collators["llava"])
    assert data.train.row_ids == ["t.parquet:row 0", "t.parquet:row 1", "t.parquet:row 4"]
    assert data.bad_rows["train"]["missing_image"]["first_rows"][0].startswith(
        "t.parquet:row 2 (img/missing.png not found")
    assert data.overflow["first_rows"][0].startswith("t.parquet:row 3 (")
    console = Console(record=True, width=200)
    preview(recipe, n=3, console=console)
    out = console.export_text()
    assert "example 2 (t.parquet:row 4)" in out
    assert "bad rows (train) missing_image: 1, e.g. t.parquet:row 2 (img/missing.png" in out
    # A saved DatasetDict read as train[2:] and a folder of data files (read like a Hub repo)
    # as train[1:]: rows keep their index in the whole split.
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "saved"))
    (tmp_path / "hub").mkdir()
    write_rows(tmp_path / "hub" / "train.jsonl", rows)
    for name, split, kept in (("saved", "train[2:]", [3, 4]), ("hub", "train[1:]", [1, 3, 4])):
        got = rows_of(tmp_path, [{"dataset": name, "split": split, "image_root": "."}])
        assert got.train.row_ids == [f"{name}[train][{i}]" for i in kept]
        assert got.bad_rows["train"]["missing_image"]["first_rows"][0].startswith(
            f"{name}[train][2] (img/missing.png not found")
