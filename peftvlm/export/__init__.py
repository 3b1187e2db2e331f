"""Export a finished run: the adapter alone, or merged into its base; verified, carded, pushed.

    peftvlm export runs/quickstart                      # adapter-only (PeftModel.from_pretrained)
    peftvlm export runs/quickstart --merge --dtype bfloat16 --push-to-hub me/quickstart-llava

Every export is checked before it counts: the exported folder is reloaded with plain
transformers / peft and its logits are compared with the trained adapter model on a few
held-out rows, merged weights must differ from the base wherever the adapter is non-zero (a merge
that silently did nothing is caught), and one short generation must run. The numbers go into
`export_report.json`; any failed check raises `ExportError` and nothing is pushed. Each export
is written into a staging folder beside its target and renamed into place once its report is
written, so a killed export never leaves a target without its report (`export/staging.py`).

QLoRA (and any run trained on a quantized base) is merged into the base reloaded UNQUANTIZED in
the chosen dtype; the model card shows how to quantize it again at load time.

Methods that are not peft adapters on a generative model (CoOp, VPT, CLIP-Adapter), or that
save more than peft's files (per_part), define their own `export_adapter`: `export_run` hands
them to `export_custom_method` (the extension point below).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from peftvlm.errors import ExportError, RunError
from peftvlm.export.checks import (check_adapter_effect, check_adapter_files, check_generation,
                                   check_merged_files, check_weights_changed, compare_logits,
                                   device, encode_rows, generate_text, logits_of, probe_rows,
                                   prompt_text, weight_probes)
from peftvlm.export.serving import prepare_for_serving
from peftvlm.export.staging import Staging
from peftvlm.kinds import kind_for
from peftvlm.export.card import local_path_leaks, portable_path, portable_values, write_model_card
from peftvlm.models import cache_dir, load_base, load_processor
from peftvlm.registry import get_method
from peftvlm.runs import RunFolder as Run  # a finished run folder, read back
from peftvlm.runs import read_run_folder, write_json

DTYPES = ("float32", "bfloat16", "float16")
PROCESSOR_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json",
                   "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass
class ExportOptions:
    merge: bool
    dtype: str
    out: Path
    push_to_hub: str | None
    private: bool
    wandb_merged: bool
    max_shard_size: str = "4GB"
    staging: Staging | None = None  # while set, `out` is its folder; finish_export publishes it


# --- the flow -------------------------------------------------------------------------------

def export_run(run_dir: str | Path, *, merge: bool | None = None, out: str | Path | None = None,
               dtype: str | None = None, push_to_hub: str | None = None,
               private: bool | None = None, dry_run: bool = False,
               wandb_merged: bool | None = None, max_shard_size: str = "4GB",
               log=print) -> dict:
    """Export a finished run; options left as None come from the recipe's `export` section.

    Returns the export report (also written to `<out>/export_report.json`); with `dry_run`,
    returns the plan without loading a model, writing or pushing anything.
    """
    run = read_run(run_dir)
    opts = resolve_options(run, merge, out, dtype, push_to_hub, private, wandb_merged,
                           max_shard_size)
    check_out_dir(opts.out)
    if opts.push_to_hub:
        from peftvlm.export.hub import require_token

        require_token()
    if dry_run:
        return print_plan(run, opts, log)
    return export_staged(run, opts, log)


def export_staged(run: Run, opts: ExportOptions, log) -> dict:
    """The export written into a staging folder beside `opts.out`, which `finish_export` renames
    into place once its report is written (`peftvlm.export.staging`): an export that fails or
    is killed on the way never leaves a target without its report."""
    staging = Staging(opts.out, log)
    try:
        return write_export(run, replace(opts, out=staging.path, staging=staging), log)
    finally:
        staging.discard()


def write_export(run: Run, opts: ExportOptions, log) -> dict:
    """The exporter of the run's method or kind, writing into `opts.out`."""
    if own_exporter(get_method(run.recipe.method.name)) is not None:
        return export_custom_method(run, opts, log)
    fresh_out_dir(opts.out)
    return finish_export(run, opts, kind_for(run.recipe).export_weights(run, opts, log), log)


def export_peft_weights(run: Run, opts: ExportOptions, log) -> dict:
    """The generative kind's export: a peft adapter, or merged into its unquantized base."""
    return export_merged(run, opts, log) if opts.merge else export_adapter(run, opts, log)


def export_after_training(recipe, run_dir: Path, summary: dict, log) -> None:
    """The recipe's `export` section: merge and/or push once training has finished."""
    if recipe.export.merge or recipe.export.push_to_hub:
        summary["export"] = export_run(run_dir, log=log)


