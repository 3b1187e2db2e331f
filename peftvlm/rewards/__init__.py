"""Verifiable rewards for GRPO, built from `peftvlm.metrics` (`train.rewards` in a recipe).

Each reward is a function with TRL's reward-function signature: `(prompts, completions,
**columns) -> list[float]`, one float per completion. The columns are the GRPO rows' own:
`references` (the row's reference answers: its last assistant turn, or its `references`) and
`box_format` (the run's family box convention, so grounding answers are parsed the way the
family writes boxes). A reward's `__name__` is its name in the recipe, so TRL logs it as
`rewards/<name>/mean` and `rewards/<name>/std` every logging step.

    funcs = build_rewards([RewardSpec(name="exact_match")], base_dir=Path("."))
    funcs[0](prompts=[...], completions=["red"], references=[["red"]])   # [1.0]

A user reward (`name: custom`) is a function in a Python file the recipe names; loading it runs
that file, so it needs `train.allow_custom_rewards: true` (like trust_remote_code).
Nothing here imports torch.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from peftvlm.data.boxes import get_convention
from peftvlm.errors import RecipeError
from peftvlm.metrics.captioning import (cider_d_per_image, python_ptb_tokenize,
                                        rouge_l_per_image)
from peftvlm.metrics.detection import detection_map
from peftvlm.metrics.grounding import row_iou
from peftvlm.metrics.vqa import anls_score, normalize_answer, row_accuracy

# score(completions, references, box_formats, spec) -> one float per completion
Scorer = Callable[[list[str], list[list], list, object], list[float]]


@dataclass(frozen=True)
class RewardInfo:
    """One built-in reward: how it scores, what it means, which recipe options it reads."""

    name: str
    score: Scorer
    summary: str
    options: tuple[str, ...] = ()


def completion_text(completion) -> str:
    """A completion's text: TRL passes strings, or (conversational prompts) a list of messages
    whose last one is the assistant's reply, its content a string or a list of text parts."""
    if isinstance(completion, str):
        return completion.strip()
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "").strip()


def _per_row(func) -> Scorer:
    return lambda texts, refs, formats, spec: [float(func(t, r)) for t, r in zip(texts, refs)]


def _exact(text: str, refs: list) -> float:
    return float(normalize_answer(text) in {normalize_answer(str(r)) for r in refs})


def _tokenised(texts: list[str], refs: list[list]) -> tuple[list[str], list[list[str]]]:
    # the Python PTB tokenizer: a Java process per rollout batch would cost more than the step
    return ([python_ptb_tokenize(t) for t in texts],
            [[python_ptb_tokenize(str(r)) for r in row] for row in refs])


def _cider(texts, refs, formats, spec) -> list[float]:
    # document frequencies come from this batch's references (CIDEr is a corpus metric)
    return cider_d_per_image(*_tokenised(texts, refs))


def _rouge(texts, refs, formats, spec) -> list[float]:
    return rouge_l_per_image(*_tokenised(texts, refs))


def _convention(fmt):
    return get_convention(fmt) if fmt else None


def _ious(texts, refs, formats) -> list[float]:
    return [row_iou(text, list(ref), _convention(fmt), f"reward row {i + 1}")[0]
            for i, (text, ref, fmt) in enumerate(zip(texts, refs, formats))]


def _iou(texts, refs, formats, spec) -> list[float]:
    return _ious(texts, refs, formats)


def _box_accuracy(texts, refs, formats, spec) -> list[float]:
    threshold = spec.threshold if spec.threshold is not None else 0.5
    return [float(v >= threshold) for v in _ious(texts, refs, formats)]


def _map50(texts, refs, formats, spec) -> list[float]:
    return [detection_map([t], [list(r)], [f])["detection_mAP50"]
            for t, r, f in zip(texts, refs, formats)]


def _format(texts, refs, formats, spec) -> list[float]:
    """1.0 when the reply fully matches `pattern`, or, without one, holds a box written in the
    family's convention (a grounding answer's shape); else 0.0."""
    if spec.pattern is not None:
        pattern = re.compile(spec.pattern, re.DOTALL)
        return [float(pattern.fullmatch(t) is not None) for t in texts]
    return [float(bool(_convention(f or "norm1").parse(t))) for t, f in zip(texts, formats)]


def _length(texts, refs, formats, spec) -> list[float]:
    """1.0 for a non-empty reply of at most `max_words` words, falling as max_words / words."""
    limit = spec.max_words or 1
    return [0.0 if not t.split() else min(1.0, limit / len(t.split())) for t in texts]


