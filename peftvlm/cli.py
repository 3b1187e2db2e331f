"""The `peftvlm` command line: a thin typer app over `peftvlm.api`.

Run `peftvlm --help`. Heavy libraries (torch, transformers, trl) are imported inside commands
only, so `--help`, `validate`, `ls` and `cp` start in well under a second.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import typer

from peftvlm.errors import PeftVLMError, RecipeError, format_error
from peftvlm.resources import shipped_dir

app = typer.Typer(help="Parameter-efficient fine-tuning of vision-language models from one YAML "
                       "recipe.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)

RECIPES_DIR = shipped_dir("recipes")

data_app = typer.Typer(help="Data: preview, stats and CLIP-score filtering of a recipe's rows; "
                            "self-instruct generation.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def resolve_recipe_path(name: str) -> Path:
    """A path as given, or the name of a shipped recipe (`quickstart`)."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml") and not name in shipped_recipes():
        return path
    return shipped_recipes().get(name.removesuffix(".yaml"), path)


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a shipped recipe."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. "
                                                               "train.learning_rate=1e-4"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o",
                                              help="Run folder (default: runs/<recipe name>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build model, method and data; show "
                                                          "one example with its loss mask; stop."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
):
    """Fine-tune a model as a recipe says."""
    quiet_libraries()
    from peftvlm import api
    from peftvlm.recipe.load import load_recipe

    loaded = load_recipe(resolve_recipe_path(recipe), overrides or [])
    summary = api.train(loaded, output_dir, resume=resume, overwrite=overwrite, dry_run=dry_run)
    if not dry_run:
        print_summary(summary, output_dir or Path("runs") / loaded.name)


@app.command("eval")
def eval_run(
    recipe: str = typer.Argument(..., help="The run's recipe file, or a shipped recipe name."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. "
                                                               "eval.batch_size=8"),
    run: Path = typer.Option(..., "--run", "-r", help="Run folder of a finished training run."),
    split: str = typer.Option("test", "--split", help="test = the recipe's data.eval (held-out "
                                                      "rows); train = its data.train rows."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1,
                                              help="Score the first N rows (default: "
                                                   "eval.max_samples, else all)."),
    no_base: bool = typer.Option(False, "--no-base", help="Skip scoring the base model."),
):
    """Score a trained run against its base model; writes RUN/eval/ (predictions, metrics, plot)."""
    quiet_libraries()
    from peftvlm import api
    from peftvlm.eval.report import print_comparison
    from peftvlm.recipe.load import load_recipe

    loaded = load_recipe(resolve_recipe_path(recipe), overrides or [])
    result = api.evaluate(loaded, run, split=split, max_samples=max_samples,
                          with_base=not no_base)
    print_comparison(result)


