"""The torch side of the CLIP-family methods (CoOp, VPT, CLIP-Adapter).

Their recipe configs live in `peftvlm.methods.coop`, `.vpt` and `.clip_adapter`, which must
stay torch-free at import (the recipe schema imports them); the modules here are imported only
when a method is applied. `base` holds what they share: a frozen dual encoder turned into a
classifier over class names, hand-written prompt features, and save/load.
"""

from peftvlm.methods.dual_encoder.base import (
    DualEncoderClassifier,
    load_method,
    prompt_text_features,
    save_method,
)

__all__ = ["DualEncoderClassifier", "load_method", "prompt_text_features", "save_method"]
