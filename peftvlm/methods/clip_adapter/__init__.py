"""CLIP-Adapter (Gao et al. 2021, IJCV 2023, https://arxiv.org/abs/2110.04544).

A small bottleneck MLP on CLIP's projected features, blended residually with the frozen
feature: f* = alpha * A(f) + (1 - alpha) * f. Trainable parameters: 2 * d * d / r per adapted
side (no biases), d = CLIP's joint embedding width. alpha = 0 is zero-shot CLIP exactly.
Config in `config.py` (torch-free), model in `model.py` (imported when applied).
"""

from __future__ import annotations

from peftvlm.methods.clip_adapter.config import ClipAdapterMethod  # noqa: F401
from peftvlm.registry import register


def apply_clip_adapter(model, family, cfg: ClipAdapterMethod, *, tokenizer, classnames,
                       templates):
    """CLIP with residual feature adapters; only the adapters train."""
    from peftvlm.methods.clip_adapter.model import ClipAdapterClassifier

    return ClipAdapterClassifier(model, family, cfg, tokenizer, classnames, templates)


register("clip_adapter", ClipAdapterMethod, "peftvlm.methods.clip_adapter:apply_clip_adapter",
         ("dual_encoder",), "CLIP-Adapter residual bottleneck adapters on CLIP features "
                            "(Gao et al. 2021)")
