"""Streamed training data: sources read as `datasets.IterableDataset`s (`sources.py`) and rows
rendered as training reads them, with a resumable position (`streaming.py`). Builds on
`data.prepare` for the per-source settings; nothing below imports it."""
