"""Streamed training data (peftvlm/data/stream/streaming.py): sources read as training goes,
bad and over-long rows counted by name, each rank its own part, and --resume continuing at the row where
training stopped."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import pytest
import yaml
from conftest import REPO
from data_helpers import data_cache, llava_collator, save_image  # noqa: F401

from peftvlm.data.stream.streaming import STATE_FILE, StreamCollator, open_training_stream
from peftvlm.errors import DataError, RecipeError
from peftvlm.recipe.load import load_recipe, validate_recipe_dict


def conversation(answer: str, image: str | None = "red.png", question: str = "What color?"):
    row = {"messages": [{"role": "user", "content": question},
                        {"role": "assistant", "content": answer}]}
    return {**row, "images": [image]} if image else row


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def recipe_dict(folder, train, data=None, **train_fields) -> dict:
    return {"name": "stream", "model": {"id": "tiny-llava"}, "base_dir": str(folder),
            "method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
            "data": {"train": train, **(data or {})}, "eval": {"metrics": []},
            "train": {"max_steps": 6, "save_steps": 3, "max_length": 64, "logging_steps": 1,
                      "per_device_train_batch_size": 2, **train_fields}}


def stream_of(folder, collator, train, rank=0, world=1, data=None, **train_fields):
    recipe = validate_recipe_dict(recipe_dict(folder, train, data, **train_fields))
    return open_training_stream(recipe, collator, rank, world)


def take(rows, n: int) -> list[dict]:
    return list(itertools.islice(iter(rows), n))


def ids(rows) -> list[str]:
    return [r["row_id"] for r in rows]


def answer(row) -> str:
    return row["messages"][-1]["content"][0]["text"]


def counts(rows) -> dict:
    return {k: v["count"] for k, v in rows.counts.snapshot()["bad_rows"].items()}


@pytest.fixture
def messy(tmp_path):
    """train.jsonl: two good rows around a bad JSON line, a missing image and an over-long row."""
    save_image(tmp_path / "red.png", (32, 32))
    write_jsonl(tmp_path / "train.jsonl", [
        conversation("a0"), "{not json", conversation("a1", image="missing.png"),
        conversation("a2", question="long " * 80), conversation("a3")])
    return tmp_path


# --- validate ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, refused", [
    ({"max_steps": -1}, "train.max_steps with streamed training data: a stream has no length"),
    ({"group_by_length": True}, "train.group_by_length with streamed"),
    ({"packing": True}, "train.packing with streamed"),
    ({"dataloader_num_workers": 2}, "train.dataloader_num_workers with streamed")])
def test_validate_refuses_what_a_stream_cannot_do_with_the_reason(messy, fields, refused):
    path = messy / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(messy, "train.jsonl", {"streaming": True},
                                               **fields)))
    with pytest.raises(RecipeError, match=refused):
        load_recipe(path)


def test_validate_refuses_a_stream_for_a_dual_encoder():
    with pytest.raises(RecipeError, match="streaming: the clip dual encoder trains on a table"):
        load_recipe(REPO / "recipes" / "clip-coop.yaml", ["data.streaming=true",
                                                           "train.max_steps=5"])


def test_validate_takes_a_glob_of_shards_and_refuses_one_that_matches_nothing(messy):
    path = messy / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(messy, [{"path": "*.jsonl", "streaming": True}])))
    assert load_recipe(path).data.streams()
    path.write_text(yaml.safe_dump(recipe_dict(messy, [{"path": "*.tar", "streaming": True}])))
    with pytest.raises(RecipeError, match=r"data.train\[0\].path: \*.tar does not exist"):
        load_recipe(path)


# --- rows ---------------------------------------------------------------------------------------

def test_a_jsonl_stream_renders_rows_counts_bad_ones_once_and_starts_again(messy, llava_collator):
    rows = stream_of(messy, llava_collator, [{"path": "train.jsonl", "streaming": True}])
    got = take(rows, 5)
    assert ids(got) == ["train.jsonl:1", "train.jsonl:5"] * 2 + ["train.jsonl:1"]
    assert [answer(r) for r in got[:2]] == ["a0", "a3"]
    assert got[0]["images"] == [str((messy / "red.png").resolve())]
    assert counts(rows) == {"invalid_json": 1, "missing_image": 1}  # once, not once per pass
    snapshot = rows.counts.snapshot()
    assert snapshot["bad_rows"]["invalid_json"]["first_rows"][0].startswith("train.jsonl:2 (")
    overflow = snapshot["dropped_overflow"]
    assert overflow["count"] == 1 and overflow["first_rows"][0].startswith("train.jsonl:4 (")
    # the trainer's collator gets the rows without their positions, and notes where batches end
    collate = StreamCollator(llava_collator, rows)
    batch = collate(got[:2])
    plain = llava_collator([{k: v for k, v in r.items() if k != "_stream_position"}
                            for r in got[:2]])
    assert all((batch[k] == plain[k]).all() for k in plain)
    assert rows.batch_ends == [got[1]["_stream_position"]]


def test_strict_policies_stop_at_the_first_bad_or_long_row_naming_it(messy, llava_collator):
    rows = stream_of(messy, llava_collator, [{"path": "train.jsonl", "streaming": True}],
                     data={"on_bad_row": "error"})
    with pytest.raises(DataError, match=r"bad row train\.jsonl:2: invalid json"):
        take(rows, 3)
    write_jsonl(messy / "long.jsonl", [conversation("a0"), conversation("a", question="x " * 80)])
    rows = stream_of(messy, llava_collator, [{"path": "long.jsonl", "streaming": True}],
                     data={"on_overflow": "error"})
    with pytest.raises(DataError, match=r"row long\.jsonl:2 has \d+ tokens, over train"):
        take(rows, 2)
    write_jsonl(messy / "bad.jsonl", ["{not json", conversation("a", image="missing.png")])
    rows = stream_of(messy, llava_collator, [{"path": "bad.jsonl", "streaming": True}])
    with pytest.raises(DataError, match=r"the stream has no usable rows \(1 invalid json \(e\.g\. "
                                        r"bad\.jsonl:1"):
        take(rows, 1)


def png(colour) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path, samples: dict) -> None:
    """A WebDataset shard: {key: {extension: bytes or a row}}."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                data = data if isinstance(data, bytes) else json.dumps(data).encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))


