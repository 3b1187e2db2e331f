"""Where `peftvlm data filter` keeps its output, as recipes read it: the filter's settings
(command line over `data.filter` over defaults) and the kept pairs as a training source.
Below both the filter (which writes them) and the loaders (which read them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peftvlm.errors import DataError, RecipeError
from peftvlm.recipe.schema import SourceConfig


@dataclass
class FilterSettings:
    min_score: float
    model_id: str
    batch_size: int
    out_dir: Path


def settings(recipe, clipscore: float | None = None, model: str | None = None,
             batch_size: int | None = None, output: str | None = None) -> FilterSettings:
    """Command-line values over the recipe's `data.filter`, over the defaults."""
    cfg = recipe.data.filter
    min_score = clipscore if clipscore is not None else cfg and cfg.clipscore
    if min_score is None:
        raise RecipeError(f"{recipe.source_path}: no CLIPScore threshold",
                          hint="pass --clipscore MIN (e.g. 0.7) or set data.filter.clipscore")
    out = output or (cfg and cfg.output) or str(Path("runs") / f"{recipe.name}-filtered")
    return FilterSettings(float(min_score), model or (cfg and cfg.model) or recipe.model.id,
                          batch_size or (cfg.batch_size if cfg else 64), Path(out))


def unfiltered(recipe):
    """The recipe as written, without `data.filter` (so its own train sources are read)."""
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"filter": None})})


def filtered_sources(recipe) -> list:
    """The kept pairs as the training source of a recipe with `data.filter`."""
    s = settings(recipe)
    report_file = s.out_dir / "report.json"
    rerun = f"run `peftvlm data filter {recipe.source_path or 'RECIPE'}` first"
    if not report_file.exists():
        raise DataError(f"data.filter: {s.out_dir} holds no filtered pairs yet", hint=rerun)
    report = json.loads(report_file.read_text())
    if report["min_score"] != s.min_score or report["model"] != s.model_id:
        raise DataError(f"data.filter: {s.out_dir} was filtered at {report['min_score']} with "
                        f"{report['model']}, the recipe asks {s.min_score} with {s.model_id}",
                        hint=rerun + " (scores are reused: only the kept set is rewritten)")
    return [SourceConfig(path=str((s.out_dir / "kept.jsonl").resolve()),
                         image_root=report["image_root"], template="caption")]
