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

from peftvlm.data.chat_template import render_conversations
from peftvlm.data.collate import ConversationCollator, encode_prompts
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
    from peftvlm.recipe import ModelConfig

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
    from peftvlm.recipe import ModelConfig

    processor = AutoProcessor.from_pretrained(tiny_model_path("tiny-llava"))
    processor.chat_template = processor.tokenizer.chat_template = None
    processor.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ModelError, match="'base-model' ships no chat template"):
        load_processor(str(tmp_path), ModelConfig(id="base-model"), FAMILIES["llava"])


# --- one render per row ----------------------------------------------------------------------

def reply(*texts):
    return {"role": "assistant", "content": [text(t) for t in texts]}


VARIED = [*CASES.values(),
          [user("Describe it."), reply("  a red circle  "), user("More?", images=0), reply("")],
          [user("Two parts?"), reply("first part.", " second part")],
          [user("Markup?"), reply("say <image> or </s> or <|im_end|> or ASSISTANT: here")],
          [user("Lines?"), reply("one\ntwo\n"), user("Again", images=0), reply("three")]]


@pytest.mark.parametrize("name", CHAT_FAMILIES + ["idefics3-8b"])
def test_one_render_gives_the_prefix_methods_text_and_spans(processors, name):
    """Whatever the family's template, the collator's renderer (one render per row where the
    template qualifies) gives exactly what prefix rendering gives, row by row and in a batch."""
    from peftvlm.data.chat_template import one_render_fit, render_by_prefixes

    spec, processor, _ = processors[name]
    fit = one_render_fit(processor, spec.end_of_turn)
    rows = []
    for conversation in VARIED:
        try:
            expected = render_by_prefixes(processor, [conversation], spec.end_of_turn)
        except Exception:  # e.g. a template that refuses a system turn
            continue
        assert render_conversations(processor, [conversation], spec.end_of_turn, fit) == expected
        rows.append((conversation, expected[0]))
    assert len(rows) >= len(VARIED) - 2
    batch = render_conversations(processor, [c for c, _ in rows], spec.end_of_turn, fit)
    assert batch == [r for _, r in rows]


def test_one_render_is_taken_by_verbatim_templates_and_refused_by_rewriting_ones(processors):
    from peftvlm.data.chat_template import _render_marked, one_render_fit

    spec, processor, _ = processors["llava"]
    fit = one_render_fit(processor, spec.end_of_turn)
    assert fit is not None and (fit.lead, fit.tail) == (" ", " ")
    # a row whose reply holds the template's own markup is rendered by prefixes
    assert not fit.allows(VARIED[-2]) and fit.allows(CASES["multi_turn"])
    assert not fit.allows([user("a \ue0000\ue001 b"), reply("c")])
    # the fast path alone (no fallback) on a plain multi-turn row: the prefix method's result
    assert _render_marked(processor, [CASES["multi_turn"]], spec.end_of_turn, fit) == \
        render_conversations(processor, [CASES["multi_turn"]], spec.end_of_turn)

    published = processor.chat_template
    rewrites = {"upper": ("content['text'] + ' '", "content['text'].upper() + ' '"),
                "trim": ("content['text'] + ' '", "content['text'] | trim + ' '"),
                "drop": ("content['text'] + ' '", "'x '")}
    try:
        for old, new in rewrites.values():
            assert old in published
            processor.chat_template = published.replace(old, new)
            assert one_render_fit(processor, spec.end_of_turn) is None, new
    finally:
        processor.chat_template = published
    # Gemma 3's published template trims every reply: it keeps the prefix method
    if "gemma3" in processors:
        gemma, gemma_processor, _ = processors["gemma3"]
        assert one_render_fit(gemma_processor, gemma.end_of_turn) is None


def test_collator_decides_the_fit_once_per_template(processors):
    spec, processor, _ = processors["qwen2_vl"]
    collator = ConversationCollator(processor, spec)
    collator([as_row(CASES["single_turn"])])
    collator([as_row(CASES["multi_turn"])])
    assert list(collator._fits.values()) != [None] and len(collator._fits) == 1
