"""VPT: Visual Prompt Tuning (Jia et al. 2022, ECCV, https://arxiv.org/abs/2203.12119), on a
CLIP-style vision transformer.

Learns `num_tokens` prompt vectors inserted between the CLS token and the patch tokens;
everything else stays frozen and in eval mode. Shallow: one set before the first layer
(num_tokens * d parameters); deep: one set per layer (layers * num_tokens * d), each replacing
the previous layer's prompt outputs. Initialised uniform(-v, v), v = sqrt(6 / (3 * patch_h *
patch_w + d)). Classes are scored against hand-written prompt features, as in zero-shot CLIP.
The implementation is in `peftvlm.methods.dual_encoder.vpt`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftvlm._schema import Section
from peftvlm.registry import register


class VptMethod(Section):
    """Prompt tokens in the vision transformer (VPT)."""

    name: Literal["vpt"] = "vpt"
    num_tokens: int = Field(5, ge=1, description="Prompt tokens per set.")
    deep: bool = Field(False, description="VPT-deep: a fresh prompt set before every layer; "
                                          "false = VPT-shallow: one set before the first layer.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the prompt vectors (VPT's "
                                                        "configs default to 0.0; 0.1 is common).")


def apply_vpt(model, family, cfg: VptMethod, *, tokenizer, classnames, templates):
    """CLIP with VPT prompts in its vision encoder; only the prompts train."""
    from peftvlm.methods.dual_encoder.vpt import VPTClassifier

    return VPTClassifier(model, family, cfg, tokenizer, classnames, templates)


def export_adapter(run_dir, adapter_dir, out_dir, merge: bool) -> dict:
    """`peftvlm export` hook: learned prompts + loader (merging is refused: VPT changes the
    image side; see `peftvlm.methods.dual_encoder.export`)."""
    from peftvlm.methods.dual_encoder.export import export_dual_encoder

    return export_dual_encoder(run_dir, adapter_dir, out_dir, merge)


register("vpt", VptMethod, "peftvlm.methods.vpt:apply_vpt", ("dual_encoder",),
         "VPT prompt tokens in CLIP's vision transformer, shallow or deep (Jia et al. 2022)")
