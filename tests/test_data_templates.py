"""Data templates: golden renders, loss masks on tiny LLaVA, seeding, boxes, options, CLI."""

from __future__ import annotations

import pytest
from data_helpers import data_cache, llava_collator, recipe_file, run_cli, save_image  # noqa: F401

from peftvlm.data.boxes import box_text, clip_box, format_box, read_box
from peftvlm.data.render.templates import (TemplateRenderer, builtin_templates, clip_prompts,
                                           load_template, merged_options, select_answers)
from peftvlm.data.rows import BadRow
from peftvlm.errors import DataError, RecipeError

RECORDS = {
    "caption": {"image": "a.png", "captions": ["a red square", "a red square on grey"]},
    "vqa": {"image": "a.png", "question": "What color is it?",
            "answers": [{"answer": "red"}] * 6 + [{"answer": "pink"}] * 4},
    "doc_qa": {"image": "a.png", "question": "What is the total?", "answers": ["42", "42.0"]},
    "multiple_choice": {"image": "a.png", "question": "Which color?",
                        "options": ["blue", "red", "green"], "answer": 1},
    "grounding": {"image": "a.png", "expression": "the red square", "box": [10, 5, 50, 15]},
    "classification": {"image": "a.png", "label": "golden_retriever"},
}
SUFFIX = "\nAnswer the question using a single word or phrase."
GOLDEN = {  # (user text, assistant text) per conversation, seed 0, row id "row1", salt "src"
    "caption": [[("Render a clear and concise summary of the photo.", "a red square on grey")]],
    "vqa": [[("Based on the image, respond to this question. What color is it?" + SUFFIX,
              "red")]],
    "doc_qa": [[("Extract the answer from the image: What is the total?" + SUFFIX, "42")]],
    "multiple_choice": [[("Answer the multiple-choice question about the picture. Which color?"
                          "\nA. blue\nB. red\nC. green\nAnswer with the option's letter from "
                          "the given choices directly.", "B")]],
    "grounding": [[("Which region shows the red square? Give its bounding box.",
                    "[0.25, 0.25, 1.00, 0.75]")],
                  [("Describe the region [0.25, 0.25, 1.00, 0.75] briefly.", "the red square")]],
    "classification": [[("What category best describes the image?" + SUFFIX,
                         "golden retriever")]],
}


@pytest.fixture
def root(tmp_path):
    save_image(tmp_path / "a.png")
    return tmp_path


def renderer(name, root, seed=0, box_format="norm1", options=None, columns=None, system=None):
    template = load_template(name)
    opts = merged_options(template.spec, options or {}, "test")
    return TemplateRenderer(template, opts, columns or {}, root, box_format, seed, "src", system)


def render(name, record, root, row_id="row1", **kw):
    r = renderer(name, root, **kw)
    return r.conversations([r.render(row_id, record)])


def turns(conversation):
    msgs = [m for m in conversation["messages"] if m["role"] != "system"]
    text = lambda m: "".join(c.get("text", "") for c in m["content"])  # noqa: E731
    return [(text(u), text(a)) for u, a in zip(msgs[::2], msgs[1::2])]


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_golden_render(name, root):
    convs = render(name, RECORDS[name], root)
    assert [turns(c) for c in convs] == GOLDEN[name]
    for c in convs:  # the image is the first item of the first user turn, resolved to a path
        assert c["messages"][0]["content"][0] == {"type": "image"}
        assert c["images"] == [str((root / "a.png").resolve())]


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_loss_mask_covers_exactly_the_answers(name, root, llava_collator):
    convs = render(name, RECORDS[name], root, options={"group_by_image": True})
    batch = llava_collator(convs)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    spans, current = [], []
    for tok, lab in zip(ids, labels):
        if lab != -100:
            current.append(tok)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    decode = llava_collator.processor.tokenizer.decode
    # Exactly each answer carries loss, and the final one its end-of-turn token (llava-1.5's
    # published template writes no </s> after earlier answers: docs/families.md). Byte-level
    # BPE merges the space after "ASSISTANT:" into the answer's first token, hence lstrip.
    answers = [a for _, a in turns(convs[0])]
    assert [decode(s).lstrip(" ") for s in spans] == answers[:-1] + [answers[-1] + "</s>"]
    assert ids.count(llava_collator.processor.tokenizer.convert_tokens_to_ids("<image>")) == 16


def test_phrasing_is_seeded_and_order_independent(root):
    records = [(f"r{i}", {**RECORDS["vqa"], "question": f"q{i}?"}) for i in range(40)]
    first = [renderer("vqa", root).render(i, r).turns for i, r in records]
    again = [renderer("vqa", root).render(i, r).turns for i, r in reversed(records)][::-1]
    other = [renderer("vqa", root, seed=1).render(i, r).turns for i, r in records]
    assert first == again
    assert first != other
    assert len({t[0][0].split("q")[0] for t in first}) > 5  # several phrasings are used


