"""`peftvlm demo RUN`: a Gradio page to try a trained run on your own images.

    peftvlm demo runs/quickstart                  # http://127.0.0.1:7860
    peftvlm demo runs/clip-coop --no-compare-base

Upload an image (or click a held-out example), press Answer: the fine-tuned answer and, side by
side, the base model's. The page is the one of the run's task, which the predictor built by the
run's kind declares (`predictor.task`, a key of `PAGES`):

- `question` / `caption` (generative runs): the generated answer (a question box, prefilled
  with the training prompt, for question runs);
- `grounding` (generative runs trained on a grounding or detection template): the answer and
  its boxes, read with the family's own convention, drawn on the image;
- `classify` (CLIP-family runs): the class probabilities as bars;
- `retrieve` (retrieval runs): the captions you list (one per line; prefilled with held-out
  ones) ranked for the image, as probabilities over them;
- `detect` (Grounding DINO runs): boxes with labels and scores drawn on the image, for the
  class names you give ("cat . dog ."; prefilled with the run's) above a score threshold.

The run's recipe summary and eval metrics are shown above. Everything goes through the run's
predictor (`serving.predictor`), so the answers are the ones `peftvlm predict` and `peftvlm
eval` give; boxes are drawn by `data.preview`, as `predict` draws them.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peftvlm.data.batch.collate import open_image
from peftvlm.data.batch.preview import PREDICTION_COLOUR, answer_boxes, draw_boxes, draw_detections
from peftvlm.data.boxes import box_format_for
from peftvlm.data.read.images import load_rgb
from peftvlm.errors import DataError, PeftVLMError, RunError
from peftvlm.families.grounding_dino import prompt_for
from peftvlm.runs import MERGED
from peftvlm.serving.detection import DEFAULT_THRESHOLD, parse_classes
from peftvlm.serving.predictor import first_user_text, open_predictor, question_row


# --- what the page shows about the run ----------------------------------------------------------

def recipe_summary(predictor) -> str:
    """Markdown: model, method and its settings, data, training length and size."""
    files, summary = predictor.files, predictor.files.summary
    recipe = files.recipe
    if recipe is None:
        return f"**{files.path}**: a merged export (its run's recipe is not beside it)"
    method = recipe.method.model_dump(exclude_none=True, exclude={"name"})
    settings = ", ".join(f"{k}={v}" for k, v in method.items()
                         if v not in ([], {}, None) and not isinstance(v, dict))
    data = recipe.data.synthetic.name if recipe.data.synthetic else ", ".join(
        s.path or s.dataset or "?" for s in recipe.data.train or [])
    lines = [f"**model** {recipe.model.id} ({summary.get('family', predictor.family.name)})",
             f"**method** {recipe.method.name}" + (f" ({settings})" if settings else ""),
             f"**data** {data}" + (f", template {recipe.data.template}"
                                   if recipe.data.template else "")]
    if summary.get("global_step") is not None:
        lines.append(f"**training** {summary['global_step']} steps, "
                     f"{summary.get('train_runtime_s', 0):.0f} s on {summary.get('hardware')}")
    if summary.get("trainable_params"):
        lines.append(f"**trainable** {summary['trainable_params']:,} of "
                     f"{summary['total_params']:,} parameters")
    if files.layout == MERGED:
        lines.append(f"**serving** the merged export {files.path}")
    return "  \n".join(lines)


def metrics_table(predictor) -> str:
    """Markdown table of held-out scores: `peftvlm eval`'s metrics.json, else summary.json's."""
    run_dir = predictor.files.run_dir
    eval_file = run_dir / "eval" / "metrics.json" if run_dir else None
    rows = []
    if eval_file is not None and eval_file.exists():
        metrics = json.loads(eval_file.read_text()).get("metrics", {})
        rows = [(k, v.get("base"), v.get("fine_tuned")) for k, v in metrics.items()]
        source = "peftvlm eval"
    else:
        rows = [(k, v.get("before"), v.get("after"))
                for k, v in predictor.files.summary.get("eval", {}).items()]
        source = "held-out, from training"
    if not rows:
        return "_no eval metrics in this run_"
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"| metric ({source}) | base | fine-tuned |\n|---|---|---|\n"
            + "\n".join(f"| {k} | {fmt(b)} | {fmt(a)} |" for k, b, a in rows))


# --- held-out examples (Gradio serves examples from files) --------------------------------------

def example_list(items: list[tuple], limit: int = 8) -> list[list]:
    """[image path, text] of (image, text) pairs; images held in memory are saved to a temp
    folder first."""
    folder, examples = None, []
    for i, (image, text) in enumerate(items[:limit]):
        if image is None:
            continue
        if not isinstance(image, (str, Path)):
            folder = folder or Path(tempfile.mkdtemp(prefix="peftvlm-demo-"))
            path = folder / f"example-{i}.png"
            open_image(image).save(path)
            image = path
        examples.append([str(image), text])
    return examples


def first_image(row: dict):
    return row["images"][0] if row.get("images") else None


def example_files(predictor, limit: int = 8) -> list[list]:
    """[image path, question] of a generative run's held-out rows."""
    return example_list([(first_image(r), first_user_text(r) or "")
                         for r in predictor.examples], limit)


