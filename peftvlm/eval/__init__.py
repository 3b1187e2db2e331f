"""Evaluation: `run.py` scores a finished run (the base and the tuned model, `peftvlm eval`),
`generate.py` answers held-out rows and scores them with `peftvlm.metrics` (also during
training), `report.py` writes RUN/eval/ (metrics, predictions, per-class tables, plots).
The scoring of each run kind lives with its kind (`peftvlm.kinds`)."""
