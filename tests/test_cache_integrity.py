"""The prepared-rows cache never hands back stale or torn rows: it is keyed on content, checks
its row count and its images on a warm start, and rows whose images fail during training are
skipped and counted, not a crash at step N."""

from __future__ import annotations

import json
import os

import pytest
from conftest import run_cli_in_process
from data_helpers import data_cache, llava_collator, recipe_file, save_image  # noqa: F401

from peftvlm.data.batch.collate import IGNORE_INDEX
from peftvlm.data.prepare.loading import CACHE_MIN_ROWS, load_source, prepared_cache_dir
from peftvlm.recipe.schema import DataConfig, SourceConfig

ROWS = CACHE_MIN_ROWS  # the smallest source that is cached


def row(i: int, image: str = "a.png") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": f"q{i:04d}?"}]},
                         {"role": "assistant", "content": [{"type": "text",
                                                            "text": f"ans{i:04d}"}]}],
            "images": [image]}


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def source(tmp_path, data_cache):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png", colour=(0, 200, 0))
    write_rows(tmp_path / "train.jsonl", [row(i, "b.png" if i % 2 else "a.png")
                                          for i in range(ROWS)])
    return tmp_path


def load(folder, collator=None):
    return load_source(SourceConfig(path="train.jsonl"), DataConfig(cache=True), folder,
                       collator=collator)


def cache_folder(loaded_rows) -> object:
    """The cache folder a source's memory-mapped rows come from."""
    from pathlib import Path

    folder = Path(loaded_rows.table.cache_files[0]["filename"]).parent
    assert folder.parent == prepared_cache_dir()
    return folder


def answer(r) -> str:
    return r["messages"][-1]["content"][0]["text"]


