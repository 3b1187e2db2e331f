"""Florence-2: our `florence2` box parser equals the processor's own `post_process_generation`,
the encoder-decoder encode (prompt -> encoder, answer -> labels), generation decoding that keeps
`<loc_N>` tokens, a detection run through the CLI (train, then eval with mAP), and collated
pixels that keep the image's colour. Whether the tiny twin learns detection (it does, with
LoRA on the language model and projector at a low learning rate: the script's MODEL_DEFAULTS)
is measured by scripts/detection_learning.py (docs/benchmarks.md), minutes of CPU."""

from __future__ import annotations

import json
import random

import pytest
from data_helpers import data_cache  # noqa: F401

from peftvlm.data.boxes import get_convention
from peftvlm.families import FAMILIES
from peftvlm.families.florence2 import decode, encode, encode_prompt, parse_with_processor

CONV = get_convention("florence2")


@pytest.fixture(scope="module")
def processor(data_cache):
    from peftvlm.models import load_processor_only
    from peftvlm.recipe.schema import ModelConfig

    proc, family = load_processor_only(ModelConfig(id="tiny-florence2"))
    assert family is FAMILIES["florence2"]
    return proc


def test_parser_equals_the_processors_post_process_generation(processor):
    rng = random.Random(0)
    for _ in range(50):
        width, height = rng.randint(20, 2000), rng.randint(20, 2000)
        objects = []
        for label in rng.sample(["car", "door handle", "red car", "sky"], rng.randint(1, 3)):
            x1, y1 = rng.uniform(0, width - 2), rng.uniform(0, height - 2)
            objects.append((label, (x1, y1, rng.uniform(x1 + 1, width),
                                    rng.uniform(y1 + 1, height))))
        text = "</s><s>" + CONV.write(objects, width, height) + "</s><pad>"
        ours = CONV.parse(text, width, height)
        for task in ("<OD>", "<CAPTION_TO_PHRASE_GROUNDING>"):
            theirs = parse_with_processor(processor, text, task, (width, height))
            assert [label for label, _ in ours] == [label for label, _ in theirs]
            # the processor truncates the bin centre to an int pixel
            for (_, a), (_, b) in zip(ours, theirs):
                assert all(abs(x - y) < 1.0 for x, y in zip(a, b)), (text, a, b)
        for (_, got), (_, want) in zip(ours, objects):  # within one bin of the original
            assert all(abs(g - w) <= s for g, w, s in
                       zip(got, want, (width / 1000, height / 1000) * 2))


def _conversation(image, prompt, answer=None):
    conv = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": prompt}]}]
    if answer is not None:
        conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return conv


def test_encode_puts_the_prompt_in_the_encoder_and_the_answer_in_labels(processor):
    from PIL import Image

    image = Image.new("RGB", (80, 60), (200, 0, 0))
    short, long = "red<loc_1><loc_2><loc_300><loc_400>", "red<loc_1><loc_2><loc_3><loc_4>blue" \
                                                         "<loc_5><loc_6><loc_7><loc_8>"
    batch = encode(processor, [_conversation(image, "<OD>", short),
                               _conversation(image, "<OD>", long)])
    tok = processor.tokenizer
    prompt = tok.decode(batch["input_ids"][0])
    assert "Locate the objects with category name in the image." in prompt  # task expanded
    labels = batch["labels"].tolist()
    first = [t for t in labels[0] if t != -100]
    assert first[0] == tok.bos_token_id and first[-1] == tok.eos_token_id  # as published
    assert tok.decode(first[1:-1]) == short
    assert labels[0][len(first):] == [-100] * (len(labels[0]) - len(first))  # padding
    assert labels[1][-1] == tok.eos_token_id
    assert "labels" not in encode_prompt(processor, [_conversation(image, "<OD>")])


def test_decode_keeps_location_tokens(processor):
    tok = processor.tokenizer
    ids = tok(["</s><s>red<loc_1><loc_2><loc_3><loc_4></s><pad><pad>"],
              add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert decode(processor, ids, {}) == ["red<loc_1><loc_2><loc_3><loc_4>"]


def test_detection_run_trains_and_reports_map(tmp_path, data_cache, cli_in_process):
    from PIL import Image, ImageDraw

    rows = []
    for i in range(8):
        img = Image.new("RGB", (64, 64), (128, 128, 128))
        ImageDraw.Draw(img).rectangle([8 * (i % 4), 8, 8 * (i % 4) + 24, 40], fill=(220, 30, 30))
        img.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "boxes": [[8 * (i % 4), 8, 8 * (i % 4) + 25, 41]],
                     "labels": ["red"]})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "flo", "model": {"id": "tiny-florence2"},
        "method": {"name": "lora", "r": 4, "target": "language"},
        "data": {"train": [{"path": "d.jsonl"}], "eval": [{"path": "d.jsonl"}],
                 "template": "detection"},
        "train": {"max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 2,
                  "max_length": 64},
        "eval": {"metrics": ["detection_map"], "max_new_tokens": 6, "max_samples": 2}}))
    # in-process: `peftvlm train` / `eval` keep their subprocess tests elsewhere
    out = cli_in_process("train", str(recipe), "-o", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    text = json.dumps(summary)
    assert "detection_mAP50" in text and "detection_parse_rate" in text
    # eval: mAP in metrics.json, reference (and any predicted) boxes drawn per row
    out = cli_in_process("eval", str(recipe), "--run", str(tmp_path / "run"), "--no-base",
                         "--max-samples", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert "detection_mAP" in metrics["metrics"]
    assert sorted(p.name for p in (tmp_path / "run" / "eval" / "boxes").iterdir()) == \
        ["row-0.png", "row-1.png"]


def test_collated_pixels_keep_the_colour_and_the_image_tokens_lead(processor):
    """Two training rows that differ only in the square's colour, batched by our collator: the
    pixels arrive at 64 px (not resized away) and normalised as the processor says, and the
    image tokens lead the encoder input, the same in both rows. (That the colour then changes
    the answer's logits: tests/test_families.py::test_forward_backward_and_generate.)"""
    import torch
    from PIL import Image, ImageDraw

    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.data.read.synthetic import COLOURS

    images = []
    for colour in ("red", "blue"):
        image = Image.new("RGB", (64, 64), (128, 128, 128))
        ImageDraw.Draw(image).rectangle([16, 16, 47, 47], fill=COLOURS[colour])
        images.append(image)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<OD>"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "red<loc_250><loc_250><loc_750><loc_750>"}]}]
    batch = ConversationCollator(processor, FAMILIES["florence2"])(
        [{"messages": messages, "images": [image]} for image in images])

    proc = processor.image_processor
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
    for row, colour in enumerate(("red", "blue")):
        want = (torch.tensor(COLOURS[colour]) / 255 - mean) / std
        torch.testing.assert_close(batch["pixel_values"][row, :, 32, 32], want, atol=1e-3, rtol=0)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    n = proc.image_seq_length
    assert (batch["input_ids"][:, :n] == image_id).all()
    assert (batch["input_ids"][:, n:] != image_id).all()
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    assert torch.equal(batch["labels"][0], batch["labels"][1])
