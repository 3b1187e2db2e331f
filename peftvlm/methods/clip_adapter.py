"""CLIP-Adapter (Gao et al. 2021, IJCV 2023, https://arxiv.org/abs/2110.04544).

A small bottleneck MLP on CLIP's projected features, blended residually with the frozen
feature: f* = alpha * A(f) + (1 - alpha) * f. Trainable parameters: 2 * d * d / r per adapted
side (no biases), d = CLIP's joint embedding width. alpha = 0 is zero-shot CLIP exactly.
The implementation is in `peftvlm.methods.dual_encoder.clip_adapter`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftvlm._schema import Section
from peftvlm.registry import register


class ClipAdapterMethod(Section):
    """Residual feature adapters on CLIP's image and/or text features (CLIP-Adapter)."""

    name: Literal["clip_adapter"] = "clip_adapter"
    reduction: int = Field(4, ge=1, description="Bottleneck reduction r: hidden width d / r.")
    alpha: float = Field(0.2, ge=0, le=1, description="Residual ratio: weight of the adapted "
                                                      "feature (0 = zero-shot CLIP).")
    side: Literal["image", "text", "both"] = Field("image", description="Which features to "
                                                   "adapt (the paper's default: image).")


def apply_clip_adapter(model, family, cfg: ClipAdapterMethod, *, tokenizer, classnames,
                       templates):
    """CLIP with residual feature adapters; only the adapters train."""
    from peftvlm.methods.dual_encoder.clip_adapter import ClipAdapterClassifier

    return ClipAdapterClassifier(model, family, cfg, tokenizer, classnames, templates)


def export_adapter(run_dir, adapter_dir, out_dir, merge: bool) -> dict:
    """`peftvlm export` hook: adapters + loader; --merge (text side only): a fixed linear head
    (see `peftvlm.methods.dual_encoder.export`)."""
    from peftvlm.methods.dual_encoder.export import export_dual_encoder

    return export_dual_encoder(run_dir, adapter_dir, out_dir, merge)


register("clip_adapter", ClipAdapterMethod, "peftvlm.methods.clip_adapter:apply_clip_adapter",
         ("dual_encoder",), "CLIP-Adapter residual bottleneck adapters on CLIP features "
                            "(Gao et al. 2021)")
