"""Tests for peftvlm.metrics: hand-computed values for every metric, the official VQA
normalisation quirks, agreement with pycocoevalcap, and `peftvlm metrics` through its real
entry point (`python -m peftvlm metrics ...`, via conftest's `cli` fixture)."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peftvlm.errors import MetricsError
from peftvlm.metrics import available_metrics, get_metric, get_metrics
from peftvlm.metrics import captioning, classification, grounding, retrieval, vqa
from peftvlm.metrics.files import score_files

REPO = Path(__file__).resolve().parent.parent
HAS_JAVA = shutil.which("java") is not None


# ---------------------------------------------------------------- registry

def test_registry_lists_every_family_with_direction_and_summary():
    metrics = available_metrics()
    assert {"vqa_accuracy", "exact_match", "anls", "bleu", "cider_d", "rouge_l", "meteor",
            "spice", "top1_accuracy", "top5_accuracy", "per_class_accuracy", "recall", "mrr",
            "map", "ndcg", "grounding_accuracy", "clipscore"} <= set(metrics)
    assert all(m.summary and m.higher_is_better for m in metrics.values())


def test_unknown_metrics_are_named_together():
    with pytest.raises(MetricsError, match="unknown metric.*: foo, bar"):
        get_metrics(["bleu", "foo", "bar"])
    assert get_metric("vqa_accuracy").func(["Two"], [["2"] * 10]) == {"vqa_accuracy": 1.0}


def test_importing_metrics_does_not_import_torch():
    code = ("import sys, peftvlm.metrics as m; m.available_metrics(); "
            "import peftvlm.metrics.files; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- VQA normalisation

@pytest.mark.parametrize("text, expected", [
    ("yes.", "yes"),                 # period not before a digit is removed
    ("2.5", "2.5"),                  # ... but kept before a digit
    ("a.b", "ab"),                   # removed, not spaced
    ("1,000", "1000"),               # digit,digit anywhere -> every mark is deleted
    ("black/white", "black white"),  # a mark not touching a space becomes a space
    ("black / white", "black  white"),  # touching a space: deleted (double space stays)
    ("hi!?", "hi  "),
    ("." * 40, "." * 8),             # re.UNICODE passed as count: at most 32 periods go
])
def test_official_punctuation_step(text, expected):
    assert vqa.process_punctuation(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Two Dogs", "2 dogs"), ("none", "0"), ("a dog", "dog"), ("The  An apple", "apple"),
    ("dont", "don't"), ("Im", "im"),  # "Im" is in the official map but lower-casing hides it
    ("ten", "10"), ("eleven", "eleven"),
])
def test_official_digit_article_step(text, expected):
    assert vqa.process_digit_article(text) == expected


def test_prediction_is_always_normalised_answers_only_when_they_disagree():
    assert vqa.vqa_question_accuracy("Two.\n", ["2"] * 10) == 1.0
    # unanimous answers are compared raw: "Yes" is not "yes"
    assert vqa.vqa_question_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa.vqa_question_accuracy("dog.", ["dog."] * 10) == 0.0  # prediction becomes "dog"
    assert vqa.vqa_question_accuracy("dog.", ["dog."] * 9 + ["cat"]) == 1.0
    # disagreeing answers get the punctuation step only (official quirk): "black  white"
    # (double space) never equals the prediction's "black white"
    assert vqa.vqa_question_accuracy("black / white", ["black / white"] * 5 + ["x"] * 5) == 0.0
    assert vqa.vqa_question_accuracy("black/white", ["black/white"] * 5 + ["x"] * 5) == 1.0


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0), (1, 0.3),   # 9 answers see 1 match (1/3); the matching one sees 0
    (2, 0.6),             # (2 * 1/3 + 8 * 2/3) / 10
    (3, 0.9),             # (3 * 2/3 + 7 * 1) / 10
    (4, 1.0), (10, 1.0),
])
def test_vqa_leave_one_out_averaging(matches, expected):
    answers = ["cat"] * matches + ["dog", "cow", "pig", "hen", "owl", "ant", "bee", "elk",
                                   "emu", "yak"][:10 - matches]
    assert vqa.vqa_question_accuracy("cat", answers) == pytest.approx(expected)


def _literal_official_loop(prediction: str, answers: list[str]) -> float:
    """The official evaluation loop written out with explicit answer records (each has its
    own id, so "the other answers" are the other 9 records, duplicates included)."""
    records = [{"answer_id": i, "answer": a} for i, a in enumerate(answers)]
    pred = vqa.normalize_answer(prediction)
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = vqa.process_punctuation(r["answer"])
    accs = []
    for gt in records:
        others = [r for r in records if r != gt]
        accs.append(min(1, len([r for r in others if r["answer"] == pred]) / 3))
    return sum(accs) / len(accs)


def test_vqa_accuracy_equals_the_literal_official_loop_on_random_cases():
    rng = random.Random(0)
    pool = ["2", "two", "yes", "no", "red", "the red", "1,000", "1000", "3.5", "dog."]
    for _ in range(300):
        answers = rng.choices(pool, k=10)
        pred = rng.choice(pool)
        assert vqa.vqa_question_accuracy(pred, answers) == pytest.approx(
            _literal_official_loop(pred, answers))


def test_vqa_accuracy_breaks_down_by_question_type():
    out = vqa.vqa_accuracy(["yes", "2", "red"], [["yes"] * 10, ["3"] * 10, ["red"] * 10],
                           question_types=["yes/no", "number", "other"])
    assert out == {"vqa_accuracy": pytest.approx(2 / 3), "vqa_accuracy/number": 0.0,
                   "vqa_accuracy/other": 1.0, "vqa_accuracy/yes/no": 1.0}


def test_exact_match_normalises_both_sides():
    out = vqa.exact_match(["Two", "the cat!", "dog"], [["2"], ["cat", "kitten"], ["cow"]])
    assert out == {"exact_match": pytest.approx(2 / 3)}


# ---------------------------------------------------------------- ANLS

@pytest.mark.parametrize("pred, answers, expected", [
    ("hello", ["helo"], 0.8),               # 1 edit / 5 chars
    ("Hello  World ", ["hello world"], 1.0),  # case and whitespace ignored
    ("abcd", ["abxy"], 0.0),                 # NL = 0.5 is not < 0.5
    ("abcde", ["zzzzz", "abxde"], 0.8),      # best answer counts
    ("abc", ["xyz"], 0.0),
])
def test_anls_worked_examples(pred, answers, expected):
    assert vqa.anls_score(pred, answers) == pytest.approx(expected)


def test_anls_corpus_mean():
    assert vqa.anls(["hello", "abc"], [["helo"], ["abc"]])["anls"] == pytest.approx(0.9)
    assert vqa.levenshtein("kitten", "sitting") == 3


# ---------------------------------------------------------------- captioning: hand-computed

def test_bleu_hand_computed():
    same = captioning.bleu(["a b c d"], [["a b c d", "x y"]])
    assert all(v == pytest.approx(1.0) for v in same.values())
    short = captioning.bleu(["a b"], [["a b c d"]])  # precisions 1, brevity exp(1 - 4/2)
    assert short["bleu_1"] == pytest.approx(math.exp(-1))
    assert short["bleu_2"] == pytest.approx(math.exp(-1))


def test_cider_d_hand_computed():
    # two images: image 0 is matched exactly, image 1 not at all. Every n-gram occurs in one
    # image (idf log 2), orders 3-4 have no n-grams, so image 0 = (1 + 1 + 0 + 0) / 4 * 10.
    per_image = captioning.cider_d_per_image(["a b", "x y"], [["a b"], ["c d"]])
    assert per_image == pytest.approx([5.0, 0.0])
    # a length gap of 2 (bigram counts 3 vs 1) costs exp(-4 / 72) on every order
    longer = captioning.cider_d_per_image(["a b c d", "x"], [["a b", "c d"], ["x"]])
    assert longer[1] > 0 and longer[0] < 10


def test_caption_scorers_reject_misaligned_inputs():
    with pytest.raises(MetricsError, match="1 empty"):
        captioning.cider_d(["a", "b"], [["a"], []])
    with pytest.raises(MetricsError, match="2 predictions, 1 reference"):
        captioning.bleu(["a", "b"], [["a"]])


def test_rouge_l_hand_computed():
    p, r = 2 / 3, 2 / 4  # LCS("a b c", "a c d e") = 2
    expected = (1 + 1.2 ** 2) * p * r / (r + 1.2 ** 2 * p)
    assert captioning.rouge_l(["a b c"], [["a c d e"]])["rouge_l"] == pytest.approx(expected)


# ---------------------------------------------------------------- captioning: pycocoevalcap

def _caption_set(seed: int = 1, images: int = 40):
    rng = random.Random(seed)
    subjects = ["a man", "a woman", "two dogs", "a cat", "the child", "a red bus", "people"]
    verbs = ["riding", "sitting on", "standing next to", "looking at", "holding", "near"]
    objects = ["a horse", "a bench", "the beach", "a table", "a red car", "the street", "grass"]
    extra = ["", "in the park", "at night", "on a sunny day", "with a dog", "."]

    def caption():
        return " ".join(w for w in (rng.choice(subjects), rng.choice(verbs),
                                    rng.choice(objects), rng.choice(extra)) if w)
    refs = [[caption() for _ in range(rng.randint(1, 5))] for _ in range(images)]
    preds = [caption() for _ in range(images)]
    preds[0], preds[1], preds[2] = "", "dog", refs[2][0]  # empty, one word, exact copy
    preds[3] = "a a a a a man man"                         # repeated n-grams get clipped
    return captioning.tokenize(preds, refs)[:2]


def _coco(preds, refs):
    return {i: r for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)}


def test_bleu_equals_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu

    preds, refs = _caption_set()
    ours = captioning.bleu(preds, refs)
    theirs, _ = Bleu(4).compute_score(*_coco(preds, refs), verbose=0)
    assert [ours[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx(theirs, abs=1e-6)


def test_cider_d_equals_pycocoevalcap_per_image():
    from pycocoevalcap.cider.cider import Cider

    preds, refs = _caption_set()
    corpus, per_image = Cider().compute_score(*_coco(preds, refs))
    assert captioning.cider_d_per_image(preds, refs) == pytest.approx(list(per_image), abs=1e-6)
    assert captioning.cider_d(preds, refs)["cider_d"] == pytest.approx(corpus, abs=1e-6)


@pytest.mark.parametrize("preds, refs", [
    (["", ""], [["a b"], ["c"]]),                                  # empty candidates
    (["a"], [["a b c"]]),                                          # one image: idf is 0
    (["a b c", "x"], [["", "a b"], ["x", "x x x"]]),               # empty reference
    (["the the the", "a b c d e f"], [["the cat"], ["a b c d e f", "f e d c b a"]]),
])
def test_caption_edge_cases_equal_pycocoevalcap(preds, refs):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco(preds, refs)
    assert list(captioning.bleu(preds, refs).values()) == pytest.approx(
        Bleu(4).compute_score(gts, res, verbose=0)[0], abs=1e-9)
    assert captioning.cider_d_per_image(preds, refs) == pytest.approx(
        list(Cider().compute_score(gts, res)[1]), abs=1e-9)
    assert captioning.rouge_l_per_image(preds, refs) == pytest.approx(
        list(Rouge().compute_score(gts, res)[1]), abs=1e-9)


@pytest.mark.parametrize("preds", [["a b", "c"], ["", ""]])
def test_only_empty_references(preds):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    refs = [[""], [""]]
    # pycocoevalcap's Cider raises here (max() of no document frequencies); we score 0
    assert captioning.cider_d_per_image(preds, refs) == [0.0, 0.0]
    gts, res = _coco(preds, refs)
    assert captioning.rouge_l_per_image(preds, refs) == pytest.approx(
        list(Rouge().compute_score(gts, res)[1]))  # "" vs "" is 1.0 there (one empty token)
    assert list(captioning.bleu(preds, refs).values()) == pytest.approx(
        Bleu(4).compute_score(gts, res, verbose=0)[0], abs=1e-12)


def test_rouge_l_equals_pycocoevalcap_per_image():
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = _caption_set()
    corpus, per_image = Rouge().compute_score(*_coco(preds, refs))
    assert captioning.rouge_l_per_image(preds, refs) == pytest.approx(list(per_image), abs=1e-6)
    assert captioning.rouge_l(preds, refs)["rouge_l"] == pytest.approx(corpus, abs=1e-6)


def test_bench_script_runs_and_checks_agreement():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_metrics.py"),
                          "--images", "60"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "CIDEr-D" in out.stdout and "speed-up" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAVA, reason="METEOR needs java")
def test_meteor_ranks_a_copy_above_an_unrelated_caption():
    refs = [["a man riding a horse on the beach", "a person rides a horse"]] * 2
    corpus, per_image = captioning.meteor_per_image(
        ["a man riding a horse on the beach", "two cats sleeping on a sofa"], refs)
    assert per_image[0] > 0.9 and per_image[1] < 0.2
    assert min(per_image) < corpus < max(per_image)


# ---------------------------------------------------------------- captioning: tokenizer

@pytest.mark.parametrize("text, expected", [
    ("A man riding a horse.", "a man riding a horse"),
    ("It's a dog's life, isn't it?", "it 's a dog 's life is n't it"),
    ("Two (red) cars; 3.5 m", "two -lrb- red -rrb- cars 3.5 m"),  # pycocoevalcap keeps -lrb-
    ("Mr. Smith cannot go -- now...", "mr. smith can not go now"),
])
def test_python_tokenizer_mimics_ptb(text, expected):
    assert captioning.python_ptb_tokenize(text) == expected


@pytest.mark.skipif(not HAS_JAVA, reason="compares against the Java PTBTokenizer")
def test_python_tokenizer_agrees_with_java_on_coco_like_captions():
    sentences = ["A man riding a horse on the beach.", "Two dogs' toys (red) and blue!",
                 "The cat isn't on the mat...", "A black-and-white photo of 3.5 people.",
                 "He said: don't do it -- now?", "A U.S. flag at 10:30 p.m.", "", "  x  "]
    java, _, note = captioning.tokenize(sentences, [])
    assert "java" in note
    assert [captioning.python_ptb_tokenize(s) for s in sentences] == java


def test_tokenizer_falls_back_to_python_without_java(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    preds, refs, note = captioning.tokenize(["A dog."], [["The dog!", "a Dog"]])
    assert (preds, refs) == (["a dog"], [["the dog", "a dog"]])
    assert "fallback" in note and "java not found" in note


def test_spice_reports_unavailable_with_reason(tmp_path):
    reason = captioning.spice_unavailable_reason()
    if reason is None:
        pytest.skip("SPICE's CoreNLP models are installed here")
    preds, refs = _write(tmp_path, [{"id": 1, "prediction": "a dog"}],
                         [{"id": 1, "references": ["a dog"]}])
    result = score_files(preds, refs, ["spice", "bleu"])
    assert result["scores"]["spice"] is None
    note = result["notes"]["spice"]
    assert note.startswith("unavailable: ") and reason in note
    assert result["scores"]["bleu_1"] == pytest.approx(1.0)


# ---------------------------------------------------------------- classification

def test_top_k_and_per_class_accuracy():
    preds = [["cat", "dog"], "Dog ", ["cow", "pig", "hen", "owl", "ant", "cat"], "cat"]
    refs = [["cat"], ["dog"], ["cat"], ["dog"]]
    assert classification.top1_accuracy(preds, refs) == {"top1_accuracy": 0.5}
    assert classification.top5_accuracy(preds, refs) == {"top5_accuracy": 0.5}  # 6th is late
    assert classification.per_class_accuracy(preds, refs) == {
        "per_class_accuracy": 0.5, "per_class_accuracy/cat": 0.5, "per_class_accuracy/dog": 0.5}
    unbalanced = classification.per_class_accuracy(["a", "a", "a", "a"],
                                                   [["a"], ["a"], ["a"], ["b"]])
    assert unbalanced["per_class_accuracy"] == 0.5  # mean of 1.0 and 0.0, not 0.75


# ---------------------------------------------------------------- retrieval

def test_ranking_metrics_worked_example():
    ranking, relevant = [3, 1, 2, 4], [1, 2]
    assert retrieval.best_rank(ranking, relevant) == 2
    assert retrieval.average_precision(ranking, relevant) == pytest.approx((1 / 2 + 2 / 3) / 2)
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    assert retrieval.ndcg_at_k(ranking, relevant) == pytest.approx(dcg / (1 + 1 / math.log2(3)))
    assert retrieval.average_precision([1, 9], [1, 2]) == pytest.approx(0.5)  # 2 never found


def test_ranking_metrics_over_queries():
    preds = [[3, 1, 2], [5, 6, 7], list(range(20, 32))]
    refs = [[1, 2], [5], [31]]  # best ranks 2, 1, 12 (missed at 10)
    assert retrieval.recall(preds, refs) == {"recall@1": pytest.approx(1 / 3),
                                             "recall@5": pytest.approx(2 / 3),
                                             "recall@10": pytest.approx(2 / 3)}
    assert retrieval.mrr(preds, refs)["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 12) / 3)


def test_cross_modal_recall_both_directions():
    # 2 images x 4 texts; texts 0,1 describe image 0, texts 2,3 image 1
    sim = [[0.9, 0.1, 0.5, 0.2],
           [0.8, 0.3, 0.4, 0.7]]
    out = retrieval.cross_modal_recall(sim, [0, 0, 1, 1], ks=(1, 2))
    # image 0: best own text ranks 1; image 1: own texts rank 2 (0.7) -> R@1 0.5, R@2 1
    assert out["image_to_text_recall@1"] == 0.5 and out["image_to_text_recall@2"] == 1.0
    # texts: t0 -> img0 rank 1; t1 -> img0 rank 2; t2 -> img1 rank 2; t3 -> img1 rank 1
    assert out["text_to_image_recall@1"] == 0.5 and out["text_to_image_recall@2"] == 1.0
    assert out["rsum"] == pytest.approx(300.0)


# ---------------------------------------------------------------- grounding

@pytest.mark.parametrize("text, box", [
    ("The dog is at [0.1, 0.2, 0.5, 0.6].", (0.1, 0.2, 0.5, 0.6)),
    ("<|box_start|>(100,200),(500,600)<|box_end|>", (0.1, 0.2, 0.5, 0.6)),
    ("(10, 20), (30, 40) then [0.1, 0.2, 0.3, 0.4]", (0.01, 0.02, 0.03, 0.04)),  # first wins
    ("[12, 30, 80, 90]", None),  # bracketed boxes must be normalised 0-1
    ("[12, 30, 80, 90] or rather [0.5, 0.5, 1, 1]", (0.5, 0.5, 1.0, 1.0)),
    ("no box here", None),
])
def test_parse_box(text, box):
    parsed = grounding.parse_box(text)
    assert parsed == (pytest.approx(box) if box else None)


def test_box_iou_and_accuracy():
    assert grounding.box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert grounding.box_iou((0, 0, 0.5, 1), (0.25, 0, 0.75, 1)) == pytest.approx(1 / 3)
    assert grounding.box_iou((0, 0, 0.1, 0.1), (0.5, 0.5, 1, 1)) == 0.0
    out = grounding.grounding_accuracy(
        ["[0, 0, 0.5, 1]", "(0,0),(500,1000)", "nothing"],
        [[0, 0, 0.5, 1], [[0.25, 0, 0.75, 1], [0, 0, 0.5, 0.9]], [0, 0, 1, 1]])
    assert out == {"grounding_accuracy": pytest.approx(2 / 3),
                   "mean_iou": pytest.approx((1 + 0.9) / 3),
                   "box_parse_rate": pytest.approx(2 / 3)}


# ---------------------------------------------------------------- CLIPScore

def test_clipscore_and_refclipscore_match_the_model_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    from peftvlm.families._tokenizer import build_tiny_tokenizer
    from peftvlm.metrics.clipscore import PREFIX, clip_score

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tok)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    images = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    captions, refs = ["a red square", "blue", "green grass"], [["red"], ["a blue box", "sky"],
                                                               ["grass"]]
    images[2].save(tmp_path / "green.png")  # paths are accepted too
    scores = clip_score(model, processor, images[:2] + [tmp_path / "green.png"], captions, refs,
                        batch_size=2)

    def embed(texts):
        batch = processor(text=[PREFIX + t for t in texts], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(**batch, pixel_values=processor(images=images,
                                                        return_tensors="pt")["pixel_values"])
        return out.image_embeds, out.text_embeds  # both L2-normalised by CLIPModel

    img, cap = embed(captions)
    clip = [2.5 * max(float(img[i] @ cap[i]), 0.0) for i in range(3)]
    ref_cos = [max(float(cap[i] @ embed([r])[1][0]) for r in refs[i]) for i in range(3)]
    ref_clip = [2 * c * r / (c + r) if c + r else 0.0 for c, r in zip(clip, ref_cos)]
    assert scores["clipscore"] == pytest.approx(sum(clip) / 3, abs=1e-5)
    assert scores["refclipscore"] == pytest.approx(sum(ref_clip) / 3, abs=1e-5)


# ---------------------------------------------------------------- files

def _write(tmp_path, preds, refs, raw_preds: str | None = None):
    p, r = tmp_path / "preds.jsonl", tmp_path / "refs.jsonl"
    p.write_text(raw_preds if raw_preds is not None
                 else "".join(json.dumps(x) + "\n" for x in preds))
    r.write_text("".join(json.dumps(x) + "\n" for x in refs))
    return p, r


VQA_REFS = [{"id": 1, "references": ["2"] * 9 + ["two"], "question_type": "number"},
            {"id": "q2", "references": ["yes"] * 10, "question_type": "yes/no"}]


def test_score_files_matches_ids_and_uses_question_types(tmp_path):
    preds = [{"id": "q2", "prediction": "no"}, {"id": "1", "prediction": "Two"}]
    result = score_files(*_write(tmp_path, preds, VQA_REFS), ["vqa_accuracy", "anls"])
    assert result["num_examples"] == 2
    assert result["scores"]["vqa_accuracy"] == 0.5
    assert result["scores"]["vqa_accuracy/number"] == 1.0
    assert result["scores"]["vqa_accuracy/yes/no"] == 0.0
    assert result["higher_is_better"]["anls"] is True


def test_score_files_retrieval_and_grounding_rows(tmp_path):
    preds = [{"id": 1, "prediction": [4, 2, 9]}, {"id": 2, "prediction": "[0, 0, 0.5, 1]"}]
    refs = [{"id": 1, "references": [2]}, {"id": 2, "references": [0, 0, 0.5, 1]}]
    p, r = _write(tmp_path, preds[:1], refs[:1])
    assert score_files(p, r, ["mrr"])["scores"] == {"mrr": 0.5}
    p, r = _write(tmp_path, preds[1:], refs[1:])
    assert score_files(p, r, ["grounding_accuracy"])["scores"]["grounding_accuracy"] == 1.0


@pytest.mark.parametrize("preds, refs, raw, message", [
    ([{"id": 1, "prediction": "2"}], VQA_REFS, None, r"id\(s\) in .*refs.jsonl have no "
                                                     r"prediction: 'q2'"),
    ([{"id": 1, "prediction": "2"}, {"id": "q2", "prediction": "yes"},
      {"id": 7, "prediction": "x"}], VQA_REFS, None, r"have no reference: '7'"),
    (None, VQA_REFS, '{"id": 1, "prediction": "2"}\n{"id": "q2", "pred', r"preds.jsonl line 2: "
                                                                         "not valid JSON"),
    (None, VQA_REFS, '{"id": 1, "prediction": "2"}\n\n{"id": "q2"}\n', r"line 3: missing key"),
    ([{"id": 1, "prediction": "2"}, {"id": 1, "prediction": "3"}], VQA_REFS, None,
     r"line 2: duplicate id '1' \(first on line 1\)"),
    ([{"id": 1, "prediction": 2}, {"id": "q2", "prediction": "yes"}], VQA_REFS, None,
     r"line 1: metric vqa_accuracy needs `prediction` to be a string"),
])
def test_score_files_errors_name_the_problem(tmp_path, preds, refs, raw, message):
    with pytest.raises(MetricsError, match=message):
        score_files(*_write(tmp_path, preds, refs, raw), ["vqa_accuracy"])


def test_score_files_rejects_model_metrics_and_empty_lists(tmp_path):
    paths = _write(tmp_path, [{"id": 1, "prediction": "2"}], VQA_REFS[:1])
    with pytest.raises(MetricsError, match="clipscore needs images and a model"):
        score_files(*paths, ["clipscore"])
    with pytest.raises(MetricsError, match="no metrics given"):
        score_files(*paths, [])


def test_captioning_metrics_share_one_tokenisation(tmp_path, monkeypatch):
    calls = []
    real = captioning.tokenize
    monkeypatch.setattr(captioning, "tokenize", lambda p, r: calls.append(1) or real(p, r))
    preds = [{"id": i, "prediction": "A dog runs."} for i in range(3)]
    refs = [{"id": i, "references": ["a dog runs", "the dog is running"]} for i in range(3)]
    result = score_files(*_write(tmp_path, preds, refs), ["bleu", "cider_d", "rouge_l"])
    assert result["scores"]["bleu_1"] == pytest.approx(1.0)
    assert result["scores"]["rouge_l"] == pytest.approx(1.0)
    assert calls == [1]
    assert list(result["notes"]) == ["captioning"] and "tokenizer" in result["notes"]["captioning"]


# ---------------------------------------------------------------- CLI (real entry point)

def test_cli_metrics_json_and_table(tmp_path, cli):
    p, r = _write(tmp_path, [{"id": 1, "prediction": "2"}, {"id": "q2", "prediction": "yes"}],
                  VQA_REFS)
    out = cli("metrics", "--predictions", p, "--references", r, "--metrics",
                  "vqa_accuracy,exact_match", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["scores"]["vqa_accuracy"] == 1.0
    table = cli("metrics", "-p", p, "-r", r, "-m", "anls")
    assert table.returncode == 0 and "anls" in table.stdout and "1.0000" in table.stdout


@pytest.mark.parametrize("preds, raw, metrics, message", [
    (None, '{"id": 1, "prediction": "2"}\nnot json\n', "vqa_accuracy",
     "preds.jsonl line 2: not valid JSON"),
    ([{"id": 1, "prediction": "2"}, {"id": "zz", "prediction": "yes"}], None, "vqa_accuracy",
     "have no prediction: 'q2'"),
    ([{"id": 1, "prediction": "2"}, {"id": "q2", "prediction": "yes"}], None, "vqa,blue",
     "unknown metric(s): vqa, blue"),
])
def test_cli_metrics_errors_exit_2_with_one_message(tmp_path, cli_in_process, preds, raw,
                                                   metrics, message):
    p, r = _write(tmp_path, preds, VQA_REFS, raw)  # main() in-process; the entry point: above
    out = cli_in_process("metrics", "--predictions", p, "--references", r, "--metrics", metrics)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_cli_ls_metrics_lists_registry(cli):
    out = cli("ls", "metrics")
    assert out.returncode == 0
    assert all(name in out.stdout for name in ("vqa_accuracy", "cider_d", "ndcg", "clipscore"))
