"""`peftvlm predict RUN --image PATH...`: answers (or top-k classes) for images, batched.

    peftvlm predict runs/quickstart --image photo.png --image more_images/
    peftvlm predict runs/quickstart/merged --image a.png --prompt "What color is the shape?"
    peftvlm predict runs/clip-coop --image a.png --top-k 3 --base --out predictions.jsonl
    peftvlm predict runs/clip-retrieval-tiny --image x.png --caption "a red square" \
        --caption "a blue circle"                      # or --captions captions.txt
    peftvlm predict runs/clip-retrieval-tiny --text "a red square" --image a.png --image b.png
    peftvlm predict runs/grounding-dino-tiny --image a.png --text "red . blue ." --out d.jsonl

Images are files, folders (their image files, sorted, not recursive) or `file://` URLs. An
image that cannot be opened is named on stderr and skipped; the others are answered. Each
JSONL row holds the image, the prompt and the answer (`base_answer` with `--base`); CLIP-family
rows hold the ranked classes with probabilities (`base_top_k` with `--base`). Retrieval runs
rank the given captions for each image (`ranking`: caption and cosine similarity, best first),
or with `--text` the given images for that text (one row). An answer with
boxes in the model family's convention (grounding / detection runs) also gets `boxes`
(`[{"label", "box": [x1, y1, x2, y2]}]` in pixels of the image); with `--out`, they are drawn
on the image into `<out stem>-boxes/<image stem>.png` (the row's `picture`).
Detection runs give each image's
boxes with labels and scores (`--text "cat . dog ."` names the classes; default: the run's),
and draw them into PNGs (beside `--out` in `<name>_images/`, else in `RUN/predictions/`).
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlparse

from peftvlm.data.boxes import box_format_for
from peftvlm.data.images import load_rgb
from peftvlm.data.preview import PREDICTION_COLOUR, answer_boxes, draw_boxes
from peftvlm.data.rows import BadRow
from peftvlm.errors import DataError, RunError
from peftvlm.serving.detection import detection_rows
from peftvlm.serving.predictor import open_predictor, question_row
from peftvlm.serving.retrieval import RetrievalPredictor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def expand_images(specs: list[str]) -> list[Path]:
    """Paths from files, folders and file:// URLs, in the order given; a missing path is an
    error before any model loads (a typo should not cost a model load)."""
    paths = []
    for spec in specs:
        if spec.startswith("file://"):
            spec = unquote(urlparse(spec).path)
        elif "://" in spec:
            raise DataError(f"--image {spec}: only local files, folders and file:// URLs are "
                            "read", hint="download the image first and pass its path")
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"--image {path}: the folder holds no image files "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise DataError(f"--image {path}: no such file or folder")
    if not paths:
        raise DataError("no images given", hint="pass --image PATH (a file or a folder)")
    return paths


def open_images(paths: list[Path], warn) -> list[tuple[Path, object]]:
    """(path, RGB image) of each readable image; unreadable ones are named and skipped."""
    opened = []
    for path in paths:
        try:
            opened.append((path, load_rgb(path)))  # decoded as training decoded its images
        except BadRow as exc:
            warn(f"skipped {path}: not a readable image ({exc.detail})")
    return opened


def read_captions(path: str | Path) -> list[str]:
    """Captions from a text file, one per line (blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--captions {path}: cannot be read ({exc})",
                        hint="give a UTF-8 text file with one caption per line") from exc
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise DataError(f"--captions {path}: the file holds no captions",
                        hint="write one caption per line")
    return captions


