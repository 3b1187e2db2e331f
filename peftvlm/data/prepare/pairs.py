"""Image-caption pairs from rendered rows (retrieval training, CLIP-score filtering).

Rows come from `peftvlm.data.prepare.loading` (any reader, the `caption` template or `messages`
rows); rows of one image are grouped, keeping each distinct caption once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from peftvlm.errors import DataError


@dataclass
class Pairs:
    """Images (paths, `{"bytes"}` dicts or PIL images) with every caption of each."""

    images: list
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, i: int, epoch: int, seed: int) -> str:
        """The caption image `i` is paired with in `epoch` (seeded, so resume repeats it)."""
        options = self.captions[i]
        return options[random.Random(f"{seed}:{epoch}:{i}").randrange(len(options))]

    def flat_texts(self) -> tuple[list[str], list[int]]:
        """Every caption once, and the image each one describes (the retrieval gallery)."""
        texts, owner = [], []
        for i, caps in enumerate(self.captions):
            texts += caps
            owner += [i] * len(caps)
        return texts, owner


def row_captions(row: dict) -> list[str]:
    """A rendered row's captions: every reference (caption template), else the last answer."""
    if row.get("references"):
        return list(row["references"])
    answers = [m for m in row["messages"] if m["role"] == "assistant"]
    texts = [c["text"] for c in answers[-1]["content"] if c.get("type") == "text"] if answers \
        else []
    return [" ".join(texts).strip()] if texts and " ".join(texts).strip() else []


def image_id(image) -> object:
    """What identifies an image across rows: its path, or its bytes."""
    if isinstance(image, dict):
        return image.get("path") or image.get("bytes")
    return image if isinstance(image, str) else id(image)


def pairs_from_rows(rows: list[dict], what: str) -> Pairs:
    """Group rendered rows by image into pairs; rows without exactly one image or a caption
    are not pairs, and say so."""
    index: dict[object, int] = {}
    images, captions, refused = [], [], []
    for n, row in enumerate(rows):
        caps = row_captions(row)
        if len(row.get("images") or []) != 1 or not caps:
            refused.append(n)
            continue
        key = image_id(row["images"][0])
        if key not in index:
            index[key] = len(images)
            images.append(row["images"][0])
            captions.append([])
        known = captions[index[key]]
        known += [c for c in caps if c not in known]
    if refused:
        raise DataError(f"{what}: {len(refused)} row(s) are not image-caption pairs (rows "
                        f"{', '.join(map(str, refused[:5]))}: each needs one image and a caption)",
                        hint="read captions with data.template: caption (columns image, "
                             "captions), or give rows one image and one assistant answer")
    return Pairs(images, captions)



