"""Row formats: the layouts conversation data comes in, detected per source, turned into
peftvlm's own `{"messages", "images", "videos"}` rows.

- `messages` (peftvlm's own, also LLaMA-Factory / ms-swift / TRL): `{"messages": [{"role",
  "content"}], "images": [...]}` (or `image`: a string or a list; `videos` / `video` alike).
  `content` is a string or a list of `{"type": "text" | "image" | "video"}` items.
- `openai_messages`: the same, with OpenAI content items `{"type": "image_url", "image_url":
  {"url": ...}}` (a path, `file://` or `data:` URL) that carry their own image.
- `llava_conversations` (LLaVA-Instruct-150K/665K, ShareGPT4V, ShareGPT): `{"conversations":
  [{"from": "human" | "gpt" | "system", "value": ...}], "image": ...}`.
- `llamafactory_v1` (LLaMA-Factory v1's standard format, what its converters produce):
  `{"messages": [{"role", "content": [{"type": "text" | "image_url" | "video_url", "value": ...}],
  "loss_weight"}]}`: each item carries its text or media path in `value`.

In every format, `<image>` / `<video>` in text mark where each image / video stands (interleaved
with the text); their number must equal the images given, or the row is a counted bad row.
Detection looks at a source's first rows and names what it picked; `format:` forces one.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import unquote, urlparse

from peftvlm.data.rows import BadRow
from peftvlm.errors import DataError

ROW_FORMATS = ("messages", "openai_messages", "llava_conversations", "llamafactory_v1")
DETECT_ROWS = 100  # rows looked at to detect a source's format
PLACEHOLDER = re.compile(r"\n?(<image>|<video>)\n?")
# ShareGPT speakers -> chat roles (LLaVA writes human/gpt; other ShareGPT sets user/assistant...).
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
            "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
            "model": "assistant", "system": "system"}
OPENAI_ITEMS = {"image_url", "input_image", "video_url"}
# LLaMA-Factory v1 item types (`v1/utils/types.py` Content) -> ours; the others (reasoning,
# tool_call, audio_url) have no place in a peftvlm row and make a named bad row.
V1_ITEMS = {"text": ("text", "text"), "image_url": ("image", "image"),
            "video_url": ("video", "video")}
V1_OTHER_ITEMS = {"reasoning", "tool_call", "audio_url"}


def detect_format(records: list) -> str | None:
    """The row format of the first rows that have `messages` or `conversations` (None: none)."""
    for _, record in records[:DETECT_ROWS]:
        if not isinstance(record, dict):
            continue
        if isinstance(record.get("conversations"), list):
            return "llava_conversations"
        if isinstance(record.get("messages"), list):
            if has_v1_items(record["messages"]):
                return "llamafactory_v1"
            return "openai_messages" if has_openai_items(record["messages"]) else "messages"
    return None


def has_v1_items(messages: list) -> bool:
    """Content items that carry their text or media in `value` (LLaMA-Factory v1)."""
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(c, dict) and "value" in c and "text" not in c
                       and c.get("type") in {*V1_ITEMS, *V1_OTHER_ITEMS} for c in m["content"])
               for m in messages)


def has_openai_items(messages: list) -> bool:
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(c, dict) and c.get("type") in OPENAI_ITEMS for c in m["content"])
               for m in messages)


def to_native(record: dict, fmt: str) -> dict:
    """A record of row format `fmt` -> `{"messages", "images", "videos"}` (media unresolved):
    content lists of text / image / video items, placeholders split out where they stand."""
    key = "conversations" if fmt == "llava_conversations" else "messages"
    if key not in record:
        other = next((k for k in ("messages", "conversations") if k in record), None)
        raise BadRow("format_mismatch",
                     f"no `{key}` in a {fmt} source" + (f" (the row has `{other}`)" if other else "")
                     + ": keep one format per file, or set the source's `format:`")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise BadRow("bad_messages", f"`{key}` must be a non-empty list")
    if fmt == "llava_conversations":
        turns = [sharegpt_turn(t) for t in turns]
    elif fmt == "llamafactory_v1":
        turns = [v1_turn(t) for t in turns]
    images, videos = media_list(record, "images", "image"), media_list(record, "videos", "video")
    inline_images, inline_videos = [], []
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRow("bad_messages", f"message {str(turn)[:60]!r} is not an object")
        content = [item for c in content_items(turn.get("content", ""))
                   for item in expand_item(c, inline_images, inline_videos)]
        messages.append({"role": turn.get("role"), "content": content})
    return {"messages": messages, "images": merge_inline(images, inline_images, "image"),
            "videos": merge_inline(videos, inline_videos, "video")}


def sharegpt_turn(turn) -> dict:
    """`{"from": "human", "value": ...}` -> `{"role": "user", "content": ...}`."""
    if not isinstance(turn, dict) or "from" not in turn:
        raise BadRow("bad_messages", f"turn {str(turn)[:60]!r} needs `from` and `value`")
    speaker = str(turn["from"]).lower()
    if speaker not in SPEAKERS:
        raise BadRow("bad_messages", f"speaker {turn['from']!r} is not one of "
                                     "human/gpt/system (or user/assistant)")
    return {"role": SPEAKERS[speaker], "content": turn.get("value", "")}


def v1_turn(turn) -> dict:
    """A LLaMA-Factory v1 message -> ours: `{"type": "text", "value": s}` -> a text item,
    `image_url` / `video_url` -> an image / video item carrying its path. `loss_weight` 0 on a
    reply would mean "do not train on it", which peftvlm rows cannot say: a bad row."""
    if not isinstance(turn, dict) or not isinstance(turn.get("content"), list):
        raise BadRow("bad_messages", f"message {str(turn)[:60]!r} needs `role` and a `content` "
                                     "list (LLaMA-Factory v1)")
    if turn.get("role") == "assistant" and turn.get("loss_weight", 1.0) != 1.0:
        raise BadRow("bad_messages", f"an assistant message with loss_weight "
                                     f"{turn['loss_weight']} (LLaMA-Factory v1): peftvlm trains "
                                     "on every reply; drop that turn or set it to 1.0")
    return {"role": turn.get("role"), "content": [v1_item(c) for c in turn["content"]]}


def v1_item(item) -> dict:
    if not isinstance(item, dict) or "value" not in item:
        raise BadRow("bad_messages", f"content item {str(item)[:60]!r} needs `type` and `value` "
                                     "(LLaMA-Factory v1)")
    kind = item.get("type")
    if kind not in V1_ITEMS:
        raise BadRow("bad_messages", f"LLaMA-Factory v1 content type {kind!r} is not supported "
                                     "(only text, image_url and video_url are)")
    ours, field = V1_ITEMS[kind]
    return {"type": ours, field: item["value"]}


def media_list(record: dict, plural: str, singular: str) -> list:
    """`images` (a list) or `image` (one value or a list); both at once is ambiguous."""
    if record.get(plural) is not None and record.get(singular) is not None:
        raise BadRow("bad_row", f"both `{plural}` and `{singular}` are set: keep one")
    value = record.get(plural, record.get(singular))
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def merge_inline(listed: list, inline: list, kind: str) -> list:
    """Media named in the row's `images` list, or carried by content items: not both."""
    if inline and listed:
        raise BadRow("bad_row", f"{kind}s are given both in content items and in `{kind}s`: "
                                "keep one")
    return inline or listed


