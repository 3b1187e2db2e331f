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

TRL_HEAD: dict = {}  # TRL's own settings (chunk, compact), kept to restore them off the CPU


def fit_fused_head(device) -> None:
    """Fit TRL's fused LM head (every TRL trainer: SFT, DPO, GRPO) to `device`, the device
    training runs on. On CPU TRL's fallback scores every position, padding and prompt
    included, and folds each `tokens x chunk` tile with whole-tile torch ops (~9 fp32 tiles
    live at the backward's peak: 2.3 GiB at 2k tokens with TRL's 32,768-entry chunks). There
    it now scores only the labelled positions (as TRL does with Triton: it scores them all
    elsewhere only so that XLA-like devices keep one tile shape), folds in place (`cpu_fold`:
    TRL's values bit for bit, three tiles at most) and takes 4,096-entry chunks (the same
    online log-sum-exp over narrower tiles). On any other device (a GPU: Triton) TRL's head is
    left as it is. TRL looks these up by name on every fused forward, so this holds for the
    process; every trainer peftvlm builds (SFT, DPO, GRPO) sets them again for its own device,
    so a run's floats never depend on what ran before it in the process."""
    import torch

    trl_utils = trl_head_settings()
    if torch.device(device).type != "cpu":  # GPUs fold with Triton; XLA-like devices need
        return use_trl_head()               # TRL's one tile shape: TRL's head as it is
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = FUSED_VOCAB_TILE["cpu"]
    # trl.trainer.utils reads `_use_triton` only to decide whether to score the labelled
    # positions alone ("compact"); its kernels module keeps its own, which picks the folds.
    trl_utils._use_triton = score_labelled_positions_only
    use_cpu_folds(True)


def use_trl_head() -> None:
    """TRL's fused head as TRL ships it (its chunk, its choice of positions, its folds)."""
    trl_utils = trl_head_settings()
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = TRL_HEAD["chunk"]
    trl_utils._use_triton = TRL_HEAD["compact"]
    use_cpu_folds(False)


def trl_head_settings():
    """`trl.trainer.utils`, once its own head settings are kept in `TRL_HEAD`."""
    from trl.trainer import utils as trl_utils

    if not TRL_HEAD:
        TRL_HEAD.update(chunk=trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE,
                        compact=trl_utils._use_triton)
    return trl_utils


def score_labelled_positions_only(device) -> bool:
    """TRL's fused head asks this whether to project only the positions with a label."""
    return True


def use_logits_head(model) -> None:
    """Replace the fused head TRL installed on `model` (the base model, under PEFT) by one that
    computes its outputs from the logits of the model's own forward."""
    trl_forward = model.forward  # TRL's patch: the model's forward unless fused_lm_head=True

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:  # as TRL's head: only the arguments given reach the model
            given = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch))
                     if v is not None}
            return trl_forward(*args, **kwargs, **given)
        logits = trl_forward(*args, **{**kwargs, "use_cache": False}).logits
        return outputs_from_logits(logits, labels, shift_labels, num_items_in_batch)

    model.forward = types.MethodType(forward, model)


def outputs_from_logits(logits, labels, shift_labels=None, num_items_in_batch=None):
    """TRL's `FusedCausalLMOutput` for these logits: each next-token label's log-probability,
    the distribution's entropy, whether the label is the top token (all zero where the label is
    -100), and the mean negative log-likelihood (over `num_items_in_batch` when given)."""
    import torch
    from torch.nn import functional as F
    from trl.trainer.utils import FusedCausalLMOutput, entropy_from_logits

    if shift_labels is None:
        logits, labels = logits[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    labels = labels.to(logits.device)
    mask = labels != -100
    # cross_entropy (fused log-softmax + NLL) keeps one logits-sized tensor for backward, where
    # TRL's selective_log_softmax (gather - logsumexp) keeps more: scripts/bench_memory.py
    log_probs = -F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100,
                                 reduction="none").view(labels.shape)
    with torch.no_grad():  # metrics only, as in TRL's head
        entropy = entropy_from_logits(logits.detach()).masked_fill(~mask, 0)
        is_top1 = (logits.argmax(-1) == labels) & mask
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs,
                               entropy=entropy, is_top1=is_top1, label_mask=mask)
