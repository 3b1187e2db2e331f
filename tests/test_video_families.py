"""Video on every family that takes it (derived from the registry: `FamilySpec.takes_video`):
a short synthetic clip goes through the collator with the processor's own video-token count
(equal to the length check's), loss only on the answer, and one training step that moves every
trainable parameter; Qwen2.5-VL's time positions and Qwen3-VL's timestamps follow the clip's real
frame rate; LLaVA-OneVision's equal-frames rule and SmolVLM's refusal are stated before training.

Run: PYTHONPATH=. python -m pytest tests/test_video_families.py -q
"""

from __future__ import annotations

import pytest
import torch

from data_helpers import data_cache  # noqa: F401
from peftvlm.data.batch.collate import ConversationCollator, IGNORE_INDEX, encode_prompts
from peftvlm.data.prepare.lengths import collator_lengths, token_lengths
from peftvlm.data.prepare.loading import load_rows
from peftvlm.data.read.video import check_video_support
from peftvlm.errors import DataError
from peftvlm.families import FAMILIES
from test_data_video import recipe, video_row, write_folder, write_gif, write_jsonl

VIDEO_FAMILIES = [name for name, spec in FAMILIES.items() if spec.takes_video and spec.tiny_name]


def processor_of(spec):
    from peftvlm.models import load_processor_only
    from peftvlm.recipe.schema import ModelConfig

    return load_processor_only(ModelConfig(id=spec.tiny_name))[0]


def clip_rows(tmp_path, model_id, rows, **data):
    write_jsonl(tmp_path / "v.jsonl", rows)
    return list(load_rows(recipe(tmp_path, "v.jsonl", model_id=model_id, **data)).train)


def test_the_registry_lists_the_video_families():
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
            "llava_onevision"} <= set(VIDEO_FAMILIES)


def test_ls_families_marks_exactly_the_video_families(cli):
    lines = {line.split()[0]: line for line in cli("ls", "families").stdout.splitlines()}
    assert {name for name, line in lines.items() if line.endswith(", video")} == {
        name for name, spec in FAMILIES.items() if spec.takes_video}


@pytest.mark.parametrize("name", VIDEO_FAMILIES)
def test_a_clip_trains_with_the_processors_token_count_and_answer_only_loss(
        tmp_path, name, data_cache):  # noqa: F811
    from transformers import AutoModelForImageTextToText

    from peftvlm.methods.lora import LoraMethod, apply_peft
    from peftvlm.models import tiny_model_path

    spec = FAMILIES[name]
    processor = processor_of(spec)
    collator = ConversationCollator(processor, spec)
    folder = write_folder(tmp_path / "clip", ["red", "green", "blue", "yellow"])
    rows = clip_rows(tmp_path, spec.tiny_name, [video_row(folder, "blue")])
    batch = collator(rows)

    # as many video tokens as the published processor's own count for a 4-frame 32x32 clip
    expected = processor._get_num_multimodal_tokens(video_sizes=[[4, 32, 32]])
    video_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    assert (batch["input_ids"] == video_id).sum().item() == expected["num_video_tokens"][0] > 0
    assert token_lengths(collator, rows) == collator_lengths(collator, rows) \
        == batch["attention_mask"].sum(dim=1).tolist()
    where = (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten()
    assert where[-1] - where[0] + 1 == len(where)  # one run of trained tokens: the answer
    assert processor.tokenizer.decode(batch["labels"][0][where]) == "blue" + spec.end_of_turn

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path(spec.tiny_name))
    peft_model = apply_peft(model, spec, LoraMethod(target="all", r=4, lora_dropout=0.0))
    # the eval prompt (`encode_prompts`, through apply_chat_template) expands the clip the same way
    prompt = encode_prompts(processor, spec, rows)
    assert (prompt["input_ids"] == video_id).sum().item() == expected["num_video_tokens"][0]
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters()
                 if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                  lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # LoRA B starts at zero, so A only gets a gradient from the second step
        optimizer.zero_grad()
        loss = peft_model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    # the vision adapters moved too: the frames reached the vision tower
    unmoved = [n for n, p in peft_model.named_parameters() if n in trainable
               and torch.equal(p.detach(), trainable[n])]
    assert not unmoved


def test_qwen2_5_vl_time_positions_follow_the_frame_rate(tmp_path, data_cache):  # noqa: F811
    """`second_per_grid_ts` = temporal_patch_size / the sampled rate, as the published
    `Qwen2_5_VLProcessor._process_videos` computes it from `VideoMetadata.sampled_fps`; the
    model's 3-D rotary ids then step `tokens_per_second * second_per_grid_ts` per temporal
    patch (`Qwen2_5_VLModel.get_vision_position_ids`)."""
    from transformers import AutoModelForImageTextToText
    from transformers.video_utils import VideoMetadata

    from peftvlm.models import tiny_model_path

    spec = FAMILIES["qwen2_5_vl"]
    collator = ConversationCollator(processor_of(spec), spec)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path(spec.tiny_name))
    colours = ["red", "green", "blue", "yellow"] * 2
    gif = write_gif(tmp_path / "c.gif", colours, ms_per_frame=250)  # 8 frames at 4 fps
    folder = write_folder(tmp_path / "f", colours)
    steps = {}
    for video_fps, video, total, source_fps in ((1.0, gif, 8, 4.0), (4.0, gif, 8, 4.0),
                                                (2.0, {"path": folder, "fps": 8}, 8, 8.0)):
        row = clip_rows(tmp_path, spec.tiny_name, [video_row(video)], video_fps=video_fps)[0]
        picked = row["videos"][0]["frames"]
        sampled = VideoMetadata(total_num_frames=total, fps=source_fps,
                                frames_indices=picked).sampled_fps
        batch = collator([row])
        seconds = batch["second_per_grid_ts"].tolist()
        assert seconds == [pytest.approx(2 / sampled)] and sampled == pytest.approx(video_fps)
        positions, _ = model.model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"],
            video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=batch["second_per_grid_ts"],
            attention_mask=batch["attention_mask"])
        video = batch["input_ids"][0] == collator.processor.video_token_id
        times = positions[0, 0][video].unique().tolist()
        grid_t = int(batch["video_grid_thw"][0, 0])
        step = model.config.vision_config.tokens_per_second * seconds[0]
        assert times == [times[0] + int(k * step) for k in range(grid_t)]
        steps[video_fps] = int(step)
    assert steps == {1.0: 8, 4.0: 2, 2.0: 4}  # tokens_per_second 4 x 2 s, 0.5 s, 1 s


