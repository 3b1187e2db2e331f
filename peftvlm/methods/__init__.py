"""One module per PEFT method; each registers itself in `peftvlm.registry`."""
