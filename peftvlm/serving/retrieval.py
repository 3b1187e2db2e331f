"""A retrieval run ready to use: rank captions for images, images for a text, embed either.

    predictor = open_predictor("runs/clip-retrieval-tiny")    # a RetrievalPredictor
    predictor.rank_texts([image], ["a red square", "a blue circle"])  # per image, best first
    predictor.rank_images("a red square", [a, b])             # [(index, score), ...]
    predictor.embed_texts(["a red square"])                   # [N, D], unit length
    predictor.embed_images([image], base=True)                # the base model's features

The model is loaded as `peftvlm eval` scores it (`trainers.contrastive.evaluate_retrieval`):
the base dual encoder (CLIPModel / SiglipModel) with the run's peft adapter on top
(`PeftModel.from_pretrained`), or a merged export (`peftvlm export --merge`) as a plain
transformers model. Texts and images are encoded by the trainer's `Encoder` (the family's text
padding, the model's own image processor), and features come out as `contrastive.features`
computes them for retrieval scores: projected, then L2-normalised. A score is the cosine
similarity of an image and a text feature (what Recall@K ranks by).
"""

from __future__ import annotations

import functools

from peftvlm.errors import RunError
from peftvlm.models import load_base
from peftvlm.serving.predictor import AdaptedPredictor
from peftvlm.trainers.contrastive import Encoder, load_pairs, pooled


class RetrievalPredictor(AdaptedPredictor):
    """A dual encoder with its contrastively trained adapter (or merged weights)."""

    generates = False  # ranks captions and images, embeds both
    task = "retrieve"
    load_model = staticmethod(load_base)

    def __init__(self, files, loaded, model, base_switch):
        super().__init__(files, loaded, model, base_switch)
        self.encoder = Encoder(loaded.model, loaded.family, loaded.processor)

    @functools.cached_property
    def examples(self) -> list[dict]:
        """The first held-out pairs (`{"images": [image], "captions": [...]}`) for the demo;
        none for a merged export without its recipe, or data that cannot be read from here."""
        loaded = self.held_out_data(load_pairs)
        if loaded is None:
            return []
        _, train, held_out = loaded
        pairs = held_out or train
        return [{"images": [image], "captions": list(captions)}
                for image, captions in zip(pairs.images[:8], pairs.captions[:8])]

    @property
    def max_text_tokens(self) -> int:
        """The text tower's context (longer texts are truncated, as training truncated them)."""
        return self.encoder.max_length

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text)["input_ids"])

    # -- features ----------------------------------------------------------------------------
    def embed_texts(self, texts: list[str], base: bool = False, batch_size: int = 64):
        """L2-normalised text features [N, D] (float32, on the CPU)."""
        import torch

        return self._embed(texts, batch_size, base, lambda model, chunk: model.get_text_features(
            **self.encoder.texts(chunk, self.device)), torch)

    def embed_images(self, images: list, base: bool = False, batch_size: int = 32):
        """L2-normalised image features [N, D] of paths or PIL images (float32, on the CPU)."""
        import torch

        return self._embed(images, batch_size, base, lambda model, chunk: model.get_image_features(
            pixel_values=self.encoder.pixels(chunk, self.device).to(model.dtype)), torch)

    def _embed(self, items: list, batch_size: int, base: bool, encode, torch):
        import torch.nn.functional as F

        if not items:
            return torch.zeros(0, self.loaded.family.joint_dim(self.loaded.model.config))
        out = []
        with self.lock, self.model_for(base) as model, torch.no_grad():
            for start in range(0, len(items), batch_size):
                out.append(pooled(encode(model, items[start:start + batch_size])).float())
        return F.normalize(torch.cat(out), dim=-1).cpu()

    @property
    def device(self):
        return next(self.model.parameters()).device

    # -- ranking -----------------------------------------------------------------------------
    def rank_texts(self, images: list, captions: list[str], base: bool = False
                   ) -> list[list[tuple[str, float]]]:
        """Per image, every caption best first with its cosine similarity."""
        if not captions:
            raise RunError("no captions to rank", hint='pass captions, e.g. "a red square"')
        sims = self.embed_images(images, base) @ self.embed_texts(captions, base).t()
        return [sorted(((c, round(float(s), 4)) for c, s in zip(captions, row.tolist())),
                       key=lambda pair: -pair[1]) for row in sims]

    def caption_probabilities(self, image, captions: list[str], base: bool = False
                              ) -> dict[str, float]:
        """{caption: probability} for one image, as CLIP scores candidates: a softmax over the
        captions of the model's scaled similarities (a sigmoid each, with the learned bias, for
        families trained with one, as SigLIP)."""
        import torch

        sims = (self.embed_images([image], base) @ self.embed_texts(captions, base).t())[0]
        model = self.loaded.model
        logits = sims * model.logit_scale.detach().float().exp().cpu()
        if self.family.logit_bias:
            probs = (logits + model.logit_bias.detach().float().cpu()).sigmoid()
        else:
            probs = torch.softmax(logits, dim=-1)
        return {c: round(float(p), 4) for c, p in zip(captions, probs.tolist())}

    def rank_images(self, text: str, images: list, base: bool = False
                    ) -> list[tuple[int, float]]:
        """The images' indices best first for `text`, with their cosine similarity."""
        sims = (self.embed_images(images, base) @ self.embed_texts([text], base).t())[:, 0]
        return sorted(((i, round(float(s), 4)) for i, s in enumerate(sims.tolist())),
                      key=lambda pair: -pair[1])