def class_example_files(predictor, limit: int = 8) -> list[list]:
    """[image path, ""] of a CLIP-family run's held-out images (no text: the classes are the
    run's)."""
    return example_list([(first_image(r), "") for r in predictor.examples], limit)


def retrieval_examples(predictor, limit: int = 8) -> list[list]:
    """[image path, its captions] of held-out pairs."""
    return example_list([(first_image(p), "\n".join(p["captions"]))
                         for p in predictor.examples], limit)


def detection_examples(predictor, limit: int = 8) -> list[list]:
    """[image path, the run's class names as a prompt] of held-out images."""
    return example_list([(first_image(r), prompt_for(r["classes"]))
                         for r in predictor.examples], limit)


def default_captions(predictor, limit: int = 4) -> str:
    """One held-out caption of each of the first images: a ready list to rank."""
    return "\n".join(pair["captions"][0] for pair in predictor.examples[:limit])


def default_classes(predictor) -> str:
    """The run's classes as a Grounding DINO prompt ("red . blue ."), or nothing when unknown."""
    return prompt_for(predictor.classes) if predictor.classes else ""


# --- answers: (text, what the column shows beside it) -------------------------------------------

def generated_answer(predictor, image, text: str, base: bool, threshold: float):
    """A generative run's answer to the question (or the training prompt)."""
    row = question_row(image, text or None, predictor.system_prompt)
    return predictor.answer([row], base=base)[0], None


def draw_box(image, answer: str, box_format: str = "norm1"):
    """(the image with the answer's boxes drawn in red, [(box in pixels, label)]): every box of
    the answer, read with the family's own convention (Qwen2.5-VL pixels, PaliGemma /
    Florence-2 tokens...), drawn as `predict --out` draws them."""
    found = answer_boxes(answer or "", box_format, image)
    picture = draw_boxes(image, [([(label or "predicted", box) for label, box in found],
                                  PREDICTION_COLOUR)])
    return picture, [(tuple(int(v) for v in box), label or "predicted") for label, box in found]


def grounded_answer(predictor, image, text: str, base: bool, threshold: float):
    """A grounding run's answer and its boxes drawn on the image."""
    answer, _ = generated_answer(predictor, image, text, base, threshold)
    return answer, draw_box(image, answer, box_format_for(predictor.family,
                                                          predictor.processor))[0]


def top_classes(predictor, image, text: str, base: bool, threshold: float):
    """A CLIP-family run's best class and {class: probability} of its top ten."""
    ranked = predictor.classify([image], top_k=10, base=base)[0]
    return ranked[0][0], dict(ranked)


def ranked_captions(predictor, image, text: str, base: bool, threshold: float):
    """A retrieval run's best caption and {caption: probability} over the listed captions."""
    captions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(captions) < 2:
        raise DataError("List at least two captions to rank, one per line.")
    probs = predictor.caption_probabilities(image, captions, base=base)
    return max(probs, key=probs.get), probs


def detected_boxes(predictor, image, text: str, base: bool, threshold: float):
    """A detection run's boxes for the given class names (default: the run's), as text and
    drawn on the image (`draw_detections`, as `predict` draws them)."""
    classes = parse_classes(text) if text and text.strip() else None
    found = predictor.detect([image], classes, threshold=threshold, base=base)[0]
    listed = "\n".join(detection_line(d) for d in found)
    return listed or f"no boxes scoring {threshold:.2f} or more", draw_detections(image, found)


def detection_line(detection: dict) -> str:
    """`red 0.91 at [x1, y1, x2, y2]` (pixels of the image)."""
    box = ", ".join(f"{v:g}" for v in detection["box"])
    return f"{detection['label']} {detection['score']:.2f} at [{box}]"


# --- pages ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Page:
    """One task's page: its title, the text box beside the image (hidden when `text_label` is
    None), what each answer column shows beside the answer ("probabilities" as bars, a drawn
    "picture", or nothing) and the functions that answer and list examples."""

    title: str
    text_label: str | None
    shows: str | None
    answer: Callable  # (predictor, image, text, base, threshold) -> (answer text, shown)
    examples: Callable  # predictor -> [[image path, text]]
    default_text: Callable  # predictor -> the text box's first value
    text_lines: int = 1
    threshold: bool = False  # a score threshold slider (detectors)


def training_prompt(predictor) -> str:
    return predictor.default_prompt or ""


