"""Read training/eval rows from the recipe's sources into normalised conversations.

A row the trainer reads is `{"messages": [...], "images": [path or PIL image, ...]}` where each
message's `content` is a list of `{"type": "image"}` / `{"type": "text", "text": ...}` items;
`id`, `references` and `question_type` are kept when present (evaluation reads them).
Bad rows (missing, corrupt or escaping images, malformed messages, empty answers) are counted by
reason with their row ids, then skipped or reported before training (`data.on_bad_row`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from peftvlm.errors import DataError

MAX_LISTED_ROWS = 5


class BadRow(Exception):
    """A row that cannot be used; `reason` is a short stable key, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class BadRowReport:
    """Counts of skipped rows per reason, with the first few row ids of each."""

    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, row_id: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < MAX_LISTED_ROWS:
            self.examples[reason].append(f"{row_id} ({detail})")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {r: {"count": c, "first_rows": self.examples[r]} for r, c in self.counts.items()}

    def describe(self) -> str:
        return "; ".join(f"{c} {r.replace('_', ' ')} (e.g. {self.examples[r][0]})"
                         for r, c in self.counts.items())


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(row id, record) pairs of a JSONL or JSON file; row ids are `file:line`."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        if isinstance(data, dict):  # {"data": [...]}-style wrappers
            data = next((v for v in data.values() if isinstance(v, list)), [])
        return [(f"{path.name}[{i}]", r) for i, r in enumerate(data)]
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path.name}:{n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            records.append((f"{path.name}:{n}", BadRow("invalid_json", exc.msg)))
    return records


def normalise_content(content) -> list[dict]:
    """String content becomes one text item; lists are kept (checked for known item types)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise BadRow("bad_messages", f"content must be a string or a list, got {type(content).__name__}")
    items = []
    for item in content:
        if not isinstance(item, dict) or item.get("type") not in ("image", "text"):
            raise BadRow("bad_messages", f"content item {item!r} is not an image or text item")
        items.append({"type": "image"} if item["type"] == "image"
                     else {"type": "text", "text": str(item.get("text") or "")})
    return items


def normalise_messages(messages, n_images: int) -> list[dict]:
    """Check roles and answers; put image items in the first user turn if none are marked."""
    if not isinstance(messages, list) or not messages:
        raise BadRow("bad_messages", "`messages` must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRow("bad_messages", f"message {str(m)[:60]!r} needs role system/user/assistant")
        out.append({"role": m["role"], "content": normalise_content(m.get("content", ""))})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("no_answer", "no assistant message")
    for m in out:
        if m["role"] == "assistant" and not "".join(i.get("text", "") for i in m["content"]).strip():
            raise BadRow("empty_answer", "an assistant message is empty")
    marked = sum(i["type"] == "image" for m in out for i in m["content"])
    if marked == 0 and n_images:
        first_user = next(m for m in out if m["role"] == "user")
        first_user["content"][:0] = [{"type": "image"}] * n_images
    elif marked != n_images:
        raise BadRow("image_count", f"{marked} image placeholders but {n_images} images")
    return out


def resolve_image(image, root: Path):
    """A path relative to `root` (must stay inside it) or an in-memory image; checked to decode."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and image.get("bytes"):
        import io
        return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
    if isinstance(image, dict) and image.get("path"):
        image = image["path"]
    if not isinstance(image, str) or not image:
        raise BadRow("bad_image", f"image {image!r} is not a path")
    path = (root / image).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BadRow("path_escapes_root", f"{image} is outside the data folder {root}")
    if not path.is_file():
        raise BadRow("missing_image", f"{image} not found")
    if path.stat().st_size == 0:
        raise BadRow("corrupt_image", f"{image} is empty")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError) as exc:
        raise BadRow("corrupt_image", f"{image}: {exc}") from exc
    return str(path)


def to_conversation(record, root: Path) -> dict:
    """A raw record -> `{"messages", "images"}` with images resolved, or `BadRow`."""
    if isinstance(record, BadRow):
        raise record
    if not isinstance(record, dict):
        raise BadRow("bad_row", "a row must be a JSON object")
    images = record.get("images", [])
    images = [images] if isinstance(images, (str, dict)) else list(images or [])
    messages = normalise_messages(record.get("messages"), len(images))
    row = {"messages": messages, "images": [resolve_image(i, root) for i in images]}
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


def load_conversations(sources, base_dir: Path, report: BadRowReport) -> list[dict]:
    """All rows of `sources` (recipe `SourceConfig`s) as conversations; bad ones go to `report`."""
    rows = []
    for src in sources:
        if src.dataset:
            raise DataError(f"data source {src.dataset!r}: `dataset` sources need the data "
                            f"templates module", hint="use a JSONL file with messages + images")
        path = (base_dir / src.path).resolve()
        records = read_records(path)[: src.max_samples]
        for row_id, record in records:
            try:
                rows.append(to_conversation(record, path.parent))
            except BadRow as bad:
                report.add(bad.reason, row_id, bad.detail)
    return rows


def enforce_policy(report: BadRowReport, policy: str, what: str) -> None:
    """With `on_bad_row: error`, any bad row stops the run before training, naming rows."""
    if report.total and policy == "error":
        raise DataError(f"{what}: {report.total} bad row(s): {report.describe()}",
                        hint="fix those rows, or set data.on_bad_row: skip to drop and count them")
