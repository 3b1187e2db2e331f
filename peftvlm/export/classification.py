"""`peftvlm export` for CLIP-family runs (CoOp, VPT, CLIP-Adapter).

Adapter export (default): the method's two files (`peftvlm_method.json` + `.safetensors`) and
the processor; `load_method(base, family, tokenizer, folder)` rebuilds the classifier.

Merged export (`--merge`), for methods whose image side is zero-shot CLIP (CoOp, CLIP-Adapter on
the text side): the learned class features are fixed after training, so they fold into one
plain linear layer: `logits = head(normalize(CLIPModel.get_image_features(pixels)))`, with
`head.weight = logit_scale.exp() * normalize(class features)` [n_classes, D] and no bias. The
folder holds the base CLIP (plain transformers), the processor, `class_head.safetensors`
(`weight`) and `class_head.json` (class names, how to apply it): nothing of peftvlm is needed.

Checks, as for peft exports: the export reloaded from disk gives the run's logits on held-out
images (`logits`), the method changes zero-shot CLIP's logits (`adapter_effect`), its held-out
accuracy equals summary.json's `eval.accuracy.after` (`accuracy`), and the files are complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftvlm.errors import ExportError
from peftvlm.export import read_run
from peftvlm.export.checks import check_adapter_effect, compare_logits
from peftvlm.methods.dual_encoder.base import (CONFIG_FILE, DualEncoderClassifier, WEIGHTS_FILE,
                                               load_method)
from peftvlm.trainers.clip import accuracy, load_dual_encoder, prepare_task

HEAD_WEIGHTS, HEAD_CONFIG = "class_head.safetensors", "class_head.json"
PROBE_IMAGES = 8


def class_head(classifier: DualEncoderClassifier) -> nn.Linear:
    """The classifier's class scoring as one bias-free linear layer over L2-normalised image
    features (the scale folded in): only valid when the image side is zero-shot CLIP."""
    if classifier.learns_image_side:
        raise ExportError(f"method {classifier.method_config.name!r} learns the image side "
                          f"(prompts or adapters on image features): its class scores do not "
                          f"fold into a linear head on CLIP's image features",
                          hint="export without --merge (the learned tensors + load_method)")
    if classifier.family.logit_bias:
        raise ExportError(f"--merge: {classifier.family.name} scores with a learned logit bias; "
                          f"the merged export's bias-free class head does not carry it yet",
                          hint="export without --merge (the learned tensors + load_method)")
    with torch.no_grad():
        text = F.normalize(classifier.class_text_features(), dim=-1)
        weight = classifier.model.logit_scale.exp() * text
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight = nn.Parameter(weight.detach().clone().cpu(), requires_grad=False)
    return head


class HeadClassifier(nn.Module):
    """Plain CLIP + a linear head: what a user of a merged export runs."""

    def __init__(self, model, head: nn.Linear):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, pixel_values):
        features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return self.head(F.normalize(features, dim=-1))


def export_dual_encoder(run_dir, adapter_dir: Path, out_dir: Path, merge: bool) -> dict:
    """Write and check the export of a finished CLIP-family run (see the module docstring)."""
    run = read_run(run_dir)
    loaded = load_dual_encoder(run.recipe)
    classnames, train_data, sets = prepare_task(run.recipe, loaded.processor)
    held_out = sets.data.get("base")
    probe_set = held_out or train_data
    pixels = probe_set.pixels(torch.arange(min(PROBE_IMAGES, len(probe_set.labels))))
    tokenizer = loaded.processor.tokenizer
    trained = load_method(loaded.model, loaded.family, tokenizer, adapter_dir).eval()
    zero_shot = DualEncoderClassifier(loaded.model, loaded.family, None, tokenizer,
                                      trained.classnames, trained.templates).eval()
    loaded.processor.save_pretrained(out_dir)
    if merge:
        exported, files = write_head_export(trained, loaded.model, out_dir), merged_files
    else:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(Path(adapter_dir) / name, out_dir / name)
        exported = load_method(load_dual_encoder(run.recipe).model, loaded.family, tokenizer,
                               out_dir).eval()
        files = adapter_files
    with torch.no_grad():
        reference, actual, base = trained(pixels), exported(pixels), zero_shot(pixels)
    source = f"{len(pixels)} {'held-out' if held_out else 'training'} images"
    checks = {"logits": compare_logits(reference, actual, "float32", source),
              "adapter_effect": check_adapter_effect(base, reference, source),
              "accuracy": accuracy_check(exported, held_out, run.summary),
              "files": files(out_dir)}
    return {"kind": "merged" if merge else "adapter", "method": run.recipe.method.name,
            "base_model": run.recipe.model.id, "classnames": trained.classnames,
            "loading_snippet": snippet(run.recipe.model.id, merge, loaded.family.name), "checks": checks}


def write_head_export(trained, model, out_dir: Path) -> HeadClassifier:
    """Base CLIP + class head to `out_dir`; returns them reloaded with plain transformers."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    head = class_head(trained)
    model.save_pretrained(out_dir)
    save_file({"weight": head.weight.contiguous()}, out_dir / HEAD_WEIGHTS)
    (out_dir / HEAD_CONFIG).write_text(json.dumps({
        "classnames": trained.classnames, "in_features": head.in_features,
        "logits": "class_head.weight @ normalize(CLIPModel.get_image_features(pixel_values))",
        "method": trained.method_config.model_dump(mode="json"),
        "templates": trained.templates}, indent=2) + "\n")
    reloaded = AutoModel.from_pretrained(out_dir).eval()
    plain = nn.Linear(head.in_features, head.out_features, bias=False)
    plain.load_state_dict(load_file(out_dir / HEAD_WEIGHTS))
    return HeadClassifier(reloaded, plain).eval()


