"""The checks every export must pass, and the inputs they run on.

Probe rows are a few held-out rows of the recipe (training rows if it has none, a drawn image if
its data cannot be read from here). Each check returns a dict with `passed` and, when it fails,
an `error` sentence; `export.finish_export` turns failures into one `ExportError`.
"""

from __future__ import annotations

from pathlib import Path

from peftvlm.data.batch.collate import ConversationCollator, encode_prompts
from peftvlm.data.prepare.loading import load_source, recipe_sources
from peftvlm.data.read.synthetic import COLOURS, draw_shape, vqa_row
from peftvlm.data.rows import with_system_prompt
from peftvlm.errors import PeftVLMError

# Logit tolerance of the merged model against the adapter model: fp32 is absolute; for half
# precisions it is relative to the largest logit, since rounding error grows with magnitude.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
PROBE_ROWS = 3
GENERATION_TOKENS = 8


# --- probe inputs -----------------------------------------------------------------------------

def device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def probe_rows(recipe, family) -> tuple[list[dict], str]:
    """A few held-out rows of the recipe, rendered as in training (training rows if it has no
    held-out data; a drawn image if its data cannot be read from here)."""
    try:
        train_sources, eval_sources = recipe_sources(recipe)
        for what, sources in (("held-out rows", eval_sources), ("training rows", train_sources)):
            for src in sources:
                first = src.model_copy(update={"max_samples": PROBE_ROWS})
                rows = load_source(first, recipe.data, recipe.base_dir(), family.box_format).rows
                if rows:
                    return with_system_prompt(rows, recipe.data.system_prompt), what
    except (PeftVLMError, OSError):
        pass
    return [synthetic_probe()], "a drawn probe image (the recipe's data is not readable here)"


def synthetic_probe() -> dict:
    import random

    row = vqa_row("", "red")
    row["images"] = [draw_shape(random.Random(0), COLOURS["red"], 32)]
    return row


def prompt_text(row: dict) -> str | None:
    """The text of a row's first user turn (the model card's example question)."""
    user = next((m for m in row["messages"] if m["role"] == "user"), None)
    texts = [c.get("text", "") for c in (user or {}).get("content", []) if c["type"] == "text"]
    return " ".join(t for t in texts if t) or None


def encode_rows(processor, family, rows: list[dict]) -> dict:
    """Whole conversations (prompt + answer) as one padded batch, without labels."""
    batch = ConversationCollator(processor, family)(rows)
    batch.pop("labels", None)
    return batch


def logits_of(model, batch: dict):
    import torch

    model.eval()
    batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
    with torch.no_grad():
        logits = model(**batch).logits.float().cpu()
    if logits.shape[1] != batch["attention_mask"].shape[1]:  # an encoder-decoder's decoder
        return logits.reshape(-1, logits.shape[-1])
    return logits[batch["attention_mask"].cpu().bool()]


def generate_text(model, processor, family, row: dict) -> tuple[str, int]:
    """Greedy answer to one row's prompt, and how many new tokens it has."""
    import torch

    batch = encode_prompts(processor, family, [row])
    batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=GENERATION_TOKENS, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    if family.decode is not None:  # Florence-2: the output is the decoder's, box tokens kept
        return family.decode(processor, out, batch)[0], int(out.shape[1] - 1)
    new = out[0, batch["input_ids"].shape[1]:]
    return processor.decode(new, skip_special_tokens=True).strip(), int(new.numel())


# --- checks ------------------------------------------------------------------------------------

