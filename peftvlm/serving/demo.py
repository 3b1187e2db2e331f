"""`peftvlm demo RUN`: a Gradio page to try a trained run on your own images.

    peftvlm demo runs/quickstart                  # http://127.0.0.1:7860
    peftvlm demo runs/clip-coop --no-compare-base

Upload an image (or click a held-out example), press Answer: the fine-tuned answer and, side by
side, the base model's. The task is the one the run was trained for: a question (editable,
prefilled with the training prompt), a caption, grounding (the predicted box is drawn on the
image), for CLIP-family runs the class probabilities as bars, and for retrieval runs the
captions you list (one per line; prefilled with held-out ones) ranked for the image, as
probabilities over them. The run's recipe summary and
eval metrics are shown above. Everything goes through `predictor.Predictor`, so the answers are
the ones `peftvlm predict` and `peftvlm eval` give.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from peftvlm.data.batch.collate import open_image
from peftvlm.data.batch.preview import answer_boxes
from peftvlm.data.boxes import box_format_for
from peftvlm.data.read.images import load_rgb
from peftvlm.errors import PeftVLMError, RunError
from peftvlm.runs import MERGED
from peftvlm.serving.predictor import first_user_text, open_predictor, question_row

TITLES = {"question": "Ask a question about an image", "caption": "Caption an image",
          "grounding": "Find the region a phrase describes", "classify": "Classify an image",
          "retrieve": "Rank captions for an image"}


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


def example_files(predictor, limit: int = 8) -> list[list]:
    """[image path, question] of held-out rows (images held in memory are saved to a temp
    folder first: Gradio serves examples from files)."""
    folder = None
    examples = []
    for i, row in enumerate(predictor.examples[:limit]):
        image = row["images"][0] if row.get("images") else None
        if image is None:
            continue
        if not isinstance(image, (str, Path)):
            folder = folder or Path(tempfile.mkdtemp(prefix="peftvlm-demo-"))
            image = folder / f"example-{i}.png"
            open_image(row["images"][0]).save(image)
        examples.append([str(image), first_user_text(row) or ""])
    return examples


# --- answering -----------------------------------------------------------------------------------

def draw_box(image, answer: str, box_format: str = "norm1"):
    """(image, [(box in pixels, label)]) for gr.AnnotatedImage: every box of the answer, read
    with the family's own convention (Qwen2.5-VL pixels, PaliGemma / Florence-2 tokens...)."""
    return image, [(tuple(int(v) for v in box), label or "predicted")
                   for label, box in answer_boxes(answer or "", box_format, image)]


def responder(predictor, compare_base: bool):
    """The button's function: image (+ question) -> the outputs of the run's task."""
    import gradio as gr

    def respond(image, question):
        if image is None:
            raise gr.Error("Upload an image first (or click an example below).")
        image = load_rgb(image)  # as training decoded its images (EXIF, alpha on white)
        if predictor.task == "retrieve":
            return rank_captions(predictor, image, question, compare_base)
        if predictor.task == "classify":
            ranked = predictor.classify([image], top_k=10)[0]
            base = predictor.classify([image], top_k=10, base=True)[0] if compare_base else []
            return [ranked[0][0], dict(ranked), base[0][0] if base else "", dict(base)]
        row = question_row(image, question or None, predictor.system_prompt)
        try:
            answers = [predictor.answer([row])[0]]
            if compare_base:
                answers.append(predictor.answer([row], base=True)[0])
        except PeftVLMError as exc:
            raise gr.Error(exc.message) from exc
        answers += [""] * (2 - len(answers))
        if predictor.task == "grounding":
            box_format = box_format_for(predictor.family, predictor.processor)
            return [answers[0], draw_box(image, answers[0], box_format), answers[1],
                    draw_box(image, answers[1], box_format)]
        return answers

    return respond


def rank_captions(predictor, image, text: str, compare_base: bool) -> list:
    """The retrieval page's outputs: best caption and {caption: probability}, tuned and base."""
    import gradio as gr

    captions = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(captions) < 2:
        raise gr.Error("List at least two captions to rank, one per line.")
    tuned = predictor.caption_probabilities(image, captions)
    base = predictor.caption_probabilities(image, captions, base=True) if compare_base else {}
    best = lambda probs: max(probs, key=probs.get) if probs else ""  # noqa: E731
    return [best(tuned), tuned, best(base), base]


