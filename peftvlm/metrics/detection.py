"""Object detection and segmentation scores: COCO mAP (the numbers pycocotools prints), mask
IoU and Dice.

COCO evaluation is implemented here in NumPy, step for step as `pycocotools.cocoeval.COCOeval`
does it (bbox IoU, crowd regions matched by intersection over the detection's area and
reusable, ground truth sorted unignored-first, greedy matching by score at each of the ten IoU
thresholds 0.50:0.05:0.95, detections matched to ignored ground truth or unmatched outside
the area range ignored, 101-point interpolated precision, area ranges all / small / medium /
large, maxDets 1 / 10 / 100), so that `peftvlm metrics` needs no compiled dependency; the tests
check it equals pycocotools 2.0.11 on a set with several classes, misses, duplicates and crowd.

- `coco_evaluate(gt, results)`: COCO dicts (instances JSON + results list) -> mAP, mAP50,
  mAP75, mAP_small / medium / large, AR1 / AR10 / AR100 and per-class AP (`AP/<name>`).
  A detection without `score` scores 1.0: ranked in file order (ties keep their order).
- `detection_map(predictions, references, box_format)`: the same over generated text, parsed
  with each family's box convention (labels are the classes, boxes in the convention's grid),
  with `detection_parse_rate`: the share of answers in which a box was found.
- `mask_iou`, `dice`, `read_mask` (PNG, or COCO RLE: compressed string or counts list).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from peftvlm.data.boxes import get_convention
from peftvlm.data.read.detection import is_no_objects
from peftvlm.errors import MetricsError
from peftvlm.metrics import mean, register

N_IOU = 10  # IoU thresholds 0.50:0.05:0.95, as np.linspace(.5, .95, 10) (COCOeval's values)
AREAS = {"all": (0.0, 1e10), "small": (0.0, 32.0 ** 2), "medium": (32.0 ** 2, 96.0 ** 2),
         "large": (96.0 ** 2, 1e10)}
MAX_DETS = (1, 10, 100)


# --- COCO bbox evaluation -------------------------------------------------------------------

def _iou_matrix(dts: list[dict], gts: list[dict]):
    """IoU of each detection (rows) with each ground truth (columns), boxes [x, y, w, h]; a
    crowd region's IoU is the intersection over the detection's area (pycocotools' maskUtils)."""
    import numpy as np

    if not dts or not gts:
        return np.zeros((len(dts), len(gts)))
    d = np.array([x["bbox"] for x in dts], dtype=float)
    g = np.array([x["bbox"] for x in gts], dtype=float)
    crowd = np.array([bool(x.get("iscrowd", 0)) for x in gts])
    iw = np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2]) - \
        np.maximum(d[:, None, 0], g[None, :, 0])
    ih = np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3]) - \
        np.maximum(d[:, None, 1], g[None, :, 1])
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    d_area, g_area = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd[None, :], d_area[:, None], d_area[:, None] + g_area[None, :] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _match_image(gts: list[dict], dts: list[dict], area: tuple[float, float], max_det: int):
    """One image x class x area range: which detections match (per IoU threshold), which are
    ignored, and the ground truth ignore flags (COCOeval.evaluateImg)."""
    import numpy as np

    ignore = [bool(g.get("iscrowd", 0)) or not area[0] <= g["area"] <= area[1] for g in gts]
    g_order = np.argsort(np.array(ignore, dtype=int), kind="mergesort")
    gts = [gts[i] for i in g_order]
    g_ignore = np.array([ignore[i] for i in g_order], dtype=bool)
    d_order = np.argsort([-d["score"] for d in dts], kind="mergesort")[:max_det]
    dts = [dts[i] for i in d_order]
    ious = _iou_matrix(dts, gts)
    crowd = [bool(g.get("iscrowd", 0)) for g in gts]
    T, G, D = N_IOU, len(gts), len(dts)
    g_matched = np.zeros((T, G), dtype=bool)
    d_matched = np.zeros((T, D), dtype=bool)
    d_ignore = np.zeros((T, D), dtype=bool)
    for t, threshold in enumerate(np.linspace(0.5, 0.95, N_IOU)):
        for di in range(D):
            best, m = min(threshold, 1 - 1e-10), -1
            for gi in range(G):
                if g_matched[t, gi] and not crowd[gi]:
                    continue
                if m > -1 and not g_ignore[m] and g_ignore[gi]:
                    break  # unignored ground truth come first; stop at the ignored ones
                if ious[di, gi] < best:
                    continue
                best, m = ious[di, gi], gi
            if m == -1:
                continue
            # COCOeval records the matched ground truth's id, and reads id 0 as "no match"
            d_ignore[t, di], d_matched[t, di] = g_ignore[m], gts[m]["id"] != 0
            g_matched[t, m] = True
    outside = np.array([not area[0] <= d["area"] <= area[1] for d in dts], dtype=bool)
    d_ignore |= ~d_matched & outside[None, :]
    scores = np.array([d["score"] for d in dts], dtype=float)
    return scores, d_matched, d_ignore, g_ignore


