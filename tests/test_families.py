"""Model families beyond LLaVA: tiny models build and reload, train, generate, mask labels
exactly, and take LoRA on the right parts.

Run: PYTHONPATH=. python -m pytest tests/test_families.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from peftvlm.data.boxes import BOX_FORMATS
from peftvlm.data.collate import ConversationCollator, encode_prompts
from peftvlm.errors import DataError
from peftvlm.families import FAMILIES, family_for_model_type, tiny_models
from peftvlm.families import paligemma
from peftvlm.families.base import read_template
from peftvlm.methods.lora import LoraMethod, apply_peft

NAMES = ["qwen2_vl", "qwen2_5_vl", "smolvlm", "paligemma"]
CHAT_NAMES = ["qwen2_vl", "qwen2_5_vl", "smolvlm"]
# The published template each tiny twin carries (peftvlm/families/templates/).
PUBLISHED = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2-vl", "smolvlm": "smolvlm"}


# --- helpers ---------------------------------------------------------------------------------

def training_batch(spec, processor, conversations):
    """Inputs + labels exactly as the trainer's collator builds them."""
    return ConversationCollator(processor, spec).encode(conversations)


def prompt_batch(spec, processor, prompts):
    """Left-padded generation inputs with the model's own (inference) chat template, as a user
    of the base model would build them."""
    processor.tokenizer.padding_side = "left"
    try:
        if spec.encode_prompt is not None:
            return dict(spec.encode_prompt(processor, prompts))
        return dict(processor.apply_chat_template(
            prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True}))
    finally:
        processor.tokenizer.padding_side = "right"


def image(colour=(255, 0, 0)):
    return Image.new("RGB", (32, 32), colour)