def predict(run: str | Path, images: list[str], prompt: str | None = None, base: bool = False,
            top_k: int = 5, out: str | Path | None = None, batch_size: int | None = None,
            captions: list[str] | None = None, text: str | None = None,
            log=print, warn=print) -> list[dict]:
    """Answer (classify, or for retrieval runs rank) every readable image; write JSONL to
    `out` if given; return the rows."""
    paths = expand_images(images)
    predictor = open_predictor(run, log)
    check_ranking_flags(predictor, run, captions, text)
    opened = open_images(paths, warn)
    if not opened:
        raise DataError(f"none of the {len(paths)} images could be read")
    if hasattr(predictor, "detect"):
        drawn = (Path(out).parent / f"{Path(out).stem}_images" if out is not None
                 else Path(run) / "predictions")
        rows = detection_rows(predictor, opened, text, base, drawn)
    elif isinstance(predictor, RetrievalPredictor):
        rows = (image_ranking_rows(predictor, opened, text, base) if text is not None
                else caption_ranking_rows(predictor, opened, captions, base))
    elif hasattr(predictor, "classify"):
        rows = classify_rows(predictor, opened, top_k, base, batch_size or 32)
    else:
        rows = answer_rows(predictor, opened, prompt, base, batch_size)
    if out is not None:
        draw_answer_boxes(rows, opened, Path(out).parent / f"{Path(out).stem}-boxes")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def check_ranking_flags(predictor, run, captions, text) -> None:
    """--caption/--captions/--text go with retrieval runs, and a retrieval run needs one."""
    if hasattr(predictor, "detect"):
        if captions:
            raise DataError(f"{run} is a detection run: name the classes to find with "
                            '--text "cat . dog ." (default: the classes it was trained on)')
        return
    if not isinstance(predictor, RetrievalPredictor):
        if captions or text is not None:
            raise DataError(f"--caption/--captions/--text rank with retrieval runs; {run} "
                            "is not one", hint="drop them (it answers or classifies images)")
        return
    if captions and text is not None:
        raise DataError("give captions to rank per image (--caption/--captions) or a --text to "
                        "rank the images for, not both")
    if not captions and text is None:
        raise DataError(f"{run} is a retrieval run: it ranks captions you give for each image, "
                        "or images for a text",
                        hint='add --caption "a red square" --caption "a blue circle" (or '
                             '--captions FILE), or --text "a red square"')


def caption_ranking_rows(predictor, opened, captions: list[str], base: bool) -> list[dict]:
    """Per image: the captions best first with their cosine similarity."""
    images = [image for _, image in opened]
    ranked = predictor.rank_texts(images, captions)
    base_ranked = predictor.rank_texts(images, captions, base=True) if base else None
    return [with_ranking({"image": str(path)}, ranked[i], base_ranked and base_ranked[i],
                         "ranking", ("caption", "score"))
            for i, (path, _) in enumerate(opened)]


def with_ranking(row: dict, ranked, base_ranked, field: str, names: tuple[str, str]) -> dict:
    """`row` with its `prediction` (the best item) and `field` (the (item, value) pairs best
    first, as dicts keyed by `names`), then the base model's as `base_...` when given."""
    for prefix, pairs in (("", ranked), ("base_", base_ranked)):
        if pairs is not None:
            row[prefix + "prediction"] = pairs[0][0]
            row[prefix + field] = [dict(zip(names, pair)) for pair in pairs]
    return row


def image_ranking_rows(predictor, opened, text: str, base: bool) -> list[dict]:
    """One row: the images best first for `text`, with their cosine similarity."""
    images = [image for _, image in opened]
    row = {"text": text}
    for prefix, is_base in (("", False), ("base_", True)) if base else (("", False),):
        ranked = predictor.rank_images(text, images, base=is_base)
        row[prefix + "prediction"] = str(opened[ranked[0][0]][0])
        row[prefix + "ranking"] = [{"image": str(opened[i][0]), "score": s} for i, s in ranked]
    return [row]


