"""Turn conversations into model inputs whose labels carry loss only on the assistant's tokens.

Conversations are rendered with the checkpoint's own chat template; which characters are
replies is derived from that template (`peftvlm.data.render.chat_template`), then mapped onto the
processor's token ids (image tokens expanded) through the tokenizer's offsets. Families without
a chat template (PaliGemma) provide their own `encode` hook.
"""

from __future__ import annotations

import functools
import itertools

from peftvlm.data.read.images import load_rgb
from peftvlm.data.read.video import load_frames, metadata
from peftvlm.data.render.chat_template import chat_template_of, shift_spans, token_mask
from peftvlm.data.render.shapes import ShapeRenderer
from peftvlm.data.rows import BadRow
from peftvlm.errors import DataError

IGNORE_INDEX = -100
RENDER_CACHE_SIZE = 200_000  # rendered rows kept by a collator (text + spans, ~1 kB each)


@functools.cache
def media_errors() -> tuple:
    """What opening a row's media raises when a file is gone, replaced or corrupt."""
    from PIL import Image

    # OSError: missing, unreadable or truncated files (PIL's UnidentifiedImageError too);
    # ValueError / SyntaxError / EOFError: what PIL's decoders raise on corrupt data.
    return (OSError, ValueError, SyntaxError, EOFError, BadRow, Image.DecompressionBombError)


def open_image(image):
    """The RGB image the processor gets: decoded as `peftvlm.data.read.images.load_rgb` says (EXIF
    orientation applied, transparency on white, 16-bit scaled), from a path, bytes or PIL image."""
    return load_rgb(image)


def with_images(messages: list[dict], images: list, videos: list = ()) -> list[dict]:
    """Attach the row's images (and videos: frame arrays with their timing, `video_metadata`),
    in order, to its media items."""
    pending = iter(open_image(i) for i in images)
    clips = iter({"type": "video", "video": load_frames(v), "video_metadata": metadata(v)}
                 for v in videos)
    media = {"image": lambda: {"type": "image", "image": next(pending)},
             "video": lambda: next(clips)}
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
    """Collate `{"messages", "images"}` rows into padded tensors with assistant-only labels.

    The text comes from the processor's own chat template (`data.chat_template`); each row's
    `input_ids` / `labels` stay per-row aligned (right padding only), so packing can build on
    them.
    """

    def __init__(self, processor, family, assistant_only_loss: bool = True):
        self.processor, self.family = processor, family
        self.assistant_only_loss = assistant_only_loss
        self._rendered: dict[str, object] = {}
        self._shapes: dict[str, object] = {}  # a ShapeRenderer per chat template
        self.skipped: list[dict] = []  # rows skipped in this process: {"row_id", "detail"}
        self._last_good = None

    def render(self, conversations: list[list[dict]]) -> list:
        """Text and reply spans per conversation (`chat_template.render_by_prefixes`'s result,
        from one layout per conversation shape where proven equal: `shapes.ShapeRenderer`),
        remembered per row: a row renders the same every epoch."""
        import json

        # images do not change the text: the key holds the place of each, not its pixels
        keys = [json.dumps(c, sort_keys=True, default=lambda _: "<image>") for c in conversations]
        missing = {k: c for k, c in zip(keys, conversations) if k not in self._rendered}
        if missing:
            if len(self._rendered) > RENDER_CACHE_SIZE:
                self._rendered.clear()
            self._rendered.update(zip(missing, self.shapes().render(list(missing.values()))))
        return [self._rendered[k] for k in keys]

    def shapes(self):
        """The shape renderer of the processor's current chat template (the same one counts
        token lengths: `lengths.LengthCounter`)."""
        template = chat_template_of(self.processor)
        if template not in self._shapes:
            self._shapes[template] = ShapeRenderer(self.processor, self.family.end_of_turn)
        return self._shapes[template]

    def encode(self, conversations: list[list[dict]]) -> dict:
        if self.family.encode is not None:
            return dict(self.family.encode(self.processor, conversations))
        rendered = self.render(conversations)
        # padding_side explicitly: some processors (InternVL) default their text kwargs to left
        batch = process_texts(self.processor, [r.text for r in rendered],
                              [conversation_media(c, "image") for c in conversations],
                              offsets=True, padding_side="right",
                              videos=[video_items(c) for c in conversations])
        masks = reply_masks(batch, [r.spans for r in rendered])
        batch = {k: to_tensor(v) for k, v in batch.items()}
        labels = batch["input_ids"].clone()
        if self.assistant_only_loss:
            labels[~to_tensor(masks)] = IGNORE_INDEX
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        batch["labels"] = labels
        return batch

    def __call__(self, rows: list[dict]) -> dict:
        self.processor.tokenizer.padding_side = "right"
        conversations, stand_ins = self.decode_or_skip(rows)
        batch = self.encode(conversations)
        if stand_ins:  # copies that keep the batch's row count (packing's bins) train nothing
            batch["labels"][stand_ins] = IGNORE_INDEX
        return batch

    # Rows whose media fail to open at training time (deleted, replaced or corrupted after they
    # were checked) are skipped, not a crash at step N: `skipped` names them, and with
    # `skipped_rows_file` set (by `api.train`) each process (dataloader workers, ranks) appends
    # them there, one JSON line each, for the run's summary.
    skipped_rows_file = None
    spare_rows = None  # the training rows: a stand-in when every row of a batch fails

    def decode_or_skip(self, rows: list[dict]) -> tuple[list, list[int]]:
        """The rows' conversations with media decoded; a row that fails is replaced by a copy
        of a good one (returned as a stand-in index, whose labels are masked) so the batch
        keeps its shape. A batch with no good row takes the last good row seen (or the first
        spare row that decodes), trained on: a batch without labels would divide by zero."""
        decoded, failed = [], []
        for i, row in enumerate(rows):
            try:
                decoded.append(with_images(row["messages"], row["images"], row.get("videos") or ()))
                self._last_good = row
            except media_errors() as exc:
                decoded.append(None)
                failed.append(i)
                self.skip(row, exc)
        if not failed:
            return decoded, []
        good = next((c for c in decoded if c is not None), None)
        if good is None:
            good, failed = self.stand_in(), failed[1:]
        return [good if c is None else c for c in decoded], failed

    def skip(self, row: dict, exc: Exception) -> None:
        import json
        import os

        entry = {"row_id": row.get("row_id") or "?", "detail": str(exc)[:300]}
        self.skipped.append(entry)
        if self.skipped_rows_file is not None:  # O_APPEND: concurrent writers' lines stay whole
            fd = os.open(self.skipped_rows_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(entry) + "\n").encode())
            finally:
                os.close(fd)

    def stand_in(self) -> list[dict]:
        """A decoded good row for a batch whose rows all failed (see `decode_or_skip`)."""
        candidates = [self._last_good] if self._last_good is not None else []
        for row in itertools.chain(candidates, self.spare_rows or ()):
            try:
                decoded = with_images(row["messages"], row["images"], row.get("videos") or ())
            except media_errors():
                continue
            self._last_good = row
            return decoded
        raise DataError("no training row's images open any more (deleted or changed since the "
                        "data was prepared)", hint="restore the images, then train again")


