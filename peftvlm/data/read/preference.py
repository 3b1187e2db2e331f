"""Preference rows (a prompt, a chosen and a rejected reply): the data of `train.objective: dpo`.

A preference row is an ordinary peftvlm row whose `messages` end with the chosen reply, plus
`rejected`: the other reply, one assistant message. So everything that reads rows (the image
checks, the cache, lengths, evaluation: the chosen reply is the reference) reads them as they
are, and the DPO collator renders `prompt + chosen` and `prompt + rejected` with the same images.

Formats, detected from a source's first rows (or forced with `format:`):
- `trl_preference` (TRL): `{"prompt": [messages] | str, "chosen": [messages] | str,
  "rejected": [messages] | str, "images": [...]}` (or `image`).
- `rlaifv` (RLAIF-V, `openbmb/RLAIF-V-Dataset`): `{"image", "question", "chosen", "rejected"}`,
  strings.
- `llamafactory_ranking` (LLaMA-Factory `ranking: true`, sharegpt or openai tags):
  `{"conversations" | "messages": [...prompt turns], "chosen": {"from": "gpt", "value"} |
  {"role": "assistant", "content"} | str, "rejected": (same), "images": [...]}`.
- `swift_rejected_response` (ms-swift): `{"messages": [..., {"role": "assistant", "content":
  chosen}], "rejected_response": str, "images": [...]}`.

Images are marked and counted as in the SFT formats (`formats.py`): `<image>` tags or image
items, else all at the start of the first user turn.
"""

from __future__ import annotations

from peftvlm.data.read.formats import (DETECT_ROWS, content_items, detect_format, expand_item,
                                       media_list, merge_inline, sharegpt_turn)
from peftvlm.data.rows import BadRow
from peftvlm.errors import DataError, RunError

PREFERENCE_FORMATS = ("trl_preference", "rlaifv", "llamafactory_ranking",
                      "swift_rejected_response")


def detect_row_format(records: list) -> str | None:
    """The row format of a source's first rows: a preference format where they hold a reply
    pair, else an SFT one (`formats.detect_format`)."""
    for _, record in records[:DETECT_ROWS]:
        found = detect_preference_format(record)
        if found:
            return found
    return detect_format(records)


def detect_preference_format(record) -> str | None:
    """The preference format of one raw record, or None when it holds no reply pair."""
    if not isinstance(record, dict):
        return None
    if "rejected_response" in record:
        return "swift_rejected_response"
    if "chosen" not in record or "rejected" not in record:
        return None
    if "prompt" in record:
        return "trl_preference"
    if "question" in record:
        return "rlaifv"
    if "conversations" in record or "messages" in record:
        return "llamafactory_ranking"
    return None


def is_preference_row(row: dict) -> bool:
    """Whether a rendered row carries a rejected reply (`to_native_pair` made it)."""
    return isinstance(row.get("rejected"), dict)


def to_native_pair(record: dict, fmt: str) -> dict:
    """A raw record of preference format `fmt` -> `{"messages": prompt + [chosen], "rejected":
    assistant message, "images", "videos"}` with content-item lists (media unresolved)."""
    readers = {"trl_preference": trl_parts, "rlaifv": rlaifv_parts,
               "llamafactory_ranking": ranking_parts,
               "swift_rejected_response": swift_parts}
    prompt, chosen, rejected = readers[fmt](record)
    if not prompt:
        raise BadRow("bad_messages", "the prompt is empty (no user turn before the replies)")
    images, videos = media_list(record, "images", "image"), media_list(record, "videos", "video")
    inline_images, inline_videos = [], []
    messages = [native_turn(t, inline_images, inline_videos) for t in [*prompt, chosen]]
    rejected = native_turn(rejected, inline_images, inline_videos)
    if any(i["type"] != "text" for m in (messages[-1], rejected) for i in m["content"]):
        raise BadRow("bad_messages", "an image or video inside a reply: media belong to the "
                                     "prompt, shared by both replies")
    return {"messages": messages, "rejected": rejected,
            "images": merge_inline(images, inline_images, "image"),
            "videos": merge_inline(videos, inline_videos, "video")}


def native_turn(turn: dict, inline_images: list, inline_videos: list) -> dict:
    content = [item for c in content_items(turn.get("content", ""))
               for item in expand_item(c, inline_images, inline_videos)]
    return {"role": turn.get("role"), "content": content}


def reply(value, field: str) -> dict:
    """A chosen/rejected reply as one assistant message: a string, a `{"role", "content"}` or
    `{"from", "value"}` message, or a list holding one assistant message (TRL)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise BadRow("bad_reply", f"`{field}` must hold exactly one assistant message "
                                      f"(got {len(value)} items)")
        value = value[0]
    if isinstance(value, dict):
        turn = sharegpt_turn(value) if "from" in value else value
        if turn.get("role") != "assistant":
            raise BadRow("bad_reply", f"`{field}` is a {turn.get('role')!r} message; it must be "
                                      "the assistant's reply")
        value = turn.get("content")
    if isinstance(value, str):
        value = [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise BadRow("bad_reply", f"`{field}` must be a string or an assistant message, got "
                                  f"{type(value).__name__}")
    text = "".join(str(i.get("text") or "") for i in value if isinstance(i, dict))
    if not text.strip():
        raise BadRow("empty_answer", f"`{field}` is empty")
    return {"role": "assistant", "content": value}


def prompt_turns(value, field: str) -> list[dict]:
    """A prompt: a string (one user turn) or a list of messages (sharegpt tags allowed)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise BadRow("bad_messages", f"`{field}` must be a string or a list of messages")
    turns = [sharegpt_turn(t) if isinstance(t, dict) and "from" in t else t for t in value]
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise BadRow("bad_messages", f"`{field}` message {str(turn)[:60]!r} needs role "
                                         "system/user/assistant")
    if turns and turns[-1]["role"] == "assistant":
        raise BadRow("bad_messages", f"`{field}` ends with an assistant turn: the prompt ends "
                                     "where the replies start")
    return turns


