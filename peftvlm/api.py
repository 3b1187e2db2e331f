"""The top-level flows: validate, train, evaluate, export. Kind-agnostic: each asks the run's
kind (`peftvlm.kinds.kind_for`) to do its stage, so this file reads top to bottom in one screen.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.checkpoints import check_resume_recipe
from peftvlm.kinds import kind_for
from peftvlm.recipe.load import load_recipe
from peftvlm.recipe.schema import Recipe
from peftvlm.runs import claimed_run_dir, default_run_dir


def validate(paths: list[str], overrides: list[str] | None = None) -> list[Recipe]:
    """Check recipes without importing torch: schema, methods, files they name."""
    return [load_recipe(p, overrides) for p in paths]


def train(recipe: Recipe, output_dir: str | Path | None = None, *, resume: bool = False,
          overwrite: bool = False, dry_run: bool = False, log=print, callbacks=()) -> dict:
    """Train the recipe's method on its data; return the run summary (also in summary.json).
    With `dry_run`, load and show what would train, and write no run folder."""
    if dry_run:
        return checked_kind(recipe).dry_run(recipe, log)
    run_dir = Path(output_dir) if output_dir else default_run_dir(recipe)
    with claimed_run_dir(run_dir, resume, overwrite, log):  # refusals before anything loads
        if resume and not overwrite:
            check_resume_recipe(recipe, run_dir)
        return checked_kind(recipe).fit(recipe, run_dir, resume=resume, overwrite=overwrite,
                                        log=log, callbacks=callbacks)


def checked_kind(recipe: Recipe):
    """The recipe's kind, once it has refused what it cannot train (reads the model config)."""
    kind = kind_for(recipe)
    kind.check(recipe)
    return kind


def evaluate(recipe: Recipe, run_dir: str | Path, *, split: str = "test",
             max_samples: int | None = None, with_base: bool = True, log=print) -> dict:
    """Score a finished run's base and fine-tuned model on a split; writes RUN/eval/."""
    # lazy, as export below: every command imports this module (`validate` must not start
    # torch), and the evaluation and export stages import it at their top
    from peftvlm.eval.run import evaluate_run

    return evaluate_run(recipe, run_dir, split, max_samples, with_base, log)


def export(run_dir: str | Path, **options) -> dict:
    """Export a finished run (`peftvlm.export.export_run`'s options); returns the report."""
    from peftvlm.export import export_run

    return export_run(run_dir, **options)
