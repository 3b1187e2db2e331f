"""A family's own image/video tokens typed in a row's text (`<|image_pad|>`, `<start_of_image>`,
`<fake_token_around_image>`...) are counted bad rows named by `file:line`, for every generative
family of the registry (processor only, no model forward); where the family's own token is
`<image>`, the `<image>` placeholder keeps working and is counted once."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from data_helpers import data_cache, save_image  # noqa: F401
from peftvlm.data.prepare.loading import load_rows
from peftvlm.errors import DataError
from peftvlm.families import FAMILIES
from peftvlm.recipe.load import validate_recipe_dict

GENERATIVE = [name for name, spec in FAMILIES.items()
              if spec.kind == "generative" and spec.tiny_name]
PLACEHOLDERS = ("<image>", "<video>")  # cut out of the text by the row formats


@pytest.fixture(scope="module")
def collator_of(data_cache):  # noqa: F811
    """family name -> the trainer's collator on its tiny twin's processor (built once)."""
    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.models import load_processor_only
    from peftvlm.recipe.schema import ModelConfig

    made = {}

    def get(family: str):
        if family not in made:
            processor, spec = load_processor_only(ModelConfig(id=FAMILIES[family].tiny_name))
            made[family] = ConversationCollator(processor, spec)
        return made[family]
    return get


def recipe(folder, family, train="m.jsonl", **data):
    r = validate_recipe_dict({"name": "t", "model": {"id": FAMILIES[family].tiny_name},
                              "method": {"name": "lora"}, "data": {"train": train, **data},
                              "train": {"max_length": 4096}})
    r.source_path = folder / "r.yaml"
    return r


def row(text, image="img/a.png", answer="red"):
    return {"messages": [{"role": "user", "content": text},
                         {"role": "assistant", "content": answer}],
            **({"images": [image]} if image else {})}


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def ids_of(collator, one_row) -> list[int]:
    return collator([one_row])["input_ids"][0].tolist()


@pytest.mark.parametrize("family", GENERATIVE)
def test_the_spec_names_every_media_token_its_processor_writes(family, tmp_path, collator_of):
    """The special tokens in an image (or video) row's ids that a text-only row lacks are all
    in the spec's list: the list is checked against the processor, not kept by hand."""
    collator = collator_of(family)
    tokenizer = collator.processor.tokenizer
    save_image(tmp_path / "img" / "a.png", (32, 32))
    rows = [row("<image>What colour?")]
    if collator.family.takes_video:
        for i in range(2):
            save_image(tmp_path / "clip" / f"{i}.png", (32, 32))
        rows.append({**row("<video>What colour?", image=None), "videos": ["clip"]})
    write_jsonl(tmp_path / "m.jsonl", rows)
    data = load_rows(recipe(tmp_path, family), collator.family.box_format, collator)
    assert not data.bad_rows["train"] and len(data.train) == len(rows)
    text_only = {**data.train[0], "images": [],
                 "messages": [{"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
                              data.train[0]["messages"][1]]}
    try:
        baseline = set(ids_of(collator, text_only))
    except DataError:  # PaliGemma takes no text-only row: its only other specials are these
        baseline = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    written = {i for r in data.train for i in ids_of(collator, r)}
    written = (written & set(tokenizer.added_tokens_decoder)) - baseline
    tokens = set(tokenizer.convert_ids_to_tokens(sorted(written)))
    assert collator.family.image_token in tokens
    assert tokens <= set(collator.family.literal_media_tokens()), family


@pytest.mark.parametrize("family", GENERATIVE)
def test_typed_media_tokens_are_bad_rows_named_by_line(family, tmp_path, collator_of):
    collator = collator_of(family)
    spec = collator.family
    save_image(tmp_path / "img" / "a.png", (32, 32))
    typed = [t for t in spec.literal_media_tokens() if t not in PLACEHOLDERS]
    good = row("<image>What colour?")
    write_jsonl(tmp_path / "m.jsonl",
                [good, *(row(f"<image>What {t} colour?") for t in typed), good])
    data = load_rows(recipe(tmp_path, family), spec.box_format, collator)
    assert len(data.train) == 2
    if not typed:  # its only media token is the `<image>` placeholder itself (llava...)
        assert not data.bad_rows["train"]
    else:
        bad = data.bad_rows["train"]["media_token_in_text"]
        assert bad["count"] == len(typed)
        for line, (token, named) in enumerate(zip(typed, bad["first_rows"]), start=2):
            assert named.startswith(f"m.jsonl:{line} (`{token}` typed in user text is "
                                    f"{spec.name}'s own image/video token"), named
            assert "`<image>` placeholder" in named
    # The `<image>` placeholder is the image, counted once (also where it is the family's
    # token): the kept row encodes exactly like an image item.
    question = [{"type": "image"}, {"type": "text", "text": "What colour?"}]
    native = {"messages": [{"role": "user", "content": question},
                           {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
              "images": data.train[0]["images"]}
    assert ids_of(collator, data.train[0]) == ids_of(collator, native)


def test_typed_tokens_in_held_out_rows_stats_and_the_error_policy(tmp_path, collator_of):
    from peftvlm.data.report import print_stats, stats

    collator = collator_of("qwen2_vl")
    save_image(tmp_path / "img" / "a.png", (32, 32))
    write_jsonl(tmp_path / "m.jsonl", [row("<image>Q"), row("<|vision_start|><|image_pad|>"
                                                            "<|vision_end|>Q")])
    write_jsonl(tmp_path / "e.jsonl", [row("Q <|image_pad|>"), row("<image>Q")])
    data = load_rows(recipe(tmp_path, "qwen2_vl", eval="e.jsonl"), "abs1000", collator)
    assert len(data.train) == 1 and len(data.eval) == 1
    assert data.bad_rows["eval"]["media_token_in_text"]["first_rows"][0].startswith(
        "e.jsonl:1 (`<|image_pad|>` typed in user text")
    assert data.bad_rows["train"]["media_token_in_text"]["first_rows"][0].startswith(
        "m.jsonl:2 (`<|vision_start|>`")
    console = Console(record=True, width=300)
    print_stats(stats(recipe(tmp_path, "qwen2_vl"), tmp_path / "h.png"), console)
    assert "bad rows (train) media_token_in_text: 1, e.g. m.jsonl:2 (`<|vision_start|>`" in \
        console.export_text()
    with pytest.raises(DataError, match=r"1 bad row\(s\): 1 media token in text \(e\.g\. "
                                        r"m\.jsonl:2 \(`<\|vision_start\|>`"):
        load_rows(recipe(tmp_path, "qwen2_vl", on_bad_row="error"), "abs1000", collator)


def test_a_cached_source_drops_the_same_rows_warm_and_counts_lengths(tmp_path, collator_of):
    """A source large enough for the preparation cache: the warm start (rows memory-mapped)
    finds the same typed token, and the kept rows' lengths are the collator's."""
    from peftvlm.data.prepare.lengths import collator_lengths
    from peftvlm.data.prepare.loading import CACHE_MIN_ROWS, load_source
    from peftvlm.recipe.schema import DataConfig, SourceConfig

    collator = collator_of("qwen2_vl")
    save_image(tmp_path / "img" / "a.png", (32, 32))
    rows = [row(f"<image>Question {i}?") for i in range(CACHE_MIN_ROWS)]
    rows[500] = row("<image>Question <|video_pad|>?")
    write_jsonl(tmp_path / "m.jsonl", rows)
    src, cfg = SourceConfig(path="m.jsonl"), DataConfig(cache=True)
    cold = load_source(src, cfg, tmp_path, "abs1000", collator)
    warm = load_source(src, cfg, tmp_path, "abs1000", collator)
    assert warm.cached and not cold.cached
    for loaded in (cold, warm):
        assert len(loaded.rows) == CACHE_MIN_ROWS - 1 and "m.jsonl:501" not in loaded.rows.row_ids
        assert loaded.report.examples["media_token_in_text"][0].startswith("m.jsonl:501 (")
    assert warm.rows.lengths().tolist()[498:502] == collator_lengths(collator, warm.rows[498:502])
