"""The model card (`README.md`) of an export: Hub metadata, what was trained, how well, how to load.

The metadata header is built with huggingface_hub's `ModelCardData`; the resolved recipe is
shown with secret-looking keys removed. The first Python block under "How to load" is a complete
program (tests run it against the exported folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from peftvlm.recipe.schema import QuantizationConfig
from peftvlm.tracking import scrub_secrets

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def write_model_card(out: Path, run, report: dict, repo_id: str | None = None) -> Path:
    """Write `out/README.md`; the snippet loads `repo_id` when pushing, else the folder itself
    (by its path relative to the run folder: cards never carry this machine's paths)."""
    path = out / "README.md"
    # `out` may be relative to the working directory (`peftvlm export runs/q`): resolve it
    # first, so the card names it relative to the run folder, as a string.
    path.write_text(build_model_card(run, report,
                                     repo_id or portable_path(Path(out).resolve(), run.dir)))
    return path


def portable_path(value, run_dir: Path):
    """A local absolute path as published files may carry it: relative to the run folder.
    Relative paths, Hub ids and non-strings are returned unchanged."""
    if not isinstance(value, (str, Path)) or not Path(value).is_absolute():
        return value
    return os.path.relpath(Path(value).resolve(), Path(run_dir).resolve())


def portable_values(data, run_dir: Path, known: tuple[str, ...] = ()):
    """`data` (nested dicts/lists) with every absolute path made relative to the run: values
    that are paths, and the `known` local paths where they appear inside text (snippets)."""
    if isinstance(data, dict):
        return {k: portable_values(v, run_dir, known) for k, v in data.items()}
    if isinstance(data, list):
        return [portable_values(v, run_dir, known) for v in data]
    if not isinstance(data, str):
        return data
    if data.startswith("/"):
        return portable_path(data, run_dir)
    for path in sorted(known, key=len, reverse=True):
        data = data.replace(path, portable_path(path, run_dir))
    return data


def local_path_leaks(folder: Path, roots: list[Path]) -> list[str]:
    """`file: path` for each text file under `folder` that names a path under one of `roots`
    (home, working folder, run folder, caches): what a Hub push must not publish."""
    prefixes = sorted({str(Path(r).resolve()) for r in roots if len(Path(r).resolve().parts) > 1},
                      key=len, reverse=True)
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix not in (".json", ".md", ".yaml", ".txt", ".jinja"):
            continue
        text = path.read_text(errors="replace")
        hit = next((p for p in prefixes if re.search(re.escape(p) + r"(?![\w.-])", text)), None)
        if hit:
            found.append(f"{path.relative_to(folder)}: {hit}")
    return found


def build_model_card(run, report: dict, model_ref: str) -> str:
    recipe, summary = run.recipe, run.summary
    sections = [
        f"# {recipe.name}: {recipe.method.name} on {portable_path(recipe.model.id, run.dir)}",
        recipe.description or "",
        what_was_trained(recipe, summary, report, run.dir),
        eval_table(summary),
        checks_table(report),
        "## How to load\n\n" + loading_snippet(run, report, model_ref),
        requantize_note(recipe, summary.get("family"), report),
        tracking_note(summary),
        "## Training recipe\n\nThe resolved recipe (`peftvlm train recipe.yaml` reproduces the "
        "run):\n\n```yaml\n" + public_recipe_yaml(recipe, run.dir) + "```",
        "*Exported with peftvlm (`peftvlm export`).*",
    ]
    body = "\n\n".join(s for s in sections if s) + "\n"
    return f"---\n{card_metadata(run, report).to_yaml()}\n---\n\n{body}"


def card_metadata(run, report: dict):
    """Hub metadata: base_model, library, pipeline, tags, datasets, license (when known)."""
    from huggingface_hub import ModelCardData

    recipe = run.recipe
    base = recipe.model.id if is_hub_id(recipe.model.id) else None
    datasets = sorted({s.dataset for s in (recipe.data.train or []) + (recipe.data.eval or [])
                       if s.dataset and is_hub_id(s.dataset)})
    tags = ["peftvlm", recipe.method.name, run.summary.get("family") or "vlm",
            "merged" if report["kind"] == "merged" else "adapter", "vision-language"]
    relation = {"base_model_relation": "merge" if report["kind"] == "merged" else "adapter"}
    return ModelCardData(
        **(relation if base else {}),
        base_model=base, library_name="transformers" if report["kind"] == "merged" else "peft",
        pipeline_tag="image-text-to-text", tags=list(dict.fromkeys(tags)),
        datasets=datasets or None, license=base_license(recipe.model))


def is_hub_id(name: str) -> bool:
    """A Hub repo id, not a local folder or a built-in tiny model."""
    return bool(HUB_ID.fullmatch(name)) and not Path(name).exists()


def base_license(model_cfg) -> str | None:
    """The base model's license from its model card (local folder, HF cache, or the Hub)."""
    from huggingface_hub import ModelCard

    try:
        if Path(model_cfg.id, "README.md").exists():
            return ModelCard.load(Path(model_cfg.id, "README.md")).data.license
        if not is_hub_id(model_cfg.id) or os.environ.get("HF_HUB_OFFLINE") == "1":
            return None
        from huggingface_hub import HfApi

        info = HfApi().model_info(model_cfg.id, revision=model_cfg.revision, timeout=5)
        return getattr(info.card_data, "license", None) if info.card_data else None
    except Exception:  # a license we cannot read is simply not carried over
        return None


def what_was_trained(recipe, summary: dict, report: dict, run_dir: Path | None = None) -> str:
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    share = f" ({100 * trainable / total:.3f}%)" if trainable and total else ""
    data = summary.get("data", {})
    if recipe.data.synthetic:
        source = f"built-in synthetic task `{recipe.data.synthetic.name}`"
    else:
        source = ", ".join(s.dataset or portable_path(s.path, run_dir or ".")
                           for s in recipe.data.train or []) or "n/a"
    bullets = [
        f"- Base model: `{portable_path(recipe.model.id, run_dir or '.')}` "
        f"(family {summary.get('family')})",
        f"- Method: {recipe.method.name}" + (", trained on a quantized base, merged into the "
                                             "unquantized base" if report["kind"] == "merged"
                                             and report.get("base_quantized_in_training") else ""),
        f"- Export: {describe_export(report)}",
        f"- Trainable parameters: {trainable:,} of {total:,}{share}" if trainable else "",
        f"- Data: {source}; {data.get('train_rows', '?')} training rows, "
        f"{data.get('eval_rows', '?')} held-out rows",
        f"- Training: {summary.get('global_step')} steps in {summary.get('train_runtime_s')} s "
        f"on {summary.get('hardware')}; final loss {fmt(summary.get('final_loss'))}",
    ]
    return "## What was trained\n\n" + "\n".join(b for b in bullets if b)


def describe_export(report: dict) -> str:
    if report["kind"] == "merged":
        return f"adapter merged into the base, {report.get('dtype')} safetensors"
    return "adapter only (peft format)"


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def eval_table(summary: dict) -> str:
    rows = summary.get("eval") or {}
    if not rows:
        return ""
    lines = ["## Evaluation (held-out)", "", "| metric | base model | fine-tuned |",
             "|---|---|---|"]
    lines += [f"| {m} | {fmt(v.get('before'))} | {fmt(v.get('after'))} |" for m, v in rows.items()]
    return "\n".join(lines)


def checks_table(report: dict) -> str:
    """The export's own verification, so readers know the merge was checked."""
    lines = ["## Export checks", "", "| check | result | details |", "|---|---|---|"]
    for name, check in report["checks"].items():
        details = ", ".join(f"{k}: {fmt(v)}" for k, v in check.items()
                            if k in ("max_abs_diff", "tolerance", "max_abs_diff_from_base",
                                     "changed_after_merge", "nonzero_adapter_modules",
                                     "new_tokens", "examples"))
        lines.append(f"| {name} | {'pass' if check['passed'] else 'FAIL'} | {details} |")
    return "\n".join(lines)


def loading_snippet(run, report: dict, model_ref: str) -> str:
    """A complete program that loads the export and answers one question about an image
    (methods with their own exporter may give their own as `report["loading_snippet"]`)."""
    where = "" if is_hub_id(model_ref) else "# local paths are relative to the run folder: run " \
        "this there (once pushed, use the Hub repo id)\n"
    if report.get("loading_snippet"):
        return report["loading_snippet"].replace("EXPORT_FOLDER", model_ref).replace(
            "```python\n", "```python\n" + where, 1)
    prompt = report.get("example_prompt") or "Describe the image."
    if report["kind"] == "merged":
        load = (f"model_id = {model_ref!r}\n"
                "model = AutoModelForImageTextToText.from_pretrained(model_id)\n"
                "processor = AutoProcessor.from_pretrained(model_id)\n")
        imports = "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
    else:
        load = (f"base_id = {report.get('base_model')!r}\n"
                f"adapter_id = {model_ref!r}\n"
                "base = AutoModelForImageTextToText.from_pretrained(base_id)\n"
                "model = PeftModel.from_pretrained(base, adapter_id)\n"
                "processor = AutoProcessor.from_pretrained(adapter_id)\n")
        imports = ("from peft import PeftModel\n"
                   "from transformers import AutoModelForImageTextToText, AutoProcessor\n")
    return ("```python\nfrom PIL import Image\n" + imports + "\n" + where + load + "\n"
            'image = Image.new("RGB", (64, 64), "red")  # or Image.open("your_image.jpg")\n'
            'messages = [{"role": "user", "content": [{"type": "image", "image": image},\n'
            f'                                         {{"type": "text", "text": {prompt!r}}}]}}]\n'
            "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, "
            "tokenize=True,\n"
            '                                       return_dict=True, return_tensors="pt")\n'
            "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
            'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], '
            "skip_special_tokens=True))\n```")


def requantize_note(recipe, family_name: str | None, report: dict) -> str:
    """Merged QLoRA weights are saved unquantized; say how to get 4-bit back at load time."""
    if not report.get("base_quantized_in_training"):
        return ""

    q = recipe.model.quantization or QuantizationConfig()
    skip = q.skip_modules
    if skip is None and family_name:
        from peftvlm.families import get_family

        skip = get_family(family_name).quantization_skip_modules()
    if q.bits == 8:
        config = f"BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules={skip!r})"
    else:
        config = (f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={q.quant_type!r},\n"
                  f"    bnb_4bit_use_double_quant={q.double_quant}, "
                  "bnb_4bit_compute_dtype=torch.bfloat16,\n"
                  f"    llm_int8_skip_modules={skip!r})")
    merged = report["kind"] == "merged"
    what = "merged weights are saved unquantized" if merged else "adapter applies to the base"
    model_var = "model_id" if merged else "base_id"
    gap = report.get("vs_quantized_training_model")
    measured = (f" Against the model as trained (adapter on the quantized base) the merged "
                f"model's logits differ by at most {gap['max_abs_diff']:.3g}, with "
                f"{100 * gap['top1_agreement']:.1f}% top-1 agreement on the probe rows."
                if gap else "")
    return ("### Quantized loading\n\nThe base was quantized during training; the "
            f"{what}.{measured} To load in {q.bits}-bit again (needs bitsandbytes):\n\n"
            "```python\nimport torch\nfrom transformers import BitsAndBytesConfig\n\n"
            f"quantization_config = {config}\n"
            f"model = AutoModelForImageTextToText.from_pretrained({model_var}, "
            "quantization_config=quantization_config)\n```")


def tracking_note(summary: dict) -> str:
    info = summary.get("wandb")
    if not info:
        return ""
    if info.get("url"):
        return f"## Tracking\n\nTraining curves and artifacts: [W&B run]({info['url']})."
    return (f"## Tracking\n\nLogged to W&B offline (project `{info.get('project')}`, run id "
            f"`{info.get('id')}`); upload with `wandb sync` from the run folder.")


def public_recipe_yaml(recipe, run_dir: Path | None = None) -> str:
    """The resolved recipe without anything that looks like a secret, and without local paths:
    no base_dir (data paths stay relative to the recipe), other absolute paths made relative
    to the run folder."""
    data = recipe.model_dump(mode="json", exclude_none=True, exclude={"base_dir_"})
    if run_dir is not None:
        data = portable_values(data, run_dir)
    return yaml.safe_dump(scrub_secrets(data), sort_keys=False)
