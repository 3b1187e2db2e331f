"""CLIPScore and RefCLIPScore (Hessel et al., 2021) from a loaded CLIP model and processor.

CLIPScore = w * max(cos(image, "A photo depicts " + caption), 0) with w = 2.5. RefCLIPScore is
the harmonic mean of that and the best cosine between the caption and any (equally prefixed)
reference, as the authors' code computes it. Scores are per-image means. torch is imported
inside the functions only; pass any `CLIPModel` + `CLIPProcessor` (a tiny random one in tests)
and PIL images or image paths.
"""

from __future__ import annotations


from peftvlm.data.read.images import load_rgb
from peftvlm.metrics import mean, register

CLIP_W = 2.5
PREFIX = "A photo depicts "


def _normalised(features):
    features = getattr(features, "pooler_output", features)
    return features / features.norm(dim=-1, keepdim=True)


def _text_features(model, processor, texts: list[str], batch_size: int):
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        batch = processor(text=[PREFIX + t for t in texts[i:i + batch_size]], padding=True,
                          truncation=True, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out.append(_normalised(model.get_text_features(**batch)))
    return torch.cat(out)




def _image_features(model, processor, images: list, batch_size: int):
    import torch

    out = []
    for i in range(0, len(images), batch_size):
        batch = processor(images=[load_rgb(im) for im in images[i:i + batch_size]],
                          return_tensors="pt").to(model.device, dtype=model.dtype)
        with torch.no_grad():
            out.append(_normalised(model.get_image_features(**batch)))
    return torch.cat(out)


def clip_scores_per_image(model, processor, images: list, captions: list[str],
                          batch_size: int = 32) -> list[float]:
    """w * max(cos, 0) for each (image, caption) pair."""
    img = _image_features(model, processor, images, batch_size)
    txt = _text_features(model, processor, captions, batch_size)
    return (CLIP_W * (img * txt).sum(-1).clamp(min=0)).tolist()


def clip_scores_per_caption(model, processor, images: list, captions: list[list[str]],
                            batch_size: int = 32) -> list[list[float]]:
    """w * max(cos, 0) of every caption of each image, each image encoded once (data filtering
    scores several captions per image)."""
    img = _image_features(model, processor, images, batch_size)
    flat = [c for caps in captions for c in caps]
    txt = _text_features(model, processor, flat, batch_size)
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    scores = (CLIP_W * (img[owner] * txt).sum(-1).clamp(min=0)).tolist()
    out, start = [], 0
    for caps in captions:
        out.append(scores[start:start + len(caps)])
        start += len(caps)
    return out


def clip_score(model, processor, images: list, captions: list[str],
               references: list[list[str]] | None = None, batch_size: int = 32
               ) -> dict[str, float]:
    """Mean CLIPScore; with references also mean RefCLIPScore."""
    per_image = clip_scores_per_image(model, processor, images, captions, batch_size)
    scores = {"clipscore": mean(per_image)}
    if references is not None:
        cand = _text_features(model, processor, captions, batch_size)
        flat = [r for refs in references for r in refs]
        ref_feats = _text_features(model, processor, flat, batch_size)
        ref_cos, start = [], 0
        for i, refs in enumerate(references):
            block = ref_feats[start:start + len(refs)]
            ref_cos.append(float((block @ cand[i]).max()))
            start += len(refs)
        scores["refclipscore"] = mean([2 * c * r / (c + r) if c + r != 0 else 0.0
                                       for c, r in zip(per_image, ref_cos)])
    return scores


register("clipscore", clip_score, higher_is_better=True, prediction="model",
         summary="CLIPScore / RefCLIPScore (needs images and a CLIP model; Python API only)")
