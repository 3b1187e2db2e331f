"""The checkpoint's own chat template is the source of truth: parity with published templates.

For every family with a chat template (derived from the registry), the tokens the model is shown
by peftvlm (the eval prompt, and the context before each trained reply) equal those the
checkpoint's published template renders (tests/fixtures/chat_templates/, see SOURCES.md), for a
single turn, several turns, a system prompt, two images in one turn and a text-only turn; and
exactly the replies (with the end-of-turn token) carry loss.

Run: PYTHONPATH=. python -m pytest tests/test_chat_templates.py -q
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from peftvlm.data.batch.collate import ConversationCollator, encode_prompts
from peftvlm.data.render.chat_template import render_conversations
from peftvlm.errors import ModelError
from peftvlm.families import FAMILIES
from peftvlm.families.base import TEMPLATES_DIR, read_template

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
CHAT_FAMILIES = sorted(n for n, s in FAMILIES.items()
                       if s.kind == "generative" and s.encode is None and s.tiny_name)


def fixture_template(checkpoint: str) -> str:
    return (FIXTURES / f"{checkpoint.split('/')[-1]}.jinja").read_text(encoding="utf-8")


# --- conversations ---------------------------------------------------------------------------

def image(colour=(255, 0, 0)):
    return Image.new("RGB", (32, 32), colour)


def text(t):
    return {"type": "text", "text": t}


def user(question, images=1):
    return {"role": "user", "content": [{"type": "image", "image": image()}] * images
            + [text(question)]}


def assistant(answer):
    return {"role": "assistant", "content": [text(answer)]}


CASES = {
    "single_turn": [user("What color is the shape?"), assistant("red")],
    "multi_turn": [user("What color is the shape?"), assistant("red"),
                   user("Which shape is it?", images=0), assistant("circle"),
                   user("Is it large?", images=0), assistant("no")],
    "system_prompt": [{"role": "system", "content": [text("Answer in one word.")]},
                      user("What color is the shape?"), assistant("blue")],
    "two_images": [user("Are the shapes the same colour?", images=2), assistant("yes")],
    "text_only": [user("Name a colour.", images=0), assistant("green")],
}


def as_row(conversation):
    """A dataset row: image items become placeholders, the images a separate list."""
    images = [c["image"] for m in conversation for c in m["content"] if c["type"] == "image"]
    messages = [{"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else c
                                                for c in m["content"]]} for m in conversation]
    return {"messages": messages, "images": images}


# --- processors ------------------------------------------------------------------------------

def load_tiny_processor(spec):
    from transformers import AutoProcessor

    from peftvlm.models import tiny_model_path

    loader = spec.processor_class() if spec.processor_class else AutoProcessor
    return loader.from_pretrained(tiny_model_path(spec.tiny_name))


@pytest.fixture(scope="module")
def processors():
    """(family spec, processor, published template) per checkpoint a test stands for."""
    out = {name: (FAMILIES[name], load_tiny_processor(FAMILIES[name]),
                  fixture_template(FAMILIES[name].reference_checkpoint))
           for name in CHAT_FAMILIES}
    out["idefics3-8b"] = idefics3_8b_processor()
    return out


def idefics3_8b_processor():
    """HuggingFaceM4/Idefics3-8B-Llama3 as the smolvlm family meets it: the tiny SmolVLM's
    processor with a Llama-3 BOS and the template Idefics3-8B publishes."""
    spec = FAMILIES["smolvlm"]
    processor = load_tiny_processor(spec)
    processor.tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    template = fixture_template("HuggingFaceM4/Idefics3-8B-Llama3")
    processor.chat_template = processor.tokenizer.chat_template = template
    return spec, processor, template


def published_ids(processor, template, conversation, generation_prompt=True):
    """Token ids of `conversation` as the published template renders them (transformers)."""
    processor.tokenizer.padding_side = "right"
    batch = processor.apply_chat_template(
        conversation, chat_template=template, add_generation_prompt=generation_prompt,
        tokenize=True, return_dict=True, return_tensors="np")
    return batch["input_ids"][0].tolist()


def trained_runs(labels):
    """(start position, token ids) of each contiguous run of trained labels."""
    runs, start = [], None
    for pos, token in enumerate(labels + [-100]):
        if token != -100 and start is None:
            start = pos
        elif token == -100 and start is not None:
            runs.append((start, labels[start:pos]))
            start = None
    return runs


# --- the published templates -----------------------------------------------------------------

def test_every_tiny_twin_carries_its_checkpoints_published_template(processors):
    for name in CHAT_FAMILIES:
        spec, processor, published = processors[name]
        assert processor.chat_template == published, name
        assert processor.tokenizer.chat_template == published, name


def test_shipped_copies_equal_the_fixtures():
    """peftvlm/families/templates/ holds byte-identical copies of the published templates."""
    copies = {"llava-1.5": "llava-1.5-7b-hf", "qwen2-vl": "Qwen2-VL-2B-Instruct",
              "smolvlm": "SmolVLM-256M-Instruct", "idefics3": "Idefics3-8B-Llama3"}
    for copy, checkpoint in copies.items():
        assert read_template(copy) == fixture_template(checkpoint), copy
    assert fixture_template("Qwen/Qwen2-VL-2B-Instruct") == fixture_template(
        "Qwen/Qwen2.5-VL-3B-Instruct")
    documented = (FIXTURES / "SOURCES.md").read_text()
    for path in FIXTURES.glob("*.jinja"):
        assert f"`{path.name}`" in documented, f"{path.name} has no source in SOURCES.md"
    assert {p.name for p in TEMPLATES_DIR.glob("*.jinja")} >= {f"{c}.jinja" for c in copies}


# --- parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", CHAT_FAMILIES + ["idefics3-8b"])
def test_training_contexts_and_prompts_equal_the_published_template(processors, name, case):
    spec, processor, published = processors[name]
    conversation = CASES[case]
    if spec.row_problem(as_row(conversation)["messages"]):  # declared in the spec, dropped as
        pytest.skip(f"{name} refuses {case} rows by its spec")  # bad rows (test_families_2026)
    replies = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    batch = ConversationCollator(processor, spec)([as_row(conversation)])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()

    runs = trained_runs(labels)
    assert len(runs) == len(replies)
    for (start, tokens), i in zip(runs, replies):
        # the context before each trained reply is what the published template shows
        assert ids[:start] == published_ids(processor, published, conversation[:i])
        # and exactly that reply carries loss (its end-of-turn token too, where one is written)
        reply = processor.tokenizer.decode(tokens).strip()
        answer = conversation[i]["content"][0]["text"]
        assert reply in (answer, answer + spec.end_of_turn)
    # the last reply always ends with the stop token, so the model learns to stop
    assert processor.tokenizer.decode(runs[-1][1]).strip() == (
        conversation[-1]["content"][0]["text"] + spec.end_of_turn)

    # the eval prompt (all turns before the last answer) is the published inference prompt
    prompt = encode_prompts(processor, spec, [as_row(conversation)])["input_ids"][0].tolist()
    assert prompt == published_ids(processor, published, conversation[:replies[-1]])


def test_idefics3_8b_prompts_start_as_its_published_template(processors):
    """Not with SmolVLM's `<|im_start|>` (not a Llama-3 token): with `<|begin_of_text|>`."""
    spec, processor, _ = processors["idefics3-8b"]
    row = as_row(CASES["single_turn"])
    tokenizer = processor.tokenizer
    for ids in (ConversationCollator(processor, spec)([row])["input_ids"][0].tolist(),
                encode_prompts(processor, spec, [row])["input_ids"][0].tolist()):
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
        assert ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, none added twice
        assert tokenizer.decode(ids).startswith("<|begin_of_text|>User:")
        assert "<|im_start|>" not in tokenizer.decode(ids)


