"""Every registry family trains through `peftvlm train` (the CLI's `main`, in the test process:
the CLI's own start-up is tested by test_readme.py and test_quickstart.py) for a few steps on
its tiny twin: the run folder is written and the loss is finite. New releases of transformers or
TRL that change a forward (TRL 1.16's fused LM head crashed BLIP-2 at step 0) fail here first.
Also: the logits head used where TRL's fused head cannot run gives TRL's own outputs.

Run: PYTHONPATH=. python -m pytest tests/test_train_every_family.py -q -n 2
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli_in_process
from peftvlm.families import FAMILIES

# One shipped recipe per kind of model, made tiny on the command line.
RECIPE_FOR_KIND = {
    "generative": ("recipes/quickstart.yaml", "data.synthetic.eval_size=2"),
    "dual_encoder": ("recipes/clip-retrieval-tiny.yaml", "data.synthetic.eval_size=4"),
    "detector": ("recipes/grounding-dino-tiny.yaml", "data.synthetic.eval_size=4"),
}
TINY = [name for name, spec in FAMILIES.items() if spec.tiny_name]


def test_every_kind_of_family_has_a_recipe_here():
    assert {spec.kind for spec in FAMILIES.values()} <= set(RECIPE_FOR_KIND)
    assert {"blip_2", "llava", "qwen3_vl", "clip", "siglip"} <= set(TINY)


@pytest.mark.parametrize("name", TINY)
def test_a_family_trains_through_the_cli(tmp_path, name):
    spec = FAMILIES[name]
    recipe, eval_size = RECIPE_FOR_KIND[spec.kind]
    run = tmp_path / "run"
    res = run_cli_in_process("train", recipe, f"model.id={spec.tiny_name}", "train.max_steps=2",
                             "train.logging_steps=1", "train.save_steps=1000",
                             "train.per_device_train_batch_size=4", "data.synthetic.train_size=8",
                             eval_size, "eval.before_training=false", "-o", run)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["family"] == name
    losses = [loss for _, loss in summary["loss_curve"]]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert (run / "adapter").is_dir() and (run / "recipe.yaml").is_file()
    assert (run / "loss.png").stat().st_size > 0


def tiny_batch(spec):
    """One collated two-row batch of the colour task for a tiny twin, and the loaded model."""
    import random

    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.data.read.synthetic import draw_shape
    from peftvlm.models import load_base
    from peftvlm.recipe.schema import ModelConfig

    loaded = load_base(ModelConfig(id=spec.tiny_name))
    rng = random.Random(0)
    rows = [{"messages": [
        {"role": "user", "content": [{"type": "image"},
                                     {"type": "text", "text": "What color is the shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        "images": [draw_shape(rng, colour, 32)]}
        for answer, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255)))]
    return loaded.model, ConversationCollator(loaded.processor, spec)(rows)


def test_the_logits_head_gives_trls_fused_outputs():
    """On a family TRL's fused head runs on, the logits head returns the same loss, per-token
    log-probabilities, top-1 flags and mask (it replaces that head where it cannot run)."""
    from trl.trainer.utils import add_fused_lm_head

    from peftvlm.trainers.lm_head import outputs_from_logits

    model, batch = tiny_batch(FAMILIES["llava"])
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        fused = model(**batch, fused_lm_head=True)
        ours = outputs_from_logits(logits, batch["labels"])
    assert ours.label_mask.equal(fused.label_mask) and ours.label_mask.sum() > 0
    assert ours.is_top1.equal(fused.is_top1)
    torch.testing.assert_close(ours.log_probs, fused.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.entropy, fused.entropy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.loss, fused.loss, rtol=1e-5, atol=1e-6)


def test_blip2_trains_on_the_logits_head_with_its_own_loss():
    """BLIP-2 opts out of TRL's fused head (its reason is family data); the head that replaces
    it returns the model's own loss and keeps gradients."""
    from trl.trainer.utils import add_fused_lm_head

    from peftvlm.trainers.lm_head import use_logits_head

    spec = FAMILIES["blip_2"]
    assert "hidden states" in spec.unfused_lm_head
    model, batch = tiny_batch(spec)
    model.eval()  # no dropout: the two forwards must see the same network
    own = model(**batch).loss
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    # what TRL 1.16 hits; once a TRL release stops raising here, blip2.py can drop the opt-out
    with pytest.raises(AttributeError, match="last_hidden_state"):
        model(**batch, fused_lm_head=True)
    use_logits_head(model)
    out = model(**batch, fused_lm_head=True)
    torch.testing.assert_close(out.loss, own, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert model.language_projection.weight.grad.abs().sum() > 0
    assert model(**batch).loss.item() == pytest.approx(own.item())  # plain calls unchanged