def _precision_recall(matches: list) -> tuple:
    """101-point interpolated precision (T x R) and final recall (T) over images' matches, or
    None when no ground truth counts (COCOeval.accumulate)."""
    import numpy as np

    if not matches:
        return None
    scores = np.concatenate([m[0] for m in matches])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([m[1] for m in matches], axis=1)[:, order]
    ignored = np.concatenate([m[2] for m in matches], axis=1)[:, order]
    n_gt = int(np.count_nonzero(~np.concatenate([m[3] for m in matches])))
    if n_gt == 0:
        return None
    tp = np.cumsum(matched & ~ignored, axis=1).astype(float)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    rec_thresholds = np.linspace(0.0, 1.00, 101)
    precision = np.zeros((N_IOU, 101))
    recall = np.zeros(N_IOU)
    for t in range(N_IOU):
        rc = tp[t] / n_gt
        pr = tp[t] / (fp[t] + tp[t] + np.spacing(1))
        recall[t] = rc[-1] if len(rc) else 0.0
        pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
        idx = np.searchsorted(rc, rec_thresholds, side="left")
        q = np.zeros(101)
        valid = idx < len(pr)
        q[valid] = pr[idx[valid]]
        precision[t] = q
    return precision, recall


def _index(items: list[dict]) -> dict:
    out: dict = {}
    for item in items:
        out.setdefault((item["image_id"], item["category_id"]), []).append(item)
    return out


def _with_area(anns: list[dict], results: bool) -> list[dict]:
    """Results get `area` = w * h as pycocotools' loadRes gives them; ground truth keeps its own
    `area` (the segment's, in COCO files) and falls back to w * h."""
    out = []
    for a in anns:
        w, h = a["bbox"][2], a["bbox"][3]
        area = w * h if results or "area" not in a else a["area"]
        out.append({**a, "area": float(area), "score": float(a.get("score", 1.0))})
    return out


def coco_evaluate(gt: dict, results: list[dict]) -> dict[str, float]:
    """COCO bbox evaluation of `results` against the instances dict `gt` (see module doc)."""
    import numpy as np

    image_ids = sorted({img["id"] for img in gt.get("images", [])})
    categories = {c["id"]: c.get("name", str(c["id"])) for c in gt.get("categories", [])}
    cat_ids = sorted(categories)
    gts = _index(_with_area(gt.get("annotations", []), results=False))
    dts = _index(_with_area(results, results=True))
    # precision[t, r, k, a, m] as COCOeval, -1 where a class has no ground truth counted
    precision = -np.ones((N_IOU, 101, len(cat_ids), len(AREAS), len(MAX_DETS)))
    recall = -np.ones((N_IOU, len(cat_ids), len(AREAS), len(MAX_DETS)))
    for k, cat in enumerate(cat_ids):
        for a, area in enumerate(AREAS.values()):
            per_image = {i: (gts.get((i, cat), []), dts.get((i, cat), [])) for i in image_ids}
            for m, max_det in enumerate(MAX_DETS):
                matches = [_match_image(g, d, area, max_det) for g, d in per_image.values()
                           if g or d]
                pr = _precision_recall(matches)
                if pr is not None:
                    precision[:, :, k, a, m], recall[:, k, a, m] = pr
    return _summary(precision, recall, [categories[c] for c in cat_ids])


def _mean_valid(values) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def _summary(precision, recall, names: list[str]) -> dict[str, float]:
    """The COCO summary numbers (-1 where nothing counts, as pycocotools prints) and per-class
    AP@[.5:.95] (all areas, 100 detections) for each class with ground truth."""
    all_, last = 0, len(MAX_DETS) - 1
    out = {"mAP": _mean_valid(precision[:, :, :, all_, last]),
           "mAP50": _mean_valid(precision[0, :, :, all_, last]),
           "mAP75": _mean_valid(precision[5, :, :, all_, last])}
    for a, name in enumerate(AREAS):
        if name != "all":
            out[f"mAP_{name}"] = _mean_valid(precision[:, :, :, a, last])
    for m, max_det in enumerate(MAX_DETS):
        out[f"AR{max_det}"] = _mean_valid(recall[:, :, all_, m])
    for k, name in enumerate(names):
        ap = _mean_valid(precision[:, :, k, all_, last])
        if ap > -1:
            out[f"AP/{name}"] = ap
    return out