def test_llava_history_follows_the_published_template(processors):
    """llava-1.5's template writes no `</s>` after earlier answers: neither does training; only
    the final reply is followed by `</s>` (appended, trained) so the model learns to stop."""
    spec, processor, _ = processors["llava"]
    rendered = render_conversations(processor, [as_row(CASES["multi_turn"])["messages"]],
                                    spec.end_of_turn)[0]
    assert "ASSISTANT: red USER: Which shape is it? ASSISTANT: circle USER:" in rendered.text
    assert rendered.text.endswith("ASSISTANT: no</s>") and rendered.text.count("</s>") == 1
    assert [rendered.text[a:b] for a, b in rendered.spans] == [" red", " circle", " no</s>"]


def test_mixed_batch_of_image_and_text_only_rows(processors):
    """A text-only row batched with image rows keeps its own labels and no image tokens."""
    for name in CHAT_FAMILIES:
        spec, processor, _ = processors[name]
        if spec.images_per_row:  # BLIP-2: exactly one image per row, by its spec
            continue
        rows = [as_row(CASES["text_only"]), as_row(CASES["two_images"])]
        batch = ConversationCollator(processor, spec)(rows)
        alone = ConversationCollator(processor, spec)(rows[:1])
        n = int(alone["attention_mask"][0].sum())
        assert batch["input_ids"][0, :n].tolist() == alone["input_ids"][0].tolist(), name
        assert batch["labels"][0, :n].tolist() == alone["labels"][0].tolist(), name