def test_webdataset_shards_take_images_from_their_samples(tmp_path, llava_collator):
    (tmp_path / "shards").mkdir()
    hf_item = {"role": "user", "content": [{"type": "image", "image": "png"},
                                           {"type": "text", "text": "Colour?"}]}
    write_shard(tmp_path / "shards" / "train-000.tar", {
        "000000": {"json": conversation("named by extension", "png"), "png": RED},
        "000001": {"json": conversation("unnamed: the sample's own", None), "png": BLUE},
        "000002": {"json": b"{not json", "png": RED},
        "000003": {"png": RED}})
    write_shard(tmp_path / "shards" / "train-001.tar", {
        "000004": {"json": {"messages": [hf_item, {"role": "assistant", "content": "item"}]},
                   "png": BLUE},
        "000005": {"json": {**conversation("two, by file name", None),
                            "images": ["000005.1.png", "000005.0.png"]},
                   "0.png": RED, "1.png": BLUE}})
    write_shard(tmp_path / "llava.tar", {"000000": {"json": {"conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "llava"}]},
        "jpg": png((0, 255, 0))}})
    rows = stream_of(tmp_path, llava_collator, [{"path": "shards/train-*.tar"},
                                                {"path": "llava.tar"}], {"streaming": True},
                     max_length=128)
    got = take(rows, 5)
    assert ids(got) == ["train-000.tar:000000", "train-000.tar:000001", "train-001.tar:000004",
                        "train-001.tar:000005", "llava.tar:000000"]
    assert [[i["bytes"] for i in r["images"]] for r in got[:4]] == [[RED], [BLUE], [BLUE],
                                                                    [BLUE, RED]]
    assert got[2]["messages"][0]["content"][0] == {"type": "image"}
    assert answer(got[4]) == "llava" and len(got[4]["images"]) == 1
    assert counts(rows) == {"invalid_json": 1, "no_json": 1}
    bad = rows.counts.snapshot()["bad_rows"]
    assert bad["no_json"]["first_rows"] == [
        "train-000.tar:000003 (the sample has no .json file (it has png))"]
    assert llava_collator([{k: v for k, v in r.items() if k != "_stream_position"}
                           for r in got])["pixel_values"].shape[0] == 6


def test_make_shards_writes_shards_the_stream_reads_as_it_read_the_jsonl(messy, llava_collator):
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from make_shards import write_shards

    shards = write_shards(messy / "train.jsonl", messy / "shards", rows_per_shard=2)
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar",
                                        "train-000002.tar"]
    lines = take(stream_of(messy, llava_collator, [{"path": "train.jsonl"}], {"streaming": True}),
                 2)
    samples = stream_of(messy, llava_collator, [{"path": "shards/*.tar"}], {"streaming": True})
    got = take(samples, 2)
    assert [r["messages"] for r in got] == [r["messages"] for r in lines]
    assert got[0]["images"] == [{"bytes": (messy / "red.png").read_bytes()}]
    assert counts(samples) == {"invalid_json": 1, "missing_image": 1}


