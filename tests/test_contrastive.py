"""Contrastive PEFT on dual encoders (CLIP, SigLIP): pairs from the shared readers, the model's
own loss, retrieval scores before/after, peftvlm eval, export (plain PeftModel, merged model),
the run-kind seam, and the shared loop's optimiser names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftvlm.errors import DataError, RecipeError
from peftvlm.recipe.load import load_recipe, validate_recipe_dict

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


@pytest.fixture(scope="module")
def merged_clip(clip_run):
    from peftvlm.export import export_run

    _, run_dir = clip_run
    report = export_run(run_dir, merge=True, out=run_dir.parent / "merged", log=lambda *_: None)
    return report, run_dir.parent / "merged"


def test_merged_export_is_a_plain_clipmodel_with_equal_features(clip_run, merged_clip, tmp_path):
    from transformers import AutoModel

    from peftvlm.export import export_run

    _, run_dir = clip_run
    report, merged = merged_clip
    assert report["passed"] and report["checks"]["features"]["max_abs_diff"] <= 1e-5
    assert report["checks"]["weights_changed"]["changed_after_merge"] > 0
    assert type(AutoModel.from_pretrained(merged)).__name__ == "CLIPModel"
    assert "PeftModel" not in (merged / "README.md").read_text()

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


def test_resume_repeats_the_uninterrupted_run_with_dropout(tmp_path):
    """accelerate's load_state restores the adapter, optimiser, schedule and RNG (dropout)."""
    import shutil

    from safetensors.torch import load_file

    from peftvlm.trainers.contrastive import train_contrastive

    recipe = retrieval_recipe(method={"name": "lora", "r": 4, "lora_dropout": 0.3,
                                      "target": "text"}, max_steps=4, save_steps=2,
                              logging_steps=1, per_device_train_batch_size=8)
    recipe.eval.before_training = False
    recipe.data.synthetic.train_size, recipe.data.synthetic.eval_size = 32, 4
    first = train_contrastive(recipe, tmp_path, log=lambda *_: None)
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-4")  # as if stopped after step 2
    (tmp_path / "summary.json").unlink()
    resumed = train_contrastive(recipe, tmp_path, resume=True, log=lambda *_: None)
    again = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert resumed["loss_curve"] == first["loss_curve"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)


# --- CLIP-score filtering ---------------------------------------------------------------------

def write_pairs(folder: Path, n: int = 24) -> Path:
    """A JSONL of shape images, half with their true caption and half with a wrong colour."""
    import random

    from peftvlm.data.read.synthetic import COLOURS, draw_shape

    rng, colours, rows = random.Random(1), list(COLOURS), []
    (folder / "images").mkdir(parents=True)
    for i in range(n):
        colour = colours[i % 4]
        draw_shape(rng, COLOURS[colour], 32).save(folder / "images" / f"{i}.png")
        said = colour if i % 2 == 0 else colours[(i + 1) % 4]
        rows.append({"image": f"images/{i}.png", "captions": [f"a {said} square"],
                     "truth": i % 2 == 0})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl"


def filter_recipe(path: Path, **extra):
    recipe = validate_recipe_dict({"model": {"id": "tiny-clip"}, "method": {"name": "lora"},
                                   "data": {"train": str(path), "template": "caption", **extra}})
    recipe.name = "filter-test"
    return recipe