def user(text, with_image=True):
    content = ([{"type": "image", "image": image()}] if with_image else [])
    return {"role": "user", "content": content + [{"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def single_turn(answer, question="What color is the shape?"):
    return [user(question), assistant(answer)]


def two_turns(first, second):
    return [{"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
            user("What color is the shape?"), assistant(first),
            user("Which shape is it?", with_image=False), assistant(second)]


def label_runs(processor, labels):
    """Decoded text of each contiguous run of trained (non -100) positions."""
    runs, current = [], []
    for token in labels.tolist() + [-100]:
        if token != -100:
            current.append(token)
        elif current:
            runs.append(processor.tokenizer.decode(current))
            current = []
    return runs


def expected_reply(spec, answer):
    # SmolVLM's cue is "Assistant:" and its reply starts with the space after it.
    return (" " if spec.name == "smolvlm" else "") + answer + spec.end_of_turn


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Each tiny model built once, into its own folder."""
    root = tmp_path_factory.mktemp("tiny-families")
    dirs = {}
    for name in NAMES:
        dirs[name] = root / name
        FAMILIES[name].build_tiny(dirs[name])
    return dirs


def load(spec, path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path)
    loader = spec.processor_class() if spec.processor_class else AutoProcessor
    return model, loader.from_pretrained(path)


@pytest.fixture(params=NAMES)
def loaded(request, tiny_dirs):
    spec = FAMILIES[request.param]
    model, processor = load(spec, tiny_dirs[request.param])
    return spec, model, processor


# --- registry and loading ---------------------------------------------------------------------

def test_families_are_registered_with_tiny_models():
    tiny = {"tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-smolvlm", "tiny-paligemma"}
    assert tiny <= set(tiny_models())
    assert family_for_model_type("idefics3").name == "smolvlm"
    assert family_for_model_type("smolvlm").name == "smolvlm"
    assert family_for_model_type("qwen2_5_vl").name == "qwen2_5_vl"
    assert FAMILIES["qwen2_vl"].box_format == "abs1000"
    # grounding data must be able to write every family's boxes
    assert {spec.box_format for spec in FAMILIES.values()} <= set(BOX_FORMATS)


def test_builds_and_reloads_through_from_pretrained(loaded):
    from transformers import ProcessorMixin

    spec, model, processor = loaded
    assert model.config.model_type in spec.model_types
    assert isinstance(processor, ProcessorMixin) and hasattr(processor, "image_processor")
    expected = read_template(PUBLISHED[spec.name]) if spec.name in PUBLISHED else None
    assert processor.chat_template == expected
    names = {n for n, _ in model.named_modules()}
    for part in ("vision", "projector", "language"):
        assert spec.module_prefix(part) in names, part
    assert sum(p.numel() for p in model.parameters()) < 500_000


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_needs_its_processor_class(tiny_dirs, name):
    """Without torchvision AutoProcessor cannot build Qwen's processor; the family's class can."""
    processor = FAMILIES[name].processor_class().from_pretrained(tiny_dirs[name])
    assert processor.image_processor.patch_size * processor.image_processor.merge_size == 16
    assert not hasattr(processor, "video_processor")
    # saved folders name the stock processor class, like Hub checkpoints (and exports) should
    saved = json.loads((tiny_dirs[name] / "processor_config.json").read_text())
    assert saved["processor_class"] == {"qwen2_vl": "Qwen2VLProcessor",
                                       "qwen2_5_vl": "Qwen2_5_VLProcessor"}[name]


def test_forward_backward_and_generate(loaded):
    spec, model, processor = loaded
    batch = training_batch(spec, processor, [single_turn("red"), single_turn("blue circle")])
    loss = model(**batch).loss
    assert math.isfinite(loss.item())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    # a longer second prompt (a whole earlier turn where the family supports it)
    second = [user("Where?")] if spec.name == "paligemma" else two_turns("a", "b")[:-1]
    prompts = prompt_batch(spec, processor, [single_turn("red")[:1], second])
    out = model.generate(**prompts, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, prompts["input_ids"].shape[1] + 4)


# --- label masks -------------------------------------------------------------------------------

def test_single_turn_labels_are_exactly_answer_and_end_of_turn(loaded):
    spec, _, processor = loaded
    batch = training_batch(spec, processor, [single_turn("red"), single_turn("blue circle")])
    assert batch["labels"].shape == batch["input_ids"].shape
    for row, answer in zip(batch["labels"], ["red", "blue circle"]):
        assert label_runs(processor, row) == [expected_reply(spec, answer)]
    # the shorter row is padded; padding never carries loss
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all()


@pytest.mark.parametrize("name", CHAT_NAMES)
def test_multi_turn_labels_cover_every_reply_and_nothing_else(tiny_dirs, name):
    spec = FAMILIES[name]
    processor = load(spec, tiny_dirs[name])[1]
    batch = training_batch(spec, processor, [two_turns("red", "circle"), single_turn("blue")])
    assert label_runs(processor, batch["labels"][0]) == [
        expected_reply(spec, "red"), expected_reply(spec, "circle")]
    assert label_runs(processor, batch["labels"][1]) == [expected_reply(spec, "blue")]
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "Answer in one word." in text and "Which shape is it?" in text


def test_training_prompt_matches_generation_prompt(loaded):
    """The tokens before the first label are the prompt the model sees at inference."""
    spec, _, processor = loaded
    train = training_batch(spec, processor, [single_turn("red")])
    first_label = int((train["labels"][0] != -100).nonzero()[0])
    prompt = prompt_batch(spec, processor, [single_turn("red")[:1]])
    assert prompt["input_ids"][0].tolist() == train["input_ids"][0, :first_label].tolist()


def as_row(conversation):
    """A dataset row: image items become placeholders, the images a separate list."""
    images = [c["image"] for m in conversation for c in m["content"] if c["type"] == "image"]
    messages = [{"role": m["role"], "content": [{"type": "image"} if c["type"] == "image" else c
                                                for c in m["content"]]} for m in conversation]
    return {"messages": messages, "images": images}


def test_evaluator_prompts_match_the_inference_template(loaded):
    """peftvlm's eval prompts equal the model's own prompts."""
    spec, _, processor = loaded
    conversations = [single_turn("red"), single_turn("blue", "Which shape is in the image?")]
    ours = encode_prompts(processor, spec, [as_row(c) for c in conversations])
    reference = prompt_batch(spec, processor, [c[:-1] for c in conversations])
    assert ours["input_ids"].tolist() == reference["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == reference["attention_mask"].tolist()


def test_generation_prompts_are_left_padded(loaded):
    spec, _, processor = loaded
    long_question = "What color is the shape in the center of this image?"
    batch = prompt_batch(spec, processor,
                         [single_turn("x")[:1], single_turn("x", long_question)[:1]])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -1].all()


def test_paligemma_rejects_multi_turn_and_text_only_rows(tiny_dirs):
    processor = load(FAMILIES["paligemma"], tiny_dirs["paligemma"])[1]
    with pytest.raises(DataError, match="single-turn"):
        paligemma.encode(processor, [two_turns("red", "circle")])
    with pytest.raises(DataError, match="needs an image"):
        paligemma.encode(processor, [[user("hi", with_image=False), assistant("yo")]])


def test_paligemma_puts_system_text_before_the_prompt(tiny_dirs):
    processor = load(FAMILIES["paligemma"], tiny_dirs["paligemma"])[1]
    conversation = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                    *single_turn("red")]
    batch = paligemma.encode(processor, [conversation])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.endswith("<bos>Be brief. What color is the shape?\nred<eos>")
    assert label_runs(processor, batch["labels"][0]) == ["red<eos>"]


# --- LoRA on the right parts -------------------------------------------------------------------

def lora_modules(model):
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A")]


def under(spec, part, name):
    return f".{spec.module_prefix(part)}." in f".{name.removeprefix('base_model.model.')}"


def test_lora_on_language_adapts_only_the_language_model(loaded):
    spec, model, _ = loaded
    peft_model = apply_peft(model, spec, LoraMethod(target="language", r=4))
    adapted = lora_modules(peft_model)
    assert adapted and all(under(spec, "language", n) for n in adapted)
    assert not any(under(spec, "vision", n) or under(spec, "projector", n) for n in adapted)


def test_lora_on_all_reaches_vision_and_projector_and_every_trainable_param_moves(loaded):
    spec, model, processor = loaded
    peft_model = apply_peft(model, spec, LoraMethod(target="all", r=4, lora_dropout=0.0))
    adapted = lora_modules(peft_model)
    for part in ("vision", "projector", "language"):
        assert any(under(spec, part, n) for n in adapted), part
    # the projector sits inside Qwen's vision prefix: make sure vision blocks are hit too
    assert any(under(spec, "vision", n) and not under(spec, "projector", n) for n in adapted)

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    # no weight decay: a parameter may only move because it got a gradient
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                  lr=1e-2, weight_decay=0.0)
    batch = training_batch(spec, processor, [single_turn("red"), single_turn("blue circle")])
    for _ in range(2):  # LoRA B starts at zero, so A only gets a gradient from the second step
        optimizer.zero_grad()
        peft_model(**batch).loss.backward()
        optimizer.step()
    for name, param in peft_model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable), name