def test_a_template_renders_shard_samples_and_resumes_inside_a_record(tmp_path, llava_collator):
    """A caption template with `selection: all` makes one row per caption: a position can fall
    between two rows of one record, and resuming there yields the record's next row."""
    from peftvlm.data.stream.streaming import Position

    write_shard(tmp_path / "captions.tar", {
        f"{i:06d}": {"json": {"captions": [f"a red square {i}", f"red shape {i}"]}, "png": RED}
        for i in range(3)})
    train = [{"path": "captions.tar", "streaming": True, "template": "caption",
              "template_options": {"selection": "all"}}]
    full = take(stream_of(tmp_path, llava_collator, train, max_length=128), 8)
    assert ids(full)[:6] == [f"captions.tar:{i:06d}" for i in range(3) for _ in range(2)]
    assert [answer(r) for r in full[:2]] == ["a red square 0", "red shape 0"]
    assert full[0]["images"] == [{"bytes": RED}]
    for k in range(7):  # as --resume does, through the JSON of peftvlm-stream.json
        rows = stream_of(tmp_path, llava_collator, train, max_length=128)
        rows.start = Position(**json.loads(json.dumps(full[k]["_stream_position"].as_dict())))
        assert [answer(r) for r in take(rows, 8 - k - 1)] == [answer(r) for r in full[k + 1:]]


def test_parquet_files_and_a_dataset_folder_stream_alike(tmp_path, llava_collator):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**conversation(f"p{i}", None), "image": {"bytes": RED, "path": None}}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "hub").mkdir()
    save_image(tmp_path / "hub" / "red.png", (32, 32))
    write_jsonl(tmp_path / "hub" / "train.jsonl", [conversation(f"h{i}") for i in range(3)])
    stream = stream_of(tmp_path, llava_collator, [{"path": "train.parquet"}, {"dataset": "hub"}],
                       {"streaming": True})
    got = take(stream, 6)
    assert ids(got) == [f"train.parquet:row {i}" for i in range(3)] + \
        [f"hub[train][{i}]" for i in range(3)]
    assert [answer(r) for r in got] == ["p0", "p1", "p2", "h0", "h1", "h2"]
    assert got[0]["images"] == [{"bytes": RED}]


def test_weighted_sources_interleave_by_probability_and_unweighted_ones_follow_each_other(
        tmp_path, llava_collator):
    save_image(tmp_path / "red.png", (32, 32))
    for name in "ab":
        write_jsonl(tmp_path / f"{name}.jsonl", [conversation(f"{name}{i}") for i in range(40)])
    weighted = [{"path": "a.jsonl", "weight": 3}, {"path": "b.jsonl", "weight": 1}]
    first = ids(take(stream_of(tmp_path, llava_collator, weighted, data={"streaming": True}), 40))
    assert 24 <= sum(i.startswith("a.") for i in first) <= 36
    again = ids(take(stream_of(tmp_path, llava_collator, weighted, data={"streaming": True}), 40))
    assert first == again  # seeded by data.seed
    plain = [{"path": "a.jsonl"}, {"path": "b.jsonl"}]
    assert ids(take(stream_of(tmp_path, llava_collator, plain, data={"streaming": True}), 42)) \
        == [f"a.jsonl:{i}" for i in range(1, 41)] + ["b.jsonl:1", "b.jsonl:2"]


