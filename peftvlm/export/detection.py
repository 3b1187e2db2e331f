"""`peftvlm export` for detection runs (a peft adapter on Grounding DINO), through the same
card / report / push steps as every export (`export.finish_export`).

- adapter-only: the peft files + processor; checked to load with plain `PeftModel` on the
  base detector and to change its outputs;
- `--merge`: the adapter folded into the base and saved as a plain transformers model; checked
  that, reloaded with `AutoModelForZeroShotObjectDetection.from_pretrained`, its class logits
  and boxes on probe images equal the adapter model's (max |diff| within the dtype's
  tolerance, as the generative export checks logits) and that the adapted weights moved.

Probe images are the recipe's first held-out images, asked for the run's classes.
"""

from __future__ import annotations

from peftvlm.export import (adapter_base, copy_adapter_files, load_unquantized_base,
                            verify_adapter_effect, verify_merge)
from peftvlm.export.checks import check_adapter_files, compare_logits, device
from peftvlm.trainers.detection import encode, load_data, peft_ready

PROBES = 2
AUTO_CLASS = "AutoModelForZeroShotObjectDetection"


def probe_batch(recipe, processor):
    """(model inputs of a few held-out images with the run's class prompt, where they came
    from, the classes)."""
    train, held_out, classes = load_data(recipe, PROBES)
    data = held_out or train
    batch = encode(processor, data.records[:PROBES], classes, device(), labels=False)
    return batch, f"the first {min(PROBES, len(data))} held-out images", classes


def outputs_of(model, batch):
    """Class logits and boxes of the probes, one flat float32 [positions, values] tensor."""
    import torch

    model.eval()
    with torch.no_grad():
        out = model(**{k: v.to(model.dtype) if k == "pixel_values" else v
                       for k, v in batch.items()})
    logits = out.logits.float().flatten(0, 1)
    # text positions past the prompt are -inf in both: compare the prompt's positions
    logits = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
    return torch.cat([logits, out.pred_boxes.float().flatten(0, 1)], dim=-1)


def export_detection_merged(run, opts, log) -> dict:
    """Merge, save, reload plainly, compare logits and boxes."""
    loaded = load_unquantized_base(run.recipe, opts.dtype, run.adapter_dir)
    peft_ready(loaded.model, loaded.family)
    batch, source, classes = probe_batch(run.recipe, loaded.processor)
    reloaded, checks = verify_merge(
        run, opts, loaded, log, outputs_of=lambda model: outputs_of(model, batch),
        compare=lambda ref, merged: compare_logits(ref, merged, opts.dtype, source),
        compared="outputs", auto_class=AUTO_CLASS)
    return {"kind": "merged", "dtype": opts.dtype, "method": run.recipe.method.name,
            "model_class": type(reloaded).__name__, "classes": classes, "checks": checks,
            "loading_snippet": loading_snippet(None, classes)}


def export_detection_adapter(run, opts, log) -> dict:
    """Copy the adapter; it must load with plain PeftModel and change the base's outputs."""
    copy_adapter_files(run.adapter_dir, opts.out)
    loaded = load_unquantized_base(run.recipe, None, run.adapter_dir)
    peft_ready(loaded.model, loaded.family)
    batch, source, classes = probe_batch(run.recipe, loaded.processor)
    _, effect = verify_adapter_effect(loaded, opts.out, lambda model: outputs_of(model, batch),
                                      source)
    checks = {"adapter_effect": effect, "files": check_adapter_files(opts.out)}
    return {"kind": "adapter", "method": run.recipe.method.name, "classes": classes,
            "base_model": adapter_base(opts.out), "checks": checks,
            "loading_snippet": loading_snippet(run.recipe.model.id, classes)}


def loading_snippet(base_id: str | None, classes: list[str]) -> str:
    """A program that loads the export and prints boxes for an image."""
    prompt = " . ".join(classes) + " ."
    if base_id is None:
        load = (f"model = {AUTO_CLASS}.from_pretrained('EXPORT_FOLDER')\n")
        imports = f"from transformers import AutoProcessor, {AUTO_CLASS}\n"
    else:
        load = (f"base = {AUTO_CLASS}.from_pretrained({base_id!r})\n"
                "base.get_input_embeddings = lambda: base.model.text_backbone.embeddings"
                ".word_embeddings  # peft asks for it\n"
                "model = PeftModel.from_pretrained(base, 'EXPORT_FOLDER')\n")
        imports = f"from peft import PeftModel\nfrom transformers import AutoProcessor, " \
                  f"{AUTO_CLASS}\n"
    return ("```python\nimport torch\nfrom PIL import Image\n" + imports + "\n" + load +
            "processor = AutoProcessor.from_pretrained('EXPORT_FOLDER')\n"
            "image = Image.open('your_image.jpg').convert('RGB')\n"
            f"inputs = processor(images=image, text={prompt!r}, return_tensors='pt')\n"
            "with torch.no_grad():\n"
            "    outputs = model(**inputs)\n"
            "print(processor.post_process_grounded_object_detection(\n"
            "    outputs, inputs.input_ids, threshold=0.3, target_sizes=[image.size[::-1]]))\n"
            "```")
