"""Batches: rows -> model inputs whose labels carry loss only on the replies (`collate.py`),
padding-free packing and length grouping (`packing.py`), mixed text/image batches across
processes (`mixed.py`) and the highlighted previews of `peftvlm data preview` (`preview.py`)."""