# --- deviations as data, and templates that cannot be used -----------------------------------

def test_family_template_file_replaces_the_checkpoints_and_is_saved(tmp_path):
    """A family's `chat_template` file is what the processor renders, and what it saves."""
    from transformers import AutoProcessor

    from peftvlm.models import load_processor, tiny_model_path
    from peftvlm.recipe.schema import ModelConfig

    spec = dataclasses.replace(FAMILIES["smolvlm"], chat_template="idefics3")
    processor = load_processor(str(tiny_model_path("tiny-smolvlm")), ModelConfig(id="x"), spec)
    assert processor.chat_template == read_template("idefics3")
    processor.save_pretrained(tmp_path)  # what a run saves beside its adapter, and exports
    assert AutoProcessor.from_pretrained(tmp_path).chat_template == read_template("idefics3")


def test_template_that_is_not_prefix_preserving_is_refused(processors):
    spec, shared, _ = processors["qwen2_vl"]
    saved = shared.chat_template
    # the generation prompt says "A:" but assistant turns render as "Assistant:"
    shared.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: "
                            "{% else %}User: {% endif %}{{ m['content'][0]['text'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}A:{% endif %}")
    try:
        with pytest.raises(ModelError, match="prefix"):
            ConversationCollator(shared, spec)([as_row(CASES["text_only"])])
    finally:
        shared.chat_template = saved


def test_processor_without_a_template_is_a_clear_error(processors):
    spec, shared, _ = processors["qwen2_vl"]
    saved = shared.chat_template, shared.tokenizer.chat_template
    shared.chat_template = shared.tokenizer.chat_template = None
    try:
        with pytest.raises(ModelError, match="no chat template"):
            ConversationCollator(shared, spec)([as_row(CASES["text_only"])])
    finally:
        shared.chat_template, shared.tokenizer.chat_template = saved


def test_loading_a_checkpoint_without_a_template_names_it(tmp_path):
    from transformers import AutoProcessor

    from peftvlm.models import load_processor, tiny_model_path
    from peftvlm.recipe.schema import ModelConfig

    processor = AutoProcessor.from_pretrained(tiny_model_path("tiny-llava"))
    processor.chat_template = processor.tokenizer.chat_template = None
    processor.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ModelError, match="'base-model' ships no chat template"):
        load_processor(str(tmp_path), ModelConfig(id="base-model"), FAMILIES["llava"])


# --- one layout per conversation shape ----------------------------------------------------

