"""CoOp: Context Optimization (Zhou et al. 2022, IJCV, https://arxiv.org/abs/2109.01134).

Learns M context vectors that replace the hand-written words of a prompt such as
"a photo of a {class}."; the whole CLIP model stays frozen. Trainable parameters: n_ctx * d
(unified context) or n_cls * n_ctx * d (class-specific context, `csc`), d = the text
encoder's width. Config in `config.py` (torch-free), model in `model.py` (imported when applied).

`optim_preset: paper` trains with the paper's optimisation (SGD, lr 0.002, momentum 0.9,
weight decay 5e-4, cosine schedule, one warm-up epoch at a constant 1e-5, batch 32) instead of
the recipe's `train` optimiser settings.
"""

from __future__ import annotations

from peftvlm.methods.coop.config import CoopMethod, PAPER_OPTIM  # noqa: F401
from peftvlm.registry import register


def apply_coop(model, family, cfg: CoopMethod, *, tokenizer, classnames, templates):
    """CLIP with CoOp context over `classnames`; only the context trains."""
    from peftvlm.methods.coop.model import CoOpClassifier

    return CoOpClassifier(model, family, cfg, tokenizer, classnames, templates)


register("coop", CoopMethod, "peftvlm.methods.coop:apply_coop", ("dual_encoder",),
         "CoOp learnable prompt context for CLIP's text encoder (Zhou et al. 2022)")