def tuner_layers(peft_model) -> dict:
    """Adapted modules by their name in the merged model (peft's wrapper prefix removed)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in peft_model.named_modules()
            if isinstance(m, BaseTunerLayer) and hasattr(m, "get_delta_weight")
            and hasattr(m.get_base_layer(), "weight")}


def weight_probes(peft_model, dtype: str) -> dict:
    """Per adapted module: the weight element the adapter moves most, its base value, and whether
    the move survives rounding to `dtype` (so a bf16 merge is not blamed for tiny updates)."""
    import torch

    probes = {}
    target = getattr(torch, dtype)
    with torch.no_grad():
        for name, layer in tuner_layers(peft_model).items():
            weight = layer.get_base_layer().weight
            delta = layer.get_delta_weight(layer.active_adapters[0]).float().reshape(weight.shape)
            index = int(delta.abs().argmax())
            base = weight.reshape(-1)[index].float()
            moved = (base + delta.reshape(-1)[index]).to(target) != base.to(target)
            probes[name] = {"index": index, "base": float(base), "delta": float(delta.abs().max()),
                            "should_change": bool(moved)}
    return probes


def check_weights_changed(model, probes: dict) -> dict:
    """Merged weights must differ from the base where the adapter is non-zero (PEFT #2586)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    expected = [n for n, p in probes.items() if p["should_change"]]
    unchanged = [n for n in expected if float(
        params[f"{n}.weight"].reshape(-1)[probes[n]["index"]]) == probes[n]["base"]]
    check = {"adapted_modules": len(probes), "nonzero_adapter_modules": len(expected),
             "changed_after_merge": len(expected) - len(unchanged), "unchanged": unchanged[:5],
             "passed": bool(expected) and not unchanged}
    if not expected:
        check["error"] = ("the adapter is all zeros: every update is 0 (or below the precision "
                          "of the dtype), so the export would equal the base model")
    elif unchanged:
        check["error"] = (f"merge did nothing: {len(unchanged)} of {len(expected)} adapted "
                          f"modules still hold the base weights (e.g. {unchanged[0]})")
    return check


def compare_logits(reference, actual, dtype: str, source: str) -> dict:
    """Max |logit difference| against the stated tolerance of the dtype."""
    diff = float((reference - actual).abs().max()) if reference.shape == actual.shape else None
    scale = 1.0 if dtype == "float32" else max(1.0, float(reference.abs().max()))
    tolerance = TOLERANCE[dtype] * scale
    check = {"examples": source, "positions": int(reference.shape[0]), "max_abs_diff": diff,
             "tolerance": tolerance,
             "tolerance_rule": "absolute" if dtype == "float32"
             else f"{TOLERANCE[dtype]} x max(1, max |logit|)",
             "top1_agreement": float((reference.argmax(-1) == actual.argmax(-1)).float().mean())
             if diff is not None else None,
             "passed": diff is not None and diff <= tolerance}
    if not check["passed"]:
        check["error"] = (f"logits differ from the adapter model by {diff} "
                          f"(tolerance {tolerance:.2e})" if diff is not None
                          else f"logit shapes differ: {tuple(reference.shape)} vs "
                               f"{tuple(actual.shape)}")
    return check


def check_generation(model, processor, family, row: dict, reference_text: str | None) -> dict:
    try:
        text, new_tokens = generate_text(model, processor, family, row)
    except Exception as exc:  # any failure here means the export is not usable
        return {"passed": False, "error": f"generation failed: {exc!r}"}
    check = {"text": text, "new_tokens": new_tokens, "passed": new_tokens > 0}
    if reference_text is not None:
        check["matches_adapter_model"] = text == reference_text
    if not check["passed"]:
        check["error"] = "generation produced no tokens"
    return check


def check_merged_files(out: Path, required=("config.json", "generation_config.json")) -> dict:
    """Weights as safetensors (no pickles), the `required` config files and tokenizer files
    (dual encoders export no generation config)."""
    names = {p.name for p in out.iterdir()}
    missing = [n for n in required if n not in names]
    if not any(n.endswith(".safetensors") for n in names):
        missing.append("*.safetensors")
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model"}:
        missing.append("tokenizer files")
    pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth")))
    check = {"files": sorted(names), "passed": not missing and not pickles}
    if not check["passed"]:
        check["error"] = f"missing {missing}" if missing else f"pickled weights {pickles}"
    return check


def check_adapter_effect(base_logits, adapter_logits, source: str) -> dict:
    """A loaded adapter must change the base model's outputs (an all-zero one does nothing)."""
    diff = float((base_logits - adapter_logits).abs().max())
    check = {"examples": source, "max_abs_diff_from_base": diff, "passed": diff > 0}
    if not check["passed"]:
        check["error"] = "the loaded adapter does not change the base model's logits (all zeros?)"
    return check


def check_adapter_files(out: Path) -> dict:
    names = {p.name for p in out.iterdir()}
    missing = [n for n in ("adapter_config.json", "adapter_model.safetensors") if n not in names]
    check = {"files": sorted(names), "passed": not missing}
    if missing:
        check["error"] = f"missing {missing}"
    return check