def test_filter_keeps_exactly_the_pairs_at_or_above_min(tmp_path, monkeypatch):
    """Scores equal CLIPScore of each pair alone (metrics.clipscore); kept = score >= MIN;
    a new MIN re-scores nothing."""
    from PIL import Image

    from peftvlm.data.prepare import filter as data_filter
    from peftvlm.metrics.clipscore import clip_scores_per_image
    from peftvlm.models import load_base
    from peftvlm.recipe.schema import ModelConfig

    path = write_pairs(tmp_path)
    recipe = filter_recipe(path)
    first = data_filter.run_filter(recipe, clipscore=0.0, batch_size=5,
                                   output=str(tmp_path / "out"), log=lambda *_: None)
    scores = [float(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().split()]
    rows = [json.loads(line) for line in path.open()]
    loaded = load_base(ModelConfig(id="tiny-clip"))
    alone = clip_scores_per_image(loaded.model, loaded.processor,
                                  [Image.open(tmp_path / r["image"]).convert("RGB") for r in rows],
                                  [r["captions"][0] for r in rows])
    assert scores == pytest.approx(alone, abs=1e-5)
    assert first["pairs"] == 24 and first["kept"] == 24
    threshold = sorted(scores)[-8]
    monkeypatch.setattr(data_filter, "load_scorer", None)  # a new MIN loads no model again
    report = data_filter.run_filter(recipe, clipscore=threshold, output=str(tmp_path / "out"),
                                    log=lambda *_: None)
    kept = [json.loads(line) for line in (tmp_path / "out" / "kept.jsonl").open()]
    assert sorted(r["row"] for r in kept) == [k for k, x in enumerate(scores) if x >= threshold]
    assert report["kept"] == len(kept) >= 8 and report["dropped"] == 24 - len(kept)
    assert report["lowest_kept"][0]["clipscore"] == min(r["clipscore"] for r in kept)
    assert {"min", "p50", "max"} <= set(report["distribution"])
    assert (tmp_path / "out" / "histogram.png").stat().st_size > 0
    assert all((Path(report["image_root"]) / r["image"]).is_file() for r in kept)


def test_filter_resumes_after_an_interruption(tmp_path, monkeypatch):
    from peftvlm.data.prepare import filter as data_filter
    from peftvlm.metrics import clipscore

    path = write_pairs(tmp_path, n=12)
    recipe = filter_recipe(path)
    whole = data_filter.run_filter(recipe, clipscore=0.1, batch_size=4,
                                   output=str(tmp_path / "a"), log=lambda *_: None)
    real, calls = clipscore.clip_scores_per_caption, []

    def stop_on_second_batch(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    # where the filter looks it up (imported at its module top)
    monkeypatch.setattr(data_filter, "clip_scores_per_caption", stop_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        data_filter.run_filter(recipe, clipscore=0.1, batch_size=4, output=str(tmp_path / "b"),
                               log=lambda *_: None)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["pairs_done"] == 4
    resumed = data_filter.run_filter(recipe, clipscore=0.1, batch_size=4,
                                     output=str(tmp_path / "b"), log=lambda *_: None)
    assert calls == [4, 4, 4, 4]  # the interrupted batch is redone, the first is not
    assert (tmp_path / "b" / "scores.jsonl").read_text() == \
        (tmp_path / "a" / "scores.jsonl").read_text()
    assert resumed["kept"] == whole["kept"]


def test_recipe_data_filter_trains_on_the_kept_pairs(tmp_path):
    from peftvlm.data.prepare.filter import run_filter
    from peftvlm.trainers.contrastive import load_pairs

    path = write_pairs(tmp_path, n=8)
    cfg = {"filter": {"clipscore": 0.2, "output": str(tmp_path / "kept")}}
    with pytest.raises(DataError, match="holds no filtered pairs yet"):
        load_pairs(filter_recipe(path, **cfg), None)
    report = run_filter(filter_recipe(path, **cfg), log=lambda *_: None)
    _, train, _ = load_pairs(filter_recipe(path, **cfg), None)
    assert sum(map(len, train.captions)) == report["kept"] > 0
    with pytest.raises(DataError, match="was filtered at 0.2"):
        load_pairs(filter_recipe(path, filter={**cfg["filter"], "clipscore": 0.5}), None)


def test_filter_command_through_the_cli(tmp_path, cli, cli_in_process):
    path = write_pairs(tmp_path, n=6)
    (tmp_path / "r.yaml").write_text(json.dumps({
        "model": {"id": "tiny-clip"}, "method": {"name": "lora"},
        "data": {"train": str(path), "template": "caption"}}))
    res = cli("data", "filter", tmp_path / "r.yaml", "--clipscore", "0.05", "--out",
              tmp_path / "out")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert f"kept {report['kept']} of 6 pairs" in res.stdout
    res = cli_in_process("data", "filter", tmp_path / "r.yaml")  # the same main(), no new python
    assert res.returncode == 2 and "--clipscore" in res.stderr


# --- pairs ------------------------------------------------------------------------------------

def test_pairs_group_captions_per_image_and_sample_one_per_epoch():
    from peftvlm.data.prepare.pairs import pairs_from_rows

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

def test_kind_for_matches_methods_and_families(tiny_llava_path):
    from peftvlm.kinds import kind_for

    def kind(model, method):
        return kind_for(validate_recipe_dict({"model": {"id": model}, "method": {"name": method},
                                              "data": {"synthetic": {"name": "colour-vqa"}}})).name

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