def answer_rows(predictor, opened, prompt: str | None, base: bool, batch_size) -> list[dict]:
    prompt = prompt or predictor.default_prompt
    if prompt is None and predictor.task != "caption":
        raise RunError(f"{predictor.files.path}: no prompt given and none known from the run's "
                       "data", hint='pass --prompt "your question"')
    rows = [question_row(image, prompt, predictor.system_prompt) for _, image in opened]
    answers = predictor.answer(rows, batch_size=batch_size)
    base_answers = predictor.answer(rows, base=True, batch_size=batch_size) if base else None
    box_format = box_format_for(predictor.family, predictor.processor)
    result = []
    for i, (path, image) in enumerate(opened):
        row = {"image": str(path), "prompt": prompt, "answer": answers[i]}
        boxes = answer_boxes(answers[i], box_format, image)
        if boxes:
            row["boxes"] = [{"label": label, "box": [round(v, 1) for v in box]}
                            for label, box in boxes]
        if base_answers is not None:
            row["base_answer"] = base_answers[i]
        result.append(row)
    return result


def draw_answer_boxes(rows: list[dict], opened, folder: Path) -> None:
    """Each answer's boxes (red) drawn on its image, saved as `folder/<image stem>.png`."""
    for row, (path, image) in zip(rows, opened):
        if row.get("boxes"):
            folder.mkdir(parents=True, exist_ok=True)
            picture = folder / f"{path.stem}.png"
            objects = [(b["label"], tuple(b["box"])) for b in row["boxes"]]
            draw_boxes(image, [(objects, PREDICTION_COLOUR)]).save(picture)
            row["picture"] = str(picture)


def classify_rows(predictor, opened, top_k: int, base: bool, batch_size: int) -> list[dict]:
    result = []
    for start in range(0, len(opened), batch_size):
        chunk = opened[start:start + batch_size]
        images = [image for _, image in chunk]
        ranked = predictor.classify(images, top_k)
        base_ranked = predictor.classify(images, top_k, base=True) if base else None
        result += [with_ranking({"image": str(path)}, ranked[i], base_ranked and base_ranked[i],
                                "top_k", ("label", "probability"))
                   for i, (path, _) in enumerate(chunk)]
    return result


def print_rows(rows: list[dict]) -> None:
    """A table on the terminal: image, answer (and base answer), top classes or rankings."""
    from rich.console import Console
    from rich.table import Table

    if rows and "ranking" in rows[0]:
        return print_rankings(rows)
    if rows and "detections" in rows[0]:
        return print_detections(rows)
    table = Table(show_lines=False)
    table.add_column("image")
    classify = bool(rows) and "top_k" in rows[0]
    table.add_column("top classes" if classify else "answer")
    with_base = bool(rows) and ("base_answer" in rows[0] or "base_top_k" in rows[0])
    if with_base:
        table.add_column("base")
    for row in rows:
        if classify:
            cells = [", ".join(f"{t['label']} {t['probability']:.2f}" for t in row[key])
                     for key in ("top_k", "base_top_k") if key in row]
        else:
            cells = [row[key] for key in ("answer", "base_answer") if key in row]
        table.add_row(Path(row["image"]).name, *cells)
    Console().print(table)


def print_rankings(rows: list[dict]) -> None:
    """Retrieval rows as a table: the query (image or text), then what it ranks, best first."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    table.add_column("query")
    table.add_column("ranked (cosine similarity)")
    with_base = "base_ranking" in rows[0]
    if with_base:
        table.add_column("base")
    for row in rows:
        query = row["text"] if "text" in row else Path(row["image"]).name
        cells = [", ".join(f"{Path(r['image']).name if 'image' in r else r['caption']} "
                           f"{r['score']:.3f}" for r in row[key])
                 for key in ("ranking", "base_ranking") if key in row]
        table.add_row(query, *cells)
    Console().print(table)


def print_detections(rows: list[dict]) -> None:
    """Detection rows as a table: image, its boxes (label score [x1, y1, x2, y2]), the PNG."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for column in ("image", "detections", "drawn"):
        table.add_column(column)
    for row in rows:
        boxes = "; ".join(f"{d['label']} {d['score']:.2f} {[round(v) for v in d['box']]}"
                          for d in row["detections"][:10]) or "(none above 0.3)"
        table.add_row(Path(row["image"]).name, boxes, row["drawn"])
    Console().print(table)
