"""Contrastive PEFT for dual encoders (CLIP, SigLIP): lora / dora / vera on the text and/or
vision tower (`method.target`: text, vision, all), trained with the model's own loss on
image-caption pairs and scored by image<->text retrieval.

The loss is the one the checkpoint was pretrained with, computed by transformers itself
(`model(..., return_loss=True)`): CLIP's symmetric InfoNCE over the batch at the model's learned
temperature, SigLIP's pairwise sigmoid loss with its learned bias. Temperature and bias stay as
the base learned them (frozen), so the adapter alone is the trained state and loads with plain
`PeftModel.from_pretrained` on `CLIPModel` / `SiglipModel`.

Pairs come from the same readers, templates and bad-row policy as generative training
(`peftvlm.data.loading.load_rows`): the `caption` template's columns, COCO/Flickr30k-style
files, parquet, Hub datasets. Rows of one image are grouped; each epoch draws one of its
captions (seeded by data.seed, epoch and image), so every caption is seen over the epochs.

Scores (before and after training, on the held-out pairs): image->text and text->image
Recall@1/5/10, their sum `rsum`, and mean ranks (`peftvlm.metrics.retrieval`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftvlm.data.images import load_rgb
from peftvlm.data.loading import load_rows
from peftvlm.data.pairs import Pairs, image_id, pairs_from_rows  # noqa: F401
from peftvlm.errors import RecipeError
from peftvlm.eval.report import compare
from peftvlm.eval.report import write_outputs as write_eval_outputs
from peftvlm.metrics.retrieval import cross_modal_ranks, cross_modal_recall, mean_ranks
from peftvlm.models import load_base
from peftvlm.registry import get_method
from peftvlm.summary import loop_losses, parameter_counts, run_summary
from peftvlm.trainers.loop import (ADAPTER_DIR, PeftAdapterState, fit_scored, start_session,
                                   write_peft_run)



# --- encoding ---------------------------------------------------------------------------------

class Encoder:
    """Texts and images into model inputs, with the family's text conventions: CLIP pads to
    the longest text with a mask; SigLIP pads to the full length with no mask (as trained)."""

    def __init__(self, base_model, family, processor):
        self.family, self.processor = family, processor
        text = base_model.get_submodule(family.language_module).config
        self.max_length = text.max_position_embeddings

    def texts(self, texts: list[str], device) -> dict:
        fixed = self.family.text_padding == "max_length"
        batch = self.processor.tokenizer(texts, padding="max_length" if fixed else True,
                                         max_length=self.max_length, truncation=True,
                                         return_tensors="pt")
        keep = ("input_ids",) if fixed else ("input_ids", "attention_mask")
        return {k: v.to(device) for k, v in batch.items() if k in keep}

    def pixels(self, images: list, device):
        pixels = self.processor.image_processor(images=[load_rgb(i) for i in images],
                                                return_tensors="pt")["pixel_values"]
        return pixels.to(device)


def pooled(output):
    """Projected features: transformers 5 returns an output object, older versions a tensor."""
    return getattr(output, "pooler_output", output)


def features(model, encoder: Encoder, pairs: Pairs, batch_size: int):
    """L2-normalised image features [N, D], caption features [M, D], caption -> image index."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    texts, owner = pairs.flat_texts()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        img = [pooled(model.get_image_features(pixel_values=encoder.pixels(
            pairs.images[i:i + batch_size], device))) for i in range(0, len(pairs), batch_size)]
        txt = [pooled(model.get_text_features(**encoder.texts(texts[i:i + batch_size], device)))
               for i in range(0, len(texts), batch_size)]
    model.train(was_training)
    return (F.normalize(torch.cat(img).float(), dim=-1),
            F.normalize(torch.cat(txt).float(), dim=-1), owner)


def retrieval_scores(model, encoder: Encoder, pairs: Pairs, batch_size: int,
                     with_ranks: bool = False):
    """Image->text and text->image Recall@1/5/10, rsum and mean ranks on `pairs`; with
    `with_ranks`, also each caption's rank of its image (for predictions files)."""
    img, txt, owner = features(model, encoder, pairs, batch_size)
    similarity = (img @ txt.t()).cpu().numpy()
    scores = {**cross_modal_recall(similarity, owner),
              **mean_ranks(*cross_modal_ranks(similarity, owner))}
    if with_ranks:
        return scores, cross_modal_ranks(similarity, owner)[1]
    return scores


# --- the task for the shared loop -------------------------------------------------------------

@dataclass
class RetrievalTask(PeftAdapterState):
    """Contrastive training on `train` pairs, scored on `held_out` pairs."""

    model: object  # the PeftModel
    encoder: Encoder
    train: Pairs
    held_out: Pairs | None
    seed: int
    eval_batch_size: int

    @property
    def n_examples(self) -> int:
        return len(self.train)

    def loss(self, model, index, epoch: int, device):
        chosen = index.tolist()
        texts = self.encoder.texts([self.train.caption(i, epoch, self.seed) for i in chosen],
                                   device)
        pixels = self.encoder.pixels([self.train.images[i] for i in chosen], device)
        return model(**texts, pixel_values=pixels, return_loss=True).loss

    def scores(self) -> dict | None:
        if not self.held_out:
            return None
        return retrieval_scores(self.model, self.encoder, self.held_out, self.eval_batch_size)


# --- the run ----------------------------------------------------------------------------------

def load_pairs(recipe, max_eval: int | None):
    """(prepared rows, training pairs, held-out pairs or None) through the generative readers."""
    data = load_rows(recipe)
    held_out = pairs_from_rows(data.eval, "data.eval") if data.eval else None
    if held_out is not None and max_eval:
        held_out = Pairs(held_out.images[:max_eval], held_out.captions[:max_eval])
    return data, pairs_from_rows(data.train, "data.train"), held_out


