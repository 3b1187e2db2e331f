"""The loss head TRL's `SFTTrainer` calls, for families its fused LM head cannot run on.

Since TRL 1.16, `SFTTrainer` patches the model's forward (`trl.trainer.utils.add_fused_lm_head`)
so that `model(..., fused_lm_head=True)` runs `model.base_model` for the hidden states and
projects them through the LM head in tiles, returning per-token log-probabilities instead of
logits. A family whose `base_model` is not a backbone with a `last_hidden_state` (BLIP-2:
`FamilySpec.unfused_lm_head` says why) crashes at step 0 there. `use_logits_head` keeps TRL's
contract (the same `FusedCausalLMOutput` fields TRL's loss and metrics read) but derives them
from the model's own forward and its full logits: more memory, the same loss.

`fit_fused_head` fits TRL's head to a device without Triton (CPU): narrower vocabulary chunks
than TRL's 32,768 (sized for its Triton kernel) and our in-place tile folds (`cpu_fold`).
"""

from __future__ import annotations

import types

from peftvlm.memory import FUSED_VOCAB_TILE
from peftvlm.trainers.cpu_fold import use_cpu_folds

_TRL_VOCAB_TILE: int | None = None  # TRL's own chunk, kept to restore it for Triton devices


def fit_fused_head(device) -> None:
    """Fit TRL's fused LM head (every TRL trainer: SFT, DPO, GRPO) to `device`, the device
    training runs on. Without Triton (CPU) TRL folds each `tokens x chunk` tile with whole-tile
    torch ops (~9 fp32 tiles live at the backward's peak: 2.3 GiB at 2k tokens with TRL's
    32,768-entry chunks): there the tiles are folded in place (`cpu_fold`: the same values,
    fewer passes, two tiles at most) and the chunks are 4,096 entries wide (the same loss:
    the same online log-sum-exp over narrower tiles). With Triton (GPU) TRL's chunk is kept
    (its kernel folds in place). TRL reads the chunk, a module constant, and its fallback
    folds by name on every fused forward, so this holds for the process; each training run
    sets it again for its own device."""
    global _TRL_VOCAB_TILE
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer import utils as trl_utils

    if _TRL_VOCAB_TILE is None:
        _TRL_VOCAB_TILE = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    triton = _use_triton(device)
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = _TRL_VOCAB_TILE if triton else FUSED_VOCAB_TILE["cpu"]
    use_cpu_folds(not triton)