def conversation_media(conversation: list[dict], kind: str = "image") -> list:
    """The decoded media of a conversation's `kind` items ("image": PIL, "video": frames)."""
    return [c[kind] for m in conversation for c in m["content"]
            if isinstance(c, dict) and c.get("type") == kind and kind in c]


def video_items(conversation: list[dict]) -> list[dict]:
    """A conversation's decoded video items (`{"video": frames, "video_metadata": ...}`)."""
    return [c for m in conversation for c in m["content"]
            if isinstance(c, dict) and c.get("type") == "video" and "video" in c]


def process_texts(processor, texts: list[str], images: list[list], offsets: bool = False,
                  videos: list[list] | None = None, **kwargs) -> dict:
    """The processor on rendered texts, as `apply_chat_template(tokenize=True)` calls it: no
    special tokens added when the template writes BOS itself; NumPy arrays (faster to build
    than tensors)."""
    bos = processor.tokenizer.bos_token
    options = dict(padding=True, return_tensors="np",
                   add_special_tokens=not (bos and texts[0].startswith(bos)), **kwargs)
    if offsets:
        options.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
    if videos and any(videos):  # only families that take video are given any (video.py)
        options["videos"] = [v["video"] for row in videos for v in row]
        # the clips' timing: Qwen2.5-VL's time positions and Qwen3-VL's `<t seconds>` read it
        options["video_metadata"] = [v["video_metadata"] for row in videos for v in row]
    has_images = any(images)
    batch = processor(text=texts, images=images if has_images else None, **options)
    return dict(batch)


def reply_masks(batch: dict, spans: list) -> object:
    """Boolean (rows, tokens) mask of reply tokens; pops the offsets from `batch`."""
    import numpy as np

    offsets = np.asarray(batch.pop("offset_mapping"))
    replacements = batch.pop("text_replacement_offsets", None)
    if replacements is None or len(replacements) == 0:  # a list, or NumPy's object array
        replacements = [[]] * len(spans)
    return np.stack([token_mask(offsets[i], shift_spans(spans[i], replacements[i]))
                     for i in range(len(spans))])


def encode_prompts(processor, family, rows: list[dict]) -> dict:
    """Left-padded generation prompts (all turns before the last answer) for batched eval,
    rendered with the processor's chat template and its generation prompt."""
    conversations = [with_images(prompt_messages(r["messages"]), r["images"], r.get("videos") or ())
                     for r in rows]
    processor.tokenizer.padding_side = "left"
    if family.encode_prompt is not None:
        return dict(family.encode_prompt(processor, conversations))
    options = {"padding": True, "padding_side": "left"}
    clips = [v["video_metadata"] for c in conversations for v in video_items(c)]
    if clips:  # apply_chat_template reads only the frames from a video item: timing goes here
        options["video_metadata"] = clips
    return dict(processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt", processor_kwargs=options))


def example_length(collator: ConversationCollator, row: dict) -> int:
    """Token count of one row as the trainer will see it (image tokens included)."""
    return int(collator([row])["input_ids"].shape[1])