def reply(*texts):
    return {"role": "assistant", "content": [text(t) for t in texts]}


VARIED = [*CASES.values(),
          [user("Describe it."), reply("  a red circle  "), user("More?", images=0), reply("")],
          [user("Two parts?"), reply("first part.", " second part")],
          [user("Markup?"), reply("say <image> or </s> or <|im_end|> or ASSISTANT: here")],
          [user("Lines?"), reply("one\ntwo\n"), user("Again", images=0), reply("three")]]


@pytest.mark.parametrize("name", CHAT_FAMILIES + ["idefics3-8b"])
def test_shape_layouts_give_the_prefix_methods_text_and_spans(processors, name, monkeypatch):
    """Whatever the family's template, the collator's renderer (one layout per conversation
    shape where proven) gives exactly what prefix rendering gives, row by row and in a batch,
    even with no row of a shape checked against the reference."""
    from peftvlm.data.render import shapes
    from peftvlm.data.render.chat_template import render_by_prefixes

    monkeypatch.setattr(shapes, "CHECKED_ROWS", 0)
    spec, processor, _ = processors[name]
    rows = []
    for conversation in VARIED:
        try:
            expected = render_by_prefixes(processor, [conversation], spec.end_of_turn)
        except ModelError:  # e.g. a template that refuses a system turn next to an image
            continue
        renderer = shapes.ShapeRenderer(processor, spec.end_of_turn)
        assert renderer.render([conversation]) == expected
        rows.append((conversation, expected[0]))
    assert len(rows) >= len(VARIED) - 2
    renderer = shapes.ShapeRenderer(processor, spec.end_of_turn)
    assert renderer.render([c for c, _ in rows]) == [r for _, r in rows]
    assert renderer.texts([c for c, _ in rows]) == [r.text for _, r in rows]


def test_shape_layouts_are_taken_by_verbatim_templates_and_refused_by_rewriting_ones(
        processors, monkeypatch):
    from peftvlm.data.render import chat_template, shapes

    spec, processor, _ = processors["llava"]
    renderer = shapes.ShapeRenderer(processor, spec.end_of_turn)
    renderer.render([CASES["multi_turn"]])
    assert list(renderer._shapes.values()) != [None]
    # a row whose texts hold the template's own markup is rendered by prefixes
    assert not renderer.inert(VARIED[-2][1]["content"][0]["text"])
    assert not renderer.inert("a \x000\x00 b") and not renderer.inert("  ")
    assert renderer.inert("What color is the shape?")

    # a proven shape costs no template render per row, once its first rows were checked
    renderer.render([CASES["multi_turn"]] * shapes.CHECKED_ROWS)
    calls = []
    real = chat_template.render_texts
    monkeypatch.setattr(shapes, "render_by_prefixes", lambda *a: calls.append(a) or
                        chat_template.render_by_prefixes(*a))
    monkeypatch.setattr(chat_template, "render_texts", lambda *a, **k: calls.append(a) or
                        real(*a, **k))
    again = [[user(f"Q{n}?"), assistant(f"A{n}"), user("More?", images=0), assistant("x"),
              user("Big?", images=0), assistant("no")] for n in range(5)]
    renderer.render(again)
    assert calls == []

    published = processor.chat_template
    rewrites = {"upper": ("content['text'] + ' '", "content['text'].upper() + ' '"),
                "drop": ("content['text'] + ' '", "'x '")}
    try:
        for old, new in rewrites.values():
            assert old in published
            processor.chat_template = published.replace(old, new)
            fresh = shapes.ShapeRenderer(processor, spec.end_of_turn)
            fresh.render([CASES["multi_turn"]])
            assert list(fresh._shapes.values()) == [None], new
        # a template that trims every text (llava trims questions; here replies too) keeps
        # its layout, filled with stripped texts: the reference's result on padded replies
        processor.chat_template = published.replace("content['text'] + ' '",
                                                    "content['text'] | trim + ' '")
        padded = [user(" Padded? "), reply("  a red circle \n"), user("More?", images=0),
                  reply(" yes ")]
        monkeypatch.setattr(shapes, "CHECKED_ROWS", 0)
        trimmed = shapes.ShapeRenderer(processor, spec.end_of_turn)
        assert trimmed.render([padded]) == chat_template.render_by_prefixes(
            processor, [padded], spec.end_of_turn)
        assert list(trimmed._shapes.values())[0].strip
    finally:
        processor.chat_template = published


