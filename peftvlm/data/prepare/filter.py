"""`peftvlm data filter RECIPE --clipscore MIN`: keep the image-text pairs of a recipe's training
sources whose CLIPScore reaches MIN (the LAION / DataComp curation step), as a new source.

Pairs are read exactly as training reads them (`load_source`: the same readers, templates and
bad-row policy), grouped per image (every caption of an image is a pair), and scored with a CLIP
model (`data.filter.model`, `--model`, else the recipe's own) by `metrics.clipscore`, batched,
each image encoded once. Scores are appended batch by batch, so an interrupted run continues
where it stopped, and changing MIN later re-scores nothing.

The output folder (`data.filter.output`, default `runs/<recipe name>-filtered/`):

    scores.jsonl   every pair's score, in reading order (the resume point is state.json)
    state.json     what is being scored (sources, model) and how far it got
    kept.jsonl     pairs with score >= MIN: {"image", "captions": [caption], "clipscore",
                   "source", "row"}, read with the `caption` template (image paths relative to
                   report.json's `image_root`; in-memory images are written to images/)
    report.json    counts kept/dropped, score distribution, the lowest kept pairs
    histogram.png  the score distribution with MIN marked

With `data.filter` in the recipe, training reads kept.jsonl instead of data.train.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from peftvlm.data.prepare.filtered import FilterSettings, settings, unfiltered
from peftvlm.data.prepare.loading import load_source, recipe_sources
from peftvlm.data.prepare.pairs import pairs_from_rows
from peftvlm.data.read.images import load_rgb
from peftvlm.data.rows import BadRowReport, enforce_policy
from peftvlm.errors import DataError, RecipeError
from peftvlm.metrics.clipscore import clip_scores_per_caption
from peftvlm.models import load_base
from peftvlm.recipe.schema import ModelConfig

LOWEST_SHOWN = 5


@dataclass
class Pair:
    image: object  # absolute path, {"bytes"} dict or PIL image
    caption: str
    source: str
    row: int  # the image's index within its source


def read_pairs(recipe) -> tuple[list[Pair], dict]:
    """Every (image, caption) pair of the training sources, and the bad rows per source."""
    train_sources, _ = recipe_sources(unfiltered(recipe))
    pairs, report, bad = [], BadRowReport(), {}
    for src in train_sources:
        loaded = load_source(src, recipe.data, recipe.base_dir())
        report.merge(loaded.report)
        bad[loaded.name] = loaded.report.as_dict()
        grouped = pairs_from_rows(loaded.rows, f"data.train source {loaded.name}")
        pairs += [Pair(image, caption, loaded.name, i)
                  for i, (image, caps) in enumerate(zip(grouped.images, grouped.captions))
                  for caption in caps]
    enforce_policy(report, recipe.data.on_bad_row, "data.train")
    if not pairs:
        raise DataError("data.train: no image-text pairs to score")
    return pairs, bad


def load_scorer(model_id: str):
    """A dual encoder and its processor (CLIPScore needs one)."""
    loaded = load_base(ModelConfig(id=model_id))
    if not loaded.family.is_dual_encoder:
        raise RecipeError(f"data filter: {model_id!r} is a {loaded.family.name} model; "
                          "CLIPScore needs a CLIP model",
                          hint="pass --model openai/clip-vit-base-patch32 (or set "
                               "data.filter.model)")
    import torch

    loaded.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return loaded.model, loaded.processor


# --- resumable scoring ------------------------------------------------------------------------

def job_key(recipe, s: FilterSettings, pairs: list[Pair]) -> str:
    """What the scores depend on: the sources, the model, and the pairs read."""
    h = hashlib.sha1(json.dumps([[src.model_dump(mode="json") for src in recipe.data.train or []],
                                 recipe.data.synthetic and recipe.data.synthetic.model_dump(),
                                 recipe.data.template, s.model_id, len(pairs),
                                 pairs[0].caption, pairs[-1].caption], default=str).encode())
    return h.hexdigest()[:16]


def read_state(out: Path, key: str, overwrite: bool) -> dict:
    """Where a previous run of the same job stopped; a different job's folder is refused."""
    state_file = out / "state.json"
    if overwrite or not state_file.exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.jsonl").write_text("")
        return {"key": key, "pairs_done": 0, "bytes": 0}
    state = json.loads(state_file.read_text())
    if state.get("key") != key:
        raise RecipeError(f"{out} holds the scores of other data or another model",
                          hint="pass --overwrite to score again, or --out for a new folder")
    with (out / "scores.jsonl").open("r+b") as f:
        f.truncate(state["bytes"])  # drop a batch half-written when the run was stopped
    return state


