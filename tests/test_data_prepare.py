"""Cold preparation in shards (`data/prepare/shards.py`, `readers.SourceData.split`): the same
rows, row ids and bad-row report as reading and rendering the file record by record, for any
number of processes; sharded readers (JSONL, CSV, Parquet) return exactly what whole-file
reading does."""

from __future__ import annotations

import itertools
import json

import pytest
from data_helpers import data_cache, llava_collator, save_image  # noqa: F401

from peftvlm.data.prepare.loading import (CACHE_MIN_ROWS, MessagesRenderer, load_source,
                                          render_chunk)
from peftvlm.data.read import readers
from peftvlm.data.read.readers import read_csv, read_jsonl, read_parquet
from peftvlm.recipe.schema import DataConfig, SourceConfig

ROWS = CACHE_MIN_ROWS + 150


def good_row(i: int, image: str = "a.png") -> str:
    return json.dumps({"images": [image], "messages": [
        {"role": "user", "content": f"What color is shape {i}?"},
        {"role": "assistant", "content": ["red", "green", "blue"][i % 3]}]})


def mixed_line(i: int) -> bytes:
    """Mostly good rows; bad ones of several reasons, some reasons more often than listed."""
    if i % 97 == 5:
        return good_row(i, image="gone.png").encode()  # missing_image (12 of them)
    if i % 211 == 7:
        return b'{"messages": [oops'  # invalid_json
    if i == 300:
        return b'{"text": "caf\xe9"}'  # bad_encoding
    if i % 250 == 11:
        return json.dumps({"messages": [{"role": "user", "content": "hi"}],
                           "images": []}).encode()  # no_answer
    if i % 400 == 13:
        return b"   "  # a blank line: not a record
    return good_row(i).encode()


@pytest.fixture()
def mixed_jsonl(tmp_path):
    save_image(tmp_path / "a.png")
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(mixed_line(i) for i in range(ROWS)) + b"\n")
    return tmp_path


def one_by_one(folder, limit=None):
    """The reference: read the whole file, render record by record in this process."""
    records = list(itertools.islice(read_jsonl(folder / "train.jsonl"), limit))
    rows, report = render_chunk(MessagesRenderer(folder), records)
    return rows, report, len(records)


@pytest.mark.parametrize("num_proc", [None, 2])
def test_sharded_preparation_equals_rendering_record_by_record(mixed_jsonl, data_cache,
                                                               monkeypatch, num_proc):
    monkeypatch.setattr(readers, "SHARD_ROWS", 100)  # 12 shards, split over the processes
    rows, report, records = one_by_one(mixed_jsonl)
    assert report.counts["missing_image"] > 5 and len(report.counts) == 4  # the file is mixed
    for cache in (True, False):
        got = load_source(SourceConfig(path="train.jsonl"),
                          DataConfig(cache=cache, num_proc=num_proc), mixed_jsonl)
        assert list(got.rows) == rows  # same rows, row ids (`file:line`), images, in order
        assert got.rows.row_ids == [r["row_id"] for r in rows]
        assert got.records == records and got.report.as_dict() == report.as_dict()
        assert got.report.describe() == report.describe()  # reasons in the same order
    warm = load_source(SourceConfig(path="train.jsonl"), DataConfig(num_proc=num_proc),
                       mixed_jsonl)
    assert warm.cached and list(warm.rows) == rows and warm.report.as_dict() == report.as_dict()


def test_max_samples_stops_the_sharded_read_at_the_same_record(mixed_jsonl, data_cache,
                                                              monkeypatch):
    monkeypatch.setattr(readers, "SHARD_ROWS", 100)
    limit = CACHE_MIN_ROWS + 33
    rows, report, records = one_by_one(mixed_jsonl, limit)
    got = load_source(SourceConfig(path="train.jsonl", max_samples=limit),
                      DataConfig(cache=False, num_proc=2), mixed_jsonl)
    assert got.records == records == limit
    assert list(got.rows) == rows and got.report.as_dict() == report.as_dict()