REWARDS: dict[str, RewardInfo] = {r.name: r for r in (
    RewardInfo("exact_match", _per_row(_exact), "1 when the reply equals a reference after VQA "
                                                "normalisation, else 0"),
    RewardInfo("vqa_accuracy", _per_row(row_accuracy), "VQA accuracy of the reply (exact match "
                                                       "below 4 reference answers)"),
    RewardInfo("anls", _per_row(anls_score), "ANLS of the reply (DocVQA, threshold 0.5)"),
    RewardInfo("rouge_l", _rouge, "ROUGE-L F of the reply against the references"),
    RewardInfo("cider_d", _cider, "CIDEr-D of the reply (document frequencies from the batch)"),
    RewardInfo("iou", _iou, "IoU of the reply's box (family convention) with the reference box"),
    RewardInfo("box_accuracy", _box_accuracy, "1 when that IoU >= threshold (Acc@0.5)",
               ("threshold",)),
    RewardInfo("detection_map50", _map50, "COCO mAP@0.5 of the reply's labelled boxes against "
                                          "the reference answer's"),
    RewardInfo("format", _format, "1 when the reply matches `pattern` (or, without one, holds a "
                                  "box in the family's convention)", ("pattern",)),
    RewardInfo("length", _length, "1 for a non-empty reply of at most `max_words` words, "
                                  "max_words / words beyond", ("max_words",)),
)}
CUSTOM = "custom"
CUSTOM_OPTIONS = ("path", "function")


def reward_names() -> list[str]:
    """Every name `train.rewards` accepts."""
    return [*REWARDS, CUSTOM]


def options_of(name: str) -> tuple[str, ...]:
    """The options a reward reads beside `name` and `weight`."""
    return CUSTOM_OPTIONS if name == CUSTOM else REWARDS[name].options


def metric_reward(info: RewardInfo, spec) -> Callable:
    """TRL's reward function for a built-in reward."""

    def reward(prompts, completions, references=None, box_format=None, **columns):
        texts = [completion_text(c) for c in completions]
        if references is None:
            raise RecipeError(f"reward {info.name!r} needs reference answers, and the GRPO rows "
                              "have none", hint="give each row a final assistant turn (the "
                                               "reference answer) or a `references` list")
        formats = box_format or [None] * len(texts)
        return info.score(texts, [list(r) for r in references], formats, spec)

    reward.__name__ = reward.__qualname__ = info.name
    return reward


def custom_file(spec, base_dir: Path, where: str) -> Path:
    """The custom reward's file (relative to the recipe's folder), checked to define the
    function, without running it: the AST is read, nothing is imported."""
    path = (base_dir / spec.path).resolve() if spec.path else None
    if path is None or not path.is_file():
        raise RecipeError(f"{where}: custom reward file {spec.path!r} not found"
                          + (f" (looked at {path})" if path else ""),
                          hint="`path` names a Python file, relative to the recipe's folder")
    tree = ast.parse(path.read_text(), filename=str(path))
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    if spec.function not in defined:
        raise RecipeError(f"{where}: {path} defines no function {spec.function!r} at its top "
                          f"level (it defines: {', '.join(sorted(defined)) or 'none'})",
                          hint="`function` names def f(prompts, completions, **kwargs) -> "
                               "list[float] in that file")
    return path


def check_custom(spec, base_dir: Path, allow_custom: bool, where: str) -> Path:
    """A custom reward is refused unless the recipe opts in; its file must define it."""
    if not allow_custom:
        raise RecipeError(f"{where}: a custom reward runs the Python code in {spec.path!r}, and "
                          "the recipe does not allow that",
                          hint="if you trust that file, set train.allow_custom_rewards: true")
    return custom_file(spec, base_dir, where)


def load_custom(spec, base_dir: Path, allow_custom: bool, where: str) -> Callable:
    """Import the user's file (after the opt-in check) and return its reward function."""
    path = check_custom(spec, base_dir, allow_custom, where)
    module_spec = importlib.util.spec_from_file_location(f"peftvlm_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    func = getattr(module, spec.function)

    @functools.wraps(func)
    def reward(prompts, completions, **columns):
        scores = func(prompts=prompts, completions=completions, **columns)
        if scores is None or len(scores) != len(completions):
            raise RecipeError(f"{where}: custom reward {spec.function} returned "
                              f"{'nothing' if scores is None else f'{len(scores)} scores'} for "
                              f"{len(completions)} completions",
                              hint="return one float (or None: not scored) per completion")
        return [None if s is None else float(s) for s in scores]

    return reward


def unique_names(funcs: list[Callable]) -> list[Callable]:
    """Two rewards of one name (e.g. two `format` patterns) log as name, name_2, ..."""
    seen: dict[str, int] = {}
    for func in funcs:
        seen[func.__name__] = seen.get(func.__name__, 0) + 1
        if seen[func.__name__] > 1:
            func.__name__ = func.__qualname__ = f"{func.__name__}_{seen[func.__name__]}"
    return funcs


def build_rewards(specs: list, base_dir: Path, allow_custom: bool = False,
                  where: str = "train.rewards") -> list[Callable]:
    """TRL reward functions for a recipe's `train.rewards` (each `spec`: name, weight, options)."""
    funcs = []
    for i, spec in enumerate(specs):
        here = f"{where}[{i}]"
        if spec.name == CUSTOM:
            funcs.append(load_custom(spec, base_dir, allow_custom, here))
        elif spec.name in REWARDS:
            funcs.append(metric_reward(REWARDS[spec.name], spec))
        else:
            raise RecipeError(f"{here}: unknown reward {spec.name!r}",
                              hint=f"available rewards: {', '.join(reward_names())}")
    return unique_names(funcs)


__all__ = ["CUSTOM", "REWARDS", "RewardInfo", "build_rewards", "check_custom",
           "completion_text", "options_of", "reward_names"]
