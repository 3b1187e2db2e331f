"""The recipe config of vpt (pydantic, no torch: the recipe schema imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftvlm._schema import Section


class VptMethod(Section):
    """Prompt tokens in the vision transformer (VPT)."""

    name: Literal["vpt"] = "vpt"
    num_tokens: int = Field(5, ge=1, description="Prompt tokens per set.")
    deep: bool = Field(False, description="VPT-deep: a fresh prompt set before every layer; "
                                          "false = VPT-shallow: one set before the first layer.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the prompt vectors (VPT's "
                                                        "configs default to 0.0; 0.1 is common).")
