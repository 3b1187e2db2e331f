"""summary.json, built one way for every kind of run, and the parameter counter they share.

Every run's summary opens with the same fields (name, method, kind, model, family, parameter
counts, runtime, steps, final loss, loss curve, eval before/after, hardware); a kind adds its
own after them (the generative kind its data report and eval history, classification its class
names, retrieval its pair counts). `peftvlm eval`, export's model card and the README read them.
"""

from __future__ import annotations

from peftvlm.kinds import kind_name


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of a torch module (a PeftModel, a CLIP-family classifier)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def hardware() -> str:
    """The GPU's name, or `cpu`."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def before_after(before: dict | None, after: dict | None) -> dict:
    """{metric: {"before": score, "after": score}} over the metrics either side has."""
    metrics = sorted(set(before or {}) | set(after or {}))
    return {m: {"before": (before or {}).get(m), "after": (after or {}).get(m)} for m in metrics}


def run_summary(recipe, family, counts: tuple[int, int], *, runtime_s: float, global_step: int,
                final_loss: float | None, loss_curve: list, eval: dict, **extra) -> dict:
    """The summary of a finished training of `recipe` on a model of `family`; `extra` fields
    (the kind's own) follow the shared ones."""
    return {
        "name": recipe.name, "method": recipe.method.name, "kind": kind_name(recipe, family),
        "model": recipe.model.id, "family": family.name,
        "trainable_params": counts[0], "total_params": counts[1],
        "train_runtime_s": round(runtime_s, 3), "global_step": global_step,
        "final_loss": final_loss,
        "loss_curve": [[s, round(loss, 6)] for s, loss in loss_curve],
        "eval": eval, **extra, "hardware": hardware(),
    }


def loop_losses(history: list[dict]) -> dict:
    """`final_loss` and `loss_curve` of the dual-encoder loop's history of {step, loss}."""
    return {"final_loss": history[-1]["loss"] if history else None,
            "loss_curve": [(h["step"], h["loss"]) for h in history]}
