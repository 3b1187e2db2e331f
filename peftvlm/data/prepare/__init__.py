"""Preparing a recipe's data for training: every source read, rendered, checked and counted
into a cached Arrow table with token lengths (`loading.py`, `shards.py`, `table.py`,
`lengths.py`); CLIP-score filtering (`filter.py`, `filtered.py`); image-caption pairs for
dual encoders (`pairs.py`). Imports `data.read`, `data.render` and the leaves."""
