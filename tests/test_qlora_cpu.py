"""QLoRA on CPU: only the language model is quantized, and an eval pass does not corrupt
gradients (the bitsandbytes AVX512-BF16 repacking trap is switched off at load time)."""

from __future__ import annotations

import pytest
import torch

from peftvlm.methods.lora import QloraMethod
from peftvlm.models import load_base
from peftvlm.recipe.schema import ModelConfig
from peftvlm.registry import get_method
from test_methods_peft import batch_for


def qlora_model():
    loaded = load_base(ModelConfig(id="tiny-llava"), "qlora")
    torch.manual_seed(0)
    model = get_method("qlora").apply(loaded.model, loaded.family,
                                      QloraMethod(r=4, lora_dropout=0.0), quantized=True)
    for name, p in model.named_parameters():  # non-zero B so every adapter gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return loaded, model


def grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_qlora_quantizes_only_the_language_model():
    import bitsandbytes as bnb

    loaded, model = qlora_model()
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(loaded.family.language_module in n for n in quantized)
    assert not any(loaded.family.vision_module in n for n in quantized)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_gradients_after_an_eval_pass_equal_gradients_without_one():
    loaded, model = qlora_model()
    batch = batch_for(loaded)
    clean = grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    after_eval = grads(model, batch)
    assert clean.keys() == after_eval.keys()
    for name in clean:
        assert torch.allclose(clean[name], after_eval[name], atol=1e-6), name
    assert all(g.abs().sum() > 0 for g in clean.values())


def test_the_trap_is_real_on_this_cpu_when_not_disabled():
    from bitsandbytes.nn import Linear4bit

    probe = Linear4bit(8, 8, bias=False)
    if not getattr(probe, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16 inference kernel: nothing to trap")
    loaded, model = qlora_model()
    for module in model.modules():  # undo our fix to show what it prevents
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True
    batch = batch_for(loaded)
    clean = grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    try:
        broken = grads(model, batch)
    except RuntimeError:
        return  # layers with bias crash: the trap, visibly
    assert any(not torch.allclose(clean[n], broken[n], atol=1e-6) for n in clean)
