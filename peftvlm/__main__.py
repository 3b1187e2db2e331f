"""`python -m peftvlm` (and `accelerate launch -m peftvlm train ...`)."""

from peftvlm.cli import main

main()
