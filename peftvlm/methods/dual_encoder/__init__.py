"""What the CLIP-family methods (CoOp, VPT, CLIP-Adapter) share: a frozen dual encoder turned
into a classifier over class names, hand-written prompt features, and save/load (`base`).

Each method is one package, `peftvlm.methods.<name>`: `config.py` (its recipe config, no
torch), `model.py` (its classifier, imported when the method is applied), and `__init__.py`
(one `register(...)` line).
"""

from peftvlm.methods.dual_encoder.base import (
    DualEncoderClassifier,
    load_method,
    prompt_text_features,
    save_method,
)

__all__ = ["DualEncoderClassifier", "load_method", "prompt_text_features", "save_method"]