def retrieval_examples(predictor, limit: int = 8) -> list[list]:
    """[image path, its captions] of held-out pairs (images in memory are saved first)."""
    folder, examples = None, []
    for i, pair in enumerate(predictor.examples[:limit]):
        image = pair["images"][0]
        if not isinstance(image, (str, Path)):
            folder = folder or Path(tempfile.mkdtemp(prefix="peftvlm-demo-"))
            image = folder / f"example-{i}.png"
            open_image(pair["images"][0]).save(image)
        examples.append([str(image), "\n".join(pair["captions"])])
    return examples


def default_captions(predictor, limit: int = 4) -> str:
    """One held-out caption of each of the first images: a ready list to rank."""
    return "\n".join(pair["captions"][0] for pair in predictor.examples[:limit])


# --- the page ------------------------------------------------------------------------------------

def build_demo(predictor, compare_base: bool = True):
    """The Gradio Blocks app for `predictor` (a generative or CLIP-family Predictor)."""
    import gradio as gr

    compare_base = compare_base and predictor.has_base
    task = predictor.task
    with gr.Blocks(title=f"peftvlm: {predictor.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"# {predictor.name}: {TITLES[task]}")
        with gr.Row():
            gr.Markdown(recipe_summary(predictor), elem_id="recipe-summary")
            gr.Markdown(metrics_table(predictor), elem_id="eval-metrics")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", elem_id="input-image", height=320)
                if task == "retrieve":
                    question = gr.Textbox(value=default_captions(predictor), lines=4,
                                          label="Captions to rank (one per line)",
                                          elem_id="question")
                else:
                    question = gr.Textbox(value=predictor.default_prompt or "",
                                          label="Question", elem_id="question",
                                          visible=task == "question")
                button = gr.Button("Answer", variant="primary", elem_id="answer-button")
            outputs = []
            for which, label in (("tuned", "Fine-tuned"), ("base", "Base model")):
                with gr.Column(visible=which == "tuned" or compare_base):
                    outputs.append(gr.Textbox(label=f"{label} answer", elem_id=f"{which}-answer",
                                              interactive=False))
                    if task in ("classify", "retrieve"):
                        what = "class" if task == "classify" else "caption"
                        outputs.append(gr.Label(num_top_classes=10, label=f"{label}: {what} "
                                                "probabilities", elem_id=f"{which}-classes"))
                    elif task == "grounding":
                        outputs.append(gr.AnnotatedImage(label=f"{label}: predicted box",
                                                         elem_id=f"{which}-box"))
        examples = (retrieval_examples(predictor) if task == "retrieve"
                    else example_files(predictor))
        if examples:
            gr.Examples(examples=examples, inputs=[image, question], examples_per_page=4,
                        elem_id="examples", label="Held-out examples (click one, then Answer)")
        button.click(responder(predictor, compare_base), inputs=[image, question],
                     outputs=outputs, api_name="answer")
    return demo


def example_folders(predictor) -> list[str]:
    examples = (retrieval_examples(predictor) if predictor.task == "retrieve"
                else example_files(predictor))
    return sorted({str(Path(path).parent) for path, _ in examples})


def launch(run, host: str = "127.0.0.1", port: int = 7860, compare_base: bool = True,
           log=print, block: bool = True):
    """Load the run and serve the demo (until Ctrl-C unless `block` is False); returns it."""
    predictor = open_predictor(run, log)
    if predictor.task not in TITLES:  # detection runs: no demo page yet
        raise RunError(f"{run}: `peftvlm demo` has no page for {predictor.task!r} runs yet",
                       hint="use `peftvlm predict RUN --image ...` (boxes drawn into PNGs) or "
                            "`peftvlm serve RUN` (POST /v1/detections)")
    demo = build_demo(predictor, compare_base)
    log(f"demo of {predictor.name} at http://{host}:{port}")
    demo.launch(server_name=host, server_port=port, ssr_mode=False, quiet=True,
                allowed_paths=example_folders(predictor), prevent_thread_lock=not block,
                footer_links=[])
    return demo