def quiet_libraries() -> None:
    """Keep the terminal for what the user needs: our messages, the progress bar, the summary."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*use_reentrant.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console

    console = Console()
    loss = summary.get("final_loss")
    console.print(f"\n[bold]done[/] in {summary.get('train_runtime_s', 0):.1f} s; "
                  + (f"final loss {loss:.4f}; " if loss is not None else "no loss logged; ")
                  + f"trainable {summary['trainable_params']:,} of {summary['total_params']:,} "
                  "parameters")
    for metric, values in summary.get("eval", {}).items():
        before, after = values.get("before"), values.get("after")
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        console.print(f"  {metric}: {fmt(before)} before -> [bold]{fmt(after)}[/] after")
    history = summary.get("eval_history") or []
    for metric in sorted({k for _, scores in history for k in scores if "/" not in k}):
        points = [f"{step}: {scores[metric]:.3f}" for step, scores in history[-8:]
                  if metric in scores]
        console.print(f"  {metric} during training (step: value): " + ", ".join(points))
    console.print(f"run folder: {run_dir}  (adapter/, summary.json, loss.png, recipe.yaml)")


@app.command()
def validate(args: List[str] = typer.Argument(..., metavar="RECIPE... [key=value ...]",
                                             help="Recipe files (or shipped names) to check; "
                                                  "key=value overrides apply to each.")):
    """Check recipes without running them (no model is loaded); reports every file."""
    from peftvlm.api import validate as validate_recipes

    overrides = [a for a in args if "=" in a and not Path(a).exists()]
    paths = [a for a in args if a not in overrides]
    if not paths:
        raise RecipeError("no recipe file given, only overrides: " + " ".join(overrides),
                          hint="peftvlm validate RECIPE... [key=value ...]")
    failed = 0
    for path in paths:
        try:
            validate_recipes([str(resolve_recipe_path(path))], overrides)
            typer.echo(f"ok: {path}")
        except PeftVLMError as err:
            if os.environ.get("PEFTVLM_DEBUG") == "1":
                raise
            failed += 1
            typer.echo(format_error(err), err=True)
    if failed:
        typer.echo(f"{failed} of {len(paths)} recipe(s) have problems", err=True)
        raise typer.Exit(2)


@app.command()
def plan(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a shipped recipe."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="key=value overrides, e.g. train.per_device_train_batch_size=1"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU to check and suggest changes for: "
                                      "GiB (24, 40, 48, 80, 141) or a card (4090, a100-40gb, "
                                      "h100, h200); default 24."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="GPUs the run shards or "
                                       "replicates over (default: 1, or 2 when sharded)."),
    sharding: Optional[str] = typer.Option(None, "--sharding", help="none, ddp, fsdp, zero2 or "
                                           "zero3 (default: from the recipe's train section)."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="WxH of the largest "
                                             "image (default: the data's, else the processor's "
                                             "maximum)."),
    images: Optional[int] = typer.Option(None, "--images", min=1, help="Images per row."),
    text_tokens: Optional[int] = typer.Option(None, "--text-tokens", min=1, help="Text tokens "
                                              "of the longest row (default: pad to "
                                              "train.max_length)."),
    labelled_share: Optional[float] = typer.Option(
        None, "--labelled-share", min=0.0, max=1.0, help="Share of a row's positions that "
        "carry a label (the loss head scores only those; default: measured on the first "
        "training rows, else 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
):
    """Will it fit? Parameter counts and peak GPU memory, built on the meta device (no weights)."""
    quiet_libraries()
    import json

    from peftvlm.plan import plan as make_plan, render
    from peftvlm.recipe.load import load_recipe

    if sharding not in (None, "none", "ddp", "fsdp", "zero2", "zero3"):
        raise RecipeError(f"--sharding {sharding}: unknown", hint="none, ddp, fsdp, zero2, zero3")
    size = None
    if image_size:
        w, sep, h = image_size.lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            raise RecipeError(f"--image-size {image_size}: write it as WIDTHxHEIGHT, e.g. 1280x960")
        size = (int(w), int(h))
    result = make_plan(load_recipe(resolve_recipe_path(recipe), overrides or []), gpu=gpu,
                       gpus=gpus, sharding=sharding, image_size=size, images_per_row=images,
                       text_tokens=text_tokens, labelled=labelled_share)
    typer.echo(json.dumps(result, indent=2, default=str) if as_json else render(result))


@data_app.command("preview")
def data_preview(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a shipped recipe."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
    n: int = typer.Option(3, "-n", "--num", min=1, help="Examples to show."),
):
    """Show training examples exactly as encoded: loss tokens in green, image token counts."""
    from peftvlm.data.report import preview
    from peftvlm.recipe.load import load_recipe
    from peftvlm.trainers.objectives import objective_for

    loaded = load_recipe(resolve_recipe_path(recipe), overrides or [])
    # an objective that reads rows its own way shows them so (GRPO: prompt + references)
    preview(loaded, n, show_row=getattr(objective_for(loaded), "preview_row", None))


@data_app.command("stats")
def data_stats(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a shipped recipe."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Histogram PNG (default: "
                                                             "runs/<name>/data_stats.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print the stats as JSON."),
):
    """Rows per source, token-length histogram, rows over train.max_length, bad rows."""
    import json

    from peftvlm.data.report import print_stats, stats
    from peftvlm.recipe.load import load_recipe
    from peftvlm.runs import default_run_dir, mark_run_dir

    loaded = load_recipe(resolve_recipe_path(recipe), overrides or [])
    if plot is None and not default_run_dir(loaded).exists():  # a run may train there later
        mark_run_dir(default_run_dir(loaded))
    result = stats(loaded, plot or default_run_dir(loaded) / "data_stats.png")
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        print_stats(result)


@data_app.command("filter")
def data_filter(
    recipe: str = typer.Argument(..., help="Recipe file, or the name of a shipped recipe."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
    clipscore: Optional[float] = typer.Option(None, "--clipscore", min=0, max=2.5,
                                              help="Keep pairs with CLIPScore >= MIN (2.5 x "
                                                   "cosine; default: data.filter.clipscore)."),
    model: Optional[str] = typer.Option(None, "--model", help="CLIP model that scores "
                                        "(default: data.filter.model, else the recipe's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Images per batch (default 64)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: "
                                       "data.filter.output, else runs/<name>-filtered)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Score again from scratch."),
):
    """Score the training pairs with CLIP, keep those above a CLIPScore; rerun to resume."""
    quiet_libraries()
    from peftvlm.data.prepare.filter import run_filter
    from peftvlm.recipe.load import load_recipe

    loaded = load_recipe(resolve_recipe_path(recipe), overrides or [])
    report = run_filter(loaded, clipscore, model, batch_size, str(out) if out else None,
                        overwrite, log=typer.echo)
    d = report["distribution"]
    typer.echo(f"kept {report['kept']} of {report['pairs']} pairs (dropped {report['dropped']}) "
               f"at CLIPScore >= {report['min_score']}; scores min {d['min']:.3f}, median "
               f"{d['p50']:.3f}, max {d['max']:.3f}")
    for row in report["lowest_kept"]:
        typer.echo(f"  lowest kept {row['clipscore']:.3f}: {row['caption'][:70]!r} "
                   f"({row['source']} #{row['row']})")
    typer.echo(f"kept pairs: {report['files']['kept.jsonl']}; histogram: "
               f"{report['files']['histogram.png']}")


def list_templates() -> None:
    from peftvlm.data.render.templates import list_templates as specs

    for spec in specs():
        columns = ", ".join(c if spec.columns[c].required else f"[{c}]" for c in spec.columns)
        typer.echo(f"{spec.name:16} {spec.task:15} columns: {columns}")
        typer.echo(f"{'':16} {spec.description}")


@app.command("ls")
def ls(what: str = typer.Argument("recipes", help="methods, families, models, metrics, "
                                                  "recipes or templates")):
    """List methods, families, tiny models, metrics, recipes or data templates."""
    if what == "methods":
        from peftvlm.registry import METHODS, method_config_classes

        method_config_classes()
        for m in METHODS.values():
            typer.echo(f"{m.name:14} {'/'.join(m.kinds):24} {m.summary}")
    elif what == "families":
        from peftvlm.families import FAMILIES

        for f in FAMILIES.values():
            media = "" if not f.is_generative else (
                "images where they stand" if f.interleaved_images else "images first in a turn"
            ) + (", video" if f.takes_video else "")
            typer.echo(f"{f.name:12} {f.kind:13} model_type: {', '.join(f.model_types):20} "
                       f"tiny: {f.tiny_name or '-':16} {media}".rstrip())
    elif what == "models":
        from peftvlm.families import tiny_models

        for name, f in tiny_models().items():
            typer.echo(f"{name:18} family {f.name}")
    elif what == "metrics":
        from peftvlm.metrics import available_metrics

        for m in available_metrics().values():
            typer.echo(f"{m.name:20} {m.family:15} {m.summary}")
    elif what == "recipes":
        for name, path in shipped_recipes().items():
            first = next((l[1:].strip() for l in path.read_text().splitlines()
                          if l.startswith("#") and l[1:].strip()), "")
            typer.echo(f"{name:24} {first}")
    elif what == "templates":
        list_templates()
    else:
        raise RecipeError(f"cannot list {what!r}",
                          hint="use methods, families, models, metrics, recipes or templates")


@app.command()
def cp(recipe: str = typer.Argument(..., help="Shipped recipe name."),
       dest: Path = typer.Argument(..., help="Where to copy it.")):
    """Copy a shipped recipe to edit it."""
    source = shipped_recipes().get(recipe.removesuffix(".yaml"))
    if source is None:
        raise RecipeError(f"no shipped recipe named {recipe!r}",
                          hint=f"available: {', '.join(shipped_recipes())}")
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists():
        raise RecipeError(f"{dest} already exists", hint="choose another destination")
    try:
        shutil.copyfile(source, dest)
    except OSError as exc:
        raise RecipeError(f"cannot copy {source.name} to {dest}: {exc.strerror or exc}",
                          hint="choose a destination in a folder that exists and that you can "
                               "write to") from None
    typer.echo(f"copied {source.name} -> {dest}")


@app.command()
def metrics(
    predictions: Path = typer.Option(..., "--predictions", "-p",
                                     help='JSONL rows {"id", "prediction"}, or a COCO results '
                                          'JSON list (with a COCO instances file).'),
    references: Path = typer.Option(..., "--references", "-r",
                                    help='JSONL rows {"id", "references": [...]}, optional '
                                         '"question_type", or a COCO instances JSON (then COCO '
                                         'detection mAP is reported).'),
    metric_names: str = typer.Option("", "--metrics", "-m",
                                     help="Comma-separated names, e.g. vqa_accuracy or "
                                          "bleu,cider_d,rouge_l (an unknown name lists all); "
                                          "not needed for COCO files."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Score a predictions file against references with the field's metrics (or COCO
    detection results against a COCO instances file: mAP, mAP50, mAP75, per-class AP)."""
    import json

    from peftvlm.metrics.files import print_table, score_files

    names = [m.strip() for m in metric_names.split(",") if m.strip()]
    result = score_files(predictions, references, names)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_table(result)


