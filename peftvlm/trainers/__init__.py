"""Trainers: TRL's SFTTrainer for generative VLMs, a readable loop for CLIP-family methods."""
