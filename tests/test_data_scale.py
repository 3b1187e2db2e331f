"""Data at scale: the Arrow cache (nothing lost, nothing executed, no per-row work when warm),
token lengths as a cached column, over-long rows named by file:line."""

from __future__ import annotations

import json
import pickle

import pytest
from data_helpers import data_cache, llava_collator, save_image  # noqa: F401

from peftvlm.data.prepare.loading import (CACHE_MIN_ROWS, drop_overflowing, load_source,
                                          prepared_cache_dir)
from peftvlm.errors import DataError
from peftvlm.families import FAMILIES
from peftvlm.recipe.schema import DataConfig, SourceConfig


def conversation_row(i: int, image="a.png") -> str:
    question = "What color is the shape?" + " Look closely." * (i % 7)
    return json.dumps({"images": [image], "messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": ["red", "green", "blue"][i % 3]}]})


def write_rows(folder, n: int, bad_at=(3,), long_at=(10,)) -> str:
    save_image(folder / "a.png")
    lines = []
    for i in range(n):
        if i in bad_at:
            lines.append(conversation_row(i, image="gone.png"))
        elif i in long_at:
            lines.append(conversation_row(0).replace("What color", "What color " + "x " * 300))
        else:
            lines.append(conversation_row(i))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return "train.jsonl"


def masks(collator, rows) -> list[list[int]]:
    batch = collator(rows)
    return [[int(t) for t, a in zip(ids, att) if a] for ids, att in
            zip(batch["labels"], batch["attention_mask"])]


class Payload:
    """Unpickling this writes a marker file: proof that a cache read executed code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cache_loses_nothing_and_a_warm_start_counts_no_row(tmp_path, data_cache,
                                                            llava_collator, monkeypatch):
    path = write_rows(tmp_path, CACHE_MIN_ROWS + 20)
    src = SourceConfig(path=path)
    cold = load_source(src, DataConfig(cache=True), tmp_path, collator=llava_collator)
    plain = load_source(src, DataConfig(cache=False), tmp_path, collator=llava_collator)
    from peftvlm.data.prepare import lengths

    def no_counting(*args, **kwargs):
        raise AssertionError("a warm start counted tokens")

    monkeypatch.setattr(lengths.BatchCounter, "__call__", no_counting)
    warm = load_source(src, DataConfig(cache=True), tmp_path, collator=llava_collator)
    assert not cold.cached and warm.cached and not plain.cached
    assert warm.rows.row_ids == plain.rows.row_ids == cold.rows.row_ids
    assert warm.rows.row_ids[:4] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3",
                                     "train.jsonl:5"]  # line 4 is the bad row
    assert warm.report.as_dict() == plain.report.as_dict()
    assert dict(warm.report.counts) == {"missing_image": 1}
    assert warm.rows.lengths().tolist() == plain.rows.lengths().tolist()
    # the Arrow round trip returns exactly what the renderer made
    from peftvlm.data.prepare.loading import MessagesRenderer, render_chunk
    from peftvlm.data.read.readers import read_jsonl

    direct, _ = render_chunk(MessagesRenderer(tmp_path), read_jsonl(tmp_path / path))
    assert list(warm.rows) == direct
    picked = [0, 1, 8, 9, 500, len(plain.rows) - 1]
    assert masks(llava_collator, [warm.rows[i] for i in picked]) == \
        masks(llava_collator, [plain.rows[i] for i in picked])
    # the lengths column is the collator's real count
    assert [int(warm.rows.lengths()[i]) for i in picked] == \
        lengths.collator_lengths(llava_collator, [warm.rows[i] for i in picked])


def test_a_planted_cache_payload_does_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTVLM_CACHE", str(tmp_path / "cache"))
    path = write_rows(tmp_path, CACHE_MIN_ROWS)
    src, cfg = SourceConfig(path=path), DataConfig(cache=True)
    first_ids = load_source(src, cfg, tmp_path).rows.row_ids
    [folder] = prepared_cache_dir().iterdir()
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    for victim in [folder / "meta.json", *sorted(folder.glob("*.arrow"))]:
        victim.unlink()  # a new file, as an attacker would write it (the old one is mapped)
        victim.write_bytes(payload)
    (folder.parent / f"{folder.name}.pkl").write_bytes(payload)  # where the old cache read
    again = load_source(src, cfg, tmp_path)
    assert not marker.exists()
    assert not again.cached and again.rows.row_ids == first_ids  # rebuilt, not trusted
    assert load_source(src, cfg, tmp_path).cached and not marker.exists()  # and repaired


def test_over_long_rows_are_named_by_their_source_line(tmp_path, llava_collator):
    path = write_rows(tmp_path, 12, bad_at=(1, 2), long_at=(6,))
    rows = load_source(SourceConfig(path=path), DataConfig(cache=False), tmp_path,
                       collator=llava_collator).rows
    kept, info = drop_overflowing(rows, 200, "drop", "data.train")
    assert info["count"] == 1 and info["first_rows"][0].startswith("train.jsonl:7 (")
    assert len(kept) == 9 and "train.jsonl:7" not in kept.row_ids
    with pytest.raises(DataError, match=r"1 row\(s\) exceed train.max_length=200: train\.jsonl:7"):
        drop_overflowing(rows, 200, "error", "data.train")


@pytest.mark.parametrize("name", [s.tiny_name for s in FAMILIES.values()
                                  if s.kind == "generative" and s.tiny_name])
def test_counted_lengths_equal_the_collators_for_every_family(name, tmp_path):
    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.data.prepare.lengths import collator_lengths, token_lengths
    from peftvlm.models import load_processor_only
    from peftvlm.recipe.schema import ModelConfig

    processor, family = load_processor_only(ModelConfig(id=name))
    collator = ConversationCollator(processor, family)
    save_image(tmp_path / "b.png", size=(64, 48))
    write_rows(tmp_path, 6, bad_at=(), long_at=(4,))
    rows = list(load_source(SourceConfig(path="train.jsonl"), DataConfig(cache=False),
                            tmp_path).rows)
    rows[2]["images"] = [str(tmp_path / "b.png")]  # a second image size
    collator(rows[:2])  # the processor now has padding switched on, as during training
    assert token_lengths(collator, rows) == collator_lengths(collator, rows)