def test_collator_keeps_one_shape_renderer_per_template(processors):
    spec, processor, _ = processors["qwen2_vl"]
    collator = ConversationCollator(processor, spec)
    collator([as_row(CASES["single_turn"])])
    collator([as_row(CASES["multi_turn"])])
    assert len(collator._shapes) == 1
    assert all(v is not None for v in collator.shapes()._shapes.values())


# --- mixed text-only and image turns ---------------------------------------------------------

SYSTEM = {"role": "system", "content": [text("Answer in one word.")]}
MIXED = {
    "text_then_image": [user("Name a colour.", images=0), assistant("green"),
                        user("What color is the shape?"), assistant("red")],
    "image_then_text": [user("What color is the shape?"), assistant("red"),
                        user("Name a colour.", images=0), assistant("green")],
}
MIXED.update({f"system_{k}": [SYSTEM, *v] for k, v in list(MIXED.items())})


def published_text(processor, template, conversation, generation_prompt):
    return processor.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def published_contexts_are_prefixes(processor, template, conversation) -> bool:
    """Whether the published template shows each reply's context as the whole conversation
    writes it (else no single training text can hold what a served model is shown)."""
    full = published_text(processor, template, conversation, False)
    return all(full.startswith(published_text(processor, template, conversation[:i], True))
               for i, m in enumerate(conversation) if m["role"] == "assistant")


@pytest.mark.parametrize("case", sorted(MIXED))
@pytest.mark.parametrize("name", CHAT_FAMILIES + ["idefics3-8b"])
def test_mixed_turns_train_on_the_published_contexts(processors, name, case, monkeypatch):
    """Text-only and image turns in both orders, with and without a system prompt: the ids
    before each trained reply are the published template's, taken from the shape's layout
    alone (no row checked against the reference); where the published template refuses the
    conversation, the error is ours and names the template."""
    from peftvlm.data.render import shapes
    from peftvlm.data.render.chat_template import render_by_prefixes

    monkeypatch.setattr(shapes, "CHECKED_ROWS", 0)
    spec, processor, published = processors[name]
    conversation = MIXED[case]
    row = as_row(conversation)
    try:
        batch = ConversationCollator(processor, spec)([row])
    except ModelError as error:
        message = str(error)
        assert "chat template of" in message and "tiny" in message, message
        if spec.row_problem(row["messages"]):  # dropped as a bad row when data is loaded
            assert "refuses a conversation" in message
        else:
            assert not published_contexts_are_prefixes(processor, published, conversation)
            assert "They part at character" in message
        with pytest.raises(ModelError):
            render_by_prefixes(processor, [conversation], spec.end_of_turn)
        return
    assert published_contexts_are_prefixes(processor, published, conversation)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    replies = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    runs = trained_runs(labels)
    assert len(runs) == len(replies)
    rendered = ConversationCollator(processor, spec).render([conversation])[0]
    for (start, tokens), i, (span, _) in zip(runs, replies, rendered.spans):
        assert rendered.text[:span] == published_text(processor, published, conversation[:i],
                                                      True)
        # BLIP-2's processor puts the row's one image (its query tokens) before the whole text
        if not spec.images_per_row:
            assert ids[:start] == published_ids(processor, published, conversation[:i])
        answer = conversation[i]["content"][0]["text"]
        assert processor.tokenizer.decode(tokens).strip() in (answer, answer + spec.end_of_turn)
