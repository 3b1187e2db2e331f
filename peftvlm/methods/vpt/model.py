"""VPT's prompt tokens in a CLIP-style vision transformer (Jia et al. 2022, "Visual Prompt
Tuning", https://arxiv.org/abs/2203.12119).

Sequence layout seen by every encoder layer: `[CLS] [P_1 .. P_n] [patch_1 .. patch_N]`.
Prompts enter after the position embeddings (they get none). Shallow: one prompt set, inserted
once before the first layer. Deep: a fresh set before every layer; before layer i > 1 the
previous layer's outputs at the prompt positions are *replaced* by set i, so the sequence
length stays 1 + n + N. The image feature is still the CLS output.

Mechanism: `VisualPrompts.attached(vision_model)` registers a forward hook on the embeddings
module (insert set 1) and, for deep prompts, forward pre-hooks on layers 2..L (swap in set i).
Hooks use only public module boundaries of transformers' vision transformers (`embeddings`,
`encoder.layers`), so the same code serves CLIP's vision model, LLaVA's CLIP vision tower and
SigLIP's, and no transformers function is patched. As in CLIP-based VPT baselines, the first
set passes CLIP's pre-encoder layer norm together with the patch tokens.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from peftvlm.errors import RecipeError
from peftvlm.methods.dual_encoder.base import DualEncoderClassifier


class VisualPrompts(nn.Module):
    """The prompt sets [n_sets, num_tokens, dim] and the hooks that place them."""

    def __init__(self, vision_config, num_tokens: int, deep: bool, dropout: float,
                 deep_layers: int | None = None):
        """`deep_layers`: how many leading layers get a prompt set when deep (default: all;
        fewer when only an earlier layer's output is used, as in LLaVA)."""
        super().__init__()
        dim, patch = vision_config.hidden_size, vision_config.patch_size
        n_sets = (deep_layers or vision_config.num_hidden_layers) if deep else 1
        channels = getattr(vision_config, "num_channels", 3)
        # Xavier-uniform bound over the patch-embedding fan-in + prompt width, as in VPT.
        bound = math.sqrt(6.0 / (channels * patch * patch + dim))
        self.prompts = nn.Parameter(torch.empty(n_sets, num_tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)
        self.num_tokens = num_tokens

    def _with_prompts(self, hidden, index: int, replace: bool):
        prompts = self.dropout(self.prompts[index]).to(hidden.dtype)
        prompts = prompts.expand(hidden.shape[0], -1, -1)
        rest = hidden[:, 1 + self.num_tokens:] if replace else hidden[:, 1:]
        return torch.cat([hidden[:, :1], prompts, rest], dim=1)

    def attach(self, vision_model) -> list:
        """Place the prompts in every later forward of `vision_model`; returns the hook handles
        (`handle.remove()` detaches). Generative VLMs call the tower inside their own forward,
        so there the prompts stay attached for the model's lifetime."""
        handles = [vision_model.embeddings.register_forward_hook(
            lambda _m, _i, out: self._with_prompts(out, 0, replace=False))]
        for i, layer in enumerate(vision_model.encoder.layers[1:self.prompts.shape[0]], start=1):
            handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        return handles

    @contextmanager
    def attached(self, vision_model):
        """Place the prompts in `vision_model`'s forward while the context is open."""
        handles = self.attach(vision_model)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def strip(self, hidden):
        """`[CLS] [prompts] [patches]` -> `[CLS] [patches]`: the layout the model expects back."""
        return torch.cat([hidden[:, :1], hidden[:, 1 + self.num_tokens:]], dim=1)

    def _layer_hook(self, index: int):
        def swap(_module, args, kwargs):
            if args:
                return (self._with_prompts(args[0], index, replace=True), *args[1:]), kwargs
            kwargs["hidden_states"] = self._with_prompts(kwargs["hidden_states"], index, True)
            return args, kwargs
        return swap


class VPTClassifier(DualEncoderClassifier):
    """CLIP with prompt tokens in its vision transformer; text side: hand-written prompts."""

    @property
    def vision_encoder(self):
        """The frozen vision transformer (a property, so it is not registered twice)."""
        return self.model.get_submodule(self.family.vision_module)

    def build_learned(self, classnames: list[str]) -> None:
        cfg = self.method_config
        if not self.family.vision_cls_token:
            raise RecipeError(
                f"method.name: vpt needs a vision transformer whose image feature is a leading "
                f"CLS token (prompts go between CLS and the patches); {self.family.name}'s vision "
                f"tower has no CLS token and pools all tokens with an attention head, so VPT as "
                f"written does not apply to it",
                hint="use clip_adapter (or coop) with this model, or a CLIP model for vpt")
        prompts = VisualPrompts(self.vision_encoder.config, cfg.num_tokens, cfg.deep, cfg.dropout)
        ref = self.model.logit_scale
        self.visual_prompts = prompts.to(device=ref.device, dtype=ref.dtype)

    @property
    def learns_image_side(self) -> bool:
        return True

    def image_features(self, pixel_values):
        with self.visual_prompts.attached(self.vision_encoder):
            return super().image_features(pixel_values)
