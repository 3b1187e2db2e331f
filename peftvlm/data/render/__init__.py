"""Rendering: data templates turn annotation records into conversations (`templates.py`); the
checkpoint's chat template turns conversations into training text and the spans that carry
loss (`chat_template.py`, `shapes.py`). Imports `data.read` and the leaves, nothing above."""
