"""VPT: Visual Prompt Tuning (Jia et al. 2022, ECCV, https://arxiv.org/abs/2203.12119), on a
CLIP-style vision transformer.

Learns `num_tokens` prompt vectors inserted between the CLS token and the patch tokens;
everything else stays frozen and in eval mode. Shallow: one set before the first layer
(num_tokens * d parameters); deep: one set per layer (layers * num_tokens * d), each replacing
the previous layer's prompt outputs. Initialised uniform(-v, v), v = sqrt(6 / (3 * patch_h *
patch_w + d)). Classes are scored against hand-written prompt features, as in zero-shot CLIP.
Config in `config.py` (torch-free), model in `model.py` (imported when applied).
"""

from __future__ import annotations

from peftvlm.methods.vpt.config import VptMethod  # noqa: F401
from peftvlm.registry import register


def apply_vpt(model, family, cfg: VptMethod, *, tokenizer, classnames, templates):
    """CLIP with VPT prompts in its vision encoder; only the prompts train."""
    from peftvlm.methods.vpt.model import VPTClassifier

    return VPTClassifier(model, family, cfg, tokenizer, classnames, templates)


register("vpt", VptMethod, "peftvlm.methods.vpt:apply_vpt", ("dual_encoder",),
         "VPT prompt tokens in CLIP's vision transformer, shallow or deep (Jia et al. 2022)")
