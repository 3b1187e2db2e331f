"""CLIP-family methods (CoOp, VPT, CLIP-Adapter) as a task of the shared dual-encoder loop
(`peftvlm.trainers.loop`): few-shot image classification with cross-entropy over CLIP's scaled
cosine logits.

`train_dual_encoder(recipe, run_dir, resume)` reads top to bottom: load the frozen dual
encoder, build the (few-shot) task, score zero-shot CLIP, apply the method, train, score again,
write the run folder (adapter/, checkpoints/, loss.png, summary.json). One accelerate process
per device; with several processes each takes its slice of every global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftvlm.errors import RecipeError
from peftvlm.methods.dual_encoder import DualEncoderClassifier, save_method
from peftvlm.methods.dual_encoder.base import WEIGHTS_FILE
from peftvlm.models import load_base
from peftvlm.registry import get_method
from peftvlm.runs import plot_loss, write_json
from peftvlm.summary import loop_losses, parameter_counts, run_summary
from peftvlm.trainers import clip_data
from peftvlm.trainers.loop import ADAPTER_DIR, CHECKPOINT_DIR, fit, start_session  # noqa: F401


# --- model ------------------------------------------------------------------------------------

def load_dual_encoder(recipe):
    """The recipe's base model (frozen later by the method), processor and family."""
    loaded = load_base(recipe.model, recipe.method.name)
    if not loaded.family.is_dual_encoder:
        raise RecipeError(f"model.id: {recipe.model.id!r} is a {loaded.family.name} model; "
                          f"{recipe.method.name} needs a dual encoder such as CLIP",
                          hint="use model.id=tiny-clip or a CLIP checkpoint")
    return loaded


# --- data -------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Images with label ids; pixels are made per batch by the model's image processor."""

    images: list
    labels: object  # LongTensor [N]
    processor: object

    def pixels(self, index) -> object:
        """Preprocessed pixel values [len(index), 3, H, W] of the images at `index`."""
        chosen = [clip_data.open_image(self.images[i]) for i in index.tolist()]
        return self.processor.image_processor(images=chosen, return_tensors="pt")["pixel_values"]


def image_set(split: clip_data.Split, processor) -> ImageSet:
    import torch

    return ImageSet(split.images, torch.tensor(split.labels, dtype=torch.long), processor)


def accuracy(classifier, data: ImageSet, batch_size: int = 64) -> float:
    """Top-1 accuracy of `classifier` on `data`."""
    import torch

    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    correct = 0
    with torch.no_grad():
        for index in torch.arange(len(data.labels)).split(batch_size):
            predicted = classifier(data.pixels(index).to(device)).argmax(-1).cpu()
            correct += int((predicted == data.labels[index]).sum())
    classifier.train(was_training)
    return correct / max(1, len(data.labels))


# --- evaluation sets --------------------------------------------------------------------------

@dataclass
class EvalSets:
    """Held-out images per class group: `base` (trained classes) and, base-to-new, `new`."""

    classnames: dict[str, list[str]]
    data: dict[str, ImageSet]
    batch_size: int = 64


def prepare_task(recipe, processor):
    """(training class names, training images, held-out sets) for the recipe's task."""
    data = recipe.data
    task = clip_data.load_task(data, recipe.base_dir())
    groups = {"base": list(range(len(task.classnames)))}
    if data.base_to_new:
        groups["base"], groups["new"] = clip_data.base_new_classes(len(task.classnames))
    train = clip_data.keep_classes(task.train, groups["base"])
    if data.shots:
        train = clip_data.few_shot(train, data.shots, len(groups["base"]), data.seed)
    names = {g: [task.classnames[c] for c in cs] for g, cs in groups.items()}
    evals = {}
    if task.eval is not None:  # no held-out data: accuracies are reported as null
        limit = recipe.eval.max_samples
        for group, classes in groups.items():
            held_out = clip_data.keep_classes(task.eval, classes)
            held_out = clip_data.Split(held_out.images[:limit], held_out.labels[:limit])
            evals[group] = image_set(held_out, processor)
    sets = EvalSets(names, evals, recipe.eval.batch_size)
    return names["base"], image_set(train, processor), sets


def evaluate(classifier, sets: EvalSets) -> dict | None:
    """Accuracy per class group (+ harmonic mean for base-to-new); restores the classes."""
    if not sets.data:
        return None
    trained = classifier.classnames
    scores = {}
    for group, tensors in sets.data.items():
        classifier.set_classnames(sets.classnames[group])
        scores[group] = accuracy(classifier, tensors, sets.batch_size)
    classifier.set_classnames(trained)
    if "new" in scores:
        b, n = scores["base"], scores["new"]
        scores["harmonic_mean"] = 2 * b * n / (b + n) if b + n else 0.0
    return scores