@data_app.command("self-instruct")
def self_instruct(
    config: Path = typer.Argument(..., help="Self-instruct config (see "
                                            "data_templates/self_instruct/example.yaml)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. "
                                                               "num_instructions=50"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again, deleting the output, "
                                                              "its state and its report."),
):
    """Generate an instruction dataset; rerun the same command to resume an interrupted run."""
    from peftvlm.data.self_instruct import load_config, run_self_instruct

    report = run_self_instruct(load_config(config, overrides or []), overwrite=overwrite,
                               log=typer.echo)
    rejected = ", ".join(f"{k} {v}" for k, v in report["rejected"].items() if v) or "none"
    typer.echo(f"kept {report['kept']}/{report['target']} from {report['candidates']} candidates "
               f"({report['stopped_because']}); rejected: {rejected}\noutput: {report['output']}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run folder (runs/<name>)."),
    merge: Optional[bool] = typer.Option(None, "--merge/--adapter-only", help="Merge the adapter "
                                         "into the base (default: the recipe's export.merge)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Export folder (default: "
                                       "RUN_DIR/merged or RUN_DIR/export)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Merged dtype: float16, bfloat16 "
                                        "or float32 (default: the recipe's export.dtype)."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="Hub repo id to push "
                                              "to (token from HF_TOKEN or `hf auth login`)."),
    private: Optional[bool] = typer.Option(None, "--private/--public", help="Visibility of a "
                                           "newly created Hub repo (default: private)."),
    wandb_merged: Optional[bool] = typer.Option(None, "--wandb-merged", help="Also log the "
                                                "merged model as a W&B artifact."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the run and options and show "
                                 "the plan; load, write and push nothing."),
):
    """Export a trained run: adapter-only or merged, verified, with a model card; push if asked."""
    from peftvlm.export import export_run

    export_run(run_dir, merge=merge, out=out, dtype=dtype, push_to_hub=push_to_hub,
               private=private, dry_run=dry_run, wandb_merged=wandb_merged, log=typer.echo)