def trl_parts(record: dict):
    return (prompt_turns(record["prompt"], "prompt"), reply(record["chosen"], "chosen"),
            reply(record["rejected"], "rejected"))


def rlaifv_parts(record: dict):
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise BadRow("bad_messages", "`question` must be a non-empty string")
    return ([{"role": "user", "content": question}], reply(record["chosen"], "chosen"),
            reply(record["rejected"], "rejected"))


def ranking_parts(record: dict):
    key = "conversations" if "conversations" in record else "messages"
    return (prompt_turns(record[key], key), reply(record["chosen"], "chosen"),
            reply(record["rejected"], "rejected"))


def swift_parts(record: dict):
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRow("bad_messages", "`messages` must be a non-empty list ending with the "
                                     "chosen reply")
    *prompt, chosen = messages
    if not isinstance(chosen, dict) or chosen.get("role") != "assistant":
        raise BadRow("bad_messages", "`messages` must end with the assistant's chosen reply "
                                     "(ms-swift: `rejected_response` is the other one)")
    return (prompt_turns(prompt, "messages"), reply(chosen, "messages[-1]"),
            reply(record["rejected_response"], "rejected_response"))


# --- what DPO reads and shows ------------------------------------------------------------------

def rejected_conversation(row: dict) -> list[dict]:
    """The row's prompt followed by its rejected reply (`messages` ends with the chosen one)."""
    return [*row["messages"][:-1], row["rejected"]]


def require_preference_rows(rows, what: str, source_formats: list[dict]) -> None:
    """DPO trains on pairs: a source without rejected replies is named, with its format."""
    plain = [s for s in source_formats if s.get("format") not in PREFERENCE_FORMATS
             and s.get("section") == what.rpartition(".")[2]]
    if plain or (len(rows) and not is_preference_row(rows[0])):
        names = ", ".join(f"{s['source']} ({s['format']})" for s in plain) or what
        raise DataError(f"{what}: train.objective dpo needs preference rows (a prompt, a chosen "
                        f"and a rejected reply), but {names} holds plain conversations",
                        hint="give rows in one of the preference formats of "
                             "docs/objectives.md (trl_preference, rlaifv, llamafactory_ranking, "
                             "swift_rejected_response), or train with objective: sft")


# --- batches -----------------------------------------------------------------------------------

# Batch keys that are text positions; every other tensor describes the images (pixels, grids,
# sizes, patch masks), which must be the same for a row's chosen and rejected halves.
TEXT_KEYS = ("input_ids", "attention_mask", "completion_mask", "token_type_ids",
             "mm_token_type_ids", "position_ids")


class PreferenceCollator:
    """Preference rows -> TRL's DPO batch: the rows' `prompt + chosen` conversations, then the
    same rows' `prompt + rejected`, encoded in one call of the conversation collator (so both
    halves hold the same images, processed alike), with `completion_mask` marking the last
    reply's tokens (earlier replies in a multi-turn prompt are context, as in TRL)."""

    def __init__(self, conversations):
        self.conversations = conversations
        self.processor, self.family = conversations.processor, conversations.family

    def __getattr__(self, name):  # skipped rows, spare rows: the conversation collator's
        if name == "conversations":  # not set yet (unpickling in a dataloader worker)
            raise AttributeError(name)
        return getattr(self.conversations, name)

    def __call__(self, rows: list[dict]) -> dict:
        pairs = [*rows, *({**r, "messages": rejected_conversation(r)} for r in rows)]
        batch = self.conversations(pairs)
        labels = batch.pop("labels")
        batch["completion_mask"] = last_run(labels != -100).long()
        check_same_images(batch, len(rows))
        return batch


def last_run(mask):
    """Each row's last run of True (the final reply); earlier runs set to False."""
    import torch

    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    gap = torch.where(~mask & (positions < last[:, None]), positions, -1).max(dim=1).values
    return mask & (positions > gap[:, None])


def check_same_images(batch: dict, rows: int) -> None:
    """Chosen and rejected must be scored on identical pixels, or DPO would learn from the
    images' difference rather than the replies' (a guard: the halves of every image tensor)."""
    import torch

    for key, value in batch.items():
        if key in TEXT_KEYS or not isinstance(value, torch.Tensor) or not value.dim():
            continue
        if value.shape[0] % 2 or not torch.equal(*value.chunk(2)):
            raise RunError(f"a DPO batch's chosen and rejected halves differ in `{key}` "
                           f"({rows} pairs): the replies would be scored on different images",
                           hint="report this with the rows of the batch; set "
                                "PEFTVLM_DEBUG=1 for the traceback")