def test_a_same_size_edit_with_the_mtime_kept_is_not_served_from_the_cache(source):
    first = load(source)
    assert load(source).cached
    path = source / "train.jsonl"
    stat = path.stat()
    path.write_text(path.read_text().replace('"ans0007"', '"EDIT007"'))  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` / `rsync -t` keep it
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    edited = load(source)
    assert not edited.cached and answer(edited.rows[7]) == "EDIT007"
    assert answer(first.rows[7]) == "ans0007"


@pytest.mark.parametrize("torn", ["rows", "lengths", "meta"])
def test_a_torn_cache_is_rebuilt_with_a_note(source, llava_collator, capfd, torn):
    first = load(source, llava_collator)
    folder = cache_folder(first.rows)
    expected, lengths = list(first.rows), first.rows.lengths().tolist()
    if torn in ("rows", "lengths"):  # a third of the file: what a crash mid-copy leaves
        path = next(folder.glob("rows.arrow" if torn == "rows" else "lengths-*.arrow"))
        cut = path.with_name("cut")  # a new file: this process still maps the old one
        cut.write_bytes(path.read_bytes()[:path.stat().st_size // 3])
        cut.replace(path)
    else:  # a table that does not match its stored row count
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "rows": meta["rows"] + 5}))
    capfd.readouterr()
    again = load(source, llava_collator)  # never a traceback, never fewer rows
    err = capfd.readouterr().err
    assert len(again.rows) == ROWS and list(again.rows) == expected
    assert again.rows.lengths().tolist() == lengths
    notes = [line for line in err.splitlines() if line.startswith("note: cached")]
    assert len(notes) == 1, err
    assert load(source, llava_collator).cached  # and the rebuilt cache is trusted again


def test_an_image_changed_after_caching_is_checked_again(source, capfd):
    first = load(source)
    assert not first.report.total
    (source / "b.png").write_bytes(b"not an image any more")  # every odd row's image
    capfd.readouterr()
    again = load(source)
    assert "image(s) changed since it was cached" in capfd.readouterr().err
    assert not again.cached and again.report.counts["corrupt_image"] == ROWS // 2
    assert len(again.rows) == ROWS // 2


def collate_rows(folder, n: int, bad: set[int]):
    rows = [{**row(i, "a.png"), "row_id": f"train.jsonl:{i + 1}"} for i in range(n)]
    for i in bad:
        rows[i]["images"] = [str(folder / "gone.png")]
    for r in rows:
        r["images"] = [str(folder / p) if not p.startswith("/") else p for p in r["images"]]
    return rows


def test_a_row_whose_image_fails_in_training_is_skipped_and_counted(tmp_path, llava_collator):
    from peftvlm.data.batch.collate import ConversationCollator

    save_image(tmp_path / "a.png")
    collator = ConversationCollator(llava_collator.processor, llava_collator.family)
    collator.skipped_rows_file = tmp_path / "skipped.jsonl"
    good = collator(collate_rows(tmp_path, 3, set()))
    batch = collator(collate_rows(tmp_path, 3, {1}))
    assert batch["input_ids"].shape[0] == 3 and (batch["labels"][1] == IGNORE_INDEX).all()
    assert (batch["labels"][0] == good["labels"][0]).all()
    # a batch of bad rows only: a good row seen before stands in, and carries loss
    alone = collator(collate_rows(tmp_path, 2, {0, 1}))
    assert alone["input_ids"].shape[0] == 2 and (alone["labels"][0] != IGNORE_INDEX).any()
    assert (alone["labels"][1] == IGNORE_INDEX).all()
    logged = [json.loads(line) for line in collator.skipped_rows_file.read_text().splitlines()]
    assert [e["row_id"] for e in logged] == ["train.jsonl:2", "train.jsonl:1", "train.jsonl:2"]
    assert "gone.png" in logged[0]["detail"]


@pytest.mark.slow
def test_train_skips_and_counts_rows_whose_images_break_after_caching(tmp_path, data_cache):
    """Through `peftvlm train`: the first run fills the cache; then an image is corrupted
    keeping its size and mtime (the warm start cannot see it: training meets it), and one that
    another source names is deleted (the warm start sees it and prepares that source again)."""
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png", colour=(0, 200, 0))
    save_image(tmp_path / "c.png", colour=(0, 0, 200))
    write_rows(tmp_path / "one.jsonl", [row(i, "a.png" if i % 4 == 0 else "b.png")
                                        for i in range(ROWS)])
    write_rows(tmp_path / "two.jsonl", [row(i, "a.png") for i in range(ROWS - 1)] +
               [row(ROWS, "c.png")])
    recipe = recipe_file(tmp_path, {"train": [{"path": "one.jsonl"}, {"path": "two.jsonl"}]},
                         max_steps=3, per_device_train_batch_size=2, logging_steps=1)
    first = run_cli_in_process("train", recipe, "-o", tmp_path / "run1",
                               env={"PEFTVLM_CACHE": data_cache})
    assert first.returncode == 0, first.stdout + first.stderr
    b = tmp_path / "b.png"
    stat = b.stat()
    b.write_bytes(b"\0" * stat.st_size)  # same size, undecodable
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (tmp_path / "c.png").unlink()
    second = run_cli_in_process("train", recipe, "-o", tmp_path / "run2",
                                env={"PEFTVLM_CACHE": data_cache})
    out = second.stdout + second.stderr
    assert second.returncode == 0, out
    assert "Traceback" not in out
    assert "cached rows of two.jsonl: 1 image(s) changed since it was cached" in out
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["global_step"] == 3
    assert [s["from_cache"] for s in summary["data"]["sources"]] == [True, False]
    bad = summary["data"]["bad_rows"]["train"]
    assert bad["missing_image"]["count"] == 1
    assert bad["missing_image"]["first_rows"][0].startswith(f"two.jsonl:{ROWS}")
    skipped = bad["unreadable_at_training"]
    assert skipped["count"] >= 1 and skipped["first_rows"][0].startswith("one.jsonl:")
    line = int(skipped["first_rows"][0].split(":")[1].split(" ")[0])
    assert (line - 1) % 4 != 0  # a b.png row
    assert "failed to open during training" in out