def content_items(content) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    raise BadRow("bad_messages", f"content must be a string or a list, got {type(content).__name__}")


def expand_item(item, inline_images: list, inline_videos: list) -> list[dict]:
    """One content item -> our items; media it carries are appended to the inline lists."""
    if not isinstance(item, dict):
        raise BadRow("bad_messages", f"content item {str(item)[:60]!r} is not an object")
    kind = item.get("type")
    if kind in ("text", "input_text"):
        return split_placeholders(str(item.get("text") or ""))
    if kind in ("image", "image_url", "input_image"):
        carried = image_in_item(item)
        if carried is not None:
            inline_images.append(carried)
        return [{"type": "image"}]
    if kind in ("video", "video_url"):
        carried = video_in_item(item)
        if carried is not None:
            inline_videos.append(carried)
        return [{"type": "video"}]
    raise BadRow("bad_messages", f"content item type {kind!r} is not text, image, image_url or "
                                 "video")


def split_placeholders(text: str) -> list[dict]:
    """`"<image>\\nWhat is this?"` -> image item, text item. The newline LLaVA data puts next to
    a tag is layout, not text (native rows have none), so one on each side is dropped."""
    pieces = PLACEHOLDER.split(text)
    items = []
    for i, piece in enumerate(pieces):
        if i % 2:
            items.append({"type": piece[1:-1]})
        elif piece:
            items.append({"type": "text", "text": piece})
    return items or [{"type": "text", "text": ""}]


