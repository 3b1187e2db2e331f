"""peftvlm: parameter-efficient fine-tuning of vision-language models from one YAML recipe.

Run `peftvlm --help`. The top-level flow lives in `peftvlm.api`.
"""

__version__ = "0.1.0"
