"""Evaluation states its own validity: VQA accuracy with fewer than 10 answers says so (and
falls back to exact match where leave-one-out is degenerate); a held-out section without one
usable row is an error naming why, not a run that silently reports no metrics."""

from __future__ import annotations

import json

import pytest

from peftvlm.data.prepare.loading import load_rows
from peftvlm.errors import DataError
from peftvlm.metrics import get_metrics
from peftvlm.metrics.files import score_predictions
from peftvlm.recipe.load import validate_recipe_dict
from test_train_run import tiny_recipe, write_image


def test_vqa_accuracy_with_one_reference_is_flagged_and_not_zero():
    result = score_predictions(get_metrics(["vqa_accuracy"]), ["red"], [["red"]])
    assert result["scores"]["vqa_accuracy"] == 1.0  # leave-one-out alone would say 0.0
    note = result["notes"]["vqa_accuracy"]
    assert "1 of 1 rows have fewer than 10 reference answers (fewest: 1)" in note
    assert "scored as exact match" in note and "not comparable" in note


def test_vqa_accuracy_with_ten_answers_has_no_note_and_five_use_the_official_formula():
    ten = score_predictions(get_metrics(["vqa_accuracy"]), ["2"], [["2"] * 10])
    assert ten["scores"]["vqa_accuracy"] == 1.0 and ten["notes"] == {}
    five = score_predictions(get_metrics(["vqa_accuracy"]), ["cat"],
                             [["cat", "cat", "dog", "dog", "dog"]])
    assert five["scores"]["vqa_accuracy"] == pytest.approx((2 * 1 / 3 + 3 * 2 / 3) / 5)
    assert "1 row(s) with the official formula" in five["notes"]["vqa_accuracy"]


def test_a_held_out_section_without_usable_rows_is_an_error_naming_reasons(tmp_path):
    write_image(tmp_path / "ok.png")

    def row(image, answer):
        return json.dumps({"images": [image], "messages": [
            {"role": "user", "content": "What color?"}, {"role": "assistant", "content": answer}]})

    (tmp_path / "train.jsonl").write_text(row("ok.png", "red") + "\n")
    (tmp_path / "test.jsonl").write_text(row("gone.png", "red") + "\n" + row("ok.png", " ") + "\n")
    recipe = validate_recipe_dict(tiny_recipe(data={
        "synthetic": None, "train": str(tmp_path / "train.jsonl"),
        "eval": str(tmp_path / "test.jsonl")}))
    with pytest.raises(DataError, match=r"data\.eval: no usable held-out rows \(1 missing image "
                                        r"\(e\.g\. test\.jsonl:1.*1 empty answer"):
        load_rows(recipe)
