"""Finished CLIP-family runs: `evaluate_dual_encoder` reproduces the run's accuracies, and
`peftvlm export` writes learned tensors with a loader (CoOp: also a fixed linear head)."""

from __future__ import annotations

import json

import pytest
import torch

from peftvlm.errors import RecipeError
from test_clip_methods import recipe_for


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short run per method (module-scoped: each takes ~2 s on the tiny CLIP)."""
    from peftvlm.models import tiny_model_path
    from peftvlm.trainers.clip import train_dual_encoder

    tiny = tiny_model_path("tiny-clip")
    out = {}
    for method in ({"name": "coop", "n_ctx": 4}, {"name": "vpt", "deep": True},
                   {"name": "clip_adapter", "side": "both"}):
        recipe = recipe_for(tiny, method, max_steps=8, learning_rate=0.05,
                            lr_scheduler_type="constant")
        run_dir = tmp_path_factory.mktemp(method["name"])
        train_dual_encoder(recipe, run_dir, resume=False, log=lambda *_: None)
        out[method["name"]] = (recipe, run_dir)
    return out


# --- evaluation -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["coop", "vpt", "clip_adapter"])
def test_eval_reproduces_the_run_summary_exactly(runs, method):
    from peftvlm.trainers.clip_eval import evaluate_dual_encoder

    recipe, run_dir = runs[method]
    result = evaluate_dual_encoder(recipe, run_dir, log=lambda *_: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["accuracy"] == summary["eval"]["accuracy"]  # before and after, exactly
    acc = result["metrics"]["accuracy"]
    assert (acc["base"], acc["fine_tuned"]) == (summary["eval"]["accuracy"]["before"],
                                                summary["eval"]["accuracy"]["after"])
    assert result["num_examples"] == 60 and result["split"] == "test"
    per_class = result["per_class"]
    assert sorted(per_class) == sorted(summary["classnames"])
    mean = sum(v["fine_tuned"] for v in per_class.values()) / 4
    assert result["metrics"]["per_class_accuracy"]["fine_tuned"] == pytest.approx(mean)
    assert "top5_accuracy" not in result["metrics"]  # 4 classes: top-5 says nothing
    written = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert written["metrics"] == result["metrics"]
    rows = (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 60 and {"label", "prediction", "base_prediction"} <= set(
        json.loads(rows[0]))


def test_eval_other_split_limit_no_base_and_errors(runs):
    from peftvlm.trainers.clip_eval import evaluate_dual_encoder

    recipe, run_dir = runs["coop"]
    small = evaluate_dual_encoder(recipe, run_dir, max_samples=10, with_base=False,
                                  log=lambda *_: None)
    assert small["num_examples"] == 10 and small["metrics"]["accuracy"]["base"] is None
    train = evaluate_dual_encoder(recipe, run_dir, split="train", log=lambda *_: None)
    assert train["num_examples"] == 32  # 8 shots x 4 classes
    with pytest.raises(RecipeError, match="split 'valid'"):
        evaluate_dual_encoder(recipe, run_dir, split="valid")


def test_eval_top5_beyond_five_classes():
    from peftvlm.trainers.clip_eval import score_classes

    class Fixed(torch.nn.Module):  # logits favour class 0, then 1, ...
        classnames = [str(i) for i in range(7)]

        def set_classnames(self, names):
            self.classnames = names

        def forward(self, pixels):
            return torch.arange(7, 0, -1.0).expand(len(pixels), 7)

    class Images:
        labels = torch.tensor([0, 4, 6])

        def pixels(self, index):
            return torch.zeros(len(index), 3, 2, 2)

    model = Fixed()
    model.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    scores, ranked = score_classes(model, model.classnames, Images(), 2)
    assert scores["top1_accuracy"] == pytest.approx(1 / 3)
    assert scores["top5_accuracy"] == pytest.approx(2 / 3)
    assert ranked[0][:3] == ["0", "1", "2"]


def test_eval_base_to_new_reports_each_group(tmp_path):
    from peftvlm.models import tiny_model_path
    from peftvlm.trainers.clip import train_dual_encoder
    from peftvlm.trainers.clip_eval import evaluate_dual_encoder

    recipe = recipe_for(tiny_model_path("tiny-clip"), {"name": "coop", "n_ctx": 4}, max_steps=3)
    recipe.data.base_to_new = True
    summary = train_dual_encoder(recipe, tmp_path, resume=False, log=lambda *_: None)
    metrics = evaluate_dual_encoder(recipe, tmp_path, log=lambda *_: None)["metrics"]
    for when, which in (("before", "base"), ("after", "fine_tuned")):
        expected = summary["eval"]["base_to_new"][when]
        assert metrics["accuracy"][which] == expected["base"]
        assert metrics["accuracy_new"][which] == expected["new"]
        assert metrics["harmonic_mean"][which] == pytest.approx(expected["harmonic_mean"])


def test_peftvlm_eval_command_dispatches_clip_runs(runs, cli_in_process):
    recipe, run_dir = runs["vpt"]
    (run_dir / "recipe_copy.yaml").write_text(recipe.to_yaml())
    result = cli_in_process("eval", run_dir / "recipe_copy.yaml", "--run", run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{summary['eval']['accuracy']['after']:.4f}" in result.stdout


# --- export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["coop", "vpt", "clip_adapter"])
def test_adapter_export_reloads_with_the_runs_logits_and_accuracy(runs, method, tmp_path):
    from peftvlm.export import export_run

    _, run_dir = runs[method]
    report = export_run(run_dir, out=tmp_path / "out", log=lambda *_: None)
    assert report["passed"] and report["kind"] == "adapter"
    checks = report["checks"]
    assert checks["logits"]["max_abs_diff"] == 0
    assert checks["adapter_effect"]["max_abs_diff_from_base"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert checks["accuracy"]["accuracy"] == summary["eval"]["accuracy"]["after"]
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"peftvlm_method.json", "peftvlm_method.safetensors", "README.md",
            "export_report.json", "tokenizer_config.json"} <= names
    assert "load_method(model" in (tmp_path / "out" / "README.md").read_text()


def test_coop_merged_export_is_a_plain_linear_head_with_coop_logits(runs, tmp_path):
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoProcessor

    from peftvlm.export import export_run
    from peftvlm.families import get_family
    from peftvlm.methods.dual_encoder import load_method
    from test_clip_methods import pixels

    _, run_dir = runs["coop"]
    report = export_run(run_dir, merge=True, out=tmp_path / "merged", log=lambda *_: None)
    assert report["passed"] and report["kind"] == "merged"
    out = tmp_path / "merged"
    # What a user does: plain transformers + safetensors, nothing of peftvlm.
    clip = AutoModel.from_pretrained(out).eval()
    head = torch.nn.Linear(clip.config.projection_dim, 4, bias=False)
    head.load_state_dict(load_file(out / "class_head.safetensors"))
    assert json.loads((out / "class_head.json").read_text())["classnames"] == \
        report["classnames"]
    x = pixels(6)
    with torch.no_grad():
        head_logits = head(F.normalize(clip.get_image_features(pixel_values=x).pooler_output,
                                       dim=-1))
        coop = load_method(AutoModel.from_pretrained(out), get_family("clip"),
                           AutoProcessor.from_pretrained(out).tokenizer, run_dir / "adapter")
        coop_logits = coop(x)
    assert torch.allclose(head_logits, coop_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(head_logits.argmax(-1), coop_logits.argmax(-1))
    assert not torch.allclose(head_logits[:, :1], head_logits[:, 1:2])  # not a constant head


@pytest.mark.parametrize("method", ["vpt", "clip_adapter"])  # the adapter run adapts images too
def test_merge_is_refused_when_the_image_side_is_learned(runs, method, tmp_path):
    from peftvlm.errors import ExportError
    from peftvlm.export import export_run

    with pytest.raises(ExportError, match="learns the image side"):
        export_run(runs[method][1], merge=True, out=tmp_path / "m", log=lambda *_: None)


def test_cli_exports_a_clip_run(runs, tmp_path, cli_in_process):
    result = cli_in_process("export", runs["coop"][1], "--merge", "--out", tmp_path / "m")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "export ok" in result.stdout
    assert json.loads((tmp_path / "m" / "export_report.json").read_text())["passed"]
