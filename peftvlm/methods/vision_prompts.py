"""The torch side of `per_part`: VPT prompts in a generative VLM's vision tower + a peft adapter.

`PeftModelWithPrompts` is a plain `PeftModel` (LoRA/DoRA/VeRA on the language model) that also
owns a `VisualPrompts` module, attached to the vision tower for the model's lifetime:

- the tower's embeddings / encoder layers get VPT's hooks (`vpt.model.VisualPrompts`),
  so every layer sees `[CLS] [P_1..P_n] [patches]`;
- a forward hook on the tower strips the prompt positions from everything it returns, so the
  VLM (which picks `hidden_states[vision_feature_layer]` and drops CLS) gets exactly the image
  features it expects and its image-token count still matches. VPT discards the prompt outputs
  at the head anyway, so this is the paper's method;
- deep prompt sets stop at `vision_feature_layer`: later layers never reach the projector.

Saving writes peft's adapter files (so `PeftModel.from_pretrained` loads the LoRA part alone)
plus `peftvlm_prompts.json` (prompt settings, tower path) and `peftvlm_prompts.safetensors`;
`PeftModelWithPrompts.from_pretrained` reloads both, and Trainer checkpoints / resume carry
the prompts too because they go through the same `save_pretrained` / `load_adapter`.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import PeftModel

from peftvlm.errors import ExportError, ModelError, RunError
from peftvlm.methods.lora import apply_peft
from peftvlm.methods.vpt.model import VisualPrompts

PROMPTS_CONFIG = "peftvlm_prompts.json"
PROMPTS_WEIGHTS = "peftvlm_prompts.safetensors"


def layers_reaching_projector(model_config, vision_config) -> int:
    """How many vision layers feed the features the VLM uses (`vision_feature_layer`, an index
    into hidden_states where 0 is the embeddings; a list means several, the deepest counts)."""
    total = vision_config.num_hidden_layers
    chosen = getattr(model_config, "vision_feature_layer", -1)
    chosen = chosen if isinstance(chosen, (list, tuple)) else [chosen]
    return max(1, max(i if i >= 0 else total + 1 + i for i in chosen))


def find_vision_transformer(model, vision_module: str):
    """The tower at `vision_module`, checked for the layout VPT's hooks need."""
    tower = model.get_submodule(vision_module)
    if not (hasattr(tower, "embeddings") and hasattr(getattr(tower, "encoder", None), "layers")):
        raise ModelError(f"method.parts.vision: VPT needs a ViT-style vision tower with "
                         f"`embeddings` and `encoder.layers` and a leading CLS token; "
                         f"{vision_module} is a {type(tower).__name__}",
                         hint="use a LLaVA-style model (CLIP vision tower)")
    return tower


def _strip_outputs(prompts: VisualPrompts):
    def strip(_module, _args, out):
        out.last_hidden_state = prompts.strip(out.last_hidden_state)
        if getattr(out, "hidden_states", None) is not None:  # unselected layers are None
            out.hidden_states = tuple(h if h is None else prompts.strip(h)
                                      for h in out.hidden_states)
        return out
    return strip


