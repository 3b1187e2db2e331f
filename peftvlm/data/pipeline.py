"""The data stage's entry: a recipe's rows as training reads them, prepared ahead (Arrow
tables, `loading.prepare_rows`) or streamed as training goes (`streaming.prepare_streaming`).
It sits above both, so neither imports the other."""

from __future__ import annotations

from peftvlm.data.prepare.loading import PreparedData, prepare_rows
from peftvlm.data.stream.streaming import StreamedData, prepare_streaming


def prepare_data(recipe, collator) -> PreparedData | StreamedData:
    """Load, check and length-filter the recipe's rows; bad rows never crash training later."""
    if recipe.data.streams():
        return prepare_streaming(recipe, collator)
    return prepare_rows(recipe, collator)
