"""The recipe config of clip_adapter (pydantic, no torch: the recipe schema imports it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftvlm._schema import Section


class ClipAdapterMethod(Section):
    """Residual feature adapters on CLIP's image and/or text features (CLIP-Adapter)."""

    name: Literal["clip_adapter"] = "clip_adapter"
    reduction: int = Field(4, ge=1, description="Bottleneck reduction r: hidden width d / r.")
    alpha: float = Field(0.2, ge=0, le=1, description="Residual ratio: weight of the adapted "
                                                      "feature (0 = zero-shot CLIP).")
    side: Literal["image", "text", "both"] = Field("image", description="Which features to "
                                                   "adapt (the paper's default: image).")