def test_qwen3_vl_writes_each_temporal_patch_time_from_the_real_rate(
        tmp_path, data_cache):  # noqa: F811
    """16 frames at 4 fps sampled at 1 fps: frames 0, 4, 8, 12 (0, 1, 2, 3 s), two per temporal
    patch, so the processor writes <0.5 seconds> and <2.5 seconds> (mean time of each patch),
    each before its own vision start/end pair; since transformers 5.25 the template's outer
    `<|vision_start|><|video_pad|><|vision_end|>` collapses into them (no nested pair)."""
    spec = FAMILIES["qwen3_vl"]
    processor = processor_of(spec)
    gif = write_gif(tmp_path / "c.gif", ["red", "green", "blue", "yellow"] * 4, ms_per_frame=250)
    row = clip_rows(tmp_path, spec.tiny_name, [video_row(gif)], video_fps=1.0)[0]
    assert row["videos"][0]["frames"] == [0, 4, 8, 12]
    batch = ConversationCollator(processor, spec)([row])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    patch = "<|vision_start|>" + "<|video_pad|>" * 4 + "<|vision_end|>"
    assert f"user\n<0.5 seconds>{patch}<2.5 seconds>{patch}Which colour" in text


def test_llava_onevision_needs_equal_frame_counts_or_video_num_frames(
        tmp_path, data_cache):  # noqa: F811
    spec = FAMILIES["llava_onevision"]
    rows = [video_row(write_folder(tmp_path / "a", ["red", "blue", "green"])),
            video_row(write_folder(tmp_path / "b", ["red", "blue", "green", "yellow"]))]
    uneven = clip_rows(tmp_path, spec.tiny_name, rows)
    with pytest.raises(DataError, match=r"different frame counts \(3, 4\).*same number of "
                                        r"frames") as err:
        check_video_support(uneven, spec, spec.tiny_name)
    assert "data.video_num_frames" in err.value.hint
    collator = ConversationCollator(processor_of(spec), spec)
    with pytest.raises(DataError, match="different frame counts"):
        collator(uneven)
    even = clip_rows(tmp_path, spec.tiny_name, rows, video_num_frames=4)
    assert [r["videos"][0]["frames"] for r in even] == [[0, 0, 1, 2], [0, 1, 2, 3]]
    check_video_support(even, spec, spec.tiny_name)
    assert collator(even)["pixel_values_videos"].shape == (2, 4, 3, 32, 32)


def test_smolvlm_refuses_video_rows_with_its_reason(tmp_path):
    rows = clip_rows(tmp_path, "tiny-smolvlm", [video_row(write_gif(tmp_path / "c.gif",
                                                                    ["red", "blue"]))])
    with pytest.raises(DataError, match="SmolVLMVideoProcessor.*needs torchvision") as err:
        check_video_support(rows, FAMILIES["smolvlm"], "tiny-smolvlm")
    assert all(name in err.value.hint for name in VIDEO_FAMILIES)


def test_qwen3_vl_sizes_clips_by_the_checkpoints_video_config(tmp_path, data_cache):  # noqa: F811
    """The video config a checkpoint ships (the twin ships one, as Qwen3-VL checkpoints do) sets
    the clip's pixel budget; saving the processor writes it back. A budget of 1,024 pixels per
    4-frame clip: Qwen3-VL's smart_resize gives sqrt(4 x 32 x 32 / 1024) = 2, 32 -> 16 px
    frames, one token per temporal patch."""
    import json
    import shutil

    from peftvlm.models import tiny_model_path

    spec = FAMILIES["qwen3_vl"]
    twin = tiny_model_path(spec.tiny_name)
    config = json.loads((twin / "video_preprocessor_config.json").read_text())
    assert config["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert processor_of(spec).video_processor.max_pixels == config["size"]["longest_edge"]
    small = tmp_path / "small"
    shutil.copytree(twin, small)
    config["size"]["longest_edge"] = 1024
    (small / "video_preprocessor_config.json").write_text(json.dumps(config))
    processor = spec.processor_class().from_pretrained(small)
    rows = clip_rows(tmp_path, spec.tiny_name,
                     [video_row(write_folder(tmp_path / "clip", ["red", "blue", "red", "blue"]))])
    batch = ConversationCollator(processor, spec)(rows)
    assert batch["video_grid_thw"].tolist() == [[2, 2, 2]]
    assert (batch["input_ids"] == processor.video_token_id).sum() == 2
    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "video_preprocessor_config.json").read_text())
    assert saved["size"]["longest_edge"] == 1024
