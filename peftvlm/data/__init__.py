"""Data: sources, synthetic offline tasks, templates, and the training collator."""
