"""Built-in offline tasks: small coloured-shape images that a tiny model can learn.

`colour-vqa` writes conversations ("What color is the shape?" -> one colour word),
`colour-preference` the same question as preference rows (RLAIF-V layout: the right colour
chosen, another one rejected; for `train.objective: dpo`) and `colour-classes` writes labelled
images for the CLIP-family methods. Files are written once per
configuration into the cache and then read by the ordinary file loaders, like user data.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220),
           "yellow": (240, 220, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What color is the shape?"


def draw_shape(rng: random.Random, colour: tuple[int, int, int], size: int):
    """One image: a shape of `colour` at a random place and size on a grey background."""
    from PIL import Image, ImageDraw

    grey = rng.randint(60, 200)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    side = rng.randint(size // 3, size * 2 // 3)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in colour)
    paint(draw, rng.choice(SHAPES), x, y, side, jitter)
    return img


def paint(pen, shape: str, x: int, y: int, side: int, fill) -> None:
    """`shape` (one of SHAPES) filling the `side`-pixel square at (x, y) on a PIL `ImageDraw`:
    every synthetic image and fixture draws its shapes with this one painter."""
    inner = [x, y, x + side - 1, y + side - 1]
    if shape == "circle":
        pen.ellipse(inner, fill=fill)
    elif shape == "square":
        pen.rectangle(inner, fill=fill)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)],
                    fill=fill)


def vqa_row(image_path: str, colour: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": QUESTION}]},
                         {"role": "assistant", "content": [{"type": "text", "text": colour}]}],
            "images": [image_path]}


def preference_row(image_path: str, colour: str, rng: random.Random) -> dict:
    wrong = rng.choice([c for c in COLOURS if c != colour])
    return {"image": image_path, "question": QUESTION, "chosen": colour, "rejected": wrong}


def class_row(image_path: str, colour: str) -> dict:
    return {"image": image_path, "label": colour}


def write_synthetic(cfg, root: Path) -> dict[str, Path]:
    """Write `train.jsonl`, `test.jsonl` and images for `cfg` under `root`; reuse if present."""
    key = hashlib.sha1(cfg.model_dump_json().encode()).hexdigest()[:10]
    folder = root / "data" / f"{cfg.name}-{key}"
    paths = {"train": folder / "train.jsonl", "test": folder / "test.jsonl"}
    if all(p.exists() for p in paths.values()):
        return paths
    # Built in a private folder, then renamed into place: several training processes
    # (torchrun) may build the same task at once, and none may read a half-written one.
    build = folder.with_name(f".{folder.name}-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    _write_task(cfg, build)
    try:
        os.replace(build, folder)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(build, ignore_errors=True)
    return paths


def _write_task(cfg, folder: Path) -> None:
    paths = {"train": folder / "train.jsonl", "test": folder / "test.jsonl"}
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    make_row = {"colour-vqa": vqa_row, "colour-classes": class_row,
                "colour-preference": lambda path, colour: preference_row(path, colour, rng)
                }[cfg.name]
    index = 0
    for split, n in (("train", cfg.train_size), ("test", cfg.eval_size)):
        rows = []
        for _ in range(n):
            colour = rng.choice(list(COLOURS))
            rel = f"images/{index:06d}.png"
            draw_shape(rng, COLOURS[colour], cfg.image_size).save(folder / rel)
            rows.append(make_row(rel, colour))
            index += 1
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
