"""Every generative family with a tiny twin (derived from the registry): tiny models build and
reload, train, generate, mask labels exactly, and take LoRA on the right parts.

Run: PYTHONPATH=. python -m pytest tests/test_families.py -q
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from peftvlm.data.batch.collate import ConversationCollator, encode_prompts
from peftvlm.data.boxes import BOX_FORMATS
from peftvlm.errors import DataError
from peftvlm.families import FAMILIES, family_for_model_type, paligemma, tiny_models
from peftvlm.methods.lora import LoraMethod, apply_peft
from test_chat_templates import fixture_template

# Adding a family to peftvlm/families/ adds it here: no hand-kept lists.
NAMES = [n for n, s in FAMILIES.items() if s.kind == "generative" and s.build_tiny]
CHAT_NAMES = [n for n in NAMES if FAMILIES[n].encode is None]


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


def image(colour=(255, 0, 0), seed=None):
    """A shape on grey: a uniform image would give identical patches, hence uniform attention
    and exactly zero gradients for the vision tower's queries and keys. The same `seed` gives
    the same shape, place and grey in any colour."""
    import random

    from peftvlm.data.read.synthetic import draw_shape

    return draw_shape(random.Random(sum(colour) if seed is None else seed), colour, 32)


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


def reply_runs(processor, labels):
    """Trained runs without the space some templates put before a reply (SmolVLM's
    "Assistant: red", LLaVA-NeXT's "[/INST] red")."""
    return [run.lstrip(" ") for run in label_runs(processor, labels)]


def expected_reply(spec, answer):
    return spec.start_of_reply + answer + spec.end_of_turn


def fit(spec, conversation):
    """The conversation, without its system message where the family refuses one next to an
    image (Llama 3.2 Vision's template raises on that; see `FamilySpec.system_with_images`)."""
    if spec.row_problem(conversation):
        conversation = [m for m in conversation if m["role"] != "system"]
    assert spec.row_problem(conversation) is None
    return conversation


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Each tiny model built once, into its own folder."""
    from peftvlm.models import tiny_model_path

    # the session's cache (conftest): each twin is built once for every test file
    return {name: tiny_model_path(FAMILIES[name].tiny_name) for name in NAMES}


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
    assert set(tiny_models()) == {s.tiny_name for s in FAMILIES.values() if s.build_tiny}
    assert all(FAMILIES[n].reference_checkpoint for n in NAMES)
    assert family_for_model_type("idefics3").name == "smolvlm"
    assert family_for_model_type("smolvlm").name == "smolvlm"
    assert family_for_model_type("qwen2_5_vl").name == "qwen2_5_vl"
    assert FAMILIES["qwen2_vl"].box_format == "qwen2_vl"
    # grounding data must be able to write every family's boxes
    assert {spec.box_format for spec in FAMILIES.values()} <= set(BOX_FORMATS)


def test_builds_and_reloads_through_from_pretrained(loaded):
    from transformers import ProcessorMixin

    spec, model, processor = loaded
    assert model.config.model_type in spec.model_types
    assert isinstance(processor, ProcessorMixin) and hasattr(processor, "image_processor")
    expected = None if spec.encode else fixture_template(spec.reference_checkpoint)
    assert processor.chat_template == expected
    names = {n for n, _ in model.named_modules()}
    for part in spec.parts():
        assert spec.module_prefix(part) in names, part
    assert sum(p.numel() for p in model.parameters()) < 500_000


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_needs_its_processor_class(tiny_dirs, name):
    """Without torchvision AutoProcessor cannot build Qwen's processor; the family's class can."""
    processor = FAMILIES[name].processor_class().from_pretrained(tiny_dirs[name])
    assert processor.image_processor.patch_size * processor.image_processor.merge_size == 16
    # Its video processor is ours (NumPy, no torchvision), never a saved sub-processor.
    from peftvlm.families.qwen2_vl import FramesVideoProcessor

    assert isinstance(processor.video_processor, FramesVideoProcessor)
    assert "video_processor" not in type(processor).get_attributes()
    # saved folders name the stock processor class, like Hub checkpoints (and exports) should
    saved = json.loads((tiny_dirs[name] / "processor_config.json").read_text())
    assert saved["processor_class"] == {"qwen2_vl": "Qwen2VLProcessor",
                                       "qwen2_5_vl": "Qwen2_5_VLProcessor"}[name]


def test_forward_backward_and_generate(loaded):
    spec, model, processor = loaded
    # the third row differs from the first only in the shape's colour
    blue = [{"role": "user", "content": [{"type": "image", "image": image((0, 0, 255), seed=255)},
                                         *single_turn("red")[0]["content"][1:]]},
            assistant("red")]
    batch = training_batch(spec, processor, [single_turn("red"), single_turn("blue circle"), blue])
    out = model(**batch)
    loss = out.loss
    assert math.isfinite(loss.item())
    loss.backward()
    # the image reaches the language model: a collator or processor that dropped the pixels
    # would leave image tokens as plain text, and every answer blind (nothing else fails)
    answer = batch["labels"][0] != -100
    red_logits, blue_logits = out.logits[0][answer].detach(), out.logits[2][answer].detach()
    assert (red_logits - blue_logits).abs().max() > 1e-4 * red_logits.abs().max()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    # a longer second prompt (a whole earlier turn where the family supports it)
    second = [user("Where?")] if spec.encode else fit(spec, two_turns("a", "b")[:-1])
    prompts = prompt_batch(spec, processor, [single_turn("red")[:1], second])
    out = model.generate(**prompts, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    # an encoder-decoder (Florence-2) returns the decoder's start token and new tokens only
    start = 1 if model.config.is_encoder_decoder else prompts["input_ids"].shape[1]
    assert out.shape == (2, start + 4)


# --- label masks -------------------------------------------------------------------------------

def test_single_turn_labels_are_exactly_answer_and_end_of_turn(loaded):
    spec, model, processor = loaded
    batch = training_batch(spec, processor, [single_turn("red"), single_turn("blue circle")])
    for row, answer in zip(batch["labels"], ["red", "blue circle"]):
        assert reply_runs(processor, row) == [expected_reply(spec, answer)]
    if model.config.is_encoder_decoder:  # labels are the decoder's: the answer, then padding
        assert batch["labels"][0, -1] == -100
        return
    assert batch["labels"].shape == batch["input_ids"].shape
    # the shorter row is padded; padding never carries loss
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all()


@pytest.mark.parametrize("name", CHAT_NAMES)
def test_multi_turn_labels_cover_every_reply_and_nothing_else(tiny_dirs, name):
    spec = FAMILIES[name]
    processor = load(spec, tiny_dirs[name])[1]
    conversation = fit(spec, two_turns("red", "circle"))
    batch = training_batch(spec, processor, [conversation, single_turn("blue")])
    first, last = reply_runs(processor, batch["labels"][0])
    # an earlier reply ends with end_of_turn where the template writes one (not llava-1.5's)
    assert first in ("red", expected_reply(spec, "red")) and last == expected_reply(spec, "circle")
    assert reply_runs(processor, batch["labels"][1]) == [expected_reply(spec, "blue")]
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "Which shape is it?" in text
    assert ("Answer in one word." in text) == (conversation[0]["role"] == "system")


def test_training_prompt_matches_generation_prompt(loaded):
    """The tokens before the first label are the prompt the model sees at inference."""
    spec, model, processor = loaded
    train = training_batch(spec, processor, [single_turn("red")])
    first_label = int((train["labels"][0] != -100).nonzero()[0])
    if model.config.is_encoder_decoder:  # the whole encoder input is the prompt
        first_label = train["input_ids"].shape[1]
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
    # generation appends after the last position: every prompt must end there (BLIP-2 keeps
    # its query tokens first, so its padding sits between them and the text)
    assert (mask[0] == 0).any() and mask[:, -1].all()


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
    return f".{spec.module_prefix(part)}." in f".{name.removeprefix('base_model.model.')}."


def test_lora_on_language_adapts_only_the_language_model(loaded):
    spec, model, _ = loaded
    peft_model = apply_peft(model, spec, LoraMethod(target="language", r=4))
    adapted = lora_modules(peft_model)
    assert adapted and all(under(spec, "language", n) for n in adapted)
    assert not any(under(spec, p, n) for p in spec.parts() if p != "language" for n in adapted)


def test_lora_on_all_reaches_vision_and_projector_and_every_trainable_param_moves(loaded):
    spec, model, processor = loaded
    peft_model = apply_peft(model, spec, LoraMethod(target="all", r=4, lora_dropout=0.0))
    adapted = lora_modules(peft_model)
    for part in spec.parts():  # every part with linear layers (not Gemma 3's projector)
        assert any(under(spec, part, n) for n in adapted) == bool(spec.part_targets(part)), part
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
        if param.grad is None and name in trainable:
            # outside the graph by architecture: the last vision layer LLaVA's feature layer
            # -2 skips (real checkpoints too); never a language or projector adapter
            assert under(spec, "vision", name) and not changed, name
            continue
        assert changed == (name in trainable), name
