"""A frozen CLIP-style dual encoder as an image classifier, and method save/load.

`DualEncoderClassifier` scores images against class names: logits = logit_scale.exp() *
cosine(image feature, class text feature), as CLIP's zero-shot classifier does (+ logit_bias
for SigLIP, whose sigmoid loss was trained on those logits). Each method
subclasses it and overrides `image_features` and/or `class_text_features`; the base model's
own parameters are frozen and stay in eval mode, so dropout inside it never fires.

A trained method is saved as two small files: `peftvlm_method.json` (method config, class
names, prompt templates) and `peftvlm_method.safetensors` (the learned tensors only).
`load_method` rebuilds the method on a base model and loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftvlm.errors import RunError
from peftvlm.registry import get_method

CONFIG_FILE = "peftvlm_method.json"
WEIGHTS_FILE = "peftvlm_method.safetensors"
BASE_PREFIX = "model."


def text_length(model, family) -> int | None:
    """The fixed length every text is padded to (`max_length` families), else None."""
    if family is None or family.text_padding != "max_length":
        return None
    return model.get_submodule(family.language_module).config.max_position_embeddings


def _tokenize(model, family, tokenizer, texts: list[str], device) -> dict:
    length = text_length(model, family)
    if length is None:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        keep = ("input_ids", "attention_mask")
    else:
        # SigLIP: pad to max_length and attend to the pads, as the text model was trained.
        batch = tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt")
        keep = ("input_ids",)
    return {k: v.to(device) for k, v in batch.items() if k in keep}


@torch.no_grad()
def prompt_text_features(model, tokenizer, classnames: list[str], templates: list[str],
                         family=None):
    """Hand-written prompt features [n_cls, D]: each template filled with each class name,
    encoded, L2-normalised and averaged over templates (CLIP's prompt ensembling). `family`
    says how texts are padded (default: CLIP's pad-to-longest)."""
    device = next(model.parameters()).device
    per_template = []
    for template in templates:
        texts = [template.format(name) for name in classnames]
        inputs = _tokenize(model, family, tokenizer, texts, device)
        feats = model.get_text_features(**inputs).pooler_output
        per_template.append(F.normalize(feats, dim=-1))
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


class DualEncoderClassifier(nn.Module):
    """Zero-shot CLIP over `classnames`; subclasses add what their paper learns."""

    def __init__(self, model, family, config, tokenizer, classnames, templates):
        super().__init__()
        self.model = model
        self.family = family
        self.method_config = config
        self.tokenizer = tokenizer
        self.templates = list(templates)
        self.model.requires_grad_(False)
        self.model.eval()
        self.build_learned(classnames)
        self.set_classnames(classnames)

    # --- what methods override ----------------------------------------------------------------
    def build_learned(self, classnames: list[str]) -> None:
        """Create the method's trainable modules/parameters (none: zero-shot CLIP)."""
    def set_classnames(self, classnames: list[str]) -> None:
        """Point the classifier at new classes (base-to-new evaluation calls this)."""
        self.classnames = list(classnames)
        self.register_buffer("zero_shot_features", prompt_text_features(
            self.model, self.tokenizer, self.classnames, self.templates, self.family),
            persistent=False)

    def image_features(self, pixel_values):
        """Projected image features [B, D] (not normalised)."""
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def class_text_features(self):
        """Projected class features [n_cls, D] (not necessarily normalised)."""
        return self.zero_shot_features

    @property
    def transfers_to_new_classes(self) -> bool:
        """Whether the learned parts apply to classes unseen in training (base-to-new)."""
        return True

    @property
    def learns_image_side(self) -> bool:
        """Whether the method changes image features (if not, its class scores fold into a
        linear head on CLIP's own image features: the merged export)."""
        return False

    # --- shared behaviour ---------------------------------------------------------------------
    def forward(self, pixel_values):
        """Class logits [B, n_cls]: scaled cosine similarity, as in CLIP (plus SigLIP's
        learned bias where the family scores with one)."""
        image = F.normalize(self.image_features(pixel_values), dim=-1)
        text = F.normalize(self.class_text_features(), dim=-1)
        logits = self.model.logit_scale.exp() * image @ text.t()
        if self.family.logit_bias:
            logits = logits + self.model.logit_bias
        return logits

    def train(self, mode: bool = True):
        """Train the method's own modules; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def learned_state_dict(self) -> dict:
        """The method's own tensors (everything outside the base model), detached."""
        return {name: p.detach() for name, p in self.named_parameters()
                if not name.startswith(BASE_PREFIX)}


def save_method(classifier: DualEncoderClassifier, out_dir: Path) -> None:
    """Write the method config + class names (JSON) and learned tensors (safetensors)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"method": classifier.method_config.model_dump(mode="json"),
            "classnames": classifier.classnames, "templates": classifier.templates}
    (out_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    tensors = {k: v.cpu().contiguous() for k, v in classifier.learned_state_dict().items()}
    save_file(tensors, out_dir / WEIGHTS_FILE)


def load_method(model, family, tokenizer, method_dir: Path) -> DualEncoderClassifier:
    """Rebuild a saved method on `model` (the same base it was trained on) and load its tensors."""
    from safetensors.torch import load_file

    method_dir = Path(method_dir)
    if not (method_dir / CONFIG_FILE).exists() or not (method_dir / WEIGHTS_FILE).exists():
        raise RunError(f"{method_dir} holds no saved CLIP-family method "
                       f"({CONFIG_FILE} and {WEIGHTS_FILE} expected)",
                       hint="point at a run's `adapter/` folder or a checkpoint folder")
    meta = json.loads((method_dir / CONFIG_FILE).read_text())
    info = get_method(meta["method"]["name"])
    config = info.config_cls.model_validate(meta["method"])
    classifier = info.apply(model, family, config, tokenizer=tokenizer,
                            classnames=meta["classnames"], templates=meta["templates"])
    device = next(model.parameters()).device
    tensors = {k: v.to(device) for k, v in load_file(method_dir / WEIGHTS_FILE).items()}
    missing, unexpected = classifier.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.startswith(BASE_PREFIX)]
    if missing or unexpected:
        raise RunError(f"{method_dir}: saved tensors do not match the method "
                       f"(missing {missing}, unexpected {unexpected})")
    return classifier
