"""Open-vocabulary detection (Grounding DINO): a peft method (lora, dora, vera) on the
detector's fusion and decoder layers (`method.target: detector`), trained with the model's own
loss in the shared dual-encoder loop (`trainers.loop`: optimiser, schedule, accelerate
checkpoints, stop signals) and scored by COCO mAP.

- Prompt: the dataset's class names joined as Grounding DINO reads them ("red . green ."); every
  image is asked for every class, so a missing object is a negative, as in the paper.
- Loss: transformers' own (`GroundingDinoForObjectDetection(..., labels=...)`: Hungarian
  matching of queries to boxes, token-level focal classification, L1 + GIoU). Labels are made
  by the checkpoint's image processor from COCO-style annotations (`class_labels` = the class's
  place in the prompt, `boxes` = normalised cx, cy, w, h after its resize and padding); crowd
  regions are left out of training, as the processor does.
- Scores (before and after training, held-out images): a query's score for a class is the mean
  sigmoid over that class's prompt tokens; each image keeps its 100 best (query, class) pairs
  as detections, boxes scaled to the image (the processor's `post_process` convention), and
  `metrics.detection.coco_evaluate` (equal to pycocotools) gives mAP@[.5:.95], mAP50, mAP75,
  AR100 and AP per class. Crowd regions are ignored regions there, never false positives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftvlm.data.batch.preview import draw_detections
from peftvlm.data.prepare.detection import DetectionData, read_section
from peftvlm.data.prepare.loading import recipe_sources
from peftvlm.data.read.images import load_rgb
from peftvlm.errors import DataError, RecipeError
from peftvlm.eval.report import compare, write_outputs as write_eval_outputs
from peftvlm.families.grounding_dino import prompt_for
from peftvlm.metrics.detection import coco_evaluate
from peftvlm.models import load_base
from peftvlm.registry import get_method
from peftvlm.summary import loop_losses, parameter_counts, run_summary
from peftvlm.trainers.loop import (ADAPTER_DIR, PeftAdapterState, fit_scored, start_session,
                                   write_peft_run)

MAX_DETECTIONS = 100  # per image, as COCO evaluates (maxDets 100)
METRICS = {"mAP": "detection_mAP", "mAP50": "detection_mAP50", "mAP75": "detection_mAP75",
           "AR100": "detection_AR100"}


# --- prompts and batches ----------------------------------------------------------------------

def check_prompt(processor, model_config, classes: list[str]) -> None:
    """The prompt must fit the model's text length, or its last classes would be cut off."""
    length = len(processor.tokenizer(prompt_for(classes))["input_ids"])
    limit = model_config.max_text_len
    if length > limit:
        raise DataError(f"the {len(classes)} class names make a {length}-token prompt; this "
                        f"model reads {limit} tokens (config.max_text_len)",
                        hint="train on fewer classes per run, or shorten the class names")


