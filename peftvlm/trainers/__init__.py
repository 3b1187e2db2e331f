"""Training loops: `sft` (TRL, generative VLMs) and `clip` (CLIP-family methods)."""
