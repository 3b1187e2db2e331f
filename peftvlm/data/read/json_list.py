"""A top-level JSON list (LLaVA-Instruct's `llava_v1_5_mix665k.json`) read one item at a time.

`json.loads` needs the whole text and builds every item at once (gigabytes for 665k rows), and
keeps no positions. `JsonListReader` decodes items with `JSONDecoder.raw_decode` from a buffer
refilled 1 MiB at a time, keeping the line and byte offset where each item starts, so a shard of
the list can start at an item's first byte (`read_json_list(path, offset, line, count)`) and
records keep their `file:line` names. Items are named by the line they start on, as before.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Any, Iterator

from peftvlm.errors import DataError

CHUNK = 1 << 20
WHITESPACE = re.compile(r"[ \t\n\r]*")


def starts_a_list(path: Path) -> bool:
    """Whether the file's first non-blank character (after a BOM) is `[`."""
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="replace")
    return head.lstrip(" \t\n\r").startswith("[")


class JsonListReader:
    """(line, item) of a JSON list from byte `offset` (the list's start, or with `inside`, an
    item's first byte on line `line`); `item_offset()` is the byte where the last item began."""

    def __init__(self, path: Path, offset: int = 0, line: int = 1, inside: bool = False):
        self.path, self.start, self.first_line, self.inside = path, offset, line, inside

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        decoder = json.JSONDecoder()
        with self.path.open("rb") as self.file:
            start = self.start
            if not start and self.file.read(3) == codecs.BOM_UTF8:
                start = 3  # a BOM is not text (and offsets stay byte offsets)
            self.file.seek(start)
            self.utf8 = codecs.getincrementaldecoder("utf-8")()
            self.buf, self.pos, self.item = "", 0, 0
            self.base, self.line, self.counted, self.eof = start, self.first_line, 0, False
            if not self.inside:
                self.skip_whitespace()
                if not self.buf.startswith("[", self.pos):
                    raise DataError(f"{self.path}: not a JSON list")
                self.pos += 1
            while self.skip_whitespace() and self.buf[self.pos] != "]":
                self.item = self.pos
                item, self.pos = self.decode(decoder)
                yield self.line_at(self.item), item
                if self.skip_whitespace() and self.buf[self.pos] == ",":
                    self.pos += 1

    def skip_whitespace(self) -> bool:
        """Move past blanks; False at the end of the file."""
        while True:
            self.pos = WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return True
            if not self.refill():
                return False

    def decode(self, decoder) -> tuple[Any, int]:
        """The item at `pos`, reading on while it may continue past the buffer."""
        while True:
            try:
                item, end = decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:
                    return item, end
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise DataError(f"{self.path}: invalid JSON at line "
                                    f"{self.line_at(exc.pos, keep=False)}: {exc.msg}") from exc
            self.refill()

    def line_at(self, position: int, keep: bool = True) -> int:
        """Line number of buffer position `position` (counted on from the last one asked)."""
        line = self.line + self.buf.count("\n", self.counted, position)
        if keep:
            self.line, self.counted = line, position
        return line

    def item_offset(self) -> int:
        """Byte offset of the last item's first character."""
        return self.base + len(self.buf[:self.item].encode("utf-8"))

    def refill(self) -> bool:
        """Drop what was read (keeping the current item) and append a chunk; False at the end."""
        if self.eof:
            return False
        keep = min(self.pos, self.item)  # the current item may still be decoding
        self.line_at(keep)
        self.base += len(self.buf[:keep].encode("utf-8"))
        self.buf, self.pos, self.item, self.counted = (self.buf[keep:], self.pos - keep,
                                                       self.item - keep, 0)
        chunk = self.file.read(CHUNK)
        try:
            self.buf += self.utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            line = self.line + self.buf.count("\n") + chunk.count(b"\n", 0, exc.start)
            raise DataError(f"{self.path}:{line}: byte {chunk[exc.start]:#04x} is not UTF-8",
                            hint="save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                            ) from exc
        self.eof = not chunk
        return True


def read_json_list(path: Path, offset: int = 0, line: int = 1,
                   count: int | None = None) -> Iterator[tuple[str, Any]]:
    """Records `file:line` of a JSON list; a shard starts at an item's byte `offset` (on line
    `line`) and stops after `count` items."""
    if count == 0:
        return
    for n, (at, item) in enumerate(JsonListReader(path, offset, line, inside=offset > 0),
                                   start=1):
        yield f"{path.name}:{at}", item
        if count is not None and n >= count:
            return


def json_list_shards(path: Path, limit: int | None, size: int) -> list[tuple[int, int, int]]:
    """(byte offset, line, count) of shards of `size` items: one pass decoding every item (in C)
    and keeping no item, which also finds invalid JSON before workers start."""
    reader, starts = JsonListReader(path), []
    for n, (line, _) in enumerate(reader):
        if limit is not None and n >= limit:
            break
        if n % size == 0:
            starts.append([reader.item_offset(), line, 0])
        starts[-1][2] += 1
    return [tuple(s) for s in starts]


def read_text(path: Path) -> str:
    """A whole text file as UTF-8 (a BOM dropped); a bad byte is an error naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: byte {data[exc.start]:#04x} is not UTF-8",
                        hint="save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from exc


def load_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
