"""Sharded training: how `train.fsdp`, `train.fsdp_config` and `train.deepspeed` (Hugging Face's
TrainingArguments names) or an `accelerate launch --config_file recipes/accelerate/<x>.yaml`
launcher reach the trainer, checked before any model loads. See docs/distributed.md.

No torch import at module level: `peftvlm validate` resolves these settings too.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

import yaml

from peftvlm.errors import RecipeError
from peftvlm.safe_yaml import AliasBombError, load_yaml

Sharding = Literal["fsdp", "deepspeed"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def sharding_mode(train_cfg) -> Sharding | None:
    """FSDP or DeepSpeed when the recipe asks for it, or when `accelerate launch` does: its config
    file reaches the trainer as ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED (accelerate's own
    hand-over, not a peftvlm switch)."""
    if train_cfg.deepspeed is not None or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _fsdp_on(train_cfg.fsdp) or _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def _fsdp_on(value) -> bool:
    if value is None or value is False:
        return False
    return not (isinstance(value, str) and value.strip().lower() in ("", "false", "no"))


def read_config_file(value, base: Path, field: str, where: str) -> dict:
    """An inline dict as given, or a JSON/YAML file relative to the recipe's folder, read."""
    if isinstance(value, dict):
        return dict(value)
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise RecipeError(f"{where}: train.{field}: {value} does not exist (looked in {base})",
                          hint="paths are relative to the recipe file; or give the settings "
                               "inline as a mapping")
    try:
        data = load_yaml(path.read_text())  # YAML is a superset of JSON
    except (yaml.YAMLError, AliasBombError) as exc:
        raise RecipeError(f"{where}: train.{field}: {path} is not valid JSON/YAML: "
                          f"{str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: train.{field}: {path} must hold a mapping of settings, "
                          f"got {type(data).__name__}")
    return data


def check_deepspeed(config: dict, where: str, on_gpu: bool) -> None:
    """DeepSpeed needs its package and CUDA GPUs; say so before a model loads, not in a trace."""
    stage = (config.get("zero_optimization") or {}).get("stage")
    if stage not in (None, 0, 1, 2, 3):
        raise RecipeError(f"{where}: train.deepspeed: zero_optimization.stage must be 0-3, "
                          f"got {stage!r}", hint="see recipes/accelerate/deepspeed-zero2.yaml")
    if importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(f"{where}: train.deepspeed is set but the `deepspeed` package is not "
                          "installed", hint="pip install 'peftvlm[deepspeed]' (needs CUDA), or "
                                            "use FSDP: train.fsdp=true")
    if not on_gpu:
        raise RecipeError(f"{where}: train.deepspeed: DeepSpeed ZeRO trains on CUDA GPUs only; "
                          "this machine has none", hint="on CPU use DDP (torchrun) or FSDP "
                                                        "(train.fsdp=true)")


def sharding_args(train_cfg, base: Path, where: str, on_gpu: bool) -> dict:
    """The TrainingArguments fields for the recipe's sharding (empty without one): files read,
    conflicts and impossible set-ups refused with the field to change."""
    args: dict = {}
    if train_cfg.deepspeed is not None and _fsdp_on(train_cfg.fsdp):
        raise RecipeError(f"{where}: train.fsdp and train.deepspeed are both set",
                          hint="choose one sharding backend")
    if train_cfg.deepspeed is not None:
        args["deepspeed"] = read_config_file(train_cfg.deepspeed, base, "deepspeed", where)
        check_deepspeed(args["deepspeed"], where, on_gpu)
    if _fsdp_on(train_cfg.fsdp):
        args["fsdp"] = train_cfg.fsdp if isinstance(train_cfg.fsdp, str) else True
    if train_cfg.fsdp_config is not None:
        if not _fsdp_on(train_cfg.fsdp) and not _env_flag("ACCELERATE_USE_FSDP"):
            raise RecipeError(f"{where}: train.fsdp_config is set but FSDP is off",
                              hint="add train.fsdp=true, or launch with "
                                   "recipes/accelerate/fsdp.yaml")
        args["fsdp_config"] = read_config_file(train_cfg.fsdp_config, base, "fsdp_config", where)
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and not on_gpu:
        raise RecipeError("accelerate launch asks for DeepSpeed, which trains on CUDA GPUs only; "
                          "this machine has none", hint="on CPU use torchrun (data parallel)")
    if sharding_mode(train_cfg) == "fsdp" and not on_gpu:
        # torch's FSDP2 shards over gloo on CPU, but accelerate (1.15) builds its FSDP plugin
        # for accelerator devices only and would train plain data-parallel without a word.
        raise RecipeError(f"{where}: FSDP was asked for (train.fsdp or an accelerate FSDP "
                          "config) but this machine has no GPU: accelerate runs FSDP on GPUs "
                          "only and would silently fall back to data parallel",
                          hint="on CPU use torchrun --nproc_per_node N (data parallel, same "
                               "losses); drop train.fsdp / the --config_file")
    return args

