"""A detection run ready to use: boxes with class names and scores for images, drawn or JSON.

    predictor = open_predictor("runs/grounding-dino-tiny")       # a DetectionPredictor
    predictor.detect([image])                   # the run's classes, detections above 0.3
    predictor.detect([image], ["cat", "dog"], threshold=0.5, base=True)
    draw_detections(image, detections).save("boxes.png")

The model is loaded as `peftvlm eval` scores it (`trainers.detection`): the base detector
(GroundingDinoForObjectDetection) with the run's peft adapter on top, or a merged export
(`peftvlm export --merge`) as a plain transformers model. Class names are the prompt, so any
names may be asked for (open vocabulary); by default, the classes the run was trained on.
"""

from __future__ import annotations

import functools
from typing import Union

from pydantic import BaseModel, ConfigDict, Field

from peftvlm.data.batch.preview import draw_detections
from peftvlm.data.read.images import load_rgb
from peftvlm.errors import DataError
from peftvlm.families.grounding_dino import prompt_for
from peftvlm.serving.inputs import APIError, check_text_budget, read_image_url
from peftvlm.serving.predictor import AdaptedPredictor
from peftvlm.trainers.detection import detect, load_data, load_detector

DEFAULT_THRESHOLD = 0.3
def parse_classes(text: str) -> list[str]:
    """Class names from a Grounding DINO prompt ("cat . dog .") or a comma-separated list."""
    separator = "." if "." in text else ","
    names = [n.strip() for n in text.split(separator) if n.strip()]
    if not names:
        raise DataError(f"no class names in {text!r}", hint='write them as "cat . dog ."')
    return names


class DetectionPredictor(AdaptedPredictor):
    """An open-vocabulary detector with its trained adapter (or merged weights)."""

    generates = False  # boxes, not text: no chat completions
    task = "detect"

    load_model = staticmethod(load_detector)

    @functools.cached_property
    def classes(self) -> list[str]:
        """The classes the run was trained on (summary.json), asked for by default."""
        found = self.files.summary.get("classes") or self.files.export_report.get("classes")
        return list(found or [])

    @functools.cached_property
    def examples(self) -> list[dict]:
        """The first held-out images (`{"images": [image], "classes": [...]}`) for the demo."""
        loaded = self.held_out_data(load_data)
        if loaded is None:
            return []
        train, held_out, classes = loaded
        records = (held_out or train).records[:8]
        return [{"images": [r["image"]], "classes": classes} for r in records]

    def prompt(self, classes: list[str] | None) -> list[str]:
        classes = list(classes or self.classes)
        if not classes:
            raise DataError(f"{self.files.path}: no class names given and none known from the "
                            "run", hint='name the classes, e.g. "cat . dog ."')
        bad = [c for c in classes if not c.strip() or "." in c or "?" in c]
        if bad:
            raise DataError(f"class name {bad[0]!r} is empty or holds '.' or '?', which split "
                            "Grounding DINO's prompt into classes")
        return classes

    def detect(self, images: list, classes: list[str] | None = None,
               threshold: float = DEFAULT_THRESHOLD, base: bool = False) -> list[list[dict]]:
        """Per image (path or PIL image): detections `{label, score, box: [x1, y1, x2, y2]}`
        in the image's pixels, best first, scoring at least `threshold`."""
        classes = self.prompt(classes)
        opened = [load_rgb(i) for i in images]
        records = [{"image": im, "width": im.width, "height": im.height} for im in opened]
        with self.lock, self.model_for(base) as model:
            found = detect(model, self.processor, records, classes)
        return [[{"label": classes[k], "score": round(s, 4), "box": [round(v, 2) for v in box]}
                 for k, s, box in image_found if s >= threshold] for image_found in found]

    def prompt_text(self, classes: list[str] | None = None) -> str:
        return prompt_for(self.prompt(classes))


# --- POST /v1/detections ----------------------------------------------------------------------

class DetectionRequest(BaseModel):
    """The body of `POST /v1/detections` (unknown fields are ignored, as OpenAI does)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    image: str = Field(..., description="data:image/... URL, or file:// under "
                                        "--allowed-local-media-path")
    classes: Union[list[str], str, None] = Field(  # noqa: UP007
        None, description="class names (a list, or 'cat . dog .'); default: the run's classes")
    threshold: float = Field(DEFAULT_THRESHOLD, ge=0.0, le=1.0)


def answer_detection_request(predictor, req, opts, base: bool) -> dict:
    """The detections response (run in a worker thread: decoding and the model call)."""
    classes = req.classes
    if isinstance(classes, str):
        check_text_budget(len(classes), "classes", opts)
        classes = parse_classes(classes) if classes.strip() else None
    elif classes is not None:
        check_text_budget(sum(map(len, classes)), "classes", opts)
    image = read_image_url(req.image, "image", opts)
    try:
        names = predictor.prompt(classes)
    except DataError as exc:
        raise APIError(400, f"classes: {exc.message}",
                       "classes", "invalid_request") from None
    found = predictor.detect([image], names, threshold=req.threshold, base=base)[0]
    return {"object": "list", "model": req.model, "prompt": prompt_for(names),
            "image_size": [image.width, image.height],
            "data": [{"object": "detection", **d} for d in found]}


# --- peftvlm predict --------------------------------------------------------------------------

def detection_rows(predictor, opened, text: str | None, base: bool, drawn_dir) -> list[dict]:
    """Per image: its detections (class names from `text`, "cat . dog .", else the run's),
    and the image with its boxes drawn, written as a PNG into `drawn_dir`."""
    from pathlib import Path

    classes = parse_classes(text) if text else None
    images = [image for _, image in opened]
    found = predictor.detect(images, classes)
    base_found = predictor.detect(images, classes, base=True) if base else None
    drawn_dir = Path(drawn_dir)
    drawn_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (path, image) in enumerate(opened):
        drawn = drawn_dir / f"{i:03d}-{Path(path).stem}.png"
        draw_detections(image, found[i]).save(drawn)
        row = {"image": str(path), "prompt": predictor.prompt_text(classes),
               "detections": found[i], "drawn": str(drawn)}
        if base_found is not None:
            row["base_detections"] = base_found[i]
        rows.append(row)
    return rows
