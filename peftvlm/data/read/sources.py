"""Check rows and images: the normalised conversation format and the bad-row report.

A row the trainer reads is `{"messages": [...], "images": [...]}` (images: absolute paths, or
`{"bytes", "path"}` dicts when a source holds encoded images, or PIL images) where each
message's `content` is a list of `{"type": "image"}` / `{"type": "text", "text": ...}` items;
`id`, `references` and `question_type` are kept when present (evaluation reads them).
Bad rows (missing, corrupt or escaping images, malformed messages, wrong column types, empty
answers, boxes outside the image) are counted by reason with their row ids, then skipped or
reported before training (`data.on_bad_row`). Reading files is `readers.py`; templates that make
conversations from annotations are `templates.py`.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.data.read.formats import to_native
from peftvlm.data.read.images import check_image
from peftvlm.data.read.preference import PREFERENCE_FORMATS, to_native_pair
from peftvlm.data.read.prompt_rows import PROMPT_FORMAT, to_native_prompt
from peftvlm.data.rows import BadRow
from peftvlm.safe_yaml import regular_file_problem


def normalise_messages(messages: list[dict], n_images: int, n_videos: int = 0) -> list[dict]:
    """Check roles and answers; media items must match the media given (none marked: images
    and videos go at the start of the first user turn, as most datasets mean)."""
    out = []
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise BadRow("bad_messages", f"message {str(m)[:60]!r} needs role system/user/assistant")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no_answer", "no assistant message")
    for m in out:
        if m["role"] == "assistant" and not "".join(i.get("text", "") for i in m["content"]).strip():
            raise BadRow("empty_answer", "an assistant message is empty")
    for kind, given in (("video", n_videos), ("image", n_images)):
        marked = sum(i["type"] == kind for m in out for i in m["content"])
        if marked == 0 and given:
            first_user = next((m for m in out if m["role"] == "user"), None)
            if first_user is None:
                raise BadRow(f"{kind}_count", f"{given} {kind}(s) but no user turn to put them in")
            first_user["content"][:0] = [{"type": kind}] * given
        elif marked != given:
            raise BadRow(f"{kind}_count", f"{marked} {kind} placeholder(s) (<{kind}> tags or "
                                          f"{kind} items) but {given} {kind}(s) given")
    return out


def resolve_image(image, root: Path):
    """A checked image: a path relative to `root` (must stay inside it) becomes an absolute
    path; encoded bytes stay `{"bytes": ...}` (decoded when batched); PIL images pass through."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        image = {"bytes": bytes(image)}
    if isinstance(image, dict) and image.get("bytes"):
        verify_image_bytes(image["bytes"])
        return {"bytes": image["bytes"]}
    if isinstance(image, dict) and image.get("path"):
        image = image["path"]
    if not isinstance(image, str) or not image.strip():
        raise BadRow("bad_image", f"image {str(image)[:60]!r} is not a path, bytes or an image")
    try:
        path = (root / image).resolve()
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError on a symlink loop
        raise BadRow("bad_image", f"{image} is a symlink loop") from None
    if not path.is_relative_to(root.resolve()):
        raise BadRow("path_escapes_root", f"{image} is outside the data folder {root}")
    problem = regular_file_problem(path)  # a directory, FIFO (open() would block), device
    if problem:
        raise BadRow("bad_image", f"{image} {problem}")
    if not path.is_file():
        raise BadRow("missing_image", f"{image} not found")
    if path.stat().st_size == 0:
        raise BadRow("corrupt_image", f"{image} is empty")

    check_image(path, image)  # decoded whole, as training will: never a crash at step N
    return str(path)


def verify_image_bytes(data: bytes) -> None:
    check_image(data, "image bytes")


def to_conversation(record, root: Path, fmt: str = "messages", video=None, resolve=None) -> dict:
    """A raw record of row format `fmt` (`formats.py`) -> `{"messages", "images"}` (+ `videos`
    when it has any) with media resolved (images by `resolve(image, root)`, default
    `resolve_image`) and checked, or `BadRow`. `video`: `VideoOptions`."""
    if isinstance(record, BadRow):
        raise record
    if not isinstance(record, dict):
        raise BadRow("bad_row", "a row must be a JSON object")
    native = (to_native_pair(record, fmt) if fmt in PREFERENCE_FORMATS else
              to_native_prompt(record) if fmt == PROMPT_FORMAT else to_native(record, fmt))
    messages = normalise_messages(native["messages"], len(native["images"]), len(native["videos"]))
    resolve = resolve or resolve_image
    row = {"messages": messages, "images": [resolve(i, root) for i in native["images"]]}
    if "rejected" in native:  # a preference row: the other reply to the same prompt
        row["rejected"] = native["rejected"]
    if native["videos"]:
        from peftvlm.data.read.video import VideoOptions, resolve_video

        row["videos"] = [resolve_video(v, root, video or VideoOptions()) for v in native["videos"]]
    if "references" in native:  # a TRL prompt row's reference column (prompt_rows.py)
        return {**row, **eval_fields({**record, "references": native["references"]})}
    return {**row, **eval_fields(record)}


def eval_fields(record: dict) -> dict:
    """Optional fields evaluation reads: `id`, `references` (e.g. VQA's 10 answers, scored
    instead of the last answer) and `question_type` (per-type scores)."""
    out = {}
    if record.get("id") is not None:
        out["id"] = str(record["id"])
    refs = record.get("references")
    if isinstance(refs, list) and refs and all(isinstance(r, (str, int, float)) for r in refs):
        out["references"] = [str(r) for r in refs]
    elif refs is not None:
        raise BadRow("bad_references", "`references` must be a non-empty list of strings")
    if record.get("question_type") is not None:
        out["question_type"] = str(record["question_type"])
    return out
