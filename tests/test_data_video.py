"""Videos on tiny-qwen2-vl: frame folders, GIF and MP4 files, frame sampling, video tokens in
the length check, refusals for families without video, and a short clip task that learns."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from data_helpers import data_cache  # noqa: F401
from peftvlm.data.pipeline import prepare_data
from peftvlm.data.prepare.lengths import collator_lengths, token_lengths
from peftvlm.data.prepare.loading import load_rows
from peftvlm.errors import DataError
from peftvlm.recipe.load import validate_recipe_dict

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220),
           "yellow": (240, 220, 30)}


@pytest.fixture(scope="session")
def qwen_collator(data_cache):  # noqa: F811
    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.models import load_processor_only
    from peftvlm.recipe.schema import ModelConfig

    processor, family = load_processor_only(ModelConfig(id="tiny-qwen2-vl"))
    return ConversationCollator(processor, family)


def frames_of(colours) -> list:
    return [Image.new("RGB", (32, 32), COLOURS[c]) for c in colours]


def write_gif(path, colours, ms_per_frame=500) -> str:
    frames = frames_of(colours)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return path.name


def write_mp4(path, colours, fps=4) -> str:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for frame in frames_of(colours):
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    return path.name


def write_folder(path, colours) -> str:
    path.mkdir()
    for i, frame in enumerate(frames_of(colours)):
        frame.save(path / f"{i:04d}.png")
    return path.name


def video_row(video, answer="red", tag="<video>"):
    return {"messages": [{"role": "user", "content": f"{tag}Which colour appears last?"},
                         {"role": "assistant", "content": answer}], "videos": [video]}


def recipe(folder, train, model_id="tiny-qwen2-vl", **data):
    r = validate_recipe_dict({"name": "v", "model": {"id": model_id}, "method": {"name": "lora"},
                              "data": {"train": train, **data}, "train": {"max_length": 256}})
    r.source_path = folder / "r.yaml"
    return r


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_video_kinds_sampling_and_token_counts(tmp_path, qwen_collator):
    colours = ["red", "green", "blue", "yellow", "red", "green", "blue", "yellow"]
    rows = [video_row(write_folder(tmp_path / "frames", colours)),
            video_row(write_gif(tmp_path / "c.gif", colours)),       # 2 frames per second
            video_row(write_mp4(tmp_path / "c.mp4", colours)),       # 4 frames per second
            video_row("missing.mp4"), video_row("c.gif", tag="<video><video>")]
    write_jsonl(tmp_path / "v.jsonl", rows)
    data = load_rows(recipe(tmp_path, "v.jsonl", video_fps=1.0, video_max_frames=6))
    frames = [r["videos"][0]["frames"] for r in data.train]
    # Folder: frame by frame, at most 6 evenly; GIF at 2 fps -> every 2nd; MP4 at 4 fps -> 4th.
    assert frames == [[0, 1, 2, 4, 5, 6], [0, 2, 4, 6], [0, 4]]
    bad = data.bad_rows["train"]
    assert bad["missing_video"]["first_rows"][0].startswith("v.jsonl:4 ")
    assert bad["video_count"]["first_rows"][0].startswith("v.jsonl:5 (2 video placeholder(s)")
    batch = qwen_collator(data.train)
    grid = batch["video_grid_thw"].tolist()
    assert grid == [[3, 4, 4], [2, 4, 4], [1, 4, 4]]  # frames / temporal patch 2, 32 px / 8
    ids = batch["input_ids"]
    video_id = qwen_collator.processor.video_token_id
    assert (ids == video_id).sum(dim=1).tolist() == [12, 8, 4]  # t * h * w / merge 2x2
    frames_of(["red"])[0].save(tmp_path / "still.png")
    image_row = {"messages": [{"role": "user", "content": [{"type": "image"},
                                                           {"type": "text", "text": "Q"}]},
                              {"role": "assistant", "content": [{"type": "text", "text": "a"}]}],
                 "images": [str(tmp_path / "still.png")]}
    mixed = [image_row, *data.train, image_row]
    assert token_lengths(qwen_collator, mixed) == collator_lengths(qwen_collator, mixed)
    # Labels: only the answer and <|im_end|> carry loss, never the video tokens.
    assert ((batch["labels"] != -100).sum(dim=1) == 2).all()
    assert not ((batch["labels"] != -100) & (ids == video_id)).any()
    # The first MP4 frame decodes to (close to) the red it was encoded from.
    from peftvlm.data.read.video import load_frames

    first = load_frames(data.train[2]["videos"][0])[0].reshape(-1, 3).mean(axis=0)
    assert np.abs(first - COLOURS["red"]).max() < 25


def test_a_still_video_patchifies_like_the_image(qwen_collator):
    """Two identical frames make exactly the patches the image processor makes of the frame
    (it repeats an image across the temporal patch): the patch layout matches Qwen's."""
    processor = qwen_collator.processor
    frame = np.asarray(Image.new("RGB", (32, 32), (10, 120, 200)))
    frame = frame.copy()
    frame[:16, :8] = (250, 0, 0)
    video = processor.video_processor([np.stack([frame, frame])])
    image = processor.image_processor(images=[Image.fromarray(frame)], return_tensors="np")
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist()
    assert np.allclose(video["pixel_values_videos"], image["pixel_values"], atol=1e-5)


