"""`peftvlm export` for retrieval runs (a peft adapter on CLIP / SigLIP), through the same
card / report / push steps as every export (`export.finish_export`).

- adapter-only: the peft files + processor; checked to load with plain `PeftModel` on the
  base `AutoModel` (CLIPModel / SiglipModel) and to change its features;
- `--merge`: the adapter folded into the base and saved as a plain transformers model; checked
  that, reloaded with `AutoModel.from_pretrained`, its image and text features equal the
  adapter model's (max |diff| <= 1e-5 in float32) and that the adapted weights moved.

Probe pairs are the recipe's first held-out rows (a drawn image when its data is unreadable).
"""

from __future__ import annotations

from peftvlm.data.pairs import pairs_from_rows
from peftvlm.export import (adapter_base, copy_adapter_files, load_unquantized_base,
                            verify_adapter_effect, verify_merge)
from peftvlm.export.checks import check_adapter_files, device, probe_rows
from peftvlm.trainers.contrastive import Encoder, pooled

# Features are unit vectors: in float32 a merge is exact to rounding.
FEATURE_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


def probe_inputs(recipe, loaded):
    """(text inputs, pixel values, where they came from) of a few probe pairs."""
    rows, source = probe_rows(recipe, loaded.family)
    pairs = pairs_from_rows(rows, "probe rows")
    encoder = Encoder(loaded.model, loaded.family, loaded.processor)
    texts = [caps[0] for caps in pairs.captions]
    return (encoder.texts(texts, device()), encoder.pixels(pairs.images, device()), source)


def features_of(model, texts: dict, pixels):
    """Image and text features of the probes, one [N_img + N_txt, D] float32 tensor."""
    import torch

    model.eval()
    with torch.no_grad():
        image = pooled(model.get_image_features(pixel_values=pixels.to(model.dtype)))
        text = pooled(model.get_text_features(**texts))
    return torch.cat([image, text]).float()


def compare_features(reference, actual, dtype: str, source: str) -> dict:
    """Max |diff| of the L2-normalised features (what retrieval compares) against the dtype's
    tolerance; the raw projections' difference is reported beside it."""
    import torch.nn.functional as F

    diff = float((F.normalize(reference, dim=-1) - F.normalize(actual, dim=-1)).abs().max())
    tolerance = FEATURE_TOLERANCE[dtype]
    check = {"examples": source, "vectors": int(reference.shape[0]), "max_abs_diff": diff,
             "raw_max_abs_diff": float((reference - actual).abs().max()),
             "tolerance": tolerance, "passed": diff <= tolerance}
    if not check["passed"]:
        check["error"] = (f"merged features differ from the adapter model's by {diff} "
                          f"(tolerance {tolerance:.0e})")
    return check


def export_retrieval_merged(run, opts, log) -> dict:
    """Merge, save, reload plainly, compare features."""
    loaded = load_unquantized_base(run.recipe, opts.dtype, run.adapter_dir)
    texts, pixels, source = probe_inputs(run.recipe, loaded)
    reloaded, checks = verify_merge(
        run, opts, loaded, log, outputs_of=lambda model: features_of(model, texts, pixels),
        compare=lambda ref, merged: compare_features(ref, merged, opts.dtype, source),
        compared="features", auto_class="AutoModel")
    return {"kind": "merged", "dtype": opts.dtype, "method": run.recipe.method.name,
            "model_class": type(reloaded).__name__, "checks": checks,
            "loading_snippet": loading_snippet(type(reloaded).__name__, None)}


def export_retrieval_adapter(run, opts, log) -> dict:
    """Copy the adapter; it must load with plain PeftModel and change the base's features."""
    copy_adapter_files(run.adapter_dir, opts.out)
    loaded = load_unquantized_base(run.recipe, None, run.adapter_dir)
    texts, pixels, source = probe_inputs(run.recipe, loaded)
    _, effect = verify_adapter_effect(
        loaded, opts.out, lambda model: features_of(model, texts, pixels), source)
    checks = {"adapter_effect": effect, "files": check_adapter_files(opts.out)}
    class_name = type(loaded.model).__name__
    return {"kind": "adapter", "method": run.recipe.method.name, "base_model": adapter_base(
        opts.out), "checks": checks, "loading_snippet": loading_snippet(class_name,
                                                                        run.recipe.model.id)}


def loading_snippet(class_name: str, base_id: str | None) -> str:
    """A program that loads the export and ranks two captions for an image."""
    if base_id is None:
        load = ("model = AutoModel.from_pretrained('EXPORT_FOLDER')\n"
                "processor = AutoProcessor.from_pretrained('EXPORT_FOLDER')\n")
        imports = "from transformers import AutoModel, AutoProcessor\n"
    else:
        load = (f"base = AutoModel.from_pretrained({base_id!r})  # a {class_name}\n"
                "model = PeftModel.from_pretrained(base, 'EXPORT_FOLDER')\n"
                "processor = AutoProcessor.from_pretrained('EXPORT_FOLDER')\n")
        imports = "from peft import PeftModel\nfrom transformers import AutoModel, AutoProcessor\n"
    return ("```python\nimport torch\nfrom PIL import Image\n" + imports + "\n" + load +
            "image = Image.open('your_image.jpg').convert('RGB')\n"
            "texts = ['a photo of a dog', 'a photo of a cat']\n"
            "inputs = processor(text=texts, images=image, padding='max_length', "
            "return_tensors='pt')\n"
            "with torch.no_grad():\n"
            "    print(model(**inputs).logits_per_image.softmax(-1))\n```")
