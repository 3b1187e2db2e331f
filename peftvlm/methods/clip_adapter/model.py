"""CLIP-Adapter's residual feature adapters (Gao et al. 2021, "CLIP-Adapter: Better
Vision-Language Models with Feature Adapters", https://arxiv.org/abs/2110.04544).

A bottleneck MLP A(f) = ReLU(W2 ReLU(W1 f)) (no biases, W1: d -> d/r) on CLIP's projected
features, blended with the frozen feature: f* = a * A(f) + (1 - a) * f. The image side is the
paper's default; the text side adapts the class (prompt) features; `both` uses one of each.
"""

from __future__ import annotations

from torch import nn

from peftvlm.errors import RecipeError
from peftvlm.methods.dual_encoder.base import DualEncoderClassifier


class Adapter(nn.Module):
    """Linear(d, d/r) -> ReLU -> Linear(d/r, d) -> ReLU, without biases (as in the paper)."""

    def __init__(self, dim: int, reduction: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
                                nn.Linear(dim // reduction, dim, bias=False), nn.ReLU())

    def forward(self, features):
        return self.fc(features)


class ClipAdapterClassifier(DualEncoderClassifier):
    """CLIP whose image and/or class text features pass a residual adapter."""

    def build_learned(self, classnames: list[str]) -> None:
        cfg = self.method_config
        dim = self.family.joint_dim(self.model.config)
        if dim % cfg.reduction:
            raise RecipeError(f"method.reduction: {cfg.reduction} does not divide the feature "
                              f"width {dim}", hint="pick a divisor of it (the paper uses 4)")
        ref = self.model.logit_scale
        sides = ("image", "text") if cfg.side == "both" else (cfg.side,)
        self.adapters = nn.ModuleDict({side: Adapter(dim, cfg.reduction) for side in sides})
        self.adapters.to(device=ref.device, dtype=ref.dtype)

    @property
    def learns_image_side(self) -> bool:
        return "image" in self.adapters

    def _blend(self, side: str, features):
        if side not in self.adapters:
            return features
        alpha = self.method_config.alpha
        return alpha * self.adapters[side](features) + (1 - alpha) * features

    def image_features(self, pixel_values):
        return self._blend("image", super().image_features(pixel_values))

    def class_text_features(self):
        return self._blend("text", super().class_text_features())