# --- using a trained run: predict, serve, demo (peftvlm/serving/) -------------------------------

RUN_ARG = typer.Argument(..., help="A run folder (runs/<name>) or a merged export "
                                   "(runs/<name>/merged).")


@app.command()
def predict(
    run: Path = RUN_ARG,
    images: List[str] = typer.Option(..., "--image", "-i", help="Image file, folder of images "
                                     "or file:// URL; repeat for more."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Question (default: the "
                                         "prompt of the run's held-out data)."),
    base: bool = typer.Option(False, "--base", help="Also answer with the base model."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="CLIP-family runs: classes to list."),
    caption: Optional[List[str]] = typer.Option(None, "--caption", "-c", help="Retrieval runs: "
                                                "a caption to rank for each image; repeat."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Retrieval runs: a text "
                                            "file of captions to rank, one per line."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Retrieval runs: rank the "
                                       "images for this text. Detection runs: the classes to "
                                       "find, 'cat . dog .' (default: the run's)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the rows as JSONL."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per "
                                             "batch (default: the recipe's eval.batch_size)."),
):
    """Answer images with a trained run (generative: answers; CLIP family: top-k classes;
    retrieval: the given captions ranked per image, or the images ranked for --text;
    detection: boxes with labels and scores, drawn into PNGs)."""
    quiet_libraries()
    from peftvlm.serving.predict import predict as run_predict, print_rows, read_captions

    given = list(caption or []) + (read_captions(captions) if captions else [])
    rows = run_predict(run, images, prompt=prompt, base=base, top_k=top_k, out=out,
                       batch_size=batch_size, captions=given, text=text, log=typer.echo,
                       warn=lambda m: typer.echo(f"warning: {m}", err=True))
    print_rows(rows)
    if out:
        typer.echo(f"{len(rows)} rows -> {out}")


@app.command()
def serve(
    run: Path = RUN_ARG,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (localhost only by "
                             "default; 0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, "--port", help="Port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PEFTVLM_API_KEY",
                                          help="Require `Authorization: Bearer KEY` (or set "
                                               "PEFTVLM_API_KEY, which keeps it out of `ps`)."),
    allowed_local_media_path: Optional[Path] = typer.Option(
        None, "--allowed-local-media-path", help="Folder whose files requests may name as "
                                                 "file:// image URLs (default: none)."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", min=1,
                                       help="Requests answered in one batch."),
    max_body_mb: int = typer.Option(64, "--max-body-mb", min=1, help="Largest request body "
                                    "read, in MiB (counted as it arrives, chunked or not)."),
    max_images: int = typer.Option(8, "--max-images", min=1, help="Images per request."),
):
    """Serve a run with an OpenAI-compatible API (/v1/models; /v1/chat/completions for a
    generative run, /v1/embeddings for a dual-encoder run)."""
    from peftvlm.serving import require_serve_extra

    require_serve_extra("serve", "fastapi", "uvicorn")
    quiet_libraries()
    from peftvlm.serving.openai_api import ServerOptions, run_server

    options = ServerOptions(api_key=api_key, allowed_local_media_path=allowed_local_media_path,
                            max_batch_size=max_batch_size, max_body_bytes=max_body_mb * 2**20,
                            max_images=max_images)
    run_server(run, options, host=host, port=port, log=typer.echo)


@app.command()
def demo(
    run: Path = RUN_ARG,
    port: int = typer.Option(7860, "--port", help="Port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    compare_base: bool = typer.Option(True, "--compare-base/--no-compare-base",
                                      help="Show the base model's answer beside the "
                                           "fine-tuned one."),
):
    """A web demo (Gradio): upload an image, see the fine-tuned and the base answer (CLIP
    family: class probabilities; retrieval: your captions ranked; grounding and detection
    runs: boxes drawn on the image)."""
    from peftvlm.serving import require_serve_extra

    require_serve_extra("demo", "gradio")
    quiet_libraries()
    from peftvlm.serving.demo import launch

    launch(run, host=host, port=port, compare_base=compare_base, log=typer.echo)


def main() -> None:
    """Console entry point: user errors print one message (exit 2); PEFTVLM_DEBUG=1 re-raises.

    Usage errors (unknown command, missing argument) are click's own, also exit 2."""
    try:
        app()
    except PeftVLMError as err:
        if os.environ.get("PEFTVLM_DEBUG") == "1":
            raise
        typer.echo(format_error(err), err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