def test_system_prompt_from_template_or_recipe(root):
    conv = render("vqa", RECORDS["vqa"], root, system="Be brief.")[0]
    assert conv["messages"][0] == {"role": "system", "content": [{"type": "text",
                                                                  "text": "Be brief."}]}


def test_box_conversion_per_family_convention():
    # 200x100 image; COCO xywh [20, 10, 60, 40] -> xyxy [20, 10, 80, 50]
    assert box_text([20, 10, 60, 40], 200, 100, "xywh", "norm1") == "[0.10, 0.10, 0.40, 0.50]"
    assert box_text([20, 10, 60, 40], 200, 100, "xywh", "abs1000") == "(100,100),(400,500)"
    assert box_text([20, 10, 80, 50], 200, 100, "xyxy", "norm1", 3) == \
        "[0.100, 0.100, 0.400, 0.500]"
    # clipped to the image
    assert box_text([-10, -5, 250, 50], 200, 100, "xyxy", "norm1") == "[0.00, 0.00, 1.00, 0.50]"
    assert box_text([150, 50, 100, 100], 200, 100, "xywh", "abs1000") == "(750,500),(1000,1000)"
    assert clip_box(read_box([1, 2, 3, 4]), 10, 10) == (1, 2, 3, 4)
    assert format_box((0, 0, 1, 1), 3, 3, "abs1000") == "(0,0),(333,333)"


@pytest.mark.parametrize("box,reason", [([300, 10, 400, 50], "box_outside_image"),
                                        ([-50, -50, -10, -10], "box_outside_image"),
                                        ([10, 10, 5, 20], "bad_box"), ([1, 2, 3], "bad_box"),
                                        (["a", 1, 2, 3], "bad_box"), (None, "bad_box")])
def test_bad_boxes(box, reason):
    with pytest.raises(BadRow) as err:
        box_text(box, 200, 100)
    assert err.value.reason == reason


def test_grounding_reads_size_from_columns_or_image(root):
    rec = {**RECORDS["grounding"], "box": [10, 5, 20, 10], "width": 100, "height": 50}
    assert turns(render("grounding", rec, root, options={"direction": "locate"})[0]) == \
        [(GOLDEN["grounding"][0][0][0], "[0.10, 0.10, 0.20, 0.20]")]
    # no size columns: read from the 40x20 image
    assert turns(render("grounding", {**rec, "width": None, "height": None}, root,
                        options={"direction": "locate"})[0])[0][1] == "[0.25, 0.25, 0.50, 0.50]"


def test_vqa_answer_selection():
    answers = ["red"] * 3 + ["pink"] * 3 + ["blue"]
    assert select_answers(answers, "most_common") == ["red"]  # tie: first given
    assert select_answers(["a", "b", "b"], "most_common") == ["b"]
    assert select_answers(answers, "first") == ["red"]
    assert sorted(select_answers(answers, "all_weighted")) == sorted(answers)


def test_all_weighted_makes_one_row_per_annotator_answer(root):
    convs = render("vqa", RECORDS["vqa"], root, options={"answer_selection": "all_weighted"})
    answers = [turns(c)[0][1] for c in convs]
    assert answers.count("red") == 6 and answers.count("pink") == 4


@pytest.mark.parametrize("answer", [1, "B", "b.", "red"])
def test_multiple_choice_answer_forms(answer, root):
    conv = render("multiple_choice", {**RECORDS["multiple_choice"], "answer": answer}, root)[0]
    assert turns(conv)[0][1] == "B"


def test_multiple_choice_shuffle_keeps_the_right_letter(root):
    for i in range(10):
        conv = render("multiple_choice", RECORDS["multiple_choice"], root, row_id=f"r{i}",
                      options={"shuffle_options": True})[0]
        question, letter = turns(conv)[0]
        assert f"{letter}. red" in question


def test_rows_keep_every_reference_for_evaluation(root):
    conv = render("vqa", {**RECORDS["vqa"], "answer_type": "other"}, root)[0]
    assert turns(conv)[0][1] == "red"  # trained on the most agreed answer...
    every_answer = [a["answer"] for a in RECORDS["vqa"]["answers"]]
    assert conv["references"] == every_answer  # ...scored against all of them
    assert conv["question_type"] == "other"
    captions = render("caption", RECORDS["caption"], root)
    assert all(c["references"] == RECORDS["caption"]["captions"] for c in captions)
    r = renderer("vqa", root, options={"group_by_image": True})
    pieces = [r.render("q1", RECORDS["vqa"]), r.render("q2", {**RECORDS["vqa"], "answers": ["no"]})]
    assert r.conversations(pieces)[0]["references"] == ["no"]  # the last turn's answers