class PeftModelWithPrompts(PeftModel):
    """A PeftModel whose vision tower carries VPT prompts; parts train at their own rates."""

    part_learning_rates: dict[str, float] | None = None

    def attach_prompts(self, prompts: VisualPrompts, settings: dict) -> None:
        """Own `prompts` (so they train, save and move with the model) and hook them into the
        tower named by `settings["vision_module"]`."""
        base = self.get_base_model()
        tower = find_vision_transformer(base, settings["vision_module"])
        ref = tower.embeddings.patch_embedding.weight
        self.visual_prompts = prompts.to(device=ref.device, dtype=ref.dtype)
        self.prompt_settings = dict(settings)
        self._prompt_hooks = prompts.attach(tower) + [
            tower.register_forward_hook(_strip_outputs(prompts))]

    def detach_prompts(self) -> None:
        """Remove the prompt hooks (the base model's forward is its own again)."""
        for handle in getattr(self, "_prompt_hooks", []):
            handle.remove()
        self._prompt_hooks = []

    def optimizer_param_groups(self, default_lr: float, weight_decay: float) -> list[dict]:
        """One optimiser group per part: `vision` (the prompts) and `language` (the adapter
        and any modules_to_save), each at its part's learning rate."""
        rates = self.part_learning_rates or {}
        prompt_ids = {id(p) for p in self.visual_prompts.parameters()}
        adapter = [p for p in self.parameters() if p.requires_grad and id(p) not in prompt_ids]
        prompts = [p for p in self.visual_prompts.parameters() if p.requires_grad]
        return [{"name": "language", "params": adapter, "weight_decay": weight_decay,
                 "lr": rates.get("language", default_lr)},
                {"name": "vision", "params": prompts, "weight_decay": weight_decay,
                 "lr": rates.get("vision", default_lr)}]

    # --- saving and loading ---------------------------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """peft's adapter files, plus the prompts (JSON settings + safetensors) beside them."""
        from safetensors.torch import save_file

        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        folder = Path(save_directory)
        (folder / PROMPTS_CONFIG).write_text(json.dumps(self.prompt_settings, indent=2) + "\n")
        tensors = {k: v.detach().cpu().contiguous()
                   for k, v in self.visual_prompts.state_dict().items()}
        save_file(tensors, folder / PROMPTS_WEIGHTS)

    def load_adapter(self, model_id, adapter_name, is_trainable: bool = False, **kwargs):
        """peft's adapter, then the prompts saved beside it (from_pretrained and Trainer's
        resume both come through here)."""
        result = super().load_adapter(model_id, adapter_name, is_trainable=is_trainable,
                                      **kwargs)
        folder = Path(model_id)
        if (folder / PROMPTS_WEIGHTS).exists():
            self.load_prompts(folder, is_trainable)
        return result

    def load_prompts(self, folder: Path, is_trainable: bool = False) -> None:
        """Build the prompts from `peftvlm_prompts.json` if absent, then load their tensors."""
        from safetensors.torch import load_file

        if not (folder / PROMPTS_CONFIG).exists():
            raise RunError(f"{folder} has {PROMPTS_WEIGHTS} but no {PROMPTS_CONFIG}",
                           hint="the adapter folder is incomplete: copy both files")
        if getattr(self, "visual_prompts", None) is None:
            settings = json.loads((folder / PROMPTS_CONFIG).read_text())
            self.attach_prompts(build_prompts(self.get_base_model(), settings), settings)
        device = self.visual_prompts.prompts.device
        tensors = {k: v.to(device) for k, v in load_file(folder / PROMPTS_WEIGHTS).items()}
        self.visual_prompts.load_state_dict(tensors)
        self.visual_prompts.requires_grad_(is_trainable)


def prompt_settings(model, family, vpt_cfg) -> dict:
    """What rebuilding the prompts needs: VPT settings, tower path, number of prompt sets."""
    tower = find_vision_transformer(model, family.vision_module)
    deep_layers = layers_reaching_projector(model.config, tower.config) if vpt_cfg.deep else 1
    return {"num_tokens": vpt_cfg.num_tokens, "deep": vpt_cfg.deep, "dropout": vpt_cfg.dropout,
            "deep_layers": deep_layers, "vision_module": family.vision_module}


def build_prompts(model, settings: dict) -> VisualPrompts:
    tower = find_vision_transformer(model, settings["vision_module"])
    return VisualPrompts(tower.config, settings["num_tokens"], settings["deep"],
                         settings["dropout"], deep_layers=settings["deep_layers"])


