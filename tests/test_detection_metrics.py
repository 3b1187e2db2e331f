"""COCO detection mAP equals pycocotools on a non-trivial set (several classes, misses,
duplicates, crowd regions, all area ranges, unscored detections); detection from generated
answers with a parse rate; mask IoU / Dice from PNG and COCO RLE; `peftvlm metrics` on COCO
files; named errors for bad files."""

from __future__ import annotations

import contextlib
import io
import json
import random

import numpy as np
import pytest

from peftvlm.data.boxes import get_convention
from peftvlm.errors import MetricsError
from peftvlm.metrics.detection import (coco_evaluate, decode_rle, detection_map, dice,
                                       mask_iou, read_mask, score_coco_files, segmentation_scores)

pycocotools = pytest.importorskip("pycocotools")
CLASSES = ["person", "car", "dog", "cup"]


def _box(rng, size):
    w, h = rng.uniform(4, size / 2), rng.uniform(4, size / 2)
    return [round(rng.uniform(0, size - w), 1), round(rng.uniform(0, size - h), 1),
            round(w, 1), round(h, 1)]


def _jitter(rng, box, amount):
    x, y, w, h = box
    return [x + rng.uniform(-amount, amount) * w, y + rng.uniform(-amount, amount) * h,
            w * rng.uniform(1 - amount, 1 + amount), h * rng.uniform(1 - amount, 1 + amount)]


def coco_set(seed: int = 0, images: int = 12):
    """Ground truth with crowd regions and every area range; detections with hits of varied
    quality, duplicates, misses (ground truth left undetected), false positives, a class with no
    ground truth, and tied scores."""
    rng = random.Random(seed)
    gt = {"images": [], "annotations": [],
          "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    results = []
    for image_id in range(1, images + 1):
        size = rng.choice([64, 200, 640])
        gt["images"].append({"id": image_id, "width": size, "height": size})
        for _ in range(rng.randint(0, 5)):
            box, cat = _box(rng, size), rng.randint(1, 3)  # "cup" (4) never in ground truth
            crowd = int(rng.random() < 0.1)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id,
                                      "category_id": cat, "bbox": box, "iscrowd": crowd,
                                      "area": box[2] * box[3] * rng.uniform(0.6, 1.0)})
            if rng.random() < 0.25:
                continue  # a miss
            for _ in range(1 + (rng.random() < 0.3)):  # sometimes a duplicate
                results.append({"image_id": image_id, "category_id": cat,
                                "bbox": _jitter(rng, box, rng.choice([0.02, 0.1, 0.3])),
                                "score": round(rng.choice([rng.random(), 0.5]), 3)})
        for _ in range(rng.randint(0, 3)):  # false positives, some of an unseen class
            results.append({"image_id": image_id, "category_id": rng.randint(1, 4),
                            "bbox": _box(rng, size), "score": round(rng.random(), 3)})
    return gt, results


def pycoco(gt: dict, results: list[dict]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt))
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{**r, "score": r.get("score", 1.0)} for r in results])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _per_class(ev, k):
    p = ev.eval["precision"][:, :, k, 0, -1]
    return float(p[p > -1].mean()) if (p > -1).any() else None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_map_equals_pycocotools(seed):
    gt, results = coco_set(seed)
    assert any(a["iscrowd"] for a in gt["annotations"])
    ours, ev = coco_evaluate(gt, results), pycoco(gt, results)
    names = ["mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR1", "AR10",
             "AR100"]
    for name, value in zip(names, ev.stats):
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    for k, cat in enumerate(ev.params.catIds):
        expected = _per_class(ev, k)
        name = f"AP/{CLASSES[cat - 1]}"
        assert (ours.get(name) is None) if expected is None else \
            ours[name] == pytest.approx(expected, abs=1e-12)
    assert "AP/cup" not in ours  # no ground truth: not a class COCO scores
    assert 0.05 < ours["mAP"] < 0.95  # non-trivial