PAGES: dict[str, Page] = {
    "question": Page("Ask a question about an image", "Question", None, generated_answer,
                     example_files, training_prompt),
    "caption": Page("Caption an image", None, None, generated_answer, example_files,
                    training_prompt),
    "grounding": Page("Find the region a phrase describes", "Prompt (the phrase to find)",
                      "picture", grounded_answer, example_files, training_prompt),
    "classify": Page("Classify an image", None, "probabilities", top_classes,
                     class_example_files, lambda predictor: ""),
    "retrieve": Page("Rank captions for an image", "Captions to rank (one per line)",
                     "probabilities", ranked_captions, retrieval_examples, default_captions,
                     text_lines=4),
    "detect": Page("Detect objects by name", 'Classes to find ("cat . dog ."; empty: the '
                   "run's)", "picture", detected_boxes, detection_examples, default_classes,
                   threshold=True),
}


def page_for(predictor) -> Page:
    """The page of the task the run's predictor declares."""
    page = PAGES.get(predictor.task)
    if page is None:
        raise RunError(f"{predictor.name}: `peftvlm demo` has no page for {predictor.task!r} "
                       "runs", hint="use `peftvlm predict RUN --image ...` or `peftvlm serve RUN`")
    return page


def responder(predictor, compare_base: bool):
    """The button's function: image, text (+ threshold) -> per column (fine-tuned, then base
    when compared) the answer and what the page shows beside it."""
    import gradio as gr

    page = page_for(predictor)

    def respond(image, text, threshold=DEFAULT_THRESHOLD):
        if image is None:
            raise gr.Error("Upload an image first (or click an example below).")
        image = load_rgb(image)  # as training decoded its images (EXIF, alpha on white)
        outputs = []
        try:
            for base in (False, True) if compare_base else (False,):
                answer, shown = page.answer(predictor, image, text, base, threshold)
                outputs += [answer] if page.shows is None else [answer, shown]
        except PeftVLMError as exc:
            raise gr.Error(exc.message) from exc
        if not compare_base:  # the hidden base column's outputs
            outputs += [""] if page.shows is None else ["", None]
        return outputs

    return respond


def answer_column(gr, page: Page, which: str, label: str) -> list:
    """The output components of one column: the answer, and what the page shows beside it."""
    outputs = [gr.Textbox(label=f"{label} answer", elem_id=f"{which}-answer",
                          interactive=False, max_lines=8)]
    if page.shows == "probabilities":
        outputs.append(gr.Label(num_top_classes=10, label=f"{label}: probabilities",
                                elem_id=f"{which}-classes"))
    elif page.shows == "picture":
        outputs.append(gr.Image(type="pil", format="png", label=f"{label}: predicted boxes",
                                elem_id=f"{which}-boxes", interactive=False, height=320))
    return outputs


def build_demo(predictor, compare_base: bool = True):
    """The Gradio Blocks app for `predictor` (any run kind's predictor with a page)."""
    import gradio as gr

    page = page_for(predictor)
    compare_base = compare_base and predictor.has_base
    with gr.Blocks(title=f"peftvlm: {predictor.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"# {predictor.name}: {page.title}")
        with gr.Row():
            gr.Markdown(recipe_summary(predictor), elem_id="recipe-summary")
            gr.Markdown(metrics_table(predictor), elem_id="eval-metrics")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", elem_id="input-image", height=320)
                text = gr.Textbox(value=page.default_text(predictor), lines=page.text_lines,
                                  label=page.text_label or "Prompt", elem_id="question",
                                  visible=page.text_label is not None)
                threshold = gr.Slider(0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.01,
                                      label="Score threshold", elem_id="threshold",
                                      visible=page.threshold)
                button = gr.Button("Answer", variant="primary", elem_id="answer-button")
            outputs = []
            for which, label in (("tuned", "Fine-tuned"), ("base", "Base model")):
                with gr.Column(visible=which == "tuned" or compare_base):
                    outputs += answer_column(gr, page, which, label)
        examples = page.examples(predictor)
        if examples:
            gr.Examples(examples=examples, inputs=[image, text], examples_per_page=4,
                        elem_id="examples", label="Held-out examples (click one, then Answer)")
        button.click(responder(predictor, compare_base), inputs=[image, text, threshold],
                     outputs=outputs, api_name="answer")
    return demo


def example_folders(predictor) -> list[str]:
    """The folders of the page's example images (Gradio serves only files it is allowed)."""
    return sorted({str(Path(path).parent) for path, _ in page_for(predictor).examples(predictor)})


def launch(run, host: str = "127.0.0.1", port: int = 7860, compare_base: bool = True,
           log=print, block: bool = True):
    """Load the run and serve the demo (until Ctrl-C unless `block` is False); returns it."""
    predictor = open_predictor(run, log)
    demo = build_demo(predictor, compare_base)
    log(f"demo of {predictor.name} at http://{host}:{port}")
    demo.launch(server_name=host, server_port=port, ssr_mode=False, quiet=True,
                allowed_paths=example_folders(predictor), prevent_thread_lock=not block,
                footer_links=[])
    return demo
