"""`peftvlm plan`: meta-device parameter counts equal the published sizes of the shipped
real-model recipes, image tokens come from the model's own image processor, the memory
arithmetic adds up, and the CLI prints counts, a memory table and its assumptions."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli_in_process
from peftvlm import memory
from peftvlm.cli import shipped_recipes
from peftvlm.errors import ModelError, PeftVLMError
from peftvlm.families import tiny_models
from peftvlm.plan import BUNDLED, plan, render
from peftvlm.recipe.load import load_recipe

# Published sizes (model cards / the papers), in parameters.
PUBLISHED = {
    "llava-hf/llava-1.5-7b-hf": 7.06e9,
    "Qwen/Qwen2-VL-2B-Instruct": 2.21e9,
    "HuggingFaceTB/SmolVLM-256M-Instruct": 0.256e9,
    "google/paligemma-3b-pt-224": 2.92e9,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9,
}
REAL = {name: path for name, path in shipped_recipes().items()
        if load_recipe(path).model.id not in tiny_models()}


@pytest.mark.parametrize("name", sorted(REAL))
def test_shipped_recipe_counts_equal_the_published_size(name):
    recipe = load_recipe(REAL[name])
    if not (BUNDLED / recipe.model.id.replace("/", "--") / "config.json").is_file():
        with pytest.raises(ModelError, match="no config.json") as err:
            plan(recipe)  # says clearly that it has no config, and how to get one
        assert "hf download" in err.value.hint
        return
    result = plan(recipe)
    published = PUBLISHED[recipe.model.id]
    assert abs(result["base_params"] - published) / published < 0.02, result["base_params"]
    assert 0 < result["trainable_params"] < 0.05 * result["base_params"]
    assert result["config"]["from"] == "bundled copy"
    assert result["images"]["tokens"] > 0 and result["estimate"]["peak_allocated"] > 0


def test_qwen_image_tokens_follow_the_image_size_and_overflow_is_flagged():
    recipe = load_recipe(REAL["qwen2-vl-2b-qlora"])
    small = plan(recipe, image_size=(448, 448))
    assert small["images"]["tokens"] == (448 // 14) ** 2 // 4 == 256
    assert small["images"]["patches"] == 1024
    big = plan(recipe)  # no local data: the processor's largest (max_pixels) image
    assert big["images"]["tokens"] == 16384 and big["images"]["size_from"] == "processor maximum"
    assert "such rows are dropped" in render(big)
    # more image tokens -> more vision activations; the text budget stays train.max_length
    assert big["estimate"]["parts"]["vision"] > small["estimate"]["parts"]["vision"]


def test_changes_are_offered_in_turn_until_it_fits():
    recipe = load_recipe(REAL["paligemma-3b-dora"],
                         ["train.gradient_checkpointing=false", "train.max_length=2048"])
    result = plan(recipe, gpu="4090")
    assert result["gpu"]["gib"] == 24
    assert result["estimate"]["with_overhead"] > 24 * memory.GIB
    steps = result["suggestions"]
    assert steps[0]["change"] == "train.gradient_checkpointing=true"
    sizes = [result["estimate"]["with_overhead"] / memory.GIB] + [o["gib"] for o in steps]
    assert sizes == sorted(sizes, reverse=True) and steps[-1]["fits"]
    assert not any(o["fits"] for o in steps[:-1])
    # full-precision LoRA on a 7B: halving the batch is not enough, QLoRA is offered next
    recipe = load_recipe(REAL["llava-1.5-7b-qlora"], ["model.dtype=float32",
                                                      "model.quantization=null",
                                                      "method.name=lora"])
    changes = [o["change"] for o in plan(recipe, gpu="24")["suggestions"]]
    assert "method.name=qlora" in changes
    with pytest.raises(PeftVLMError, match="--gpu"):
        plan(recipe, gpu="a-toaster")


def test_a_model_without_any_config_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {id: someone/unknown-vlm, family: llava}\nmethod: {name: lora}\n"
                    "data: {synthetic: {name: colour-vqa}}\n")
    with pytest.raises(ModelError, match="no config.json for 'someone/unknown-vlm'") as err:
        plan(load_recipe(path))
    assert "hf download someone/unknown-vlm config.json" in err.value.hint


def test_memory_terms_add_up_by_hand():
    shape = memory.Shape(total_params=1_100, trainable_params=100, frozen_params_full=1_000,
                         dtype="bfloat16", layers=2, hidden=8, intermediate=16, q_dim=8,
                         kv_dim=4, vocab=10)
    work = memory.Workload(batch_size=2, seq_len=5, optim="adamw_torch")
    parts = memory.estimate(shape, work)["parts"]
    assert parts["weights"] == 2_000 and parts["adapter"] == parts["gradients"] == 400
    assert parts["optimizer"] == 800
    per_layer = (4 * 8 + 2 * 8 + 2 * 4 + 4 * 16) * 2
    assert parts["activations"] == 10 * 2 * per_layer
    # TRL's fused head: one bf16 tile (10 tokens x 10 vocabulary) + per-token fp32 values
    assert parts["logits"] == 10 * 10 * 2 + 10 * (8 * 4 + 2 * 8 * 4)
    logits_head = memory.with_changes(shape, work, shape={"unfused_lm_head": True})
    assert logits_head["parts"]["logits"] == 10 * 10 * (2 + 4 + 4)
    checkpointed = memory.with_changes(shape, work, work={"gradient_checkpointing": True})
    assert checkpointed["parts"]["activations"] == 10 * (2 * 8 * 2 + per_layer)
    eight_bit = memory.with_changes(shape, work, work={"optim": "paged_adamw_8bit"})
    assert eight_bit["parts"]["optimizer"] == 200
    sharded = memory.with_changes(shape, work, work={"gpus": 4, "sharding": "fsdp"})
    assert sharded["parts"]["weights"] == 500 and sharded["parts"]["optimizer"] == 200
    zero2 = memory.with_changes(shape, work, work={"gpus": 4, "sharding": "zero2"})
    assert zero2["parts"]["weights"] == 2_000 and zero2["parts"]["gradients"] == 100


def test_cli_prints_published_counts_a_memory_table_and_assumptions():
    res = run_cli_in_process("plan", "recipes/llava-1.5-7b-qlora.yaml", "--labelled-share", "0.25")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "labelled positions: 25.0% of each row (given)" in out
    assert "7,063,427,072 (7.063 B)" in out and "bundled copy" in out
    assert "576 per image" in out and "| **peak allocated** |" in out
    assert "fits: 24 GiB" in out and "assumptions:" in out


def test_json_plan_with_sharding_over_gpus():
    result = plan(load_recipe(REAL["llava-1.5-7b-qlora"]), gpus=2, sharding="fsdp")
    data = json.loads(json.dumps(result, default=str))
    alone = memory.with_changes(memory.Shape(**data["shape"]), memory.Workload(**data["workload"]),
                                work={"gpus": 1, "sharding": "none"})
    assert data["workload"]["gpus"] == 2
    # Hub data (and a bundled config without a tokenizer): every position counted as labelled
    assert data["labels"]["share"] == 1.0 and data["labels"]["from"].startswith("default")
    assert data["estimate"]["parts"]["optimizer"] == alone["parts"]["optimizer"] / 2
