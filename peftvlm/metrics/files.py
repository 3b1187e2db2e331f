"""Score a predictions JSONL file against a references JSONL file with named metrics.

    predictions.jsonl: {"id": "q1", "prediction": "two"}
    references.jsonl:  {"id": "q1", "references": ["2", "two", ...], "question_type": "number"}

Rows are matched by id (compared as strings, so 7 and "7" match). References are captions,
the 10 VQA answers, class labels, relevant ids (retrieval: the prediction is then a ranked
list) or boxes [x1, y1, x2, y2] (grounding; checked: NaN, negative, swapped or pixel
boxes are errors naming the line and field). COCO detection files (instances JSON + results
list) are scored with COCO mAP (`peftvlm.metrics.detection`). Every problem a user can
cause (missing file, bad JSON line, missing/duplicate/mismatched ids, unknown metric) is a
MetricsError naming it.

    peftvlm metrics --predictions preds.jsonl --references refs.jsonl --metrics bleu,cider_d
"""

from __future__ import annotations

import json
from pathlib import Path

from peftvlm.errors import MetricsError
from peftvlm.metrics import MetricInfo, MetricUnavailable, get_metrics
from peftvlm.metrics.detection import is_coco_instances, score_coco_files

_MAX_LISTED = 5


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file; blank lines are skipped, every other line must be a JSON object
    with the `required` keys. Errors name the file and the line number."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{path}: file not found")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MetricsError(f"{path} line {line_no}: not valid JSON ({exc.msg})",
                                   hint="each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise MetricsError(f"{path} line {line_no}: expected a JSON object, got "
                                   f"{type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise MetricsError(f"{path} line {line_no}: missing key(s) {', '.join(missing)}",
                                   hint=f"each row needs {', '.join(required)}")
            row["_line"] = line_no
            rows.append(row)
    if not rows:
        raise MetricsError(f"{path}: no rows")
    return rows


