"""Small annotation files in public layouts, for recipes, tests and examples (offline).

`write_fixture(name, folder, ...)` draws coloured shapes on grey and writes their annotations
the way public datasets ship them, so the same readers and templates as real data apply:
- `coco-captions`: COCO captions JSON (`images` + `annotations`), several captions per image;
- `vqav2`: VQAv2 questions + annotations files, two questions per image, 10 annotator answers;
- `refcoco`: a RefCOCO-style JSONL (`file_name`, `sentences`, COCO `bbox` in pixels, xywh),
  two shapes per image, one row per shape;
- `coco-instances`: COCO instances JSON (`images`, `annotations` with pixel `bbox` xywh,
  `categories` = the colours), one or two shapes per image, one image in ten empty: detection.
Recipes use them through `data.synthetic.name`; `scripts/make_fixture_data.py` writes them to a
folder of your choice.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from peftvlm.data.read.synthetic import COLOURS, SHAPES, paint
from peftvlm.recipe.schema import SourceConfig

FIXTURES = ("coco-captions", "vqav2", "refcoco", "coco-instances")
DEFAULT_TEMPLATE = {"coco-captions": "caption", "vqav2": "vqa", "refcoco": "grounding",
                    "coco-instances": "detection"}


def draw(rng: random.Random, size: int, n_shapes: int):
    """An image with `n_shapes` non-overlapping shapes: (image, [(colour, shape, xyxy box)])."""
    from PIL import Image, ImageDraw

    grey = rng.randint(90, 160)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(img)
    colours = rng.sample(list(COLOURS), n_shapes)
    half = size // max(n_shapes, 1)
    objects = []
    for i, colour in enumerate(colours):
        side = rng.randint(max(4, half // 2), max(5, half - 1))
        x = i * half + rng.randint(0, half - side)
        y = rng.randint(0, size - side)
        box = [x, y, x + side, y + side]
        shape = rng.choice(SHAPES)
        paint(pen, shape, x, y, side, COLOURS[colour])
        objects.append((colour, shape, box))
    return img, objects


def coco_captions(images: list[dict], objects: list, rng: random.Random) -> dict:
    annotations = []
    for img, objs in zip(images, objects):
        colour, shape, _ = objs[0]
        for text in (f"a {colour} {shape}", f"a {colour} {shape} on a grey background",
                     f"a picture of a {colour} {shape}"):
            annotations.append({"id": len(annotations) + 1, "image_id": img["id"],
                                "caption": text})
    return {"images": images, "annotations": annotations}


def vqav2_files(images: list[dict], objects: list, rng: random.Random, subtype: str):
    questions, annotations = [], []
    for img, objs in zip(images, objects):
        colour, shape, _ = objs[0]
        for question, truth, pool in (("What color is the shape?", colour, list(COLOURS)),
                                      ("What shape is this?", shape, list(SHAPES))):
            qid = len(questions) + 1
            questions.append({"image_id": img["id"], "question": question, "question_id": qid})
            agree = rng.randint(6, 10)  # annotators disagree a little, as in VQAv2
            given = [truth] * agree + [rng.choice(pool) for _ in range(10 - agree)]
            annotations.append({"question_id": qid, "image_id": img["id"],
                                "multiple_choice_answer": truth,
                                "answers": [{"answer": a, "answer_confidence": "yes",
                                             "answer_id": k + 1} for k, a in enumerate(given)]})
    return ({"data_subtype": subtype, "questions": questions},
            {"data_subtype": subtype, "annotations": annotations})


def refcoco_rows(images: list[dict], objects: list) -> list[dict]:
    rows = []
    for img, objs in zip(images, objects):
        for colour, shape, (x1, y1, x2, y2) in objs:
            rows.append({"ref_id": len(rows), "image_id": img["id"], "file_name": img["file_name"],
                         "sentences": [f"the {colour} {shape}", f"{colour} {shape}"],
                         "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return rows


def coco_instances(images: list[dict], objects: list) -> dict:
    names = list(COLOURS)
    annotations = [{"image_id": img["id"], "category_id": names.index(colour) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0}
                   for img, objs in zip(images, objects) for colour, _, (x1, y1, x2, y2) in objs]
    for k, ann in enumerate(annotations):
        ann["id"] = k + 1
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}


def shapes_in(name: str, rng: random.Random) -> int:
    if name == "refcoco":
        return 2
    if name == "coco-instances":  # some images hold nothing: the answer says so
        return 0 if rng.random() < 0.1 else rng.randint(1, 2)
    return 1


def write_split(name: str, folder: Path, split: str, n: int, size: int,
                rng: random.Random, first_id: int) -> dict[str, Path]:
    """Images for one split plus its annotation file(s); returns the files written."""
    images, objects = [], []
    for k in range(n):
        image_id = first_id + k
        img, objs = draw(rng, size, shapes_in(name, rng))
        rel = f"images/{image_id:06d}.png"
        img.save(folder / rel)
        images.append({"id": image_id, "file_name": rel, "width": size, "height": size})
        objects.append(objs)
    if name == "coco-captions":
        files = {"path": folder / f"captions_{split}.json"}
        files["path"].write_text(json.dumps(coco_captions(images, objects, rng)))
    elif name == "vqav2":
        questions, annotations = vqav2_files(images, objects, rng, split)
        files = {"path": folder / f"questions_{split}.json",
                 "annotations": folder / f"annotations_{split}.json"}
        files["path"].write_text(json.dumps(questions))
        files["annotations"].write_text(json.dumps(annotations))
    elif name == "coco-instances":
        files = {"path": folder / f"instances_{split}.json"}
        files["path"].write_text(json.dumps(coco_instances(images, objects)))
    else:
        files = {"path": folder / f"refs_{split}.jsonl"}
        files["path"].write_text("".join(json.dumps(r) + "\n"
                                         for r in refcoco_rows(images, objects)))
    return files


def write_fixture(name: str, folder: Path, train_size: int = 200, eval_size: int = 20,
                  image_size: int = 32, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Write `name`'s train and test files under `folder` (reused when already complete)."""
    if name not in FIXTURES:
        raise ValueError(f"unknown fixture {name!r}; known: {', '.join(FIXTURES)}")
    folder = Path(folder)
    done = folder / ".complete.json"
    if done.exists():
        written = json.loads(done.read_text())
        return {s: {k: Path(v) for k, v in f.items()} for s, f in written.items()}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = {"train": write_split(name, folder, "train", train_size, image_size, rng, 1),
           "test": write_split(name, folder, "test", eval_size, image_size, rng, train_size + 1)}
    done.write_text(json.dumps({s: {k: str(v) for k, v in f.items()} for s, f in out.items()}))
    return out


def source_options(name: str) -> dict:
    """How a recipe reads each layout: format, column mapping, template options."""
    return {"coco-captions": {"format": "coco_captions"},
            "vqav2": {"format": "vqav2", "image_pattern": "images/{image_id:06d}.png"},
            "refcoco": {"columns": {"image": "file_name", "expression": "sentences",
                                    "box": "bbox"},
                        "template_options": {"box_input": "xywh"}},
            "coco-instances": {"format": "coco_instances"}}[name]


def fixture_sources(cfg, cache_root: Path, template: str | None):
    """(train, eval) `SourceConfig`s over a fixture written once into the cache."""
    key = hashlib.sha1(cfg.model_dump_json().encode()).hexdigest()[:10]
    files = write_fixture(cfg.name, cache_root / "data" / f"{cfg.name}-{key}", cfg.train_size,
                          cfg.eval_size, cfg.image_size, cfg.seed)
    extra = source_options(cfg.name)
    if template is None:
        extra["template"] = DEFAULT_TEMPLATE[cfg.name]
    return tuple([SourceConfig(**{k: str(v) for k, v in files[split].items()}, **extra)]
                 for split in ("train", "test"))
