"""`peftvlm plan`'s estimate of a training step against the measured peak (CPU RSS) on a twin with
a Qwen-sized vocabulary (151,680) at 2,048 tokens, for TRL's fused LM head and for the logits
head (`scripts/bench_memory.py` measures each in a child process).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from peftvlm import memory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def test_the_loss_head_term_follows_the_head_and_the_device():
    shape = memory.Shape(total_params=0, trainable_params=0, frozen_params_full=0,
                         hidden=128, vocab=151_680, dtype="bfloat16")
    tokens = 2048
    fused_gpu = memory.loss_head_bytes(shape, tokens, 2, "cuda")
    fused_cpu = memory.loss_head_bytes(shape, tokens, 2, "cpu")
    shape.unfused_lm_head = True
    logits = memory.loss_head_bytes(shape, tokens, 2, "cuda")
    assert logits == tokens * 151_680 * (2 + 4 + 4)  # logits, fp32 log-softmax, fp32 gradient
    # one bf16 tile of 2048 x 32768 on a GPU; five fp32 tiles of 4,096 on CPU (trainers.lm_head.fit_fused_head)
    assert fused_gpu == pytest.approx(2048 * 32768 * 2, rel=0.03)  # + per-token fp32 values
    assert fused_cpu == pytest.approx(5 * 2048 * 4096 * 4, rel=0.02)
    assert fused_gpu < 0.1 * logits


@pytest.mark.slow
def test_plan_is_within_15_percent_of_the_measured_step_peak():
    from bench_memory import compare

    results = compare(tokens=2048, vocab=151_680, hidden=128, heads=("fused", "logits"))
    for head, r in results.items():
        assert r["plan_bytes"] == pytest.approx(r["peak_bytes"], rel=0.15), (head, r)
    # the fused head holds tiles, the logits head three (tokens x vocabulary) tensors
    assert results["fused"]["peak_bytes"] < 0.7 * results["logits"]["peak_bytes"]
    assert results["fused"]["loss"] == pytest.approx(results["logits"]["loss"], abs=1e-5)
