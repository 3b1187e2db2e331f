"""Template shortcuts equal the reference, and templates whose generation prompt differs from the
in-conversation turn only in whitespace are trained on what inference renders.

- Llama 3.2 Vision's published template writes a system block before a text-only turn's
  prompt, but not once an image follows in the conversation: prefix rendering refuses such a
  row, and so must the per-shape shortcut (it used to accept it and train reply 1 on a prompt
  the model is never served).
- A template whose generation prompt is `assistant\\n` while the turn inside a conversation is
  `assistant \\n` (or with one newline more or fewer) trains the final reply after exactly the
  generation prompt; any other difference is refused naming the template and where the two
  renderings part.

Run: PYTHONPATH=. python -m pytest tests/test_template_shortcuts.py -q
"""

from __future__ import annotations

import logging

import pytest
from test_chat_templates import (CASES, as_row, assistant, load_tiny_processor, published_ids,
                                 trained_runs, user)

from peftvlm.data.batch.collate import ConversationCollator, encode_prompts
from peftvlm.data.prepare.lengths import collator_lengths, token_lengths
from peftvlm.data.render import shapes
from peftvlm.data.render.chat_template import render_by_prefixes
from peftvlm.errors import ModelError
from peftvlm.families import FAMILIES

TEXT_THEN_IMAGE = [user("Name a colour.", images=0), assistant("green"),
                   user("What color is the shape?"), assistant("red")]


@pytest.fixture(scope="module")
def mllama():
    return FAMILIES["mllama"], load_tiny_processor(FAMILIES["mllama"])


@pytest.fixture(scope="module")
def qwen():
    return FAMILIES["qwen2_vl"], load_tiny_processor(FAMILIES["qwen2_vl"])


def test_shortcut_refuses_the_mllama_row_prefix_rendering_refuses(mllama, monkeypatch):
    monkeypatch.setattr(shapes, "CHECKED_ROWS", 0)  # the shape's verdict alone decides
    spec, processor = mllama
    row = as_row(TEXT_THEN_IMAGE)
    with pytest.raises(ModelError) as reference:
        render_by_prefixes(processor, [TEXT_THEN_IMAGE], spec.end_of_turn)
    message = str(reference.value)
    assert "the chat template of '" in message and "tiny-mllama" in message
    assert "They part at character" in message and "system" in message
    renderer = shapes.ShapeRenderer(processor, spec.end_of_turn)
    with pytest.raises(ModelError, match="They part at character"):
        renderer.render([TEXT_THEN_IMAGE])
    assert list(renderer._shapes.values()) == [None]
    # the collator (labels) and the length counter refuse it alike
    collator = ConversationCollator(processor, spec)
    with pytest.raises(ModelError, match="tiny-mllama"):
        collator([row])
    with pytest.raises(ModelError, match="tiny-mllama"):
        token_lengths(collator, [row])
    # the other order is served as trained: image first, the system block never written
    image_first = TEXT_THEN_IMAGE[2:] + TEXT_THEN_IMAGE[:2]
    assert renderer.render([image_first]) == render_by_prefixes(processor, [image_first],
                                                                spec.end_of_turn)


# ChatML like Qwen's, with the assistant turn's header ending in GEN in the generation prompt
# and in TURN inside a conversation (as Jinja string literals: the renderer's `trim_blocks`
# would drop a newline written right after a tag).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] }}"
          "{% if m['role'] == 'assistant' %}{{ TURN }}{% else %}{{ '\\n' }}{% endif %}"
          "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
          "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% else %}{{ c['text'] }}"
          "{% endif %}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant' + GEN }}{% endif %}")
WHITESPACE_ONLY = {"space before newline": ("\n", " \n"),
                   "one newline more in the prompt": ("\n\n", "\n"),
                   "a trailing newline in the prompt": (" \n", " ")}


def chatml(gen, turn):
    return CHATML.replace("GEN", repr(gen)).replace("TURN", repr(turn))


@pytest.fixture
def templated(qwen):
    """The tiny Qwen2-VL processor with another chat template for one test."""
    spec, processor = qwen
    saved = processor.chat_template, processor.tokenizer.chat_template

    def use(template):
        processor.chat_template = processor.tokenizer.chat_template = template
        return spec, processor
    yield use
    processor.chat_template, processor.tokenizer.chat_template = saved