def test_group_by_image_makes_multi_turn_conversations(root):
    r = renderer("vqa", root, options={"group_by_image": True, "max_turns": 2})
    pieces = [r.render(f"q{i}", {**RECORDS["vqa"], "question": f"q{i}?"}) for i in range(3)]
    convs = r.conversations(pieces)
    assert [len(turns(c)) for c in convs] == [2, 1]
    assert [m["role"] for m in convs[0]["messages"]] == ["user", "assistant"] * 2
    assert convs[0]["messages"][2]["content"][0]["type"] == "text"  # image only in turn 1


def test_column_mapping(root):
    rec = {"file": "a.png", "q": "What color is it?", "a": "red"}
    conv = render("vqa", rec, root, columns={"image": "file", "question": "q", "answers": "a"})
    assert turns(conv[0])[0][1] == "red"
    with pytest.raises(BadRow) as err:
        render("vqa", rec, root)
    assert err.value.reason == "missing_column"


def test_clip_prompts():
    prompts = clip_prompts("classification")
    assert len(prompts) >= 10 and all(p.count("{}") == 1 for p in prompts)
    assert prompts[0].format("dog") == "a photo of a dog."
    with pytest.raises(DataError, match="no `clip_prompts`"):
        clip_prompts("vqa")


def test_builtin_templates_have_many_phrasings():
    assert set(RECORDS) <= set(builtin_templates())
    for name in RECORDS:
        spec = load_template(name).spec
        assert all(10 <= len(p) <= 15 for p in spec.prompts.values()), name


def test_user_template_from_a_path(tmp_path, root):
    path = tmp_path / "count.yaml"
    path.write_text("name: count\ntask: generic\ncolumns: {image: {}, object: {}, n: {}}\n"
                    "prompts: {count: ['How many {object}s?']}\nanswers: {count: '{n}'}\n")
    template = load_template(str(path))
    r = TemplateRenderer(template, merged_options(template.spec, {}, "t"), {}, root)
    conv = r.conversations([r.render("x", {"image": "a.png", "object": "cat", "n": 3})])[0]
    assert turns(conv) == [("How many cats?", "3")]


def test_template_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\ntask: vqa\ncolumns: {image: {}}\nprompts: {answer: ['{nope}']}\n")
    with pytest.raises(DataError, match="unknown placeholder"):
        load_template(str(bad))
    with pytest.raises(DataError, match="unknown data template"):
        load_template("no-such-template")
    with pytest.raises(DataError, match="unknown option"):
        merged_options(load_template("vqa").spec, {"answer_selektion": "x"}, "t")
    with pytest.raises(DataError, match="must be one of"):
        merged_options(load_template("vqa").spec, {"answer_selection": "x"}, "t")


def test_old_kind_key_still_names_the_task(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("name: o\nkind: vqa\ncolumns: {image: {}, question: {}, answers: {}}\n"
                   "prompts: {answer: ['{question}']}\n")
    assert load_template(str(old)).spec.task == "vqa"
    both = tmp_path / "both.yaml"
    both.write_text(old.read_text().replace("kind: vqa", "kind: vqa\ntask: vqa"))
    with pytest.raises(DataError, match="give `task` only"):
        load_template(str(both))
    assert all(load_template(name).spec.task for name in builtin_templates())
    assert not any("\nkind:" in path.read_text() for path in builtin_templates().values())


def test_recipe_validation_checks_templates(tmp_path):
    from peftvlm.recipe.load import load_recipe

    data = tmp_path / "d.jsonl"
    data.write_text("")
    with pytest.raises(RecipeError, match="unknown data template"):
        load_recipe(recipe_file(tmp_path, {"train": str(data.name), "template": "nope"}))
    with pytest.raises(RecipeError, match="has no column"):
        load_recipe(recipe_file(tmp_path, {"train": [{"path": data.name, "template": "vqa",
                                                      "columns": {"questoin": "q"}}]}))
    with pytest.raises(RecipeError, match="unknown option"):
        load_recipe(recipe_file(tmp_path, {"train": data.name, "template": "vqa",
                                           "template_options": {"bogus": 1}}))


def test_ls_templates_cli(data_cache):
    out = run_cli("ls", "templates", cache=data_cache)
    assert out.returncode == 0, out.stderr
    assert "grounding" in out.stdout and "image, expression, box, [width], [height]" in out.stdout