def _by_id(rows: list[dict], path: str | Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for row in rows:
        key = str(row["id"])
        if key in out:
            raise MetricsError(f"{path} line {row['_line']}: duplicate id {key!r} (first on "
                               f"line {out[key]['_line']})")
        out[key] = row
    return out


def _listed(ids: list[str]) -> str:
    more = f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else ""
    return ", ".join(repr(i) for i in ids[:_MAX_LISTED]) + more


def align(pred_rows: list[dict], ref_rows: list[dict], pred_path, ref_path
          ) -> list[tuple[dict, dict]]:
    """(prediction row, reference row) pairs in references order; any id present in only one
    file is an error listing those ids."""
    preds, refs = _by_id(pred_rows, pred_path), _by_id(ref_rows, ref_path)
    no_pred = [i for i in refs if i not in preds]
    no_ref = [i for i in preds if i not in refs]
    if no_pred or no_ref:
        parts = []
        if no_pred:
            parts.append(f"{len(no_pred)} id(s) in {ref_path} have no prediction: "
                         f"{_listed(no_pred)}")
        if no_ref:
            parts.append(f"{len(no_ref)} id(s) in {pred_path} have no reference: "
                         f"{_listed(no_ref)}")
        raise MetricsError("; ".join(parts), hint="both files must hold the same ids")
    return [(preds[i], refs[i]) for i in refs]


def _check_types(metric: MetricInfo, pairs: list[tuple[dict, dict]], pred_path, ref_path):
    for pred, ref in pairs:
        p = pred["prediction"]
        ok = {"text": isinstance(p, str), "ranking": isinstance(p, list),
              "labels": isinstance(p, (str, int, list))}.get(metric.prediction, True)
        if not ok:
            want = {"text": "a string", "ranking": "a ranked list of ids",
                    "labels": "a label or a ranked list of labels"}[metric.prediction]
            raise MetricsError(f"{pred_path} line {pred['_line']}: metric {metric.name} needs "
                               f"`prediction` to be {want}, got {type(p).__name__}")
        r = ref["references"]
        if not isinstance(r, list) or not r:
            raise MetricsError(f"{ref_path} line {ref['_line']}: `references` must be a "
                               "non-empty list")
        _check_references(metric, r, f"{ref_path} line {ref['_line']}")


def _check_references(metric: MetricInfo, refs: list, where: str) -> None:
    if metric.reference == "text" and not all(isinstance(x, str) for x in refs):
        raise MetricsError(f"{where}: metric {metric.name} needs `references` to be a list of "
                           "strings")
    if metric.reference == "boxes" and not all(isinstance(x, str) for x in refs):
        from peftvlm.metrics.grounding import reference_boxes

        reference_boxes(refs, f"{where}, field `references`")


def score_files(predictions_path: str | Path, references_path: str | Path,
                metric_names: list[str]) -> dict:
    """Score the files with each named metric. Returns
    `{"num_examples", "scores": {score name: value or None}, "notes": {...},
      "higher_is_better": {score name: bool}}`; a metric that cannot run here (SPICE
    offline) scores None with its reason in `notes`. A COCO instances JSON as references
    (with a COCO results list as predictions) is scored with COCO detection mAP."""
    if is_coco_instances(references_path):
        unknown = [n for n in metric_names if n not in ("coco_map", "detection_map")]
        if unknown:
            raise MetricsError(f"{references_path} is a COCO instances file: it is scored with "
                               f"COCO detection mAP, not {', '.join(unknown)}",
                               hint="leave out --metrics (or give coco_map)")
        return score_coco_files(references_path, predictions_path)
    if not metric_names:
        raise MetricsError("no metrics given", hint="e.g. --metrics vqa_accuracy,anls")
    metrics = get_metrics(list(metric_names))
    for m in metrics:
        if m.prediction == "model":
            raise MetricsError(f"metric {m.name} needs images and a model, not files",
                               hint=f"call {m.func.__module__}.{m.func.__name__} from Python")
    pairs = align(read_jsonl(predictions_path, ("id", "prediction")),
                  read_jsonl(references_path, ("id", "references")),
                  predictions_path, references_path)
    for m in metrics:
        _check_types(m, pairs, predictions_path, references_path)
    return score_predictions(metrics, [p["prediction"] for p, _ in pairs],
                             [r["references"] for _, r in pairs], [r for _, r in pairs])


def score_predictions(metrics: list[MetricInfo], predictions: list, references: list,
                      reference_rows: list[dict] | None = None) -> dict:
    """Score aligned lists with each metric (shared by files and `peftvlm eval`).

    `reference_rows` supply per-row extras such as `question_type`."""
    rows = reference_rows or [{} for _ in references]
    result = {"num_examples": len(predictions), "scores": {}, "notes": {},
              "higher_is_better": {}}
    prepared: dict = {}  # one prepare() pass (e.g. tokenisation) per family of metrics
    for m in metrics:
        preds, refs = predictions, references
        if m.prepare is not None:
            if m.prepare not in prepared:
                prepared[m.prepare] = m.prepare(predictions, references)
            preds, refs, note = prepared[m.prepare]
            if note:
                result["notes"][m.family] = note
        extras = {kw: [r.get(key) for r in rows] for key, kw in m.extras.items()
                  if any(key in r for r in rows)}
        _run_metric(m, preds, refs, extras, result)
    return result


def _run_metric(m: MetricInfo, preds: list, refs: list, extras: dict, result: dict) -> None:
    try:
        scores = m.func(preds, refs, **extras)
    except MetricUnavailable as exc:
        scores = {m.name: None}
        result["notes"][m.name] = f"unavailable: {exc.message}"
    result["scores"].update(scores)
    result["higher_is_better"].update({k: m.higher_is_better for k in scores})
    note = m.validity(preds, refs) if m.validity is not None else None
    if note:
        result["notes"][m.name] = note


def print_table(result: dict, console=None) -> None:
    """Print scores as a rich table, then any notes (tokenizer used, unavailable metrics)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"metrics over {result['num_examples']} examples")
    table.add_column("metric")
    table.add_column("score", justify="right")
    table.add_column("better", justify="center")
    for name, value in result["scores"].items():
        shown = "unavailable" if value is None else f"{value:.4f}"
        table.add_row(name, shown, "↑" if result["higher_is_better"][name] else "↓")
    console.print(table)
    for name, note in result["notes"].items():
        console.print(f"[dim]{name}: {note}[/dim]")