def annotations_of(record: dict, classes: list[str], image_id: int) -> dict:
    """A record's objects as the COCO detection annotations the image processor reads."""
    anns = []
    for (x1, y1, x2, y2), label, crowd in zip(record["boxes"], record["labels"], record["crowd"]):
        anns.append({"bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                     "category_id": classes.index(label), "iscrowd": crowd})
    return {"image_id": image_id, "annotations": anns}


def encode(processor, records: list[dict], classes: list[str], device, labels: bool = True):
    """Model inputs for `records` (pixels, mask, the class prompt) and, with `labels`, the
    training targets in transformers' format."""
    images = [load_rgb(r["image"]) for r in records]
    kwargs = {"annotations": [annotations_of(r, classes, i) for i, r in enumerate(records)]} \
        if labels else {}
    vision = processor.image_processor(images=images, return_tensors="pt", **kwargs)
    text = processor.tokenizer([prompt_for(classes)] * len(records), padding=True,
                               return_tensors="pt")
    batch = {k: v.to(device) for k, v in {**vision, **text}.items() if k != "labels"}
    if labels:
        batch["labels"] = [{k: v.to(device) for k, v in t.items()
                            if k in ("class_labels", "boxes")} for t in vision["labels"]]
    return batch


# --- detections and scores --------------------------------------------------------------------

def class_scores(logits, input_ids):
    """[queries, classes] scores: the mean sigmoid of each class's prompt tokens (transformers'
    own grouping of tokens into classes, `build_label_maps`)."""
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    label_map = build_label_maps(logits[None], input_ids[None])[0].to(logits.dtype)
    weights = label_map / label_map.sum(-1, keepdim=True).clamp(min=1)
    return logits.sigmoid() @ weights.t()


def detections_of(output, input_ids, width: float, height: float, limit: int = MAX_DETECTIONS):
    """The best (query, class) pairs of one image: [(class index, score, [x1, y1, x2, y2])]
    with boxes in the image's pixels."""
    import torch

    scores = class_scores(output.logits[0].float(), input_ids[0])
    cx, cy, w, h = output.pred_boxes[0].float().unbind(-1)
    boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                         (cx + w / 2) * width, (cy + h / 2) * height], -1)
    top = scores.flatten().topk(min(limit, scores.numel()))
    n_classes = scores.shape[1]
    return [(int(i) % n_classes, float(s), [float(v) for v in boxes[int(i) // n_classes]])
            for s, i in zip(top.values, top.indices)]


def detect(model, processor, records: list[dict], classes: list[str]) -> list[list]:
    """Detections of every record, one image per forward (no padding: boxes stay relative to
    the image itself)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for record in records:
            batch = encode(processor, [record], classes, device, labels=False)
            found = detections_of(model(**batch), batch["input_ids"], record["width"],
                                  record["height"])
            out.append(found)
    model.train(was_training)
    return out


def coco_scores(records: list[dict], detections: list[list], classes: list[str]) -> dict:
    """COCO mAP of `detections` against the records' boxes (crowd regions ignored)."""
    gt = {"images": [{"id": i + 1} for i in range(len(records))], "annotations": [],
          "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}
    for i, record in enumerate(records):
        for (x1, y1, x2, y2), label, crowd in zip(record["boxes"], record["labels"],
                                                  record["crowd"]):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1,
                                      "category_id": classes.index(label) + 1,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": crowd})
    results = [{"image_id": i + 1, "category_id": k + 1, "score": score,
                "bbox": [x1, y1, x2 - x1, y2 - y1]}
               for i, found in enumerate(detections) for k, score, (x1, y1, x2, y2) in found]
    scores = coco_evaluate(gt, results)
    out = {name: scores[key] for key, name in METRICS.items()}
    out.update({f"detection_{k}": v for k, v in scores.items() if k.startswith("AP/")})
    return out


def detection_scores(model, processor, data: DetectionData, classes: list[str]) -> dict:
    return coco_scores(data.records, detect(model, processor, data.records, classes), classes)


# --- the task for the shared loop -------------------------------------------------------------

@dataclass
class DetectionTask(PeftAdapterState):
    """Grounding DINO's own loss on `train` images, scored on `held_out` images."""

    model: object  # the PeftModel
    processor: object
    train: DetectionData
    held_out: DetectionData | None
    classes: list[str]

    @property
    def n_examples(self) -> int:
        return len(self.train)

    def loss(self, model, index, epoch: int, device):
        records = [self.train.records[i] for i in index.tolist()]
        return model(**encode(self.processor, records, self.classes, device)).loss

    def scores(self) -> dict | None:
        if not self.held_out:
            return None
        return detection_scores(self.model, self.processor, self.held_out, self.classes)


# --- the run ----------------------------------------------------------------------------------

def load_data(recipe, max_eval: int | None = None):
    """(training images, held-out images or None, the classes of the prompt)."""
    train_sources, eval_sources = recipe_sources(recipe)
    base, data_cfg = recipe.base_dir(), recipe.data
    options = dict(data_cfg.template_options)
    train = read_section(train_sources, base, options, data_cfg.on_bad_row, "data.train")
    held_out = None
    if eval_sources:
        held_out = read_section(eval_sources, base, options, data_cfg.on_bad_row, "data.eval",
                                classes=train.classes)
        if max_eval:
            held_out = DetectionData(held_out.records[:max_eval], held_out.classes,
                                     held_out.bad_rows)
    return train, held_out, held_out.classes if held_out else train.classes


def peft_ready(model, family):
    """peft asks every model for `get_input_embeddings()`; GroundingDino raises there: its
    text backbone's word embeddings are the model's input embeddings."""
    try:
        model.get_input_embeddings()
    except NotImplementedError:
        embeddings = model.get_submodule(family.language_module).get_input_embeddings()
        model.get_input_embeddings = lambda: embeddings
    return model


def load_detector(model_cfg, method_name: str = "lora"):
    """The base detector and processor, ready for peft."""
    loaded = load_base(model_cfg, method_name)
    peft_ready(loaded.model, loaded.family)
    return loaded


def load_and_adapt(recipe):
    """(loaded base, the PeftModel) for a detection recipe."""
    loaded = load_detector(recipe.model, recipe.method.name)
    model = get_method(recipe.method.name).apply(
        loaded.model, loaded.family, recipe.method,
        gradient_checkpointing=recipe.train.gradient_checkpointing)
    return loaded, model


def dry_run_detection(recipe, log=print) -> dict:
    """Load, adapt and read the images; report parameter counts, classes and one image."""
    loaded, model = load_and_adapt(recipe)
    train, held_out, classes = load_data(recipe, recipe.eval.max_samples)
    check_prompt(loaded.processor, loaded.model.config, classes)
    trainable, total = parameter_counts(model)
    log(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    log(f"images: {len(train)} training, {len(held_out) if held_out else 0} held-out; "
        f"prompt: {prompt_for(classes)!r}")
    first = train.records[0]
    log(f"example: {first['image']}: {list(zip(first['labels'], first['boxes']))}")
    return {"trainable_params": trainable, "total_params": total, "train_images": len(train),
            "eval_images": len(held_out) if held_out else 0, "classes": classes,
            "bad_rows": {"train": train.bad_rows, "eval": held_out.bad_rows if held_out else {}}}


def train_detection(recipe, run_dir: Path, resume: bool = False, log=print) -> dict:
    """Train a peft adapter on an open-vocabulary detector; returns (and writes) the summary."""
    from accelerate.utils import set_seed

    run_dir, session = Path(run_dir), start_session(recipe)
    set_seed(recipe.train.seed)
    train, held_out, classes = load_data(recipe, recipe.eval.max_samples)
    loaded, model = load_and_adapt(recipe)
    check_prompt(loaded.processor, loaded.model.config, classes)
    model.to(session.accelerator.device)
    counts = parameter_counts(model)
    log(f"model: {recipe.model.id} ({loaded.family.name}), {recipe.method.name}: "
        f"{counts[0]:,} of {counts[1]:,} parameters train; {len(train)} training images, "
        f"classes {prompt_for(classes)!r}")
    task = DetectionTask(model, loaded.processor, train, held_out, classes)
    done, scores = fit_scored(recipe, session, task, model, run_dir, resume, log, held_out)
    summary = run_summary(
        recipe, loaded.family, counts, runtime_s=done.runtime_s, global_step=done.state.step,
        **loop_losses(done.state.history), eval=scores, classes=classes,
        data={"train_images": len(train), "eval_images": len(held_out) if held_out else 0,
              "bad_rows": {"train": train.bad_rows,
                           "eval": held_out.bad_rows if held_out else {}}})
    if session.accelerator.is_main_process:
        write_peft_run(recipe, model, loaded.processor, done, summary, run_dir)
    return summary


# --- peftvlm eval -----------------------------------------------------------------------------

def load_trained(recipe, adapter_dir: Path):
    """(the base detector's LoadedModel, the PeftModel with the run's adapter), on the device."""
    import torch
    from peft import PeftModel

    loaded = load_detector(recipe.model, recipe.method.name)
    loaded.model.to("cuda" if torch.cuda.is_available() else "cpu")
    return loaded, PeftModel.from_pretrained(loaded.model, adapter_dir)


def evaluate_detection(recipe, run_dir, split: str = "test", max_samples: int | None = None,
                       with_base: bool = True, log=print) -> dict:
    """`peftvlm eval` of a detection run: base vs the run's adapter on the held-out images
    (`test`) or the training images (`train`); writes RUN/eval/ (metrics.json,
    predictions.jsonl: each image's detections above 0.3 and its reference boxes,
    metrics.png, and images/ with predicted (red) and reference (green) boxes drawn)."""
    run_dir, limit = Path(run_dir), max_samples or recipe.eval.max_samples
    train, held_out, classes = load_data(recipe, limit)
    data = held_out if split == "test" else DetectionData(train.records[:limit], classes)
    if data is None:
        raise RecipeError("--split test: the recipe has no held-out images (data.eval)",
                          hint="add data.eval, or score the training images with --split train")
    loaded, tuned_model = load_trained(recipe, run_dir / ADAPTER_DIR)
    base = None
    if with_base:
        with tuned_model.disable_adapter():
            base = detection_scores(tuned_model, loaded.processor, data, classes)
    found = detect(tuned_model, loaded.processor, data.records, classes)
    tuned = coco_scores(data.records, found, classes)
    result = {"run": str(run_dir), "run_name": recipe.name, "recipe": str(recipe.source_path),
              "model": recipe.model.id, "method": recipe.method.name, "split": split,
              "num_examples": len(data), "metrics": compare(base, tuned, {}),
              "per_class": {}, "notes": {"detections": f"top {MAX_DETECTIONS} (query, class) "
                                                       "pairs per image, COCO evaluation"}}
    rows = prediction_rows(data.records, found, classes)
    files = write_eval_outputs(run_dir / "eval", result, rows)
    images = run_dir / "eval" / "images"
    images.mkdir(exist_ok=True)
    for i, (record, row) in enumerate(list(zip(data.records, rows))[:8]):
        draw_detections(load_rgb(record["image"]), row["prediction"],
                        references=row["references"]).save(images / f"{i:03d}.png")
    result["files"] = {**{k: str(v) for k, v in files.items()}, "images": str(images)}
    log(f"{split}: mAP50 {tuned['detection_mAP50']:.3f} with {recipe.method.name}"
        + (f" ({base['detection_mAP50']:.3f} base)" if base else ""))
    return result


def prediction_rows(records: list[dict], found: list[list], classes: list[str],
                    threshold: float = 0.3) -> list[dict]:
    """One row per image: its reference boxes and the detections scoring at least `threshold`."""
    return [{"id": str(i), "image": str(r["image"])[:200],
             "references": [{"label": lab, "box": box} for lab, box in zip(r["labels"],
                                                                           r["boxes"])],
             "prediction": [{"label": classes[k], "score": round(s, 4),
                             "box": [round(v, 2) for v in box]}
                            for k, s, box in found[i] if s >= threshold]}
            for i, r in enumerate(records)]