def finish_export(run: Run, opts: ExportOptions, report: dict, log) -> dict:
    """Card, report, failure check, then the Hub and W&B (only for exports that passed)."""
    target = opts.staging.target if opts.staging else opts.out
    make_portable(opts.out, run, report, shown_as=target)
    # the card's snippet names where the export will be, not its staging folder
    write_model_card(opts.out, run, report,
                     repo_id=opts.push_to_hub or str(portable_path(target, run.dir)))
    report["checks"]["no_local_paths"] = check_no_local_paths(opts.out, run, report)
    failures = [f"{name}: {check['error']}" for name, check in report["checks"].items()
                if not check["passed"]]
    report["passed"] = not failures
    write_json(opts.out / "export_report.json", report)
    if opts.staging:  # written and reported (a failed export too, so its report can be read)
        opts.out, opts.staging = opts.staging.publish(), None
    if failures:
        raise ExportError(f"export of {run.dir} failed its checks ({opts.out}/export_report.json):"
                          "\n  " + "\n  ".join(failures),
                          hint="nothing was pushed; PEFTVLM_DEBUG=1 shows more")
    log(f"export ok: {opts.out} ({report['kind']}; " + ", ".join(
        f"{k} ok" for k in report["checks"]) + ")")
    if opts.push_to_hub:
        from peftvlm.export.hub import push_folder

        report["hub"] = push_folder(opts.out, opts.push_to_hub, private=opts.private,
                                    commit_message=f"peftvlm export of run {run.recipe.name} "
                                                   f"({report['kind']})", log=log)
        write_json(opts.out / "export_report.json", report)
    if run.recipe.tracking.wandb is not None:
        from peftvlm.tracking import log_export_artifacts

        folders = {"adapter": run.adapter_dir}
        if opts.merge and opts.wandb_merged:
            folders["merged"] = opts.out
        report["wandb_artifacts"] = log_export_artifacts(run.recipe, run.dir, folders, log)
    return report


def make_portable(out: Path, run: Run, report: dict, shown_as: Path | None = None) -> None:
    """Local paths in the report and the adapter config become relative to the run folder,
    so nothing exported or pushed carries this machine's folders (the report's `out`:
    `shown_as`, where the export ends up, when `out` is its staging folder)."""
    known = tuple(p for p in (run.recipe.model.id, report.get("base_model"))
                  if isinstance(p, str) and Path(p).is_absolute())
    shown = str(Path(shown_as or out).resolve())
    report.update(portable_values({**report, "out": shown}, run.dir, known))
    config = out / "adapter_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = portable_path(data.get("base_model_name_or_path"),
                                                        run.dir)
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_no_local_paths(out: Path, run: Run, report: dict) -> dict:
    """No text file of the export (card, report, configs) names a local folder."""
    write_json(out / "export_report.json", report)  # scanned too
    leaks = local_path_leaks(out, [Path.home(), Path.cwd(), run.dir, cache_dir(),
                                   run.recipe.base_dir()])
    return {"passed": not leaks, "files": leaks,
            "error": "local paths in " + "; ".join(leaks) if leaks else None}


def export_custom_method(run: Run, opts: ExportOptions, log) -> dict:
    """Extension point for methods with files beyond peft's (per_part's prompts).

    Such a method module may define `export_adapter(run_dir, adapter_dir, out_dir, merge) ->
    report dict` (with a `checks` dict of `{"passed": bool, "error": str}` entries); the report
    then goes through the same card / push / W&B steps as peft adapters.
    """
    exporter = own_exporter(get_method(run.recipe.method.name))
    fresh_out_dir(opts.out)
    report = exporter(run.dir, run.adapter_dir, opts.out, opts.merge)
    report.setdefault("kind", "merged" if opts.merge else "adapter")
    return finish_export(run, opts, report, log)


def own_exporter(info):
    """The method module's `export_adapter`, if it has one (generative methods with files
    beyond peft's, such as per_part's prompts, have one too)."""
    return info.hook("export_adapter")


# --- reading the run and the options ---------------------------------------------------------

def read_run(run_dir: str | Path) -> Run:
    """The run folder's recipe, summary and adapter (`runs.read_run_folder`, the one reader);
    what is missing or damaged is an ExportError."""
    try:
        run = read_run_folder(run_dir)
        run.recipe  # noqa: B018  (read now: a broken recipe.yaml fails before any model loads)
    except RunError as exc:
        raise ExportError(exc.message, hint=exc.hint) from None
    return run