def test_families_without_video_refuse_video_rows(tmp_path, data_cache):  # noqa: F811
    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.models import load_processor_only

    write_jsonl(tmp_path / "v.jsonl", [video_row(write_gif(tmp_path / "c.gif", ["red", "blue"]))])
    r = recipe(tmp_path, "v.jsonl", model_id="tiny-llava")
    processor, family = load_processor_only(r.model)
    with pytest.raises(DataError, match=r"1 row\(s\) have videos, but tiny-llava \(llava\) "
                                        r"does not take video"):
        prepare_data(r, ConversationCollator(processor, family))


def clip_rows(folder, n, rng) -> list[dict]:
    """Clips of two colours, two frames each: the answer is the colour shown last."""
    rows = []
    for i in range(n):
        first, last = rng.sample(list(COLOURS), 2)
        name = write_gif(folder / f"{i}.gif", [first, first, last, last])
        rows.append(video_row(name, last))
    return rows


@pytest.mark.slow
def test_which_colour_appears_last_is_learned_from_video(tmp_path):
    from peftvlm import api

    rng = random.Random(0)
    write_jsonl(tmp_path / "train.jsonl", clip_rows(tmp_path, 64, rng))
    (tmp_path / "test").mkdir()
    write_jsonl(tmp_path / "test.jsonl",
                [{**r, "videos": [f"test/{r['videos'][0]}"]} for r in clip_rows(tmp_path / "test",
                                                                               32, rng)])
    r = validate_recipe_dict({
        "name": "clips", "model": {"id": "tiny-qwen2-vl"},
        "method": {"name": "lora", "r": 8, "lora_dropout": 0.0},
        "data": {"train": "train.jsonl", "eval": "test.jsonl"},
        "train": {"max_steps": 50, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                  "logging_steps": 10, "max_length": 128, "save_steps": 1000},
        "eval": {"metrics": ["exact_match"], "max_new_tokens": 2}})
    r.source_path = tmp_path / "r.yaml"
    summary = api.train(r, tmp_path / "run", log=lambda *_: None)
    losses = [loss for _, loss in summary["loss_curve"]]
    assert losses[-1] < losses[0]
    # A text-only guess cannot beat 1/4 (the last colour is any of the four).
    assert summary["eval"]["exact_match"]["before"] < 0.3
    assert summary["eval"]["exact_match"]["after"] >= 0.5


def test_qwen2_5_vl_trains_and_generates_on_a_video_row(tmp_path, data_cache):  # noqa: F811
    from transformers import AutoModelForImageTextToText

    from peftvlm.data.batch.collate import ConversationCollator, encode_prompts
    from peftvlm.models import load_processor_only, tiny_model_path
    from peftvlm.recipe.schema import ModelConfig

    write_jsonl(tmp_path / "v.jsonl", [video_row(write_folder(tmp_path / "f", ["red", "blue"]))])
    row = load_rows(recipe(tmp_path, "v.jsonl")).train[0]
    processor, family = load_processor_only(ModelConfig(id="tiny-qwen2.5-vl"))
    batch = ConversationCollator(processor, family)([row])
    # Qwen2.5-VL's temporal rotary positions: 2 frames per patch at 2 fps = 1 s per patch.
    assert batch["second_per_grid_ts"].tolist() == [1.0]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path("tiny-qwen2.5-vl"))
    loss = model(**batch).loss
    loss.backward()
    assert loss.isfinite() and model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    prompt = encode_prompts(processor, family, [row])
    assert model.generate(**prompt, max_new_tokens=2).shape[1] > prompt["input_ids"].shape[1]