def test_unscored_detections_count_as_one_in_file_order():
    gt, results = coco_set(3)
    unscored = [{k: v for k, v in r.items() if k != "score"} for r in results]
    ours, ev = coco_evaluate(gt, unscored), pycoco(gt, unscored)
    assert ours["mAP"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert ours["mAP"] != pytest.approx(coco_evaluate(gt, results)["mAP"])


def test_detection_map_over_answers_with_a_parse_rate():
    conv = get_convention("qwen3_vl")
    refs = [[conv.write([("dog", (10, 10, 50, 50)), ("cat", (60, 60, 90, 90))], 100, 100)],
            [conv.write([("dog", (0, 0, 40, 40))], 100, 100)]]
    perfect = [r[0] for r in refs]
    out = detection_map(perfect, refs, ["qwen3_vl"] * 2)
    assert out["detection_mAP"] == pytest.approx(1.0) and out["detection_parse_rate"] == 1.0
    half = [conv.write([("dog", (10, 10, 50, 50))], 100, 100), "I see no dog"]
    out = detection_map(half, refs, ["qwen3_vl"] * 2)
    assert out["detection_parse_rate"] == 0.5
    assert out["AP/dog"] == pytest.approx(pycoco(*_as_coco(half, refs, conv)).stats[0])
    assert out["AP/cat"] == 0.0
    with pytest.raises(MetricsError, match="row 2: reference 'none' holds no box"):
        detection_map(half, [refs[0], ["none"]], ["qwen3_vl"] * 2)


def _as_coco(preds, refs, conv):
    names, gt, res = {"dog": 1, "cat": 2}, {"images": [{"id": 1}, {"id": 2}], "annotations": [],
                                            "categories": [{"id": 1}, {"id": 2}]}, []
    for i, (p, r) in enumerate(zip(preds, refs)):
        for label, (x1, y1, x2, y2) in conv.parse(r[0]):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1,
                                      "category_id": names[label], "iscrowd": 0,
                                      "bbox": [x1, y1, x2 - x1, y2 - y1],
                                      "area": (x2 - x1) * (y2 - y1)})
        res += [{"image_id": i + 1, "category_id": names[label], "score": 1.0,
                 "bbox": [x1, y1, x2 - x1, y2 - y1]} for label, (x1, y1, x2, y2) in conv.parse(p)]
    gt["categories"] = [{"id": 1}]  # dog only: its AP alone
    return gt, res


def test_mask_iou_and_dice_from_png_and_rle(tmp_path):
    from PIL import Image
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    ref = np.zeros((30, 40), dtype=bool)
    ref[5:20, 10:30] = True
    pred = np.zeros_like(ref)
    pred[10:25, 10:30] = True
    assert mask_iou(pred, ref) == pytest.approx(200 / 400)
    assert dice(pred, ref) == pytest.approx(2 * 200 / 600)
    noisy = rng.random((30, 40)) > 0.6
    for m in (ref, noisy):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        assert (decode_rle(rle) == m).all()  # compressed counts, as pycocotools writes them
        assert (decode_rle({"size": [30, 40], "counts": _runs(m)}) == m).all()  # counts list
    Image.fromarray(pred.astype(np.uint8) * 255).save(tmp_path / "p.png")
    rle = mask_utils.encode(np.asfortranarray(ref.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    out = segmentation_scores([str(tmp_path / "p.png")], [[rle]])
    assert out == {"mask_iou": pytest.approx(0.5), "dice": pytest.approx(2 / 3)}
    with pytest.raises(MetricsError, match="masks differ in size"):
        mask_iou(read_mask(str(tmp_path / "p.png")), np.zeros((3, 3)))
    with pytest.raises(MetricsError, match="RLE counts cover 5 pixels, not 30x40"):
        decode_rle({"size": [30, 40], "counts": [2, 3]})


def _runs(mask):
    flat = mask.T.reshape(-1).astype(int)
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    return runs + [n]


def test_cli_metrics_reads_coco_files(tmp_path, cli):
    gt, results = coco_set(0)
    (tmp_path / "instances.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = cli("metrics", "--references", tmp_path / "instances.json", "--predictions",
              tmp_path / "results.json", "--json")
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout)["scores"]
    assert scores["mAP"] == pytest.approx(pycoco(gt, results).stats[0], abs=1e-9)
    assert {"mAP50", "mAP75", "AP/person", "AP/car", "AP/dog"} <= set(scores)


@pytest.mark.parametrize("mutate, message", [
    (lambda gt, res: res.append({"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1]}),
     r"results.json \[\d+\]: image_id 999 is not in"),
    (lambda gt, res: res[0].update(bbox=[0, 0, float("nan"), 3]), r"\[0\]: `bbox` .* NaN"),
    (lambda gt, res: gt["annotations"][0].update(bbox=[10, 10, -5, 3]),
     r"annotations\[0\]: `bbox` .* negative width"),
    (lambda gt, res: res[1].update(score="high"), r"\[1\]: `score` 'high' is not a finite"),
])
def test_bad_coco_files_are_named_errors(tmp_path, mutate, message):
    gt, results = coco_set(0)
    mutate(gt, results)
    (tmp_path / "instances.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(MetricsError, match=message):
        score_coco_files(tmp_path / "instances.json", tmp_path / "results.json")


def test_metrics_files_score_masks(tmp_path):
    from pycocotools import mask as mask_utils

    from peftvlm.metrics.files import score_files

    def rle(m):
        out = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        return {"size": [int(v) for v in out["size"]], "counts": out["counts"].decode()}

    ref = np.zeros((8, 8), dtype=bool)
    ref[:4] = True
    pred = np.zeros_like(ref)
    pred[:2] = True
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": 1, "prediction": rle(pred)}) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": 1, "references": [rle(ref)]}) + "\n")
    scores = score_files(tmp_path / "p.jsonl", tmp_path / "r.jsonl", ["mask_iou"])["scores"]
    assert scores == {"mask_iou": pytest.approx(0.5), "dice": pytest.approx(2 / 3)}
