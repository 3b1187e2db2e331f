"""Cross-field checks of a validated recipe, run before any model loads: files and templates
exist, the method fits the family, streaming / GRPO / packing settings are possible."""

from __future__ import annotations

import glob
import importlib.util
from pathlib import Path

from peftvlm.data.render.templates import load_template, merged_options
from peftvlm.distributed import read_config_file
from peftvlm.errors import DataError, RecipeError
from peftvlm.families import FAMILIES, known_family, method_refusal
from peftvlm.metrics import available_metrics
from peftvlm.recipe.schema import GRPOConfig, Recipe
from peftvlm.registry import get_method
from peftvlm.rewards import check_custom, reward_names
from peftvlm.trainers.objectives import check_objective


def check_recipe_files(recipe: Recipe) -> None:
    """Files and templates the recipe names must exist (checked at validate time, before any
    model loads)."""
    if recipe.model.family is not None and recipe.model.family not in FAMILIES:
        raise RecipeError(f"{recipe.source_path}: model.family: unknown family "
                          f"{recipe.model.family!r}; known: {', '.join(FAMILIES)}",
                          hint="or leave it out to detect the family from the model's config")
    check_method_fits_family(recipe)
    check_objective_fits(recipe)

    unknown = [m for m in recipe.eval.metrics if m not in available_metrics()]
    if unknown:
        raise RecipeError(f"{recipe.source_path}: eval.metrics: unknown metric(s) "
                          f"{', '.join(unknown)}", hint="see `peftvlm ls metrics`")
    base = recipe.base_dir()
    for section in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, section) or []):
            where = f"{recipe.source_path}: data.{section}[{i}]"
            for key in ("path", "annotations", "image_root"):
                value = getattr(src, key)
                globbed = key == "path" and section == "train" and recipe.data.streams()
                if value and not _is_remote(value) and not _exists(base, value, globbed):
                    raise RecipeError(f"{where}.{key}: {value} does not exist (looked in {base})",
                                      hint="paths are relative to the recipe file")
            _check_template(recipe, src, where)
    if recipe.data.train is None and recipe.data.synthetic is None:
        raise RecipeError(f"{recipe.source_path}: data: give `train` (files or a dataset) or "
                          f"`synthetic` (a built-in offline task)")
    if recipe.data.template:
        _check_template(recipe, None, f"{recipe.source_path}: data")
    _check_sharding_files(recipe)
    check_streaming(recipe)
    check_grpo(recipe)
    if recipe.train.packing:
        check_packing(recipe, known_family(recipe.model))


def _check_sharding_files(recipe: Recipe) -> None:
    """train.fsdp_config / train.deepspeed files exist and parse (validate time, no torch)."""
    for field in ("fsdp_config", "deepspeed"):
        value = getattr(recipe.train, field)
        if isinstance(value, str):
            read_config_file(value, recipe.base_dir(), field, str(recipe.source_path))


def _exists(base: Path, value: str, globbed: bool) -> bool:
    """A path exists; a streamed source's path may be a glob (`shards/train-*.tar`)."""
    if globbed and glob.has_magic(value):
        return bool(glob.glob(str(base / value)))
    return (base / value).exists()


def check_streaming(recipe: Recipe) -> None:
    """What a streamed training cannot do, refused before anything loads, with the reason."""
    data, train = recipe.data, recipe.train
    where = recipe.source_path or "recipe"
    for i, src in enumerate(data.eval or []):
        if src.streaming and src.path:
            raise RecipeError(f"{where}: data.eval[{i}].streaming: held-out rows are read "
                              "whole (every evaluation scores them all)",
                              hint="drop streaming there (max_samples caps the rows)")
    if not data.streams():
        return
    family = known_family(recipe.model)
    if family is not None and not family.is_generative:
        refuse_dual_encoder_stream(where, family.name)
    whole = "set it back to its default, or read the data whole (streaming: false)"
    counted = "and a stream's rows are counted as they are read"
    refusals = [
        (train.max_steps == -1, "train.max_steps",
         ("a stream has no length, so epochs cannot be counted: give the number of optimizer "
          "steps (a stream that ends sooner starts again)"),
         "set train.max_steps, e.g. train.max_steps=1000"),
        (train.group_by_length, "train.group_by_length",
         f"length grouping sorts every row by its token length before training, {counted}",
         whole),
        (train.packing, "train.packing",
         f"packing fills bins from every row's token length before training, {counted}", whole),
        (train.dataloader_num_workers > 0, "train.dataloader_num_workers",
         ("a stream is read in the training process, which keeps its position for --resume; "
          "worker processes would each read shards of their own that no checkpoint records"),
         whole),
        (data.filter is not None, "data.filter",
         "the CLIP-score filter scores a whole table before training", whole)]
    for refused, name, reason, hint in refusals:
        if refused:
            raise RecipeError(f"{where}: {name} with streamed training data: {reason}",
                              hint=hint)