# --- the run ----------------------------------------------------------------------------------

def build_classifier(recipe, loaded, classnames: list[str]):
    """Apply the recipe's method to the frozen base, over `classnames`."""
    method = get_method(recipe.method.name)
    if not method.trains_dual_encoders:
        raise RecipeError(f"method.name: {method.name!r} is not a CLIP-family method",
                          hint="use coop, vpt or clip_adapter with a CLIP model")
    classifier = method.apply(loaded.model, loaded.family, recipe.method,
                              tokenizer=loaded.processor.tokenizer, classnames=classnames,
                              templates=recipe.data.prompt_templates)
    if recipe.data.base_to_new and not classifier.transfers_to_new_classes:
        raise RecipeError(f"data.base_to_new: method {method.name!r} as configured learns "
                          f"per-class parameters and cannot score new classes",
                          hint="for CoOp set method.csc=false")
    return classifier


def dry_run_dual_encoder(recipe, log=print) -> dict:
    """Load, apply the method and report parameter counts; trains and writes nothing."""
    loaded = load_dual_encoder(recipe)
    classnames, train_data, eval_sets = prepare_task(recipe, loaded.processor)
    trainable, total = parameter_counts(build_classifier(recipe, loaded, classnames))
    log(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    log(f"classes: {', '.join(classnames)}; train images: {len(train_data.labels)}")
    return {"trainable_params": trainable, "total_params": total,
            "train_examples": len(train_data.labels), "classnames": classnames}


def train_dual_encoder(recipe, run_dir: Path, resume: bool = False, log=print) -> dict:
    """Train the recipe's CLIP-family method; returns (and writes) the run summary."""
    from accelerate.utils import set_seed

    run_dir, session = Path(run_dir), start_session(recipe)
    accelerator = session.accelerator
    set_seed(recipe.train.seed)
    loaded = load_dual_encoder(recipe)
    loaded.model.to(accelerator.device)
    classnames, train_data, eval_sets = prepare_task(recipe, loaded.processor)
    zero_shot = DualEncoderClassifier(loaded.model, loaded.family, None, loaded.processor.tokenizer,
                                      classnames, recipe.data.prompt_templates)
    before = evaluate(zero_shot, eval_sets) if recipe.eval.before_training else None
    classifier = build_classifier(recipe, loaded, classnames)
    counts = parameter_counts(classifier)
    task = ClassificationTask(classifier, train_data, eval_sets)
    done = fit(recipe, session, task, classifier, run_dir, resume, log)
    state = done.state
    summary = run_summary(
        recipe, loaded.family, counts, runtime_s=done.runtime_s, global_step=state.step,
        **loop_losses(state.history),
        eval=eval_summary(before, evaluate(classifier, eval_sets), recipe.data.base_to_new),
        train_examples=len(train_data.labels), classnames=classnames)
    if accelerator.is_main_process:
        save_method(classifier, run_dir / ADAPTER_DIR)
        plot_loss(state.history, run_dir / "loss.png", title=f"{recipe.method.name} loss")
        write_json(run_dir / "summary.json", summary)
        if done.tracker is not None:
            done.tracker.summary.update({"eval/accuracy": summary["eval"]["accuracy"]["after"]})
            done.tracker.finish()
    return summary


def eval_summary(before: dict | None, after: dict | None, base_to_new: bool) -> dict:
    """`accuracy` {before, after} on the trained (base) classes; base/new/harmonic mean too."""
    out = {"accuracy": {"before": before and before["base"], "after": after and after["base"]}}
    if base_to_new:
        out["base_to_new"] = {"before": before, "after": after}
    return out


@dataclass
class ClassificationTask:
    """Few-shot classification for the shared loop: cross-entropy over the classifier's
    scaled cosine logits."""

    classifier: object
    data: ImageSet
    eval_sets: EvalSets

    @property
    def n_examples(self) -> int:
        return len(self.data.labels)

    def loss(self, model, index, epoch: int, device):
        import torch.nn.functional as F

        return F.cross_entropy(model(self.data.pixels(index).to(device)),
                               self.data.labels[index].to(device))

    def scores(self) -> dict | None:
        if not self.eval_sets.data:
            return None
        return {f"accuracy_{k}": v for k, v in evaluate(self.classifier, self.eval_sets).items()}

    def save_learned(self, folder: Path) -> None:
        save_method(self.classifier, folder)

    def load_learned(self, folder: Path) -> None:
        from safetensors.torch import load_file

        device = next(self.classifier.parameters()).device
        tensors = {k: v.to(device) for k, v in load_file(folder / WEIGHTS_FILE).items()}
        self.classifier.load_state_dict(tensors, strict=False)