@pytest.mark.parametrize("case", sorted(WHITESPACE_ONLY))
def test_whitespace_only_difference_trains_on_what_inference_renders(templated, case, caplog,
                                                                     monkeypatch):
    template = chatml(*WHITESPACE_ONLY[case])
    spec, processor = templated(template)
    gen, turn = WHITESPACE_ONLY[case]
    with pytest.raises(AssertionError):  # the template really is not prefix-preserving
        full = processor.apply_chat_template(CASES["single_turn"], tokenize=False)
        assert full.startswith(processor.apply_chat_template(
            CASES["single_turn"][:1], tokenize=False, add_generation_prompt=True))

    for conversation in (CASES["single_turn"], CASES["multi_turn"]):
        with caplog.at_level(logging.WARNING, logger="peftvlm"):
            batch = ConversationCollator(processor, spec)([as_row(conversation)])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        runs = trained_runs(labels)
        assert len(runs) == 1  # earlier replies follow other whitespace than their own prompt
        (start, tokens), last = runs[0], len(conversation) - 1
        # the final reply follows exactly the generation prompt inference renders ...
        assert ids[:start] == published_ids(processor, template, conversation[:last])
        assert ids[:start] == encode_prompts(processor, spec, [as_row(conversation)])[
            "input_ids"][0].tolist()
        # ... and is the reply as the conversation writes it, with its stop token
        assert processor.tokenizer.decode(tokens) == \
            conversation[last]["content"][0]["text"] + "<|im_end|>"
    assert "earlier replies of multi-turn rows are not trained" in caplog.text

    # the shortcut gives the same, and the counted length is the collated one
    monkeypatch.setattr(shapes, "CHECKED_ROWS", 0)
    rows = [CASES["single_turn"], CASES["multi_turn"], CASES["text_only"]]
    expected = render_by_prefixes(processor, rows, spec.end_of_turn)
    assert shapes.ShapeRenderer(processor, spec.end_of_turn).render(rows) == expected
    collator = ConversationCollator(processor, spec)
    as_rows = [as_row(c) for c in rows]
    assert token_lengths(collator, as_rows) == collator_lengths(collator, as_rows)


def test_reply_that_starts_with_whitespace_keeps_it(templated):
    spec, processor = templated(chatml("\n", " \n"))
    conversation = [user("Pad?"), assistant("  two spaces")]
    rendered = render_by_prefixes(processor, [conversation], spec.end_of_turn)[0]
    context = processor.apply_chat_template(conversation[:1], tokenize=False,
                                            add_generation_prompt=True)
    assert rendered.text == context + "  two spaces<|im_end|>\n"
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["  two spaces<|im_end|>"]


@pytest.mark.parametrize("gen, turn", [(":\n", "\n"), ("\n", "_\n"),
                                       ("\n<think>\n\n</think>\n\n", "\n")])
def test_other_differences_are_refused_naming_the_template(templated, gen, turn):
    spec, processor = templated(chatml(gen, turn))
    with pytest.raises(ModelError) as error:
        ConversationCollator(processor, spec)([as_row(CASES["single_turn"])])
    message = str(error.value)
    assert "the chat template of '" in message and "tiny-qwen2-vl" in message
    assert "They part at character" in message
    # the first differing characters, as the prompt and as the conversation writes them
    assert repr("assistant" + gen)[1:-1] in message
    assert repr("assistant" + turn)[1:-1] in message


def test_a_template_that_raises_is_our_error_naming_it(mllama):
    spec, processor = mllama
    conversation = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                    *CASES["single_turn"]]
    with pytest.raises(ModelError, match="tiny-mllama.*refuses a conversation: Prompting "
                                         "with images is incompatible with system messages"):
        ConversationCollator(processor, spec)([as_row(conversation)])


def test_data_preview_of_a_row_the_template_cannot_train_says_why(tmp_path, cli_in_process):
    """The user's path: `peftvlm data preview` on a Llama 3.2 Vision recipe whose row has a
    text-only turn before an image turn stops with our one-paragraph error, no traceback."""
    import json

    import yaml
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "red.png")
    row = {"messages": [{"role": "user", "content": "Name a colour."},
                        {"role": "assistant", "content": "green"},
                        {"role": "user", "content": "<image>What color is the shape?"},
                        {"role": "assistant", "content": "red"}], "images": ["red.png"]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "r", "model": {"id": "tiny-mllama"}, "method": {"name": "lora", "r": 4},
        "data": {"train": "rows.jsonl"}, "train": {"max_length": 256}}))
    shown = cli_in_process("data", "preview", recipe, "-n", "1")
    said = " ".join((shown.stdout + shown.stderr).split())
    assert shown.returncode == 2 and "Traceback" not in said, said
    assert "the chat template of '" in said and "tiny-mllama" in said
    assert "They part at character" in said and "system" in said