def refuse_dual_encoder_stream(where, name: str) -> None:
    raise RecipeError(f"{where}: streaming: the {name} dual encoder trains on a table of "
                      "image-text pairs read whole; streaming is for generative training",
                      hint="read the data whole (streaming: false)")


def check_grpo(recipe: Recipe) -> None:
    """`objective: grpo`: rewards given (custom ones allowed and defined), the batch a whole
    number of groups, vLLM installed when asked for, a family TRL can roll out (a CUDA device for
    vLLM is checked when training starts)."""
    train, where = recipe.train, f"{recipe.source_path}: train"
    if train.objective != "grpo":
        return
    if not train.rewards:
        raise RecipeError(f"{where}.rewards: objective grpo needs at least one reward",
                          hint="e.g. rewards: [{name: exact_match}]; available rewards: "
                               f"{', '.join(reward_names())}")
    for i, spec in enumerate(train.rewards):
        if spec.name == "custom":
            check_custom(spec, recipe.base_dir(), train.allow_custom_rewards,
                         f"{where}.rewards[{i}]")
    grpo = train.grpo or GRPOConfig()
    batch = train.per_device_train_batch_size * (grpo.steps_per_generation
                                                 or train.gradient_accumulation_steps)
    if batch % grpo.num_generations:
        raise RecipeError(f"{where}.grpo.num_generations: a generated batch of {batch} "
                          "completions (per_device_train_batch_size x steps_per_generation, "
                          "default gradient_accumulation_steps) is not a whole number of groups "
                          f"of {grpo.num_generations}",
                          hint="make per_device_train_batch_size a multiple of num_generations")
    if grpo.use_vllm and importlib.util.find_spec("vllm") is None:
        raise RecipeError(f"{where}.grpo.use_vllm: vLLM is not installed",
                          hint="vLLM rollouts need a CUDA GPU and `pip install vllm`; or set "
                               "use_vllm: false (transformers' generate)")
    family = known_family(recipe.model)
    if family is not None and family.encode_prompt is not None and not family.rollout_template:
        raise RecipeError(f"{where}.objective: the {family.name} family cannot train with GRPO: "
                          "TRL's GRPOTrainer renders rollout prompts with the processor's chat "
                          "template, and this family has none (it encodes prompts itself) and "
                          "no `rollout_template` to render them with",
                          hint="use objective: sft for this family, or another model")


def check_packing(recipe: Recipe, family) -> None:
    """`train.packing` on a family whose attention cannot isolate packed conversations."""
    if family is not None and family.packing_refusal:
        raise RecipeError(f"{recipe.source_path}: train.packing: the {family.name} family "
                          f"cannot pack conversations: {family.packing_refusal}",
                          hint="set train.packing: false (train.group_by_length: true also "
                               "cuts padding)")


def check_method_fits_family(recipe: Recipe) -> None:
    """A method the model's family cannot take is refused here, before any weights load (the
    family is known for `model.family`, built-in tiny models and local folders)."""
    family = known_family(recipe.model)
    reason = method_refusal(family, recipe.method) if family else None
    if reason:
        raise RecipeError(f"{recipe.source_path}: {reason}",
                          hint="pick another method (`peftvlm ls methods`) or another model")


def check_objective_fits(recipe: Recipe) -> None:
    """`train.objective` must fit the model's family and the method (validate time; a Hub
    id's family is checked again once its config is read)."""
    check_objective(recipe, known_family(recipe.model), get_method(recipe.method.name))


def _check_template(recipe: Recipe, src, where: str) -> None:
    """The template a source uses exists, parses, and accepts the options given."""
    name = (src.template if src else None) or recipe.data.template
    if name is None:
        return
    try:
        spec = load_template(name, recipe.base_dir()).spec
        merged_options(spec, {**recipe.data.template_options,
                              **(src.template_options if src else {})}, where)
        unknown = set(src.columns if src else {}) - set(spec.columns)
    except DataError as exc:
        raise RecipeError(f"{where}: {exc.message}", hint=exc.hint) from exc
    if unknown:
        raise RecipeError(f"{where}.columns: template {name!r} has no column(s) "
                          f"{sorted(unknown)}; its columns: {', '.join(spec.columns)}")


def _is_remote(path: str) -> bool:
    return "://" in path
