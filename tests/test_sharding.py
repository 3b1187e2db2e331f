"""Sharded training up to the launch (this machine has no GPU): the shipped accelerate configs
parse as accelerate's own and become the launcher's environment; train.fsdp / fsdp_config /
deepspeed resolve into the trainer's fields; impossible set-ups are refused with the fix;
QLoRA stores 4-bit weights in the compute dtype when sharded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from peftvlm.distributed import sharding_args, sharding_mode
from peftvlm.errors import RecipeError
from peftvlm.recipe.load import load_recipe
from peftvlm.recipe.schema import TrainConfig

CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
EXPECTED = {"ddp": ("MULTI_GPU", None), "fsdp": ("FSDP", "2"), "fsdp-qlora": ("FSDP", "1"),
            "deepspeed-zero2": ("DEEPSPEED", 2), "deepspeed-zero3": ("DEEPSPEED", 3)}


def test_every_shipped_config_is_shipped():
    assert {p.stem for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_parses_and_says_how_to_launch(path):
    from accelerate.commands.config.config_args import load_config_from_file

    text = path.read_text()
    assert text.startswith("#") and f"accelerate launch --config_file recipes/accelerate/" \
                                      f"{path.name}" in text and "-m peftvlm train" in text
    config = load_config_from_file(str(path))
    kind, detail = EXPECTED[path.stem]
    assert config.distributed_type.value == kind
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == detail


@pytest.mark.parametrize("name", ["fsdp", "fsdp-qlora"])
def test_launcher_environment_turns_fsdp_on_and_cpu_refuses_it(name, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(REPO / "recipes" / "accelerate" / f"{name}.yaml"), "-m",
         "peftvlm", "train", "quickstart"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == EXPECTED[name][1]
    if name == "fsdp-qlora":
        assert env["FSDP_USE_ORIG_PARAMS"] == "false"
        assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    train = TrainConfig()
    assert sharding_mode(train) == "fsdp"
    assert sharding_args(train, REPO, "r.yaml", on_gpu=True) == {}  # the launcher carries it
    with pytest.raises(RecipeError, match="accelerate runs FSDP on GPUs only") as err:
        sharding_args(train, REPO, "r.yaml", on_gpu=False)
    assert "torchrun" in err.value.hint


def test_recipe_fields_resolve_files_relative_to_the_recipe(tmp_path):
    (tmp_path / "fsdp.json").write_text(json.dumps({"version": 2, "reshard_after_forward": False}))
    (tmp_path / "ds.yaml").write_text("zero_optimization: {stage: 3}\nbf16: {enabled: auto}\n")
    train = TrainConfig(fsdp=True, fsdp_config="fsdp.json")
    args = sharding_args(train, tmp_path, "r.yaml", on_gpu=True)
    assert args == {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": False}}
    inline = TrainConfig(fsdp="full_shard auto_wrap", fsdp_config={"version": 1})
    assert sharding_args(inline, tmp_path, "r.yaml", on_gpu=True)["fsdp"] == "full_shard auto_wrap"
    deepspeed = TrainConfig(deepspeed="ds.yaml")
    assert sharding_mode(deepspeed) == "deepspeed"
    with pytest.raises(RecipeError, match="train.deepspeed") as err:
        sharding_args(deepspeed, tmp_path, "r.yaml", on_gpu=False)  # no package or no GPU
    assert "deepspeed" in err.value.hint or "torchrun" in err.value.hint


@pytest.mark.parametrize("train, message", [
    ({"fsdp": True, "deepspeed": {"zero_optimization": {"stage": 2}}}, "both set"),
    ({"fsdp_config": {"version": 2}}, "FSDP is off"),
    ({"deepspeed": {"zero_optimization": {"stage": 7}}}, "stage must be 0-3"),
    ({"deepspeed": "missing.json"}, "missing.json does not exist"),
])
def test_impossible_sharding_is_refused_with_the_field(tmp_path, train, message):
    with pytest.raises(RecipeError, match=message):
        sharding_args(TrainConfig(**train), tmp_path, "r.yaml", on_gpu=True)


def test_validate_checks_sharding_files_without_loading_anything(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {id: tiny-llava}\nmethod: {name: lora}\n"
                    "data: {synthetic: {name: colour-vqa}}\ntrain: {deepspeed: ds.json}\n")
    with pytest.raises(RecipeError, match=r"train.deepspeed: ds.json does not exist"):
        load_recipe(path)
    (tmp_path / "ds.json").write_text("[1, 2]")
    with pytest.raises(RecipeError, match="must hold a mapping"):
        load_recipe(path)


def test_trainer_builds_its_fsdp_plugin_from_the_resolved_fields(tmp_path):
    from peftvlm.trainers.sft import sft_config

    train = TrainConfig(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": False,
                                                 "cpu_offload": True})
    args = sft_config(train, Path(tmp_path), [], None,
                      sharding_args(train, tmp_path, "r.yaml", on_gpu=True))
    assert args.fsdp is True
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is False
    assert plugin["cpu_offload"] is True and plugin["state_dict_type"] == "FULL_STATE_DICT"


def test_sharded_qlora_stores_4bit_weights_in_the_compute_dtype():
    import torch

    from peftvlm.families import get_family
    from peftvlm.models import quantization_config
    from peftvlm.recipe.schema import ModelConfig

    cfg = ModelConfig(id="x", quantization={"compute_dtype": "bfloat16"})
    family = get_family("llava")
    sharded = quantization_config(cfg, family, "qlora", sharded=True)
    assert sharded.bnb_4bit_quant_storage == torch.bfloat16 == sharded.bnb_4bit_compute_dtype
    assert quantization_config(cfg, family, "qlora").bnb_4bit_quant_storage == torch.uint8
