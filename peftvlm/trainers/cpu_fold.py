"""TRL's fused LM head on devices without Triton (CPU): the same tile folds with fewer passes.

TRL 1.16's chunked log-probability head (`trl.kernels.chunked_logprob`) projects the hidden
states through the LM head one `tokens x vocabulary-chunk` tile at a time and folds each tile
into per-token statistics (forward) or into the logits' gradient (backward). On a GPU a Triton
kernel folds a tile in place; elsewhere TRL's torch fallback runs whole-tile out-of-place ops:
~12 passes over the tile and up to 9 live fp32 copies of it in backward. On a 0.3 M-parameter
model that fallback was a quarter of a CPU training step (docs/benchmarks.md).

`forward_tile` and `backward_tile` take TRL's arguments and compute the same values with
in-place ops on one contiguous fp32 buffer (two in forward): every elementwise op runs on a
tensor of the same shape and layout as TRL's own intermediate, so the results are bitwise
TRL's (tests/test_fused_head.py). Only `max_before_target` (TRL's running maximum over the
columns left of the target, read only to tell whether the target is the row's first maximum)
takes other values where that answer cannot change: the tile's first maximum comes from one
`max`, and a tile whose first maximum is at or right of the target adds nothing to it. Cases
this does not cover (soft-capped logits, `log_sum_sq_probs`, a gradient through the entropy)
go to TRL's own fold.
"""

from __future__ import annotations

import math


def forward_tile(tile, tile_stride, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum,
                 max_before_target, target_logit, vocab_start, n_cols, logit_scale, softcap,
                 inv_t, HAS_SOFTCAP, HAS_ENTROPY, HAS_LOG_SUM_SQ_PROBS, HAS_MEAN_LOGITS,
                 HAS_IS_TOP1, BLOCK_SIZE):  # noqa: N803 (TRL's kernel argument names)
    """Fold one projected tile into the running log-sum-exp statistics (TRL's `_forward_tile`)."""
    import torch

    if HAS_SOFTCAP or HAS_LOG_SUM_SQ_PROBS:
        return TRL_FOLDS["forward"](
            tile, tile_stride, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum,
            max_before_target, target_logit, vocab_start, n_cols, logit_scale, softcap, inv_t,
            HAS_SOFTCAP, HAS_ENTROPY, HAS_LOG_SUM_SQ_PROBS, HAS_MEAN_LOGITS, HAS_IS_TOP1,
            BLOCK_SIZE)
    z = scaled_logits(tile, logit_scale, inv_t)
    local = targets - vocab_start
    if HAS_MEAN_LOGITS:
        z_sum += z.sum(-1)
    tile_max, first_max = z.max(-1)
    if HAS_IS_TOP1:
        # TRL: the maximum over the columns left of the target. A tile wholly left of it adds
        # its maximum; one holding it adds its maximum if that comes first (else the target is
        # either the tile's first maximum, and nothing left of it reaches it, or not a maximum).
        counts = (local >= n_cols) | ((local > 0) & (first_max < local))
        max_before_target.copy_(torch.maximum(
            max_before_target, tile_max.masked_fill(~counts, -math.inf)))
    new_m = torch.maximum(running_max, tile_max)
    rescale = torch.exp(running_max - new_m)
    e = torch.sub(z, new_m.unsqueeze(-1)).exp_()
    sum_exp.mul_(rescale).add_(e.sum(-1))
    if HAS_ENTROPY:
        x_sum_exp.mul_(rescale).add_(e.mul_(z).sum(-1))
    running_max.copy_(new_m)
    in_tile = (local >= 0) & (local < n_cols)
    target_z = z.gather(-1, local.clamp(0, n_cols - 1).unsqueeze(-1)).squeeze(-1)
    target_logit.copy_(torch.where(in_tile, target_z, target_logit))


def backward_tile(tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy,
                  vocab_start, n_cols, logit_scale, softcap, inv_t, HAS_SOFTCAP,
                  HAS_LOGPROB_GRAD, HAS_ENTROPY_GRAD, BLOCK_SIZE):  # noqa: N803
    """Overwrite one re-projected tile with the gradient of the loss with respect to its logits
    (TRL's `_backward_tile`): `g * (onehot(target) - p)`, scaled as the logits were."""
    import torch

    if HAS_SOFTCAP or HAS_ENTROPY_GRAD or not HAS_LOGPROB_GRAD:
        return TRL_FOLDS["backward"](
            tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy,
            vocab_start, n_cols, logit_scale, softcap, inv_t, HAS_SOFTCAP, HAS_LOGPROB_GRAD,
            HAS_ENTROPY_GRAD, BLOCK_SIZE)
    grad = scaled_logits(tile, logit_scale, inv_t)
    grad.sub_(log_z.unsqueeze(-1)).exp_().neg_()  # -p
    local = targets - vocab_start
    rows = ((local >= 0) & (local < n_cols)).nonzero().squeeze(-1)
    grad[rows, local[rows]] += 1.0  # onehot - p (1 + -p is 1 - p exactly)
    grad.mul_(grad_logprobs.unsqueeze(-1))
    if inv_t != 1.0:
        grad.mul_(inv_t)
    if logit_scale != 1.0:
        grad.mul_(logit_scale)
    tile.copy_(grad)


def scaled_logits(tile, logit_scale, inv_t):
    """`tile * logit_scale * inv_t` in fp32, as a new contiguous tensor (TRL's layout)."""
    import torch

    z = torch.mul(tile, logit_scale) if tile.dtype == torch.float32 else (
        tile.float().mul_(logit_scale))
    return z.mul_(inv_t) if inv_t != 1.0 else z


TRL_FOLDS: dict = {}  # TRL's own folds, for the cases above and to restore them


def use_cpu_folds(enabled: bool = True) -> None:
    """Make TRL's fused head fold its tiles with `forward_tile` / `backward_tile` where it has no
    Triton (TRL looks its fallback folds up by name on every call), or restore TRL's."""
    from trl.kernels import chunked_logprob

    if not TRL_FOLDS:
        TRL_FOLDS.update(forward=chunked_logprob._forward_tile,
                         backward=chunked_logprob._backward_tile)
    chunked_logprob._forward_tile = forward_tile if enabled else TRL_FOLDS["forward"]
    chunked_logprob._backward_tile = backward_tile if enabled else TRL_FOLDS["backward"]