def test_bad_row_report_lists_the_first_rows_of_each_reason_in_file_order(mixed_jsonl,
                                                                          data_cache,
                                                                          monkeypatch):
    monkeypatch.setattr(readers, "SHARD_ROWS", 100)
    got = load_source(SourceConfig(path="train.jsonl"), DataConfig(cache=False, num_proc=2),
                      mixed_jsonl)
    missing = got.report.as_dict()["missing_image"]
    assert missing["count"] == sum(1 for i in range(ROWS) if i % 97 == 5)
    assert [e.split(" ")[0] for e in missing["first_rows"]] == \
        [f"train.jsonl:{i + 1}" for i in range(ROWS) if i % 97 == 5][:5]
    assert got.report.as_dict()["bad_encoding"]["first_rows"][0].startswith("train.jsonl:301 ")


def shard_union(shards) -> list:
    return list(itertools.chain.from_iterable(shards))


def test_jsonl_shards_cover_the_file_exactly(mixed_jsonl, monkeypatch):
    monkeypatch.setattr(readers, "SHARD_ROWS", 64)
    path = mixed_jsonl / "train.jsonl"
    whole = [(i, repr(r)) for i, r in read_jsonl(path)]
    for limit in (None, 1, 64, 65, 1000):
        shards = readers.jsonl_shards(path, limit)
        assert [(i, repr(r)) for i, r in shard_union(shards)] == whole[:limit]


def test_csv_shards_cover_the_file_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "SHARD_ROWS", 3)
    path = tmp_path / "rows.csv"
    lines = ['\ufeffimage,question,answers'] + [
        f'a.png,"Q{i}\nsecond line, with comma",["x{i}"]' if i % 4 == 0 else
        ("" if i % 5 == 0 else f"a.png,Q{i},A{i}") for i in range(20)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    whole = list(read_csv(path))
    assert whole[0] == ("rows.csv:3", {"image": "a.png", "question": "Q0\nsecond line, with comma",
                                       "answers": ["x0"]})
    for limit in (None, 2, 3, 7):
        assert shard_union(readers.csv_shards(path, limit)) == whole[:limit]


def test_parquet_shards_cover_the_file_exactly(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(readers, "SHARD_ROWS", 7)
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"question": [f"Q{i}" for i in range(50)],
                             "image": [{"bytes": bytes([i]), "path": None} for i in range(50)]}),
                   path, row_group_size=9)
    whole = list(read_parquet(path))
    assert len(whole) == 50 and whole[10] == ("rows.parquet:row 10", {
        "question": "Q10", "image": {"bytes": b"\n", "path": None}})
    for limit in (None, 6, 7, 30):
        assert shard_union(readers.parquet_shards(path, limit)) == whole[:limit]


@pytest.mark.parametrize("kind", ["json_list", "saved_dataset"])
def test_json_lists_and_one_pass_sources_lose_no_record(tmp_path, data_cache, monkeypatch, kind):
    """A JSON list is sharded like JSONL; a `datasets` folder is read in one pass, here."""
    monkeypatch.setattr(readers, "SHARD_ROWS", 300)
    save_image(tmp_path / "a.png")
    items = [json.loads(good_row(i, "gone.png" if i % 50 == 3 else "a.png"))
             for i in range(CACHE_MIN_ROWS + 5)]
    if kind == "json_list":
        (tmp_path / "train").with_suffix(".json").write_text(json.dumps(items, indent=1))
        src = SourceConfig(path="train.json")
    else:
        import datasets

        datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "saved"))
        src = SourceConfig(path="saved", image_root=".")
    got = load_source(src, DataConfig(cache=False, num_proc=2), tmp_path)
    opened = readers.open_source(src, tmp_path)
    rows, report = render_chunk(MessagesRenderer(opened.root), list(opened.records))
    assert got.records == len(items) and list(got.rows) == rows
    assert got.report.as_dict() == report.as_dict() and report.total == 21


def fake_processor(template: str):
    """What the renderer reads of a processor: its chat template and special tokens."""
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(special_tokens_map={"eos_token": "[END]"},
                                all_special_tokens=["[END]"])
    return SimpleNamespace(chat_template=template, tokenizer=tokenizer)


