"""The loss head `peftvlm train` runs gives the model's own loss, on every generative family.

SFTTrainer (TRL 1.16) patches each model with its fused LM head (`add_fused_lm_head`, the
outputs it asks for); families that opt out (`FamilySpec.unfused_lm_head`: BLIP-2) get our
logits head (`peftvlm.trainers.lm_head`) instead. Either way the loss must equal the model's own
full-logits cross-entropy on the same collated batch (within 1e-5), and gradients must flow.
"""

from __future__ import annotations

import pytest
import torch

from peftvlm.families import FAMILIES
from test_train_every_family import tiny_batch

GENERATIVE = sorted(name for name, spec in FAMILIES.items()
                    if spec.tiny_name and spec.is_generative)


def test_the_registry_has_generative_families_on_every_head():
    assert {"llava", "qwen2_vl", "blip_2", "florence2"} <= set(GENERATIVE)
    assert {FAMILIES[n].loss_head for n in GENERATIVE} == {"fused", "logits", "own"}
    assert FAMILIES["blip_2"].loss_head == "logits" and FAMILIES["florence2"].loss_head == "own"


@pytest.mark.parametrize("name", GENERATIVE)
def test_the_training_loss_head_equals_the_models_own_loss(name):
    from trl.trainer.utils import add_fused_lm_head

    from peftvlm.trainers.lm_head import use_logits_head

    spec = FAMILIES[name]
    model, batch = tiny_batch(spec)
    # an encoder-decoder's labels the fused head would shift as a causal LM's: own loss
    assert bool(getattr(model.config, "is_encoder_decoder", False)) == (spec.loss_head == "own")
    if spec.loss_head == "own":
        pytest.skip(f"{name} trains on the model's own loss (FamilySpec.own_loss): "
                    "TRL's fused head is not used")
    model.eval()  # no dropout: both forwards see the same network
    own = model(**batch).loss
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer
    if spec.loss_head == "logits":
        use_logits_head(model)  # as peftvlm.trainers.sft.build_trainer
    out = model(**batch, fused_lm_head=True)
    assert out.label_mask.sum() > 0
    torch.testing.assert_close(out.loss, own, rtol=0, atol=1e-5)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