def load_and_adapt(recipe):
    """(loaded base, the PeftModel, the family's encoder) for a retrieval recipe."""
    loaded = load_base(recipe.model, recipe.method.name)
    encoder = Encoder(loaded.model, loaded.family, loaded.processor)
    model = get_method(recipe.method.name).apply(
        loaded.model, loaded.family, recipe.method,
        gradient_checkpointing=recipe.train.gradient_checkpointing)
    return loaded, model, encoder


def dry_run_contrastive(recipe, log=print) -> dict:
    """Load, adapt and read the pairs; report parameter counts and one pair; train nothing."""
    loaded, model, _ = load_and_adapt(recipe)
    data, train, held_out = load_pairs(recipe, recipe.eval.max_samples)
    trainable, total = parameter_counts(model)
    log(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    log(f"pairs: {len(train)} training images ({sum(map(len, train.captions))} captions), "
        f"{len(held_out) if held_out else 0} held-out images")
    log(f"example: {train.images[0]} <-> {train.captions[0]}")
    return {"trainable_params": trainable, "total_params": total, "train_images": len(train),
            "train_captions": sum(map(len, train.captions)), **data.report()}


def train_contrastive(recipe, run_dir: Path, resume: bool = False, log=print) -> dict:
    """Train a peft adapter on a dual encoder contrastively; returns (and writes) the summary."""
    from accelerate.utils import set_seed

    run_dir, session = Path(run_dir), start_session(recipe)
    set_seed(recipe.train.seed)
    data, train, held_out = load_pairs(recipe, recipe.eval.max_samples)
    loaded, model, encoder = load_and_adapt(recipe)
    model.to(session.accelerator.device)
    trainable, total = parameter_counts(model)
    log(f"model: {recipe.model.id} ({loaded.family.name}), {recipe.method.name}: "
        f"{trainable:,} of {total:,} parameters train; {len(train)} training images")
    task = RetrievalTask(model, encoder, train, held_out, recipe.data.seed,
                         recipe.eval.batch_size)
    done, scores = fit_scored(recipe, session, task, model, run_dir, resume, log, held_out)
    summary = summarise(recipe, loaded, done, (trainable, total), data, train, scores)
    if session.accelerator.is_main_process:
        write_peft_run(recipe, model, loaded.processor, done, summary, run_dir)
    return summary


def summarise(recipe, loaded, done, counts, data, train: Pairs, scores: dict) -> dict:
    """summary.json: the generative summary's fields, with retrieval scores under `eval`."""
    return run_summary(
        recipe, loaded.family, counts, runtime_s=done.runtime_s, global_step=done.state.step,
        **loop_losses(done.state.history), eval=scores,
        data={**data.report(), "train_images": len(train),
              "train_captions": sum(map(len, train.captions))})


# --- peftvlm eval -----------------------------------------------------------------------------

LOWER_IS_BETTER = {"image_to_text_mean_rank": False, "text_to_image_mean_rank": False}


def evaluate_retrieval(recipe, run_dir, split: str = "test", max_samples: int | None = None,
                       with_base: bool = True, log=print) -> dict:
    """`peftvlm eval` of a retrieval run: the base vs the run's adapter on the held-out pairs
    (`test`, as training scored them, so the numbers equal summary.json's) or the training
    pairs (`train`); writes RUN/eval/ (metrics.json, predictions.jsonl: each caption's rank of
    its image, metrics.png)."""
    from peft import PeftModel

    run_dir, limit = Path(run_dir), max_samples or recipe.eval.max_samples
    _, train, held_out = load_pairs(recipe, limit)
    pairs = held_out if split == "test" else Pairs(train.images[:limit], train.captions[:limit])
    if pairs is None:
        raise RecipeError("--split test: the recipe has no held-out pairs (data.eval)",
                          hint="add data.eval, or score the training pairs with --split train")
    loaded = load_base(recipe.model, recipe.method.name)
    loaded.model.to("cuda" if _cuda() else "cpu")
    encoder, size = Encoder(loaded.model, loaded.family, loaded.processor), recipe.eval.batch_size
    base, base_ranks = retrieval_scores(loaded.model, encoder, pairs, size, True) if with_base \
        else (None, None)
    tuned_model = PeftModel.from_pretrained(loaded.model, run_dir / ADAPTER_DIR)
    tuned, ranks = retrieval_scores(tuned_model, encoder, pairs, size, True)
    result = {"run": str(run_dir), "run_name": recipe.name, "recipe": str(recipe.source_path),
              "model": recipe.model.id, "method": recipe.method.name, "split": split,
              "num_examples": len(pairs), "metrics": compare(base, tuned, LOWER_IS_BETTER),
              "per_class": {}, "notes": {}}
    files = write_eval_outputs(run_dir / "eval", result,
                               prediction_rows(pairs, ranks, base_ranks))
    result["files"] = {k: str(v) for k, v in files.items()}
    log(f"{split}: rsum {tuned['rsum']:.2f} with {recipe.method.name}"
        + (f" ({base['rsum']:.2f} base)" if base else ""))
    return result


def prediction_rows(pairs: Pairs, ranks: list[int], base_ranks: list[int] | None) -> list[dict]:
    """One row per caption query: its text, its image, the rank of that image (and the base's)."""
    texts, owner = pairs.flat_texts()
    return [{"id": str(j), "text": text, "image": str(image_id(pairs.images[owner[j]]))[:200],
             "rank": ranks[j], "base_rank": base_ranks[j] if base_ranks else None}
            for j, text in enumerate(texts)]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