def resolve_options(run: Run, merge, out, dtype, push_to_hub, private, wandb_merged,
                    max_shard_size) -> ExportOptions:
    """Explicit arguments win; the rest come from the recipe's `export` section."""
    cfg = run.recipe.export
    merge = cfg.merge if merge is None else merge
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r} for the export",
                          hint=f"use one of: {', '.join(DTYPES)}")
    if dtype is not None and not merge:
        raise ExportError("--dtype applies to merged exports only (an adapter is exported as "
                          "trained)", hint="add --merge, or leave --dtype out")
    dtype = dtype or cfg.dtype
    out = Path(out) if out else run.dir / ("merged" if merge else "export")
    return ExportOptions(
        merge=merge, dtype=dtype, out=out, push_to_hub=push_to_hub or cfg.push_to_hub,
        private=cfg.private if private is None else private,
        wandb_merged=cfg.wandb_merged if wandb_merged is None else wandb_merged,
        max_shard_size=max_shard_size)


def check_out_dir(out: Path) -> None:
    """Only an empty folder or an earlier export may be replaced; anything else is the user's."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / "export_report.json").exists())):
        raise ExportError(f"output folder {out} exists and is not an earlier export",
                          hint="choose another --out, or remove that folder yourself")


def fresh_out_dir(out: Path) -> None:
    """An empty `out` (a staging folder is one already: it stays, with its lock)."""
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def print_plan(run: Run, opts: ExportOptions, log) -> dict:
    """What an export would do, without loading a model or writing anything."""
    plan = {"run": str(run.dir), "method": run.recipe.method.name, "merge": opts.merge,
            "dtype": opts.dtype if opts.merge else "as trained", "out": str(opts.out),
            "push_to_hub": opts.push_to_hub, "private": opts.private, "dry_run": True}
    for key, value in plan.items():
        log(f"{key:12} {value}")
    return plan


# --- loading models ---------------------------------------------------------------------------

def load_unquantized_base(recipe, dtype: str | None, processor_dir: Path | None = None):
    """The run's base model without quantization (QLoRA bases too), in `dtype`, with the
    processor the run saved beside its adapter (the one it trained with) when there is one."""
    update = {"quantization": None}
    if dtype:
        update["dtype"] = dtype
    loaded = load_base(recipe.model.model_copy(update=update))
    if processor_dir is not None and (processor_dir / "tokenizer_config.json").exists():
        loaded.processor = load_processor(str(processor_dir), recipe.model, loaded.family)
    return loaded


# --- merged export ----------------------------------------------------------------------------

def export_merged(run: Run, opts: ExportOptions, log) -> dict:
    """Merge the adapter into the unquantized base, save, reload plainly, and check."""
    from peft import PeftModel

    loaded = load_unquantized_base(run.recipe, opts.dtype, run.adapter_dir)
    rows, source = probe_rows(run.recipe, loaded.family)
    batch = encode_rows(loaded.processor, loaded.family, rows)
    model = PeftModel.from_pretrained(loaded.model, run.adapter_dir).to(device())
    reference = logits_of(model, batch)
    ref_text, _ = generate_text(model, loaded.processor, loaded.family, rows[0])
    probes = weight_probes(model, opts.dtype)
    log(f"merging {run.recipe.method.name} adapter into the base in {opts.dtype}")
    merged = merge_adapter(model)
    serving = prepare_for_serving(merged, loaded.processor, loaded.family, run.recipe.eval)
    merged.save_pretrained(opts.out, max_shard_size=opts.max_shard_size)
    loaded.processor.save_pretrained(opts.out)
    del merged, model
    loaded.model = None  # the base now holds merged weights; free it before reloading
    reloaded = reload_merged(opts.out, opts.dtype)
    merged_logits = logits_of(reloaded, batch)
    checks = {
        "logits": compare_logits(reference, merged_logits, opts.dtype, source),
        "weights_changed": check_weights_changed(reloaded, probes),
        "generation": check_generation(reloaded, loaded.processor, loaded.family, rows[0],
                                       ref_text),
        "files": check_merged_files(opts.out),
    }
    report = {"kind": "merged", "dtype": opts.dtype, "method": run.recipe.method.name,
              "example_prompt": prompt_text(rows[0]),
              "base_quantized_in_training": base_was_quantized(run.recipe),
              "model_class": type(reloaded).__name__, "serving": serving, "checks": checks}
    if report["base_quantized_in_training"]:
        del reloaded
        report["vs_quantized_training_model"] = quantization_gap(run, batch, merged_logits)
    return report


def merge_adapter(peft_model):
    """Fold the adapter into the base weights and drop the peft wrappers."""
    return peft_model.merge_and_unload(safe_merge=True)


def reload_merged(folder: Path, dtype: str, auto_class: str = "AutoModelForImageTextToText"):
    """Reload the merged folder the way a user would: plain transformers (`auto_class`: the
    generative class, or `AutoModel` for dual encoders), nothing of ours."""
    import transformers

    try:
        return getattr(transformers, auto_class).from_pretrained(folder, dtype=dtype).to(device())
    except (OSError, ValueError) as exc:
        raise ExportError(f"the merged folder {folder} does not load with "
                          f"{auto_class}: {str(exc).splitlines()[0]}") from exc


def verify_merge(run: Run, opts: ExportOptions, loaded, log, *, outputs_of, compare,
                 compared: str, auto_class: str) -> tuple[object, dict]:
    """Merge the run's adapter into `loaded.model`, save it with the processor, reload it with
    plain transformers (`auto_class`) and check it: `compare(adapter's, merged's)` of the
    probes' `outputs_of(model)` (the check named `compared`), the adapted weights moved, the
    files are there. Returns (the reloaded model, the checks)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(loaded.model, run.adapter_dir).to(device())
    reference = outputs_of(model)
    probes = weight_probes(model, opts.dtype)
    log(f"merging {run.recipe.method.name} adapter into the base in {opts.dtype}")
    merge_adapter(model).save_pretrained(opts.out, max_shard_size=opts.max_shard_size)
    loaded.processor.save_pretrained(opts.out)
    reloaded = reload_merged(opts.out, opts.dtype, auto_class)
    return reloaded, {compared: compare(reference, outputs_of(reloaded)),
                      "weights_changed": check_weights_changed(reloaded, probes),
                      "files": check_merged_files(opts.out, required=("config.json",))}


