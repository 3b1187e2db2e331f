"""Seed tasks and image annotations: reading, checking, and rendering images as text.

An image reaches a text-only generator the way LLaVA-Instruct showed it to GPT-4: as captions
and object boxes with normalised (x0, y0, x1, y1) coordinates in [0, 1], origin top left.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator

from peftvlm._schema import Section
from peftvlm.errors import DataError


class LabelledBox(Section):
    label: str = Field(..., min_length=1, description="Object name.")
    box: list[float] = Field(..., description="[x0, y0, x1, y1], each in [0, 1].")

    @field_validator("box")
    @classmethod
    def _normalised(cls, box):
        if len(box) != 4 or not all(0 <= v <= 1 for v in box) or box[0] > box[2] or box[1] > box[3]:
            raise ValueError(f"box must be [x0, y0, x1, y1] with 0 <= x0 <= x1 <= 1 and "
                             f"0 <= y0 <= y1 <= 1, got {box}")
        return box


class ImageContext(Section):
    captions: list[str] = Field(default_factory=list, description="Sentences about the image.")
    objects: list[LabelledBox] = Field(default_factory=list, description="Labelled boxes.")


class FollowUp(Section):
    instruction: str
    output: str


class SeedTask(Section):
    """One hand-written task; `context` makes it a task about an (annotated) image."""

    id: str | None = None
    task_type: str = Field(..., min_length=1)
    instruction: str = Field(..., min_length=1)
    input: str = ""
    output: str = Field(..., min_length=1)
    context: ImageContext | None = None
    followups: list[FollowUp] = Field(default_factory=list,
                                      description="Further turns of a conversation task.")


class AnnotatedImage(ImageContext):
    """A row of the visual-mode images file: an image path plus its annotations."""

    image: str = Field(..., min_length=1, description="Image path, relative to the JSONL file.")


def read_jsonl_models(path: Path, model: type[BaseModel]) -> list:
    """Rows of a JSONL file validated as `model`; a bad row is a DataError naming file:line."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(model.model_validate(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: invalid JSON: {exc.msg}") from exc
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(row)"
            raise DataError(f"{path}:{n}: {field}: {err['msg']}",
                            hint="see data_templates/self_instruct/ for the row format") from exc
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def load_seed_tasks(path: Path) -> list[SeedTask]:
    """The seed tasks of a JSONL file."""
    return read_jsonl_models(path, SeedTask)


def load_images(path: Path, output_dir: Path) -> list[AnnotatedImage]:
    """Annotated images with `image` rewritten relative to the output folder (as the trainer
    reads it); every image must exist and lie inside that folder."""
    images = read_jsonl_models(path, AnnotatedImage)
    for n, row in enumerate(images, start=1):
        file = (path.parent / row.image).resolve()
        if not file.is_file():
            raise DataError(f"{path}: row {n}: image {row.image} not found (looked in "
                            f"{path.parent})")
        if not file.is_relative_to(output_dir.resolve()):
            raise DataError(f"{path}: row {n}: image {file} is outside the output folder "
                            f"{output_dir}", hint="training reads images relative to the data "
                                                  "file: write the output next to the images")
        row.image = file.relative_to(output_dir.resolve()).as_posix()
    return images


def render_context(context: ImageContext) -> str:
    """Captions and boxes as the text a generator reads in place of the image."""
    lines = ["Captions:"] + [f"- {c}" for c in context.captions]
    if context.objects:
        lines.append("Objects (x0, y0, x1, y1 in [0, 1], origin top left):")
        lines += [f"- {o.label}: [{', '.join(f'{v:.2f}' for v in o.box)}]" for o in context.objects]
    return "\n".join(lines)