def image_in_item(item: dict):
    """The image an item carries (OpenAI `image_url`, HF `image`/`url`/`path`), or None."""
    value = item.get("image_url", item.get("image", item.get("url", item.get("path"))))
    if isinstance(value, dict):
        value = value.get("url")
    return None if value is None else from_url(value, "image")


def video_in_item(item: dict):
    value = item.get("video_url", item.get("video", item.get("url", item.get("path"))))
    if isinstance(value, dict):
        value = value.get("url")
    return None if value is None else from_url(value, "video")


def from_url(value, kind: str):
    """A path, `file://` URL or `data:` URL -> a path or `{"bytes"}`; remote URLs are refused."""
    if not isinstance(value, str):
        return value  # bytes / PIL images / frame lists: checked when resolved
    scheme = urlparse(value).scheme.lower()
    if scheme == "data":
        return {"bytes": decode_data_url(value)}
    if scheme == "file":
        return unquote(urlparse(value).path)
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise BadRow("remote_url", f"{kind} {value[:80]} is a remote URL: training does not "
                                   "fetch from the network; download it and give a path")
    return value


def decode_data_url(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise BadRow("bad_image", "data: URL is not base64-encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRow("bad_image", f"data: URL does not decode as base64: {exc}") from exc


def no_format_error(records: list, name: str):
    """No row of the first ones holds a conversation: say what the rows have and what to do."""
    first = next((r for _, r in records[:DETECT_ROWS] if isinstance(r, dict)), None)
    if first is None:
        return "messages"  # every row is already bad (invalid JSON...): they are counted as such
    raise DataError(f"data source {name}: rows have neither `messages` nor `conversations` "
                    f"(first row's keys: {', '.join(map(str, list(first)[:8]))})",
                    hint="give conversations in one of the formats of docs/data.md, or name a "
                         "data template (`peftvlm ls templates`) that builds them from columns")


def media_token_hits(rows, tokens: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """(row index, token, role) for each row of `rows` (a `table.Rows`) whose message text
    holds one of `tokens`: a family's own image / video tokens, typed in the text, would be read
    as media by its processor (see `FamilySpec.media_tokens`). One regex over the rows' JSON
    text in Arrow finds the candidates, so a warm start of a large source decodes no row; only
    candidates are decoded, to confirm the token stands in a message's text."""
    import pyarrow.compute as pc

    if not tokens or not len(rows):
        return []
    pattern = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    found = pc.indices_nonzero(pc.match_substring_regex(rows.column("row"), pattern))
    hits = []
    for index in found.to_pylist():
        hit = token_in_text(rows[index]["messages"], tokens)
        if hit:
            hits.append((index, *hit))
    return hits


def token_in_text(messages: list[dict], tokens: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of `tokens` to stand in a message's text items, with that message's role."""
    for m in messages:
        for item in m["content"]:
            text = (item.get("text") or "") if item.get("type") == "text" else ""
            found = [(text.index(t), -len(t), t) for t in tokens if t in text]
            if found:
                return min(found)[2], m["role"]
    return None


def media_token_detail(token: str, role: str, family_name: str) -> str:
    """Why a row holding `token` in its text is refused, and what to write instead."""
    if token in ("<image>", "<video>"):  # still in text: a data template wrote it from a column
        fix = "remove it from the column (the data template places the media itself)"
    else:
        fix = ("remove it and mark where each image stands with an `<image>` placeholder (or an "
               "image item), listing the images in `images`")
    return (f"`{token}` typed in {role} text is {family_name}'s own image/video token, which its "
            f"processor would read as media: {fix}")


def interleaving_note(rows: list[dict], family) -> str | None:
    """Say so when rows place images mid-text but the family's template puts them first."""
    if family.interleaved_images:
        return None
    moved = sum(1 for r in rows if any(image_after_text(m["content"]) for m in r["messages"]))
    if not moved:
        return None
    return (f"{moved} row(s) place images between text, but {family.name}'s chat template puts "
            "each turn's images before its text: they are rendered there (the model was "
            "trained that way)")


def image_after_text(content: list[dict]) -> bool:
    seen_text = False
    for item in content:
        if item["type"] == "text" and item.get("text", "").strip():
            seen_text = True
        elif item["type"] in ("image", "video") and seen_text:
            return True
    return False
