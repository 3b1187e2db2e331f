"""Show a rendered training example with the tokens that carry loss highlighted, and draw the
boxes of grounding / detection answers on their image (parsed back from the rendered text with
the family's box convention, so a user sees where the model is taught to point)."""

from __future__ import annotations

from pathlib import Path

from peftvlm.data.batch.collate import IGNORE_INDEX, last_answer, open_image
from peftvlm.data.boxes import get_convention
from peftvlm.data.read.images import load_rgb
from peftvlm.data.read.preference import rejected_conversation

# Reference boxes green, predictions red (eval pictures), thin enough for small images.
REFERENCE_COLOUR, PREDICTION_COLOUR = (0, 200, 0), (230, 0, 0)


def loss_spans(input_ids, labels) -> list[tuple[list[int], bool]]:
    """Consecutive runs of token ids, each flagged whether it carries loss."""
    spans: list[tuple[list[int], bool]] = []
    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE_INDEX
        if spans and spans[-1][1] == trained:
            spans[-1][0].append(tok)
        else:
            spans.append(([tok], trained))
    return spans


def render_example(collator, row: dict, image_token: str | None = None):
    """A rich Text of one encoded row: trained tokens in bold green, image runs collapsed."""
    from rich.text import Text

    batch = collator([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tokenizer = collator.processor.tokenizer
    # the processor's video token, where it has one (`<|video_pad|>`, `<video>`)
    video_token = getattr(collator.processor, "video_token", None) if row.get("videos") else None
    text = Text()
    spans = loss_spans(ids, labels)
    if len(labels) != len(ids):  # an encoder-decoder: the prompt feeds the encoder, the labels
        spans = [(ids, False), ([t for t in labels if t != IGNORE_INDEX], True)]  # the decoder
    for span, trained in spans:
        piece = tokenizer.decode(span)
        for token in filter(None, (image_token, video_token)):
            if piece.count(token) > 3:  # a run of one image's / clip's tokens, shown counted
                piece = piece.replace(token * piece.count(token), f"{token}x{piece.count(token)}")
        text.append(piece, style="bold green" if trained else "dim")
    n_trained = sum(lab != IGNORE_INDEX for lab in labels)
    image_id = tokenizer.convert_tokens_to_ids(image_token) if image_token else None
    video_id = tokenizer.convert_tokens_to_ids(video_token) if video_token else None
    return text, {"tokens": len(ids), "trained_tokens": n_trained,
                  "image_tokens": ids.count(image_id) if image_id is not None else 0,
                  "video_tokens": ids.count(video_id) if video_id is not None else 0}


def draw_boxes(image, layers: list[tuple[list, tuple[int, int, int]]]):
    """A copy of `image` with each layer's (label, pixel box) pairs drawn in its colour."""
    from PIL import ImageDraw

    picture = load_rgb(image).copy()  # as training saw it (alpha on white)
    draw = ImageDraw.Draw(picture)
    width = max(1, round(min(picture.size) / 150))
    for objects, colour in layers:
        for label, (x1, y1, x2, y2) in objects:
            draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=colour,
                           width=width)
            if label:
                draw.text((x1 + width + 1, y1 + width), str(label), fill=colour)
    return picture


PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60))


def draw_detections(image, detections: list[dict], references: list[dict] | None = None):
    """A copy of `image` with each detection's box, label and score drawn in its class's colour
    (reference boxes, when given, in white): `draw_boxes` with one layer per class."""
    names = sorted({d["label"] for d in detections})
    layers = [([(None, ref["box"]) for ref in references or []], (255, 255, 255))]
    layers += [([(f"{d['label']} {d['score']:.2f}", d["box"]) for d in detections
                 if d["label"] == name], PALETTE[k % len(PALETTE)])
               for k, name in enumerate(names)]
    return draw_boxes(image, layers)


def answer_boxes(text: str, box_format: str, image) -> list:
    """(label, pixel box) pairs of an answer in the family's convention, on `image`."""
    width, height = image.size
    return get_convention(box_format).parse(text, width, height)


def box_picture(row: dict, box_format: str, path: Path, prediction: str | None = None) -> bool:
    """Draw the boxes of a row's answer (green) and of a predicted answer (red) on the row's
    image and save a PNG at `path`; False (nothing written) when the answer holds no box."""
    if not row.get("images"):
        return False
    image = open_image(row["images"][0])
    reference = answer_boxes(last_answer(row["messages"]), box_format, image)
    crowd = answer_boxes(row["crowd"], box_format, image) if row.get("crowd") else []
    predicted = answer_boxes(prediction, box_format, image) if prediction else []
    if not reference and not predicted:
        return False
    layers = [(reference, REFERENCE_COLOUR), (crowd, (120, 120, 120)),
              (predicted, PREDICTION_COLOUR)]
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_boxes(image, layers).save(path)
    return True


def preview_pair(collator, row: dict, image_token: str | None):
    """(chosen, rejected) rendered for `data preview`: rich Texts with the reply's tokens (the
    ones DPO scores) in green, and their counts."""
    chosen = render_example(collator, row, image_token)
    rejected = render_example(collator, {**row, "messages": rejected_conversation(row)},
                              image_token)
    return chosen, rejected
