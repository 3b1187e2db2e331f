"""Bounding boxes for grounding data: read pixel boxes, clip them to the image, and write / parse
them in a model family's own box convention (`FamilySpec.box_format` names one).

A convention is data: a coordinate grid (what one unit is, per image) plus a text form, with a
writer and a parser that are inverses (a box written and parsed back lands within one grid unit).
Where each convention comes from is recorded in tests/fixtures/box_conventions/SOURCES.md and
docs/grounding.md.

- `norm1`: `[x1, y1, x2, y2]` in 0-1 with decimals; several: `label: [..]; label: [..]`
  (the documented choice for families that publish no convention).
- `abs1000`: bare `(x1,y1),(x2,y2)` on 0-1000 (legacy; no family uses it now).
- `qwen2_vl`: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`
  on 0-1000.
- `qwen2_5_vl`: `[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]` in pixels of the image as
  the processor resizes it.
- `qwen3_vl`: the same JSON on 0-1000.
- `paligemma`: `<locY1><locX1><locY2><locX2> label ; ...` (y first), 1024 bins.
- `internvl`: `<ref>label</ref><box>[[x1, y1, x2, y2]]</box>` on 0-1000.
- `florence2`: `label<loc_x1><loc_y1><loc_x2><loc_y2>` on 1000 bins (a pixel's bin is
  floor(x / size * 1000), read back as the bin's centre, as Florence-2's processor quantizes and
  dequantizes), with its task tokens (`<OD>`, `<CAPTION_TO_PHRASE_GROUNDING>`...) as prompts.

`qwen2_5_vl` depends on the processor (its `smart_resize`, with the processor's patch x merge
factor and min / max pixels): `box_format_for(family, processor)` binds those into the name
(`qwen2_5_vl:factor=28,min_pixels=3136,max_pixels=12845056`), which is what data templates and
the prepared-rows cache key see. Unbound, it uses Qwen2.5-VL's published processor settings.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, replace
from typing import Callable

from peftvlm.data.rows import BadRow

BOX_INPUTS = ("xyxy", "xywh")
Box = tuple[float, float, float, float]
Labelled = tuple[str | None, Box]  # (label or None, box)

_NUM = r"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*"
_BRACKET = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_PAIRS = re.compile(r"\(" + _NUM + "," + _NUM + r"\)\s*,?\s*(?:to\s*)?\(" + _NUM + "," + _NUM
                    + r"\)")
_LOC = re.compile(r"<loc(\d{4})>" * 4 + r"([^;<]*)")
_FLORENCE_LOC = re.compile(r"<loc_(\d+)>" * 4)
_FLORENCE_MARKUP = re.compile(r"</?s>|<pad>|<od>|</od>|<ground>|<obj>")
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
# Markup and separators that may sit between a label and its box (or be all that is between two
# boxes of one label); special tokens may also be gone when decoded with skip_special_tokens.
_MARKUP = re.compile(r"<\|?/?(?:object_ref_start|object_ref_end|box_start|box_end|ref|box)\|?>")


def read_box(value, box_input: str = "xyxy") -> Box:
    """Four finite pixel numbers -> `(x1, y1, x2, y2)`; COCO `xywh` is converted."""
    if isinstance(value, dict):  # {"x", "y", "w", "h"} or {"x1", "y1", "x2", "y2"}
        keys = ("x", "y", "w", "h") if "w" in value else ("x1", "y1", "x2", "y2")
        value = [value.get(k) for k in keys]
    try:
        nums = [float(v) for v in value]
    except (TypeError, ValueError):
        raise BadRow("bad_box", f"box {value!r} is not 4 numbers") from None
    if len(nums) != 4 or not all(math.isfinite(v) for v in nums):
        raise BadRow("bad_box", f"box {value!r} is not 4 finite numbers")
    x1, y1, a, b = nums
    x2, y2 = (x1 + a, y1 + b) if box_input == "xywh" else (a, b)
    if x2 <= x1 or y2 <= y1:
        raise BadRow("bad_box", f"box {value!r} has no area ({box_input})")
    return x1, y1, x2, y2


def clip_box(box, width: float, height: float) -> Box:
    """Clip to the image; a box with no area left inside the image is a bad row."""
    x1, y1, x2, y2 = box
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        raise BadRow("box_outside_image", f"box {list(box)} lies outside the {width:g}x{height:g} "
                                          "image")
    return clipped


# --- text forms: native boxes (grid units, x1 y1 x2 y2) <-> text --------------------------------

def _num(v: float, decimals: int | None) -> str:
    return str(int(v)) if decimals is None else f"{v:.{decimals}f}"


def _label_before(gap: str) -> str:
    """The label written in the text between the previous box and this one."""
    return _MARKUP.sub(" ", gap).strip(" \t\n;:,[]").strip()


def _scan(text: str, pattern: re.Pattern) -> list[Labelled]:
    """Boxes of `pattern` in order, each labelled by the text before it (several boxes in a row
    with only markup between them share the label before the first)."""
    out, end, label = [], 0, None
    for match in pattern.finditer(text):
        gap = _label_before(text[end:match.start()])
        label = gap or (label if out else None)
        out.append((label or None, tuple(float(v) for v in match.groups()[:4])))
        end = match.end()
    return out


def _norm1_write(objects, decimals):
    def box(b):
        return "[" + ", ".join(_num(v, decimals) for v in b) + "]"
    return "; ".join(box(b) if label is None else f"{label}: {box(b)}" for label, b in objects)


def _norm1_box(b, decimals):
    return _norm1_write([(None, b)], decimals)


def _pairs_box(b, decimals):
    x1, y1, x2, y2 = (_num(v, decimals) for v in b)
    return f"({x1},{y1}),({x2},{y2})"


def _abs1000_write(objects, decimals):
    return "; ".join(_pairs_box(b, decimals) if label is None
                     else f"{label}: {_pairs_box(b, decimals)}" for label, b in objects)


def _qwen2_write(objects, decimals):
    return "".join((f"<|object_ref_start|>{label}<|object_ref_end|>" if label is not None else "")
                   + f"<|box_start|>{_pairs_box(b, decimals)}<|box_end|>" for label, b in objects)


def _qwen2_box(b, decimals):
    return f"<|box_start|>{_pairs_box(b, decimals)}<|box_end|>"


def _json_write(objects, decimals):
    items = [{"bbox_2d": [int(v) for v in b], **({"label": label} if label is not None else {})}
             for label, b in objects]
    return json.dumps(items, ensure_ascii=False)


def _json_box(b, decimals):
    return json.dumps([int(v) for v in b])


def _json_parse(text: str) -> list[Labelled]:
    """Every `{"bbox_2d": [..], "label": ..}` object in the text, fenced or not, whole list or
    truncated; falls back to bare `[x1, y1, x2, y2]` lists."""
    out = []
    for match in _JSON_OBJECT.finditer(text):
        try:
            item = json.loads(match.group())
            box = [float(v) for v in item["bbox_2d"]]
        except (ValueError, KeyError, TypeError):
            continue
        if len(box) == 4:
            label = item.get("label")
            out.append((str(label) if label is not None else None, tuple(box)))
    return out or _scan(text, _BRACKET)


def _paligemma_write(objects, decimals):
    def one(label, b):
        if label is not None and (";" in label or "<loc" in label):
            raise BadRow("bad_label", f"label {label!r} holds ';' or '<loc': PaliGemma "
                                      "separates objects with ' ; ' after four <loc> tokens")
        x1, y1, x2, y2 = (int(v) for v in b)
        locs = "".join(f"<loc{v:04d}>" for v in (y1, x1, y2, x2))
        return locs if label is None else f"{locs} {label}"
    return " ; ".join(one(label, b) for label, b in objects)


def _paligemma_box(b, decimals):
    return _paligemma_write([(None, b)], decimals)


def _paligemma_parse(text: str) -> list[Labelled]:
    out = []
    for match in _LOC.finditer(text):
        y1, x1, y2, x2 = (float(v) for v in match.groups()[:4])
        out.append((match.group(5).strip() or None, (x1, y1, x2, y2)))
    return out


def _internvl_write(objects, decimals):
    return "".join((f"<ref>{label}</ref>" if label is not None else "")
                   + f"<box>[[{', '.join(_num(v, decimals) for v in b)}]]</box>"
                   for label, b in objects)


def _internvl_box(b, decimals):
    return _internvl_write([(None, b)], decimals)


def _florence_write(objects, decimals):
    def one(label, b):
        if label is not None and "<" in label:
            raise BadRow("bad_label", f"label {label!r} holds '<': Florence-2 reads the text "
                                      "before a <loc_> token as the label")
        return (label or "") + "".join(f"<loc_{int(v)}>" for v in b)
    return "".join(one(label, b) for label, b in objects)


def _florence_box(b, decimals):
    return _florence_write([(None, b)], decimals)


def _florence_parse(text: str) -> list[Labelled]:
    """Florence-2's `description_with_bboxes` / `phrase_grounding` parsing: the text before
    a run of `<loc_>` quadruples labels each box of the run (equal to the processor's
    `post_process_generation`, tests/test_florence2.py)."""
    return _scan(_FLORENCE_MARKUP.sub("", text), _FLORENCE_LOC)


# --- conventions -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BoxConvention:
    """One family's way of writing boxes in text.

    `grid`: "relative" (0-`scale` of the image's width / height), or "resized_pixels" (pixels
    of the image as the processor resizes it: `smart_resize` with `factor`, `min_pixels`,
    `max_pixels`). `decimals`: None for integers. `top`: the largest value written (PaliGemma's
    1024 bins end at 1023). `names_objects`: whether a grounding answer repeats the expression
    as the box's label (the checkpoint's own outputs do), else it is the bare box.
    `task_prompts`: (template task, prompt) pairs that replace a template's phrasings where the
    checkpoint was trained on one fixed task prefix (PaliGemma's `detect {expression}`).
    `list_separator`: how a prompt lists several class names (PaliGemma: `detect a ; b`).
    `quantize`: "round" (to the nearest grid unit), or "floor" (a pixel's bin, read back as the
    bin's centre: Florence-2's processor).
    """

    name: str
    source: str
    grid: str
    write_text: Callable[[list, int | None], str]  # native labelled boxes -> text
    box_only: Callable[[Box, int | None], str]  # one native box, unlabelled -> text
    parse_text: Callable[[str], list]  # text -> native labelled boxes, in order
    scale: float = 1000.0
    decimals: int | None = None
    top: float | None = None
    names_objects: bool = True
    task_prompts: tuple[tuple[str, str], ...] = ()
    list_separator: str = ", "
    quantize: str = "round"
    factor: int = 28
    min_pixels: int = 3136
    max_pixels: int = 12845056

    @property
    def key(self) -> str:
        """The name with any processor settings, as families, templates and caches know it."""
        if self.grid != "resized_pixels":
            return self.name
        return (f"{self.name}:factor={self.factor},min_pixels={self.min_pixels},"
                f"max_pixels={self.max_pixels}")

    def units(self, width: float, height: float) -> tuple[float, float]:
        """Grid units per pixel of the original image, along x and y."""
        if self.grid == "resized_pixels":
            rh, rw = resized_size(int(round(height)), int(round(width)), self.factor,
                                  self.min_pixels, self.max_pixels)
            return rw / width, rh / height
        return self.scale / width, self.scale / height

    def limits(self, width: float, height: float) -> tuple[float, float]:
        sx, sy = self.units(width, height)
        top_x, top_y = width * sx, height * sy
        return (min(top_x, self.top) if self.top else top_x,
                min(top_y, self.top) if self.top else top_y)

    def to_native(self, box: Box, width: float, height: float, decimals: int | None = None) -> Box:
        """A pixel box of the original image -> grid units, rounded as written."""
        sx, sy = self.units(width, height)
        mx, my = self.limits(width, height)
        places = self.decimals if decimals is None else decimals
        x1, y1, x2, y2 = box
        out = []
        for v, s, m in ((x1, sx, mx), (y1, sy, my), (x2, sx, mx), (y2, sy, my)):
            v = min(max(v * s, 0.0), m)
            if self.quantize == "floor":
                v = float(math.floor(v))
            out.append(float(round(v)) if places is None else round(v, places))
        return tuple(out)  # type: ignore[return-value]

    def to_pixels(self, native: Box, width: float, height: float) -> Box:
        """Grid units -> a pixel box of the original image."""
        sx, sy = self.units(width, height)
        half = 0.5 if self.quantize == "floor" else 0.0  # a bin is read as its centre
        x1, y1, x2, y2 = (v + half for v in native)
        return x1 / sx, y1 / sy, x2 / sx, y2 / sy

    def write(self, objects: list[Labelled], width: float, height: float,
              decimals: int | None = None) -> str:
        """Labelled pixel boxes of a width x height image -> the family's answer text."""
        places = self.decimals if decimals is None else decimals
        native = [(label, self.to_native(b, width, height, places)) for label, b in objects]
        return self.write_text(native, places)

    def write_box(self, box: Box, width: float, height: float,
                  decimals: int | None = None) -> str:
        """One unlabelled pixel box as the family writes a region in a question."""
        places = self.decimals if decimals is None else decimals
        return self.box_only(self.to_native(box, width, height, places), places)

    def parse(self, text: str, width: float | None = None,
              height: float | None = None) -> list[Labelled]:
        """Labelled boxes in `text`: pixel boxes when the image size is given, else grid
        units (enough for IoU between two answers about one image)."""
        found = self.parse_text(text)
        if width is None or height is None:
            return found
        return [(label, self.to_pixels(b, width, height)) for label, b in found]

    def relative(self, native: Box, width: float | None = None,
                 height: float | None = None) -> Box:
        """Grid units -> 0-1 of the image (pixel grids need the image size)."""
        if self.grid == "resized_pixels":
            if width is None or height is None:
                raise ValueError(f"box convention {self.name} writes pixels: converting to 0-1 "
                                 "needs the image width and height")
            x1, y1, x2, y2 = self.to_pixels(native, width, height)
            return x1 / width, y1 / height, x2 / width, y2 / height
        return tuple(v / self.scale for v in native)  # type: ignore[return-value]


@functools.cache
def resized_size(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """(height, width) the Qwen2-VL-family processor resizes an image to: transformers' own
    `smart_resize` (imported here, not copied, so that a change there is followed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return tuple(smart_resize(height, width, factor=factor, min_pixels=min_pixels,
                              max_pixels=max_pixels))  # type: ignore[return-value]


_SOURCES = "tests/fixtures/box_conventions/SOURCES.md"
CONVENTIONS: dict[str, BoxConvention] = {c.name: c for c in (
    BoxConvention("norm1", "LLaVA-1.5 / Shikra RefCOCO answers (documented choice, see "
                  "docs/grounding.md)", "relative", _norm1_write, _norm1_box,
                  lambda t: [(lab, b) for lab, b in _scan(t, _BRACKET)
                             if all(0.0 <= v <= 1.0 for v in b)],
                  scale=1.0, decimals=2, names_objects=False),
    BoxConvention("abs1000", "legacy bare Qwen-VL pairs", "relative", _abs1000_write,
                  _pairs_box, lambda t: _scan(t, _PAIRS), names_objects=False),
    BoxConvention("qwen2_vl", _SOURCES, "relative", _qwen2_write, _qwen2_box,
                  lambda t: _scan(t, _PAIRS)),
    BoxConvention("qwen2_5_vl", _SOURCES, "resized_pixels", _json_write, _json_box, _json_parse),
    BoxConvention("qwen3_vl", _SOURCES, "relative", _json_write, _json_box, _json_parse),
    BoxConvention("paligemma", _SOURCES, "relative", _paligemma_write, _paligemma_box,
                  _paligemma_parse, scale=1024.0, top=1023.0, list_separator=" ; ",
                  task_prompts=(("locate", "detect {expression}"), ("all", "detect {categories}"),
                                ("category", "detect {category}"))),
    BoxConvention("internvl", _SOURCES, "relative", _internvl_write, _internvl_box,
                  lambda t: _scan(t, _BRACKET)),
    BoxConvention("florence2", _SOURCES, "relative", _florence_write, _florence_box,
                  _florence_parse, top=999.0, quantize="floor",
                  task_prompts=(("locate", "<CAPTION_TO_PHRASE_GROUNDING>{expression}"),
                                ("describe", "<REGION_TO_DESCRIPTION>{box}"),
                                ("all", "<OD>"),
                                ("category", "<CAPTION_TO_PHRASE_GROUNDING>{category}"))),
)}
BOX_FORMATS = tuple(CONVENTIONS)


def get_convention(name: str) -> BoxConvention:
    """The convention a `box_format` names (with `:key=value,...` processor settings bound)."""
    base, _, settings = name.partition(":")
    if base not in CONVENTIONS:
        raise ValueError(f"unknown box format {name!r}; known: {', '.join(BOX_FORMATS)}")
    conv = CONVENTIONS[base]
    if settings:
        try:
            values = {k: int(v) for k, v in (kv.split("=") for kv in settings.split(","))}
            conv = replace(conv, **values)
        except (ValueError, TypeError):
            raise ValueError(f"bad box format settings in {name!r}") from None
    return conv


def bind_convention(name: str, processor) -> str:
    """The box format `name` with the settings it reads from a loaded processor (the
    resize that pixel-grid conventions depend on); other conventions are returned as they are."""
    conv = get_convention(name)
    image_processor = getattr(processor, "image_processor", None)
    if conv.grid != "resized_pixels" or image_processor is None:
        return conv.key
    size = getattr(image_processor, "size", None)

    def setting(key, size_key, default):
        value = getattr(image_processor, key, None) or (getattr(size, size_key, None) if size
                                                        is not None and not isinstance(size, dict)
                                                        else (size or {}).get(size_key))
        return int(value or default)
    factor = int(getattr(image_processor, "patch_size", 14) *
                 getattr(image_processor, "merge_size", 2))
    return replace(conv, factor=factor,
                   min_pixels=setting("min_pixels", "shortest_edge", conv.min_pixels),
                   max_pixels=setting("max_pixels", "longest_edge", conv.max_pixels)).key


def box_format_for(family, processor=None) -> str:
    """The box format a family's grounding data is written in, bound to its processor."""
    return bind_convention(family.box_format, processor) if processor is not None \
        else get_convention(family.box_format).key


def format_box(box, width: float, height: float, box_format: str = "norm1",
               precision: int = 2) -> str:
    """A clipped pixel box as the bare region text a family's model reads (no label)."""
    conv = get_convention(box_format)
    return conv.write_box(box, width, height, precision if conv.decimals is not None else None)


def box_text(value, width: float, height: float, box_input: str = "xyxy",
             box_format: str = "norm1", precision: int = 2) -> str:
    """Read, clip and format one box (the whole path a grounding row takes)."""
    return format_box(clip_box(read_box(value, box_input), width, height), width, height,
                      box_format, precision)


def answer_text(objects: list[Labelled], width: float, height: float,
                box_format: str = "norm1", precision: int = 2) -> str:
    """Clipped, labelled pixel boxes as a family's grounding answer (labels kept only where the
    convention's own answers name their objects, or there are several)."""
    conv = get_convention(box_format)
    if not conv.names_objects and len(objects) == 1:
        objects = [(None, objects[0][1])]
    return conv.write(objects, width, height, precision if conv.decimals is not None else None)
