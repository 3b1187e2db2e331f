"""Contrastive PEFT on dual encoders (CLIP, SigLIP): pairs from the shared readers, the model's
own loss, retrieval scores before/after, peftvlm eval, export (plain PeftModel, merged model),
the run-kind seam, and the shared loop's optimiser names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftvlm.errors import DataError, RecipeError
from peftvlm.recipe import load_recipe, validate_recipe_dict

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def retrieval_recipe(model_id="tiny-clip", method=None, **train):
    settings = {"max_steps": 60, "per_device_train_batch_size": 32, "learning_rate": 0.003,
                "logging_steps": 10, "save_steps": 1000, **train}
    recipe = validate_recipe_dict({
        "model": {"id": model_id},
        "method": method or {"name": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                             "target": "all"},
        "data": {"synthetic": {"name": "coco-captions", "train_size": 200, "eval_size": 30}},
        "train": settings, "eval": {"batch_size": 64}})
    recipe.name = "retrieval-test"
    return recipe


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """One trained LoRA retrieval run on the tiny CLIP, shared by the tests below."""
    from peftvlm import api

    run_dir = tmp_path_factory.mktemp("clip-retrieval") / "run"
    summary = api.train(retrieval_recipe(), run_dir, log=lambda *_: None)
    return summary, run_dir


# --- training and scores ----------------------------------------------------------------------

def test_lora_on_clip_raises_recall_well_above_the_base(clip_run):
    summary, run_dir = clip_run
    scores = summary["eval"]
    i2t = scores["image_to_text_recall@1"]
    assert i2t["after"] >= i2t["before"] + 0.2, scores
    assert scores["rsum"]["after"] > scores["rsum"]["before"] + 60, scores
    assert scores["text_to_image_mean_rank"]["after"] < scores["text_to_image_mean_rank"]["before"]
    assert summary["kind"] == "retrieval" and summary["family"] == "clip"
    assert summary["data"]["train_images"] == 200 and summary["data"]["train_captions"] == 600
    curve = [loss for _, loss in summary["loss_curve"]]
    assert curve[-1] < curve[0]
    for name in ("summary.json", "loss.png", "recipe.yaml", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (run_dir / name).exists(), name


def test_adapter_loads_with_plain_peft_on_clipmodel(clip_run):
    from peft import PeftModel
    from transformers import CLIPModel

    from peftvlm.models import tiny_model_path

    _, run_dir = clip_run
    base = CLIPModel.from_pretrained(tiny_model_path("tiny-clip"))
    pixels = torch.rand(2, 3, 32, 32)
    before = base.get_image_features(pixel_values=pixels).pooler_output.detach().clone()
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    after = model.get_image_features(pixel_values=pixels).pooler_output
    assert not torch.allclose(before, after)


def test_eval_reproduces_the_summary_and_writes_predictions(clip_run):
    from peftvlm import api

    summary, run_dir = clip_run
    result = api.evaluate(retrieval_recipe(), run_dir, log=lambda *_: None)
    for name, row in result["metrics"].items():
        assert row["base"] == pytest.approx(summary["eval"][name]["before"], abs=1e-9), name
        assert row["fine_tuned"] == pytest.approx(summary["eval"][name]["after"], abs=1e-9), name
    assert result["metrics"]["text_to_image_mean_rank"]["higher_is_better"] is False
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").open()]
    assert len(rows) == 90 and {"text", "image", "rank", "base_rank"} <= set(rows[0])
    assert (run_dir / "eval" / "metrics.png").stat().st_size > 0


def test_merged_export_is_a_plain_clipmodel_with_equal_features(clip_run, tmp_path):
    from transformers import AutoModel

    from peftvlm.export import export_run

    _, run_dir = clip_run
    report = export_run(run_dir, merge=True, out=tmp_path / "merged", log=lambda *_: None)
    assert report["passed"] and report["checks"]["features"]["max_abs_diff"] <= 1e-5
    assert report["checks"]["weights_changed"]["changed_after_merge"] > 0
    assert type(AutoModel.from_pretrained(tmp_path / "merged")).__name__ == "CLIPModel"
    assert "PeftModel" not in (tmp_path / "merged" / "README.md").read_text()

    adapter = export_run(run_dir, merge=False, out=tmp_path / "adapter", log=lambda *_: None)
    assert adapter["passed"] and adapter["checks"]["adapter_effect"]["passed"]
    assert "PeftModel.from_pretrained" in (tmp_path / "adapter" / "README.md").read_text()


def dual_peft_methods() -> list[str]:
    from peftvlm.registry import METHODS, method_config_classes

    method_config_classes()
    return [m.name for m in METHODS.values() if {"generative", "dual_encoder"} <= set(m.kinds)]


@pytest.mark.parametrize("family", ["tiny-clip", "tiny-siglip"])
@pytest.mark.parametrize("method", dual_peft_methods())
def test_each_peft_method_steps_on_each_dual_encoder(family, method):
    """Every trainable parameter moves after one step of the model's own loss; nothing else."""
    from peftvlm.trainers.contrastive import RetrievalTask, load_and_adapt, load_pairs

    recipe = retrieval_recipe(family, {"name": method, "target": "all"})
    _, train, _ = load_pairs(recipe, None)
    _, model, encoder = load_and_adapt(recipe)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(".vision_model." in n or ".text_model." in n for n in trainable)
    optimizer = torch.optim.AdamW([params[n] for n in trainable], lr=1e-2)
    loss = RetrievalTask(model, encoder, train, None, 0, 16).loss(model, torch.arange(8), 0, "cpu")
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    moved = {n for n, p in params.items() if not torch.equal(p, before[n])}
    # LoRA's B starts at zero, so A gets no gradient on the first step; everything else moves.
    assert trainable - moved <= {n for n in trainable if "lora_A" in n}, trainable - moved
    assert moved <= trainable