def conversation(question: str, answer: str, image: bool = True) -> list[dict]:
    user = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


LOOP = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}BODY{% else %}<img>{% endif %}{% endfor %}"
        "{{ eos_token }}\n{% endfor %}")


@pytest.mark.parametrize("body, cached", [
    ("{{ c['text'] }}", True),                      # placed as it is
    ("{{ c['text'] | trim }}", True),               # trimmed (Gemma 3 does this)
    ("{{ c['text'] | upper }}", False),             # changed: rendered row by row
    ("{% if '<think>' in c['text'] %}T{% endif %}{{ c['text'] }}", True),
    ("{% if c['text'] == 'red' %}RED{% endif %}{{ c['text'] }}", False),  # seen in a checked row
])
def test_shape_renderer_gives_the_templates_own_text(body, cached):
    from peftvlm.data.render.chat_template import render_texts
    from peftvlm.data.render.shapes import ShapeRenderer

    processor = fake_processor(LOOP.replace("BODY", body))
    conversations = [conversation("What colour?", "red"),
                     conversation("  padded \n", "blue  "),
                     conversation("a <think>x</think> b", "green"),
                     conversation("ends [END]", "red"),
                     conversation("", "red", image=False),
                     *[conversation(f"Q{i}\nline", f"A {i}") for i in range(6)]]
    shapes = ShapeRenderer(processor)
    first = shapes.texts(conversations[:5])
    assert first + shapes.texts(conversations[5:]) == \
        render_texts(processor, conversations, add_generation_prompt=False)
    with_image = next(k for k in shapes._shapes if len(k[0][1]) == 2)
    assert (shapes._shapes[with_image] is not None) == cached


def test_json_list_read_item_by_item_equals_whole_file_parsing(tmp_path, monkeypatch):
    from peftvlm.data.read import json_list

    monkeypatch.setattr(json_list, "CHUNK", 37)  # items and characters cut across chunks
    monkeypatch.setattr(readers, "SHARD_ROWS", 4)
    items = [{"id": i, "text": "caf\u00e9 \U0001f600 " * (i % 4), "nested": {"a": [i, None]},
              "s": "] , [ \\" } for i in range(23)]
    text = "\ufeff[\n" + ",\n".join(json.dumps(x, ensure_ascii=False, indent=i % 3 or None)
                                   for i, x in enumerate(items)) + "\n]\n"
    path = tmp_path / "rows.json"
    path.write_text(text, encoding="utf-8")
    whole = [(f"rows.json:{line}", item)
             for line, item in readers.json_list_items(text.lstrip("\ufeff"), path)]
    assert [r for _, r in whole] == items
    assert list(readers.read_json(path)) == whole
    for limit in (None, 1, 4, 9):
        assert shard_union(readers.json_shards(path, limit)) == whole[:limit]


def test_a_json_list_with_an_invalid_item_is_refused_naming_its_line(tmp_path):
    from peftvlm.errors import DataError

    path = tmp_path / "rows.json"
    path.write_text('[\n{"a": 1},\n{"a": 2},\n{"a": oops}\n]\n')
    with pytest.raises(DataError, match=r"rows.json: invalid JSON at line 4"):
        readers.json_shards(path, None)
    (tmp_path / "wrapped.json").write_text('{"data": [{"a": 1}, {"a": 2}]}')
    assert shard_union(readers.json_shards(tmp_path / "wrapped.json", 1)) == \
        [("wrapped.json[0]", {"a": 1})]


def test_a_large_source_of_bad_rows_only_counts_them_all(tmp_path, data_cache, llava_collator):
    lines = [good_row(i, image="gone.png") for i in range(CACHE_MIN_ROWS + 5)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    got = load_source(SourceConfig(path="train.jsonl"), DataConfig(num_proc=2), tmp_path,
                      collator=llava_collator)
    assert len(got.rows) == 0 and got.rows.lengths().tolist() == []
    assert got.records == len(lines) and dict(got.report.counts) == {"missing_image": len(lines)}
