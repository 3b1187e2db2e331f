"""TRL's GRPO rows: a prompt, its images and a reference column, read as ordinary peftvlm rows.

Format `trl_prompt` (detected from a source's first rows, or forced with `format:`):
`{"prompt": [messages] | str, "images": [...] (or "image"), <reference>}`, the reference in the
first of REFERENCE_COLUMNS the row has (`solution`, as TRL's and open-r1's datasets name it,
`answer`, `answers`, `references`, `ground_truth`): a string or a list of acceptable answers.

The row becomes the conversation `prompt + [assistant: first reference]` with every reference
kept in `references`, so SFT trains on it, eval scores against all references, and GRPO
(`trainers.objectives.grpo`) rolls out the prompt and rewards against the references.
"""

from __future__ import annotations

from peftvlm.data.read.formats import media_list, merge_inline
from peftvlm.data.read.preference import detect_row_format, native_turn, prompt_turns
from peftvlm.data.rows import BadRow

PROMPT_FORMAT = "trl_prompt"
REFERENCE_COLUMNS = ("solution", "answer", "answers", "references", "ground_truth")
_OTHER_LAYOUTS = ("chosen", "rejected", "rejected_response", "messages", "conversations")


def is_prompt_record(record) -> bool:
    """A TRL prompt row: `prompt` and no reply pair or conversation of its own."""
    return (isinstance(record, dict) and "prompt" in record
            and not any(k in record for k in _OTHER_LAYOUTS))


def detect_source_format(records: list) -> str | None:
    """`trl_prompt` when a source's first row is a TRL prompt row, else the preference or SFT
    format `preference.detect_row_format` finds."""
    first = next((r for _, r in records[:1]), None)
    return PROMPT_FORMAT if is_prompt_record(first) else detect_row_format(records)


def reference_answers(record: dict) -> list[str]:
    """The row's references, from the first reference column it has; a named bad row without."""
    column = next((c for c in REFERENCE_COLUMNS if c in record), None)
    if column is None:
        raise BadRow("no_reference", "a trl_prompt row needs a reference answer in one of "
                                     f"{', '.join(REFERENCE_COLUMNS)}")
    value = record[column]
    answers = value if isinstance(value, list) else [value]
    answers = [str(a) for a in answers if isinstance(a, (str, int, float)) and str(a).strip()]
    if not answers:
        raise BadRow("empty_answer", f"`{column}` holds no answer (a string or a list of them)")
    return answers


def to_native_prompt(record: dict) -> dict:
    """A `trl_prompt` record -> `{"messages": prompt + [reference], "references", "images",
    "videos"}` (media unresolved)."""
    prompt = prompt_turns(record["prompt"], "prompt")
    if not prompt:
        raise BadRow("bad_messages", "the prompt is empty")
    references = reference_answers(record)
    inline_images, inline_videos = [], []
    turns = [*prompt, {"role": "assistant", "content": references[0]}]
    messages = [native_turn(t, inline_images, inline_videos) for t in turns]
    return {"messages": messages, "references": references,
            "images": merge_inline(media_list(record, "images", "image"), inline_images, "image"),
            "videos": merge_inline(media_list(record, "videos", "video"), inline_videos, "video")}