def quantization_gap(run: Run, batch: dict, merged_logits) -> dict:
    """How far the unquantized merge is from the model as trained (adapter on the quantized
    base): informative, not a check, since quantization error is expected here."""
    from peft import PeftModel

    loaded = load_base(run.recipe.model, run.recipe.method.name)
    model = PeftModel.from_pretrained(loaded.model, run.adapter_dir)
    trained = logits_of(model, batch)
    return {"max_abs_diff": float((trained - merged_logits).abs().max()),
            "top1_agreement": float((trained.argmax(-1) == merged_logits.argmax(-1))
                                    .float().mean())}


def base_was_quantized(recipe) -> bool:
    return recipe.method.name == "qlora" or recipe.model.quantization is not None


# --- adapter-only export ----------------------------------------------------------------------

def export_adapter(run: Run, opts: ExportOptions, log) -> dict:
    """Copy the adapter and processor; check it loads with plain PeftModel and does something."""
    copy_adapter_files(run.adapter_dir, opts.out)
    loaded = load_unquantized_base(run.recipe, None, run.adapter_dir)
    rows, source = probe_rows(run.recipe, loaded.family)
    batch = encode_rows(loaded.processor, loaded.family, rows)
    model, effect = verify_adapter_effect(loaded, opts.out, lambda m: logits_of(m, batch), source)
    checks = {
        "adapter_effect": effect,
        "generation": check_generation(model, loaded.processor, loaded.family, rows[0], None),
        "files": check_adapter_files(opts.out),
    }
    return {"kind": "adapter", "method": run.recipe.method.name,
            "example_prompt": prompt_text(rows[0]),
            "base_quantized_in_training": base_was_quantized(run.recipe),
            "base_model": adapter_base(opts.out), "checks": checks}


def verify_adapter_effect(loaded, out: Path, outputs_of, source: str) -> tuple[object, dict]:
    """Load the exported adapter in `out` on the base the way a user would (plain PeftModel)
    and check it changes the base's `outputs_of(model)` on the probes; returns (the adapter
    model, the `adapter_effect` check)."""
    from peft import PeftModel

    base = outputs_of(loaded.model.to(device()))
    try:
        model = PeftModel.from_pretrained(loaded.model, out)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"the exported adapter in {out} does not load with "
                          f"PeftModel.from_pretrained: {str(exc).splitlines()[0]}") from exc
    return model, check_adapter_effect(base, outputs_of(model), source)


def copy_adapter_files(adapter_dir: Path, out: Path) -> None:
    """The peft adapter files and the processor; peft's auto-generated README is replaced."""
    for path in adapter_dir.iterdir():
        if path.is_file() and (path.name.startswith("adapter_") or path.name in PROCESSOR_FILES):
            shutil.copy2(path, out / path.name)


def adapter_base(folder: Path) -> str | None:
    return json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")