def groups_from(pairs: list[Pair], start: int, batch_size: int):
    """Consecutive pairs of the same image, batch_size images at a time, from pair `start`."""
    batch, i = [], start
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j].source == pairs[i].source and \
                pairs[j].row == pairs[i].row:
            j += 1
        batch.append((i, j))
        i = j
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_pairs(pairs: list[Pair], s: FilterSettings, state: dict, log) -> list[float]:
    """Score the pairs not scored yet (appending to scores.jsonl); return every score."""
    from tqdm.auto import tqdm

    out = s.out_dir
    if state["pairs_done"] < len(pairs):
        if state["pairs_done"]:
            log(f"resuming: {state['pairs_done']} of {len(pairs)} pairs already scored")
        model, processor = load_scorer(s.model_id)
        bar = tqdm(total=len(pairs), initial=state["pairs_done"], desc="scoring pairs")
        with (out / "scores.jsonl").open("a") as f:
            for batch in groups_from(pairs, state["pairs_done"], s.batch_size):
                images = [load_rgb(pairs[i].image) for i, _ in batch]
                captions = [[p.caption for p in pairs[i:j]] for i, j in batch]
                scores = clip_scores_per_caption(model, processor, images, captions,
                                                 s.batch_size)
                f.write("".join(json.dumps(round(x, 6)) + "\n" for caps in scores for x in caps))
                f.flush()
                state.update(pairs_done=batch[-1][1], bytes=f.tell())
                write_state(out, state)
                bar.update(batch[-1][1] - batch[0][0])
        bar.close()
    return [float(line) for line in (out / "scores.jsonl").read_text().splitlines()]


def write_state(out: Path, state: dict) -> None:
    tmp = out / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(out / "state.json")


# --- outputs ----------------------------------------------------------------------------------

def image_file(image, out: Path, index: int) -> str:
    """An absolute path for a kept pair's image (in-memory images are written as PNG)."""
    if isinstance(image, str):
        return image
    path = out / "images" / f"{index:08d}.png"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        load_rgb(image).save(path)
    return str(path.resolve())


def write_kept(pairs: list[Pair], scores: list[float], s: FilterSettings) -> tuple[int, str]:
    """kept.jsonl, image paths relative to their common folder; (kept count, that folder)."""
    kept = [(k, p, sc) for k, (p, sc) in enumerate(zip(pairs, scores)) if sc >= s.min_score]
    paths = [image_file(p.image, s.out_dir, k) for k, p, _ in kept]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else str(s.out_dir)
    tmp = s.out_dir / "kept.jsonl.tmp"
    with tmp.open("w") as f:
        for (_, p, score), path in zip(kept, paths):
            f.write(json.dumps({"image": os.path.relpath(path, root), "captions": [p.caption],
                                "clipscore": score, "source": p.source, "row": p.row}) + "\n")
    tmp.replace(s.out_dir / "kept.jsonl")
    return len(kept), root


def distribution(scores: list[float]) -> dict:
    import numpy as np

    values = np.asarray(scores)
    return {"min": float(values.min()), "max": float(values.max()),
            "mean": float(values.mean()),
            **{f"p{q}": float(np.percentile(values, q)) for q in (5, 25, 50, 75, 95)}}


def plot_histogram(scores: list[float], min_score: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(scores, bins=50, color="#4878cf")
    ax.axvline(min_score, color="#d62728", linestyle="--", label=f"threshold {min_score}")
    ax.set(xlabel="CLIPScore", ylabel="pairs", title="CLIPScore of the training pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_filter(recipe, clipscore: float | None = None, model: str | None = None,
               batch_size: int | None = None, output: str | None = None,
               overwrite: bool = False, log=print) -> dict:
    """Score every training pair (resuming), write the kept pairs and the report."""
    s = settings(recipe, clipscore, model, batch_size, output)
    pairs, bad_rows = read_pairs(recipe)
    state = read_state(s.out_dir, job_key(recipe, s, pairs), overwrite)
    scores = score_pairs(pairs, s, state, log)
    kept, root = write_kept(pairs, scores, s)
    plot_histogram(scores, s.min_score, s.out_dir / "histogram.png")
    lowest = sorted((k for k, sc in enumerate(scores) if sc >= s.min_score),
                    key=lambda k: scores[k])[:LOWEST_SHOWN]
    report = {"min_score": s.min_score, "model": s.model_id, "pairs": len(pairs), "kept": kept,
              "dropped": len(pairs) - kept, "distribution": distribution(scores),
              "lowest_kept": [{"clipscore": scores[k], "caption": pairs[k].caption,
                               "source": pairs[k].source, "row": pairs[k].row} for k in lowest],
              "bad_rows": bad_rows, "image_root": root,
              "files": {n: str(s.out_dir / n) for n in ("kept.jsonl", "scores.jsonl",
                                                         "histogram.png", "report.json")}}
    (s.out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