def test_siglip_dora_on_the_vision_tower_merges_exactly(tmp_path):
    from peftvlm import api
    from peftvlm.export import export_run

    recipe = retrieval_recipe("tiny-siglip", {"name": "dora", "target": "vision"}, max_steps=3,
                              logging_steps=1)
    summary = api.train(recipe, tmp_path / "run", log=lambda *_: None)
    assert summary["family"] == "siglip" and summary["global_step"] == 3
    assert all(loss == loss for _, loss in summary["loss_curve"])  # sigmoid loss, finite
    report = export_run(tmp_path / "run", merge=True, out=tmp_path / "merged", log=lambda *_: None)
    assert report["passed"] and report["model_class"] == "SiglipModel"


# --- pairs ------------------------------------------------------------------------------------

def test_pairs_group_captions_per_image_and_sample_one_per_epoch():
    from peftvlm.trainers.contrastive import pairs_from_rows

    def row(image, caption, refs=None):
        r = {"messages": [{"role": "user", "content": [{"type": "image"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": caption}]}],
             "images": [image]}
        return {**r, "references": refs} if refs else r

    pairs = pairs_from_rows([row("a.png", "x", ["one", "two", "three"]), row("b.png", "b1"),
                             row("a.png", "one", ["one", "four"])], "data.train")
    assert pairs.images == ["a.png", "b.png"]
    assert pairs.captions == [["one", "two", "three", "four"], ["b1"]]
    drawn = {pairs.caption(0, epoch, seed=0) for epoch in range(40)}
    assert drawn == {"one", "two", "three", "four"}
    assert pairs.caption(0, 3, 0) == pairs.caption(0, 3, 0)  # seeded: resume repeats it
    with pytest.raises(DataError, match="rows 1: each needs one image"):
        pairs_from_rows([row("a.png", "x"), {"messages": [], "images": []}], "data.train")


def test_pairs_come_from_parquet_with_image_bytes_through_the_caption_template(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from peftvlm.trainers.contrastive import load_pairs

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    table = pa.table({"picture": [{"bytes": png(c), "path": None} for c in ("red", "blue")],
                      "texts": [["a red square", "red"], ["a blue square"]]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    recipe = validate_recipe_dict({
        "model": {"id": "tiny-clip"}, "method": {"name": "lora"},
        "data": {"train": [{"path": str(tmp_path / "pairs.parquet"),
                            "columns": {"image": "picture", "captions": "texts"}}],
                 "template": "caption"}})
    _, train, held_out = load_pairs(recipe, None)
    assert len(train) == 2 and held_out is None
    assert train.captions == [["a red square", "red"], ["a blue square"]]


# --- the seam ---------------------------------------------------------------------------------

def test_run_kind_matches_methods_and_families(tiny_llava_path):
    from peftvlm.kinds import run_kind

    def kind(model, method):
        return run_kind(validate_recipe_dict({"model": {"id": model}, "method": {"name": method},
                                              "data": {"synthetic": {"name": "colour-vqa"}}}))

    assert kind("tiny-clip", "lora") == "retrieval"
    assert kind("tiny-siglip", "vera") == "retrieval"
    assert kind("tiny-clip", "coop") == "classification"
    assert kind(str(tiny_llava_path), "lora") == "generative"
    with pytest.raises(RecipeError, match="'qlora' does not train dual encoders"):
        kind("tiny-clip", "qlora")


def test_dry_run_reads_pairs_and_writes_nothing(tmp_path):
    from peftvlm import api

    recipe = load_recipe(RECIPES / "clip-retrieval-tiny.yaml")
    result = api.train(recipe, tmp_path / "run", dry_run=True, log=lambda *_: None)
    assert result["train_images"] == 300 and result["train_captions"] == 900
    assert 0 < result["trainable_params"] < result["total_params"]
    assert not (tmp_path / "run").exists()


# --- optimiser names mean what transformers means --------------------------------------------

@pytest.mark.parametrize("name,expected", [("adamw_torch", "torch.optim.adamw.AdamW"),
                                           ("sgd", "torch.optim.sgd.SGD"),
                                           ("adamw_bnb_8bit", "bitsandbytes.optim.adamw.AdamW")])
def test_optimizer_names_build_the_same_class_as_the_generative_trainer(name, expected, tmp_path):
    from transformers import Trainer

    from peftvlm.trainers.loop import build_optimizer, optim_settings
    from peftvlm.trainers.sft import sft_config

    recipe = retrieval_recipe(optim=name)
    optimizer = build_optimizer([("w", torch.nn.Parameter(torch.zeros(4, 4)))],
                                optim_settings(recipe, 8, 1))
    cls = type(optimizer)
    assert f"{cls.__module__}.{cls.__name__}" == expected
    generative_cls, _ = Trainer.get_optimizer_cls_and_kwargs(sft_config(recipe.train, tmp_path,
                                                                        [], "x"))
    assert generative_cls is cls
    if name == "adamw_bnb_8bit":
        assert optimizer.args.optim_bits == 8  # really 8-bit, not a plain AdamW


def test_unknown_optimizer_is_a_recipe_error():
    from peftvlm.trainers.loop import build_optimizer, optim_settings

    with pytest.raises(RecipeError, match="train.optim: 'adamw_nonsense'"):
        build_optimizer([("w", torch.nn.Parameter(torch.zeros(2, 2)))],
                        optim_settings(retrieval_recipe(optim="adamw_nonsense"), 8, 1))