# --- checks ------------------------------------------------------------------------------------

def accuracy_check(exported, held_out, summary: dict) -> dict:
    """The export's held-out accuracy against the one the run reported."""
    expected = ((summary.get("eval") or {}).get("accuracy") or {}).get("after")
    if held_out is None or expected is None:
        return {"passed": True, "skipped": "the run has no held-out accuracy to reproduce"}
    got = accuracy(exported, held_out)
    check = {"accuracy": got, "run_accuracy": expected, "passed": got == expected}
    if not check["passed"]:
        check["error"] = f"held-out accuracy {got} differs from the run's {expected}"
    return check


def _files_check(out_dir: Path, required: tuple[str, ...]) -> dict:
    names = {p.name for p in out_dir.iterdir()}
    missing = [n for n in required if n not in names]
    if not names & {"processor_config.json", "preprocessor_config.json"}:
        missing.append("processor_config.json")
    check = {"files": sorted(names), "passed": not missing}
    if missing:
        check["error"] = f"missing {missing}"
    return check


def adapter_files(out_dir: Path) -> dict:
    return _files_check(out_dir, (CONFIG_FILE, WEIGHTS_FILE, "tokenizer_config.json"))


def merged_files(out_dir: Path) -> dict:
    return _files_check(out_dir, ("config.json", "model.safetensors", HEAD_WEIGHTS, HEAD_CONFIG,
                                  "tokenizer_config.json"))


def snippet(base_id: str, merge: bool, family: str = "clip") -> str:
    """The model card's loading example."""
    if merge:
        body = ("import json\nimport torch.nn.functional as F\nfrom safetensors.torch import "
                "load_file\nfrom transformers import AutoModel, AutoProcessor\n\n"
                "folder = 'EXPORT_FOLDER'\nmodel = AutoModel.from_pretrained(folder)\n"
                "processor = AutoProcessor.from_pretrained(folder)\n"
                "weight = load_file(f'{folder}/class_head.safetensors')['weight']\n"
                "classnames = json.load(open(f'{folder}/class_head.json'))['classnames']\n"
                "image = Image.open('your_image.jpg').convert('RGB')\n"
                "pixels = processor(images=[image], return_tensors='pt')['pixel_values']\n"
                "features = F.normalize(model.get_image_features(pixel_values=pixels)"
                ".pooler_output, dim=-1)\n"
                "print(classnames[int((features @ weight.T).argmax())])\n")
    else:
        body = ("from PIL import Image\nfrom transformers import AutoModel, AutoProcessor\n"
                "from peftvlm.families import get_family\n"
                "from peftvlm.methods.dual_encoder import load_method\n\n"
                f"model = AutoModel.from_pretrained({base_id!r})  # the base it was trained on\n"
                "processor = AutoProcessor.from_pretrained('EXPORT_FOLDER')\n"
                f"classifier = load_method(model, get_family({family!r}), processor.tokenizer, "
                "'EXPORT_FOLDER')\n"
                "image = Image.open('your_image.jpg').convert('RGB')\n"
                "pixels = processor(images=[image], return_tensors='pt')['pixel_values']\n"
                "print(classifier.classnames[int(classifier(pixels).argmax())])\n")
    return "```python\n" + body + "```"