# --- files -----------------------------------------------------------------------------------

def is_coco_instances(path: str | Path) -> bool:
    """Whether `path` is a COCO instances JSON (an object with images and annotations)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "annotations" in data and "images" in data


def _load_json(path: Path):
    if not path.is_file():
        raise MetricsError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MetricsError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _check_bbox(ann, where: str) -> None:
    box = ann.get("bbox") if isinstance(ann, dict) else None
    if not (isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise MetricsError(f"{where}: `bbox` {box!r} is not [x, y, width, height]",
                           hint="COCO boxes are [x, y, w, h] in pixels")
    if not all(math.isfinite(v) for v in box):
        raise MetricsError(f"{where}: `bbox` {box} has a NaN or infinite value")
    if box[2] < 0 or box[3] < 0:
        raise MetricsError(f"{where}: `bbox` {box} has a negative width or height",
                           hint="COCO boxes are [x, y, w, h], not [x1, y1, x2, y2]")
    for key in ("image_id", "category_id"):
        if key not in ann:
            raise MetricsError(f"{where}: missing `{key}`")


def read_coco_files(gt_path: str | Path, results_path: str | Path) -> tuple[dict, list[dict]]:
    """The ground truth instances and the results list, checked; errors name the file, the
    entry and the field."""
    gt_path, results_path = Path(gt_path), Path(results_path)
    gt = _load_json(gt_path)
    if not isinstance(gt, dict) or not {"images", "annotations", "categories"} <= set(gt):
        raise MetricsError(f"{gt_path}: not a COCO instances file",
                           hint="needs `images`, `annotations` and `categories`")
    for i, ann in enumerate(gt["annotations"]):
        _check_bbox(ann, f"{gt_path} annotations[{i}]")
    results = _load_json(results_path)
    if isinstance(results, dict) and "annotations" in results:
        results = results["annotations"]
    if not isinstance(results, list):
        raise MetricsError(f"{results_path}: expected a JSON list of detections",
                           hint='[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]')
    images = {img["id"] for img in gt["images"]}
    for i, det in enumerate(results):
        _check_bbox(det, f"{results_path} [{i}]")
        if det["image_id"] not in images:
            raise MetricsError(f"{results_path} [{i}]: image_id {det['image_id']!r} is not in "
                               f"{gt_path}", hint="results must be for the ground truth's images")
        score = det.get("score", 1.0)
        if not isinstance(score, (int, float)) or not math.isfinite(score):
            raise MetricsError(f"{results_path} [{i}]: `score` {score!r} is not a finite number")
    return gt, results


def score_coco_files(gt_path: str | Path, results_path: str | Path) -> dict:
    """`peftvlm metrics` on COCO files: the result shape `score_files` returns."""
    gt, results = read_coco_files(gt_path, results_path)
    scores = coco_evaluate(gt, results)
    notes = {}
    if any("score" not in d for d in results):
        notes["coco_map"] = "detections without `score` count as 1.0, ranked in file order"
    return {"num_examples": len(gt["images"]), "scores": scores, "notes": notes,
            "higher_is_better": {k: True for k in scores}}


# --- detection from generated text -----------------------------------------------------------

def _text_objects(text: str, convention, where: str | None) -> list:
    objects = convention.parse(text) if convention else []
    if where is not None and not objects and not is_no_objects(text):
        raise MetricsError(f"{where}: reference {text!r} holds no box in the "
                           f"{convention.name if convention else '(none given)'} box convention",
                           hint="detection references are the family's answer text")
    return objects


def detection_map(predictions: list[str], references: list[list],
                  box_format: list[str | None] | None = None,
                  crowd: list[str | None] | None = None) -> dict[str, float]:
    """COCO mAP over generated answers: each answer's labelled boxes (family convention) are
    detections scored 1.0 in answer order; the reference answer's boxes the ground truth. Boxes
    are compared in the convention's grid (area ranges are not reported: no pixel sizes).
    `crowd` (per row, the detection template's crowd regions as text) adds iscrowd ground
    truth; a reference that is the template's empty answer (`NO_OBJECTS`) has no ground truth."""
    formats = box_format or [None] * len(predictions)
    crowds = crowd or [None] * len(predictions)
    conventions = [get_convention(fmt or "norm1") for fmt in formats]
    gt = {"images": [{"id": i + 1} for i in range(len(predictions))], "annotations": []}
    names: dict[str, int] = {}  # class name -> id, from the references of every row
    for i, (refs, convention) in enumerate(zip(references, conventions)):
        for ref in refs:
            for label, box in _text_objects(str(ref), convention, f"row {i + 1}"):
                cat = names.setdefault(label or "object", len(names) + 1)
                gt["annotations"].append(_coco_ann(len(gt["annotations"]) + 1, i + 1, cat, box))
        for label, box in _text_objects(crowds[i], convention, None) if crowds[i] else ():
            cat = names.setdefault(label or "object", len(names) + 1)
            gt["annotations"].append({**_coco_ann(len(gt["annotations"]) + 1, i + 1, cat, box),
                                      "iscrowd": 1})
    results, parsed = [], []
    for i, (text, convention) in enumerate(zip(predictions, conventions)):
        found = _text_objects(text, convention, None)
        parsed.append(float(bool(found)))
        # a class no reference has cannot be scored (COCO evaluates the ground truth's classes)
        results += [_coco_ann(0, i + 1, names[label or "object"], box)
                    for label, box in found if (label or "object") in names]
    gt["categories"] = [{"id": c, "name": n} for n, c in names.items()]
    scores = coco_evaluate(gt, results)
    out = {"detection_mAP": scores["mAP"], "detection_mAP50": scores["mAP50"],
           "detection_mAP75": scores["mAP75"], "detection_parse_rate": mean(parsed)}
    out.update({k: v for k, v in scores.items() if k.startswith("AP/")})
    return out


def _coco_ann(ann_id: int, image_id: int, cat: int, box) -> dict:
    x1, y1, x2, y2 = box
    return {"id": ann_id, "image_id": image_id, "category_id": cat,
            "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0}


# --- segmentation masks ----------------------------------------------------------------------

def rle_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' `rleFrString`)."""
    runs, p = [], 0
    data = counts.encode("ascii") if isinstance(counts, str) else counts
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def decode_rle(rle: dict):
    """A COCO RLE (`{"size": [h, w], "counts": str | list}`) -> a bool mask (h, w)."""
    import numpy as np

    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = rle_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(runs) != h * w or any(r < 0 for r in runs):
        raise MetricsError(f"RLE counts cover {sum(runs)} pixels, not {h}x{w}",
                           hint="check the mask's `size` ([height, width]) and `counts`")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True  # runs alternate background, foreground, starting with background
    return np.repeat(values, runs).reshape((w, h)).T  # column-major, as COCO stores masks


def read_mask(value, base_dir: Path | None = None):
    """A mask from a PNG path (non-zero = foreground), a COCO RLE dict or a 2-D array."""
    import numpy as np

    if isinstance(value, dict):
        try:
            return decode_rle(value)
        except (KeyError, TypeError, ValueError) as exc:
            raise MetricsError(f"mask {str(value)[:60]!r} is not a COCO RLE ({exc})",
                               hint='RLE masks are {"size": [h, w], "counts": ...}') from None
    if isinstance(value, (str, Path)):
        from PIL import Image

        path = Path(value) if base_dir is None else Path(base_dir) / value
        if not path.is_file():
            raise MetricsError(f"mask file {path} not found")
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) > 0
    return np.asarray(value).astype(bool)


def mask_iou(pred, ref) -> float:
    """Intersection over union of two masks of one size (two empty masks: 1.0)."""
    import numpy as np

    pred, ref = _same_shape(pred, ref)
    union = np.logical_or(pred, ref).sum()
    return float(np.logical_and(pred, ref).sum() / union) if union else 1.0


def dice(pred, ref) -> float:
    """Dice coefficient 2|A∩B| / (|A| + |B|) (two empty masks: 1.0)."""
    import numpy as np

    pred, ref = _same_shape(pred, ref)
    total = pred.sum() + ref.sum()
    return float(2 * np.logical_and(pred, ref).sum() / total) if total else 1.0


def _same_shape(pred, ref):
    import numpy as np

    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise MetricsError(f"masks differ in size: prediction {pred.shape}, reference "
                           f"{ref.shape}", hint="score masks at the reference's resolution")
    return pred, ref


def segmentation_scores(predictions: list, references: list[list]) -> dict[str, float]:
    """Mean mask IoU and Dice over rows (each reference list holds one mask)."""
    ious, dices = [], []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not refs:
            raise MetricsError(f"row {i + 1}: no reference mask")
        p, r = read_mask(pred), read_mask(refs[0])
        ious.append(mask_iou(p, r))
        dices.append(dice(p, r))
    return {"mask_iou": mean(ious), "dice": mean(dices)}


register("detection_map", detection_map, higher_is_better=True,
         extras={"box_format": "box_format", "crowd": "crowd"},
         summary="COCO mAP@[.5:.95] / 50 / 75 of labelled boxes in answers (family convention), "
                 "per-class AP, parse rate")
register("mask_iou", segmentation_scores, higher_is_better=True, prediction="masks",
         reference="masks",
         summary="mean mask IoU and Dice (masks as PNG paths or COCO RLE)")