def apply_parts(model, family, cfg, *, quantized: bool = False,
                gradient_checkpointing: bool = False) -> PeftModelWithPrompts:
    """peft adapter on the language model, VPT prompts in the vision tower, per-part rates."""
    settings = prompt_settings(model, family, cfg.parts.vision)
    prompts = build_prompts(model, settings)  # before peft: same init whatever the adapter
    peft_model = apply_peft(model, family, cfg.parts.language, quantized=quantized,
                            gradient_checkpointing=gradient_checkpointing, wrap=_wrap)
    peft_model.attach_prompts(prompts, settings)
    peft_model.part_learning_rates = {part: getattr(cfg.parts, part).learning_rate
                                      for part in ("vision", "language")
                                      if getattr(cfg.parts, part).learning_rate}
    return peft_model


def _wrap(model, config) -> PeftModelWithPrompts:
    # As get_peft_model does: record the base (a from-config model's "" is no Hub id).
    config.base_model_name_or_path = model.__dict__.get("name_or_path") or None
    return PeftModelWithPrompts(model, config)


# --- export ------------------------------------------------------------------------------------

def export_per_part(run_dir, adapter_dir: Path, out_dir: Path, merge: bool) -> dict:
    """`peftvlm export` for per_part runs: peft's adapter + the prompts + the processor, checked
    by reloading the export as a user would and comparing with the run's own adapter folder.
    Merging is refused: prompts are extra tokens in the tower's input, not weight deltas."""
    import shutil

    # lazy: a method module is imported by the registry (so by `validate`); the export stage
    # above it pulls in the trainers (TRL), which only an export needs
    from peftvlm.export import (base_was_quantized, copy_adapter_files, load_unquantized_base,
                                read_run)
    from peftvlm.export.checks import (check_adapter_effect, check_adapter_files,
                                       check_generation, compare_logits, device, encode_rows,
                                       logits_of, probe_rows, prompt_text)

    if merge:
        raise ExportError("per_part runs cannot be merged: VPT prompts are extra tokens fed to "
                          "the vision tower, not weights that fold into the base",
                          hint="export the adapter (leave out --merge / export.merge)")
    run = read_run(run_dir)
    copy_adapter_files(adapter_dir, out_dir)
    for name in (PROMPTS_CONFIG, PROMPTS_WEIGHTS):
        shutil.copy2(adapter_dir / name, out_dir / name)
    loaded = load_unquantized_base(run.recipe, None, adapter_dir)
    rows, source = probe_rows(run.recipe, loaded.family)
    batch = encode_rows(loaded.processor, loaded.family, rows)
    base_logits = logits_of(loaded.model.to(device()), batch)
    trained = logits_of(PeftModelWithPrompts.from_pretrained(loaded.model, adapter_dir), batch)
    exported = load_unquantized_base(run.recipe, None, out_dir)
    model = PeftModelWithPrompts.from_pretrained(exported.model.to(device()), out_dir)
    prompt_files = check_adapter_files(out_dir)
    missing = [n for n in (PROMPTS_CONFIG, PROMPTS_WEIGHTS) if n not in prompt_files["files"]]
    if missing:
        prompt_files.update(passed=False, error=f"missing {missing}")
    checks = {"logits": compare_logits(trained, logits_of(model, batch), "float32", source),
              "adapter_effect": check_adapter_effect(base_logits, logits_of(model, batch), source),
              "generation": check_generation(model, exported.processor, exported.family, rows[0],
                                             None),
              "files": prompt_files}
    return {"kind": "adapter", "method": run.recipe.method.name,
            "example_prompt": prompt_text(rows[0]),
            "base_quantized_in_training": base_was_quantized(run.recipe),
            "base_model": model.peft_config["default"].base_model_name_or_path,
            "loading_snippet": LOADING_SNIPPET.replace("BASE_ID", repr(run.recipe.model.id)),
            "checks": checks}


LOADING_SNIPPET = """```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from peftvlm.methods.per_part import load_trained

base = AutoModelForImageTextToText.from_pretrained(BASE_ID)
model = load_trained(base, "EXPORT_FOLDER")  # LoRA via peft + the vision prompts
processor = AutoProcessor.from_pretrained("EXPORT_FOLDER")
image = Image.open("your_image.jpg").convert("RGB")
messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What color is the shape?"}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""