@pytest.mark.parametrize("files", [["train.jsonl"], ["part-0.jsonl", "part-1.jsonl"]])
def test_two_ranks_read_disjoint_rows_that_together_are_the_stream(tmp_path, llava_collator,
                                                                   files):
    """One file: each rank keeps every other row; two files: each rank reads one (datasets'
    split_dataset_by_node, the rank and world size accelerate gives in a launched run)."""
    save_image(tmp_path / "red.png", (32, 32))
    per_file = 8 // len(files)
    for f, name in enumerate(files):
        write_jsonl(tmp_path / name, [conversation(f"{f}-{i}") for i in range(per_file)])
    train = [{"path": "*.jsonl" if len(files) > 1 else files[0], "streaming": True}]
    whole = ids(take(stream_of(tmp_path, llava_collator, train), 8))
    parts = [ids(take(stream_of(tmp_path, llava_collator, train, rank, 2), 4)) for rank in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(whole)


def test_a_launched_process_reads_the_part_of_the_rank_its_launcher_gave(messy, llava_collator,
                                                                        monkeypatch):
    """torchrun / accelerate launch announce RANK and WORLD_SIZE before the trainer (and, on
    CPU, accelerate's state) knows of several processes: the stream splits by them."""
    write_jsonl(messy / "train.jsonl", [conversation(f"a{i}") for i in range(4)])
    recipe = validate_recipe_dict(recipe_dict(messy, [{"path": "train.jsonl",
                                                       "streaming": True}]))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ids(take(open_training_stream(recipe, llava_collator), 2)) == ["train.jsonl:2",
                                                                         "train.jsonl:4"]


# --- training and resume ----------------------------------------------------------------------

class StopAfterSaving:
    """Stops the run (as a kill would) once checkpoint `step` is written."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == step:
                    raise KeyboardInterrupt("simulated kill")

        return Stop()


def test_resume_continues_at_the_row_where_training_stopped(messy, monkeypatch):
    """6 steps straight, and 3 steps + a kill + --resume, train on the same rows in the same
    order (the stream ends and starts again in between); bad rows are reported once."""
    from peftvlm import api

    write_jsonl(messy / "train.jsonl", [conversation(f"a{i}") for i in range(7)] +
                ["{not json", conversation("x", image="missing.png"),
                 conversation("x", question="long " * 80)])
    batches = []
    collate = StreamCollator.__call__
    monkeypatch.setattr(StreamCollator, "__call__",
                        lambda self, rows: batches.append(ids(rows)) or collate(self, rows))
    recipe = validate_recipe_dict(recipe_dict(messy, [{"path": "train.jsonl",
                                                       "streaming": True}]))
    straight = api.train(recipe, messy / "straight", log=lambda *_: None)
    whole, batches[:] = batches[:6], []
    with pytest.raises(KeyboardInterrupt):
        api.train(recipe, messy / "run", log=lambda *_: None, callbacks=[StopAfterSaving(3)])
    before, batches[:] = batches[:3], []
    saved = json.loads((messy / "run" / "checkpoints" / "checkpoint-3" / STATE_FILE).read_text())
    assert saved["world_size"] == 1 and saved["ranks"][0]["rows"] == 6
    logged = []
    resumed = api.train(recipe, messy / "run", resume=True, log=logged.append)
    assert before + batches[:3] == whole
    assert [r for b in whole for r in b][6:9] == ["train.jsonl:7", "train.jsonl:1",
                                                  "train.jsonl:2"]
    assert any(line.startswith("stream: resuming after row 6 (record 6, pass 1) as saved in "
                               "checkpoint-3") for line in logged)
    for summary in (straight, resumed):
        report = summary["data"]
        assert report["train_rows"] == 12 and report["stream"]["records_read"] == 15
        assert {k: v["count"] for k, v in report["bad_rows"]["train"].items()} == \
            {"invalid_json": 1, "missing_image": 1}
        assert report["dropped_overflow"]["first_rows"][0].startswith("train.jsonl:10 (")
    assert any(line.startswith("stream: 12 rows trained on from 15 records read") and
               "1 invalid json (e.g. train.jsonl:8" in line for line in logged)
    assert [s for s, _ in resumed["loss_curve"]][-1] == 6


def test_a_streamed_row_typing_the_models_own_image_token_is_a_bad_row():
    """A stream checks rows as prepared sources do (`loading.drop_media_token_rows`)."""
    from types import SimpleNamespace

    from peftvlm.data.stream.streaming import StreamingRows
    from peftvlm.families import get_family

    family = get_family("qwen2_vl")
    typed = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "look <|image_pad|> here"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], "images": []}
    plain = {**typed, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look here"}]}, typed["messages"][1]]}
    bad = StreamingRows.unfit(SimpleNamespace(family=family), typed)
    assert bad.reason == "media_token_in_text" and "<|image_pad|>" in bad.detail
    assert StreamingRows.unfit(SimpleNamespace(family=family), plain) is None


def test_data_preview_shows_a_streams_first_rows_and_stats_refuses_shards(tmp_path,
                                                                           cli_in_process):
    """`data preview` reads a stream as training does (first rows, bad rows met on the way);
    `data stats`, which reads sources whole, refuses shards with what to do instead."""
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "train-000.tar", {
        "000000": {"json": b"{not json", "png": RED},
        "000001": {"json": conversation("first", "png"), "png": RED},
        "000002": {"json": conversation("second", "png"), "png": BLUE}})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tmp_path, [{"path": "shards/*.tar"}],
                                               {"streaming": True}, max_length=128)))
    shown = cli_in_process("data", "preview", path, "-n", "2")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    out = " ".join(shown.stdout.split())
    assert "streamed training rows" in out and "format: messages, streamed" in out
    assert "train-000.tar:000001" in out and "train-000.tar:000002" in out
    assert "bad rows (train) invalid_json: 1, e.g. train-000.tar:000000" in out
    refused = cli_in_process("data", "stats", path)
    said = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode != 0 and "Traceback" not in said
    assert "data.train[0] (shards/*.tar): data stats reads a source whole" in said
    assert "peftvlm data preview" in said
