"""The loss head `peftvlm train` runs gives the model's own loss, on every generative family.

SFTTrainer (TRL 1.16) patches each model with its fused LM head (`add_fused_lm_head`, the
outputs it asks for); families that opt out (`FamilySpec.unfused_lm_head`: BLIP-2) get our
logits head (`peftvlm.trainers.lm_head`) instead. Either way the loss must equal the model's own
full-logits cross-entropy on the same collated batch (within 1e-5), and gradients must flow.
On CPU every trainer peftvlm builds fits TRL's head to the device (`lm_head.fit_fused_head`):
our in-place tile folds (`cpu_fold`) must give TRL's values bit for bit, so training is
unchanged.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import REPO
from peftvlm.families import FAMILIES
from peftvlm.trainers.lm_head import fit_fused_head
from peftvlm.trainers.objectives import OBJECTIVES
from test_train_every_family import tiny_batch

RECIPES = REPO / "recipes"

GENERATIVE = sorted(name for name, spec in FAMILIES.items()
                    if spec.tiny_name and spec.is_generative)


def test_the_registry_has_generative_families_on_every_head():
    assert {"llava", "qwen2_vl", "blip_2", "florence2"} <= set(GENERATIVE)
    assert {FAMILIES[n].loss_head for n in GENERATIVE} == {"fused", "logits", "own"}
    assert FAMILIES["blip_2"].loss_head == "logits" and FAMILIES["florence2"].loss_head == "own"


@pytest.mark.parametrize("name", GENERATIVE)
def test_the_training_loss_head_equals_the_models_own_loss(name):
    from trl.trainer.utils import add_fused_lm_head

    from peftvlm.trainers.lm_head import fit_fused_head, use_logits_head

    from transformers import AutoConfig

    from peftvlm.models import tiny_model_path

    spec = FAMILIES[name]
    config = AutoConfig.from_pretrained(tiny_model_path(spec.tiny_name))  # no model built
    # an encoder-decoder's labels the fused head would shift as a causal LM's: own loss
    assert bool(getattr(config, "is_encoder_decoder", False)) == (spec.loss_head == "own")
    if spec.loss_head == "own":
        pytest.skip(f"{name} trains on the model's own loss (FamilySpec.own_loss): "
                    "TRL's fused head is not used")
    model, batch = tiny_batch(spec)
    model.eval()  # no dropout: both forwards see the same network
    own = model(**batch).loss
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer
    fit_fused_head(torch.device("cpu"))  # as every trainer builder (sft.build_trainer...)
    if spec.loss_head == "logits":
        use_logits_head(model)  # as peftvlm.trainers.sft.build_trainer
    out = model(**batch, fused_lm_head=True)
    assert out.label_mask.sum() > 0
    torch.testing.assert_close(out.loss, own, rtol=0, atol=1e-5)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def chunked_head(n, vocab, chunk, scale=1.0, temperature=1.0, dtype=torch.float32,
                 outputs=("entropy", "is_top1", "mean_logits"), softcap=None):
    """TRL's chunked log-probability function on random tensors: its outputs, then the
    gradients of the mean log-probability. Some tokens score equal logits (tied maximum)."""
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, 16, generator=g)
    weight = torch.randn(vocab, 16, generator=g)
    weight[2] *= 3
    weight[5] = weight[2]  # two columns (of one tile) with the same logits everywhere
    hidden[:2] = 10 * weight[2]  # ... the largest of rows 0 and 1: a tied maximum
    targets = (hidden @ weight.T).argmax(-1)  # top-1 rows ...
    targets[n // 2:] = torch.randint(0, vocab, (n - n // 2,), generator=g)  # ... and others
    targets[:2] = torch.tensor([2, 5])  # the first of the tie is top-1, not the second
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = ChunkedLogProbFunction.apply(hidden, weight, None, targets, temperature, chunk,
                                           softcap, scale, outputs)
    (-out[0].mean()).backward()
    return [x for x in out if x is not None] + [hidden.grad, weight.grad]


@pytest.mark.parametrize("case", [
    dict(n=37, vocab=601, chunk=4096),                       # one tile (tiny twins)
    dict(n=50, vocab=1000, chunk=128),                       # many tiles, a ragged last one
    dict(n=50, vocab=1000, chunk=100, scale=0.5, temperature=0.7),
    dict(n=20, vocab=300, chunk=64, dtype=torch.bfloat16),   # autocast: fp32 folds of bf16
    dict(n=20, vocab=300, chunk=64, softcap=30.0),           # TRL's own fold
    dict(n=20, vocab=300, chunk=64, outputs=("log_sum_sq_probs",)),
])
def test_the_cpu_folds_give_trls_values_bit_for_bit(case):
    from trl.kernels import chunked_logprob

    from peftvlm.trainers.cpu_fold import use_cpu_folds

    try:
        use_cpu_folds(False)
        trl = chunked_head(**case)
        use_cpu_folds(True)
        assert chunked_logprob._backward_tile.__module__ == "peftvlm.trainers.cpu_fold"
        ours = chunked_head(**case)
    finally:
        use_cpu_folds(True)  # as every CPU training run leaves it
    assert len(ours) == len(trl)
    for a, b in zip(ours, trl):
        assert torch.equal(a, b)
    if "is_top1" in case.get("outputs", ("is_top1",)):
        is_top1 = next(x for x in ours if x.dtype == torch.bool)
        assert is_top1[0] and not is_top1[1] and is_top1[2:4].all() and not is_top1.all()


def test_fit_fused_head_on_cpu_scores_labelled_positions_in_narrow_chunks_in_place():
    from trl.kernels import chunked_logprob
    from trl.trainer import utils as trl_utils

    from peftvlm.memory import FUSED_VOCAB_TILE
    from peftvlm.trainers.cpu_fold import backward_tile, forward_tile
    from peftvlm.trainers.lm_head import fit_fused_head, use_trl_head

    use_trl_head()
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 32768
    assert not trl_utils._use_triton(torch.device("cpu"))  # TRL scores every position
    fit_fused_head(torch.device("cpu"))
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == FUSED_VOCAB_TILE["cpu"] == 4096
    assert trl_utils._use_triton(torch.device("cpu"))  # only the labelled ones
    assert chunked_logprob._forward_tile is forward_tile
    assert chunked_logprob._backward_tile is backward_tile


def test_a_cpu_training_step_is_the_same_on_the_fitted_head_as_on_trls():
    """Loss, metrics and every gradient bit for bit (the batch's vocabulary fits one chunk)."""
    from trl.trainer.utils import add_fused_lm_head

    from peftvlm.trainers.lm_head import fit_fused_head, use_trl_head

    results = []
    for fit in (use_trl_head, lambda: fit_fused_head(torch.device("cpu"))):
        torch.manual_seed(0)
        model, batch = tiny_batch(FAMILIES["llava"])
        model.eval()
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        fit()
        out = model(**batch, fused_lm_head=True)
        out.loss.backward()
        results.append([out.loss, out.log_probs, out.entropy, out.is_top1,
                        *(p.grad for p in model.parameters() if p.grad is not None)])
    trl, ours = results
    assert (batch["labels"] != -100).float().mean() < 0.5  # prompt positions are not scored
    assert len(trl) == len(ours) > 4
    for a, b in zip(trl, ours):
        assert torch.equal(a, b)


def shipped_recipe_for(objective: str):
    """A shipped offline recipe that trains with `objective` (quickstart for SFT)."""
    for path in [RECIPES / "quickstart.yaml", *sorted(RECIPES.glob("*-tiny.yaml"))]:
        if (yaml.safe_load(path.read_text()).get("train") or {}).get("objective",
                                                                     "sft") == objective:
            return path
    raise AssertionError(f"no shipped tiny recipe trains with objective {objective!r}")


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objectives_trainer_fits_the_head_whatever_ran_before_it(objective, tmp_path):
    """Built where TRL's stock head is in place (a fresh process), each objective's trainer
    gets the CPU-fitted head, as `peftvlm train` runs: a script or test that builds trainers
    itself must not train on other floats depending on what ran before it in the process."""
    from trl.trainer import utils as trl_utils

    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.data.pipeline import prepare_data
    from peftvlm.recipe.load import load_recipe
    from peftvlm.registry import get_method
    from peftvlm.trainers.generative import load_model_with_method
    from peftvlm.trainers.lm_head import use_trl_head
    from peftvlm.trainers.objectives import objective_for

    recipe = load_recipe(shipped_recipe_for(objective), ["data.synthetic.train_size=8",
                                                          "data.synthetic.eval_size=2"])
    loaded, model = load_model_with_method(recipe, get_method(recipe.method.name))
    collator = ConversationCollator(loaded.processor, loaded.family, True)
    data = prepare_data(recipe, collator)
    use_trl_head()
    try:
        objective_for(recipe).build_trainer(recipe, model, loaded.processor, collator, data,
                                            tmp_path / "run", [], None, [])
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 4096
        assert trl_utils._use_triton(torch.device("cpu"))  # the labelled positions only
    finally:
        fit_fused_head(torch.device("cpu"))  # as every CPU training run leaves it
