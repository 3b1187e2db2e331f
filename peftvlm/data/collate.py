"""Turn conversations into model inputs whose labels carry loss only on the assistant's tokens.

The family's training chat template wraps each assistant reply (and its end-of-turn token) in
`{% generation %}` markers; the processor turns those spans into `assistant_masks` after image
tokens are expanded, so the mask lines up with the real input ids. Families without a chat
template (PaliGemma) provide their own `encode` hook.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def open_image(image):
    """The RGB image the processor gets: decoded as `peftvlm.data.images.load_rgb` says (EXIF
    orientation applied, transparency on white, 16-bit scaled), from a path, bytes or PIL image."""
    from peftvlm.data.images import load_rgb

    return load_rgb(image)


def with_images(messages: list[dict], images: list, videos: list = ()) -> list[dict]:
    """Attach the row's images (and videos: frame arrays), in order, to its media items."""
    from peftvlm.data.video import load_frames

    pending = iter(open_image(i) for i in images)
    clips = iter(load_frames(v) for v in videos)
    media = {"image": lambda: {"type": "image", "image": next(pending)},
             "video": lambda: {"type": "video", "video": next(clips)}}
    return [{"role": m["role"],
             "content": [media[c["type"]]() if c["type"] in media else c for c in m["content"]]}
            for m in messages]


def prompt_messages(messages: list[dict]) -> list[dict]:
    """Everything before the last assistant turn: the prompt a model answers at eval time."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def last_answer(messages: list[dict]) -> str:
    reply = [m for m in messages if m["role"] == "assistant"][-1]
    return "".join(c.get("text", "") for c in reply["content"]).strip()


def to_tensor(value):
    import numpy as np
    import torch

    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


class ConversationCollator:
    """Collate `{"messages", "images"}` rows into padded tensors with assistant-only labels."""

    def __init__(self, processor, family, assistant_only_loss: bool = True):
        self.processor, self.family = processor, family
        self.assistant_only_loss = assistant_only_loss

    def encode(self, conversations: list[list[dict]]) -> dict:
        if self.family.encode is not None:
            return dict(self.family.encode(self.processor, conversations))
        # NumPy, not torch: transformers maps generation spans onto tokens in a Python loop
        # over the offsets, which is twice as fast over arrays as over tensors.
        batch = self.processor.apply_chat_template(
            conversations, chat_template=self.family.training_chat_template, tokenize=True,
            return_dict=True, return_assistant_tokens_mask=True, return_tensors="np",
            processor_kwargs={"padding": True})
        batch = {k: to_tensor(v) for k, v in batch.items()}
        mask = batch.pop("assistant_masks")
        labels = batch["input_ids"].clone()
        if self.assistant_only_loss:
            labels[mask == 0] = IGNORE_INDEX
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
        return batch

    def __call__(self, rows: list[dict]) -> dict:
        self.processor.tokenizer.padding_side = "right"
        return self.encode([with_images(r["messages"], r["images"], r.get("videos") or ())
                            for r in rows])


def encode_prompts(processor, family, rows: list[dict]) -> dict:
    """Left-padded generation prompts (all turns before the last answer) for batched eval."""
    conversations = [with_images(prompt_messages(r["messages"]), r["images"], r.get("videos") or ())
                     for r in rows]
    processor.tokenizer.padding_side = "left"
    if family.encode_prompt is not None:
        return dict(family.encode_prompt(processor, conversations))
    return dict(processor.apply_chat_template(
        conversations, chat_template=family.training_chat_template, add_generation_prompt=True,
        tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"padding": True}))


def example_length(collator: ConversationCollator, row: dict) -> int:
    """Token count of one row as the trainer will see it (image tokens included)."""
    return int(collator([row])["input_ids"].shape[1])
