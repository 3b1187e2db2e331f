"""The data stage, by layer (each imports only the layers above it in this list, never below):

- `rows.py`, `boxes.py`: leaf types (bad rows and their report; box geometry and conventions)
- `read/`: sources and their layouts -> records (row formats, annotation readers, THE image
  decoder, video, synthetic and fixture data)
- `render/`: records -> conversations (data templates) -> training text and reply spans (the
  checkpoint's chat template, rendered once per conversation shape)
- `prepare/`: a recipe's sources -> checked, cached Arrow tables with token lengths; CLIP-score
  filtering; image-caption pairs
- `stream/`: the same rows read as a stream, for data that does not fit at once
- `batch/`: rows -> model inputs (collation with assistant-only labels, packing, mixed batches,
  previews)
- `pipeline.py` (the data stage's entry for training) and `report.py` (`peftvlm data preview /
  stats`) sit on top; `self_instruct/` generates data with a model.
"""
