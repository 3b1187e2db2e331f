"""Data templates: YAML files that turn annotation rows (captions, VQA, boxes...) into the
conversations the trainer reads.

A template (`data_templates/<name>.yaml`, or any YAML path given in the recipe) declares its
`task` (which annotation logic applies: caption, vqa, ...), the `columns` it reads, its
`options`, an optional system prompt, and several phrasings per prompt; a phrasing is chosen per
row with a generator seeded by `data.seed` and the row id, so renders are reproducible and
independent of order or parallelism. Add a template by dropping a YAML file in
`data_templates/`; `task: generic` needs no code at all (prompts and answers are `{column}`
formats). List them: `peftvlm ls templates`. (`kind:` is still read as the old name of `task:`.)

Rendering one row: map columns (recipe `columns:` template column -> source column), check the
values (bad ones raise `BadRow`), build the turns of the template's task, then assemble
conversations (one per turn, or one per image with `group_by_image`).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from peftvlm._schema import Section
from peftvlm.data.boxes import (BOX_INPUTS, answer_text, box_text, clip_box, get_convention,
                                read_box)
from peftvlm.data.read.detection import NO_OBJECTS, image_objects
from peftvlm.data.read.images import image_size
from peftvlm.data.read.sources import resolve_image
from peftvlm.data.rows import BadRow
from peftvlm.errors import DataError
from peftvlm.resources import shipped_dir
from peftvlm.safe_yaml import AliasBombError, load_yaml, regular_file_problem

TEMPLATES_DIR = shipped_dir("data_templates")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PLACEHOLDER = re.compile(r"\{(\w*)\}")

# Options every task understands, then each task's own; a template's `options:` and the recipe's
# `template_options:` may only set these keys.
COMMON_OPTIONS = {"suffix": "", "group_by_image": False, "max_turns": 10}
TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "caption": {"selection": "random", "style": "auto", "detailed_min_words": 20},
    "vqa": {"answer_selection": "most_common"},
    "doc_qa": {"answer_selection": "first"},
    "multiple_choice": {"shuffle_options": False},
    "grounding": {"box_input": "xyxy", "direction": "both", "precision": 2},
    "detection": {"box_input": "xyxy", "mode": "all", "precision": 2, "class_names": None},
    "classification": {"class_names": None},
    "generic": {},
}
CHOICES = {"selection": ("random", "all"), "style": ("auto", "short", "detailed"),
           "answer_selection": ("most_common", "all_weighted", "first"),
           "box_input": BOX_INPUTS, "direction": ("both", "locate", "describe"),
           "mode": ("all", "per_category")}
# Variables each task's phrasings may use, per prompt (the keys of a template's `prompts:`).
TASK_PROMPTS: dict[str, dict[str, set[str]]] = {
    "caption": {"short": set(), "detailed": set()},
    "vqa": {"answer": {"question"}},
    "doc_qa": {"answer": {"question"}},
    "multiple_choice": {"answer": {"question", "options"}},
    "grounding": {"locate": {"expression"}, "describe": {"box"}},
    "detection": {"all": {"categories"}, "category": {"category"}},
    "classification": {"answer": set()},
}


class ColumnSpec(Section):
    required: bool = Field(True, description="A row without this column is a bad row.")
    description: str = Field("", description="What the column holds (shown by `ls templates`).")


class TemplateSpec(Section):
    """One data template, as read from YAML."""

    name: str
    task: Literal["caption", "vqa", "doc_qa", "multiple_choice", "grounding", "detection",
                  "classification", "generic"]
    description: str = ""
    columns: dict[str, ColumnSpec]
    system_prompt: str | None = None
    group_by_image: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    prompts: dict[str, list[str]]
    answers: dict[str, str] = Field(default_factory=dict,
                                    description="generic task: prompt -> answer format")
    clip_prompts: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def old_kind_key(cls, data):
        """`kind:` was this field's name before `kind` came to mean only a run's kind."""
        if isinstance(data, dict) and "kind" in data and "task" not in data:
            data = {("task" if k == "kind" else k): v for k, v in data.items()}
        return data

    def required_columns(self) -> list[str]:
        return [c for c, spec in self.columns.items() if spec.required]


@dataclass
class Template:
    """A loaded template: its spec plus the file text (part of the preprocessing cache key)."""

    spec: TemplateSpec
    path: Path
    text: str


# --- finding and loading ---------------------------------------------------------------------

def builtin_templates() -> dict[str, Path]:
    """Template name -> YAML file of the templates shipped in `data_templates/`."""
    return {p.stem: p for p in sorted(TEMPLATES_DIR.glob("*.yaml"))}


def template_path(name: str, base_dir: Path | None = None) -> Path:
    """A shipped template's name, or a YAML path (relative to `base_dir`, the recipe folder)."""
    if name in builtin_templates():
        return builtin_templates()[name]
    path = Path(name) if base_dir is None else base_dir / name
    problem = regular_file_problem(path)
    if problem:
        raise DataError(f"data template {path} {problem}",
                        hint="give the path of a template YAML file, relative to the recipe")
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    raise DataError(f"unknown data template {name!r}",
                    hint=f"use one of {', '.join(builtin_templates())} (`peftvlm ls templates`) "
                         "or a path to a template YAML file, relative to the recipe")


def load_template(name: str, base_dir: Path | None = None) -> Template:
    """Read and check a template: schema, placeholders of every phrasing, option values."""
    path = template_path(name, base_dir)
    text = path.read_text()
    try:
        data = load_yaml(text)
        if isinstance(data, dict) and {"kind", "task"} <= set(data):
            raise DataError(f"data template {path}: give `task` only (`kind` is its old name)",
                            hint="delete the `kind:` line")
        spec = TemplateSpec.model_validate(data)
    except AliasBombError as exc:
        raise DataError(f"data template {path}: refused: {exc}",
                        hint="write repeated values out, or use fewer nested aliases") from None
    except (yaml.YAMLError, ValidationError) as exc:
        raise DataError(f"data template {path}: {str(exc).splitlines()[0]}",
                        hint="compare with a shipped template in data_templates/") from exc
    check_phrasings(spec, path)
    merged_options(spec, {}, str(path))
    return Template(spec, path, text)


def check_phrasings(spec: TemplateSpec, path: Path) -> None:
    """Every prompt has phrasings, and each uses only the variables its task provides."""
    prompts = TASK_PROMPTS.get(spec.task) or {t: set(spec.columns) for t in spec.answers}
    if spec.task == "generic" and set(spec.prompts) != set(spec.answers):
        raise DataError(f"data template {path}: a generic template needs the same prompts in "
                        f"`prompts` and `answers` (got {sorted(spec.prompts)} and "
                        f"{sorted(spec.answers)})")
    for prompt, allowed in prompts.items():
        phrasings = spec.prompts.get(prompt)
        if not phrasings:
            raise DataError(f"data template {path}: no phrasings for prompt `{prompt}` "
                            f"(task {spec.task} needs prompts for {', '.join(prompts)})")
        for text in [*phrasings, spec.answers.get(prompt, "")]:
            unknown = set(PLACEHOLDER.findall(text)) - allowed
            if unknown:
                raise DataError(f"data template {path}: `{text}` uses unknown placeholder(s) "
                                f"{sorted(unknown)}; prompt `{prompt}` provides {sorted(allowed)}")


def merged_options(spec: TemplateSpec, overrides: dict, where: str) -> dict:
    """Task defaults <- template options <- recipe `template_options`; unknown keys are errors."""
    options = {**COMMON_OPTIONS, "group_by_image": spec.group_by_image,
               **TASK_OPTIONS[spec.task]}
    for origin, given in (("template", spec.options), ("recipe", overrides)):
        unknown = set(given) - set(options)
        if unknown:
            raise DataError(f"{where}: unknown option(s) {sorted(unknown)} for a {spec.task} "
                            f"template ({origin}); known: {', '.join(sorted(options))}")
        options.update(given)
    for key, allowed in CHOICES.items():
        if key in options and options[key] not in allowed:
            raise DataError(f"{where}: option {key}={options[key]!r} must be one of "
                            f"{', '.join(allowed)}")
    return options


def list_templates() -> list[TemplateSpec]:
    """Specs of the shipped templates (for `peftvlm ls templates`)."""
    return [load_template(name).spec for name in builtin_templates()]


def clip_prompts(name: str = "classification", base_dir: Path | None = None) -> list[str]:
    """The CLIP prompt set of a template: formats with one `{}` for the class name."""
    spec = load_template(name, base_dir).spec
    if not spec.clip_prompts:
        raise DataError(f"data template {name!r} has no `clip_prompts`",
                        hint="use `classification` or add a clip_prompts list to the template")
    return list(spec.clip_prompts)


# --- values ----------------------------------------------------------------------------------

def fill(fmt: str, values: dict) -> str:
    """Replace `{name}` placeholders (only plain names: templates are data, not code)."""
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), fmt)


def as_text(value, column: str, empty_reason: str = "empty_value") -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadRow("bad_column_type", f"column `{column}` should be text, got "
                                        f"{type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise BadRow(empty_reason, f"column `{column}` is empty")
    return text


def as_text_list(value, column: str) -> list[str]:
    """One text, or a list of texts / `{"answer"|"caption"|"text": ...}` dicts; non-empty."""
    items = value if isinstance(value, (list, tuple)) else [value]
    texts = []
    for item in items:
        if isinstance(item, dict):
            item = next((item[k] for k in ("answer", "caption", "text", "raw") if k in item), None)
        if isinstance(item, str) and not item.strip():
            continue
        texts.append(as_text(item, column, "empty_answer"))
    if not texts:
        raise BadRow("empty_answer", f"column `{column}` has no non-empty text")
    return texts


def select_answers(answers: list[str], how: str) -> list[str]:
    """`most_common` (ties: first given), `first`, or `all_weighted`: every annotator's answer,
    grouped, so each distinct answer appears as often as annotators gave it."""
    if how == "first":
        return answers[:1]
    counts = Counter(answers)
    if how == "most_common":
        return [counts.most_common(1)[0][0]]
    return [a for a, n in counts.items() for _ in range(n)]


# --- turns per task: (prompt, variables, answer[, extra row fields for eval]) ----------------

def caption_turns(v, opts, rng, ctx):
    captions = as_text_list(v["captions"], "captions")
    if opts["selection"] == "random":
        captions = [rng.choice(captions)]
    style = opts["style"]
    return [(style if style != "auto" else
             "detailed" if len(c.split()) >= opts["detailed_min_words"] else "short", {}, c)
            for c in captions]


def vqa_turns(v, opts, rng, ctx):
    question = as_text(v["question"], "question")
    answers = select_answers(as_text_list(v["answers"], "answers"), opts["answer_selection"])
    return [("answer", {"question": question}, a) for a in answers]


def multiple_choice_turns(v, opts, rng, ctx):
    question = as_text(v["question"], "question")
    raw = v["options"].split("|") if isinstance(v["options"], str) else v["options"]
    if not isinstance(raw, (list, tuple)) or not 2 <= len(raw) <= len(LETTERS):
        raise BadRow("bad_column_type", "column `options` should be a list of 2-26 options")
    options = [as_text(o, "options") for o in raw]
    correct = options[answer_index(v["answer"], options)]
    if opts["shuffle_options"]:
        rng.shuffle(options)
    listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return [("answer", {"question": question, "options": listed},
             LETTERS[options.index(correct)])]


def answer_index(answer, options: list[str]) -> int:
    """0-based index, a letter, or the option's own text -> index into `options`."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    text = str(answer).strip() if isinstance(answer, (str, int)) else ""
    if text in options:
        return options.index(text)
    letter = text.rstrip(".").upper()
    if len(letter) == 1 and letter in LETTERS[:len(options)]:
        return LETTERS.index(letter)
    if not text:
        raise BadRow("empty_answer", "column `answer` is empty")
    raise BadRow("bad_answer", f"answer {answer!r} is not an index, letter or text of the options")


def grounding_turns(v, opts, rng, ctx):
    expression = rng.choice(as_text_list(v["expression"], "expression"))
    width, height = ctx.size(v)
    # Written with the family's box convention: the answer names the object where the
    # checkpoint's own grounding answers do (Qwen, InternVL, PaliGemma), the question's region
    # is the bare box.
    pixels = clip_box(read_box(v["box"], opts["box_input"]), width, height)
    turns = []
    if opts["direction"] in ("both", "locate"):
        answer = answer_text([(expression, pixels)], width, height, ctx.box_format,
                             opts["precision"])
        turns.append(("locate", {"expression": expression}, answer))
    if opts["direction"] in ("both", "describe"):
        box = box_text(pixels, width, height, "xyxy", ctx.box_format, opts["precision"])
        turns.append(("describe", {"box": box}, expression))
    return turns


def detection_turns(v, opts, rng, ctx):
    """`mode: all`: one question, every object of the image in one answer; `per_category`:
    one question per category present, its boxes the answer. Crowd regions are left out of
    answers (kept in the turn's `crowd` field for evaluation); an image with no object is
    answered `NO_OBJECTS` (also in per_category mode, as one `all` question)."""
    width, height = ctx.size(v)
    class_names = opts["class_names"]
    labels = [class_name(x, class_names) for x in v["labels"]] \
        if class_names and isinstance(v["labels"], (list, tuple)) else v["labels"]
    objects = image_objects(v["boxes"], labels, v.get("crowd"), width, height,
                            opts["box_input"])
    convention = get_convention(ctx.box_format)
    places = opts["precision"] if convention.decimals is not None else None

    def answer(objs):
        labelled = [(label, box) for label, box, crowd in objs if not crowd]
        return convention.write(labelled, width, height, places) if labelled else NO_OBJECTS

    def extra(objs):  # crowd regions, for evaluation only (see detection_map)
        regions = [(label, box) for label, box, crowd in objs if crowd]
        return {"crowd": convention.write(regions, width, height, places)} if regions else {}

    present = list(dict.fromkeys(label for label, _, crowd in objects if not crowd))
    # every class of the data set where known (PaliGemma's `detect a ; b` lists them all)
    names = [str(c) for c in v.get("categories") or class_names or []] or present
    if opts["mode"] == "all" or not present:
        return [("all", {"categories": convention.list_separator.join(names)}, answer(objects),
                 extra(objects))]
    mine = {name: [o for o in objects if o[0] == name] for name in present}
    return [("category", {"category": name}, answer(mine[name]), extra(mine[name]))
            for name in present]


def class_name(label, names: list[str]):
    """An integer class id -> its name in `class_names` (names pass through)."""
    if isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(names):
            raise BadRow("bad_label", f"label {label} is not an index into class_names "
                                      f"({len(names)} names)")
        return names[label]
    return label


def classification_turns(v, opts, rng, ctx):
    label = v["label"]
    names = opts["class_names"]
    if names and isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(names):
            raise BadRow("bad_answer", f"label {label} is not an index into class_names")
        label = names[label]
    return [("answer", {}, as_text(label, "label", "empty_answer").replace("_", " "))]


def generic_turns(v, opts, rng, ctx):
    """`task: generic`: each prompt and its answer are formats over the columns."""
    texts = {c: "" if x is None else as_text(x, c) if not isinstance(x, str) else x.strip()
             for c, x in v.items() if c != "image"}
    out = []
    for task, answer_fmt in ctx.spec.answers.items():
        answer = fill(answer_fmt, texts).strip()
        if not answer:
            raise BadRow("empty_answer", f"task `{task}` renders an empty answer")
        out.append((task, texts, answer))
    return out


TASK_TURNS = {"caption": caption_turns, "vqa": vqa_turns, "doc_qa": vqa_turns,
              "multiple_choice": multiple_choice_turns, "grounding": grounding_turns,
              "detection": detection_turns,
              "classification": classification_turns, "generic": generic_turns}


# --- rendering -------------------------------------------------------------------------------

@dataclass
class Piece:
    """One row rendered: its image (resolved), and (user text, assistant text) turns."""

    image_key: Any
    image: Any
    turns: list[tuple[str, str]]
    # What evaluation scores the row's last answer against: every annotator answer or caption
    # (VQA accuracy, CIDEr need them all), and the VQA answer type for per-type scores.
    references: list[str] | None = None
    question_type: str | None = None
    row_id: str = ""  # the source row it came from (`file:line`), what reports name
    # Per turn: fields a conversation ending with that turn carries for evaluation (a
    # detection answer's crowd regions); empty dicts elsewhere.
    extras: list[dict] | None = None


class TemplateRenderer:
    """Render rows of one source through one template (picklable, for parallel workers)."""

    def __init__(self, template: Template, options: dict, columns: dict[str, str], root: Path,
                 box_format: str = "norm1", seed: int = 0, salt: str = "",
                 system_prompt: str | None = None):
        try:
            self.task_prompts = dict(get_convention(box_format).task_prompts)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        self.spec, self.options = template.spec, options
        self.columns = {c: columns.get(c, c) for c in template.spec.columns}
        self.root, self.box_format, self.seed, self.salt = root, box_format, seed, salt
        self.system_prompt = system_prompt if system_prompt is not None else self.spec.system_prompt
        self._checked: dict[str, Any] = {}

    def values(self, record) -> dict:
        """Template column -> value, via the column mapping; missing required ones are bad."""
        if not isinstance(record, dict):
            raise BadRow("bad_row", "a row must be a mapping of columns")
        values = {}
        for column, source in self.columns.items():
            value = column_value(record, source)
            if value is None and self.spec.columns[column].required:
                raise BadRow("missing_column", f"no value in column `{source}`"
                                               + (f" (template column `{column}`)"
                                                  if source != column else ""))
            values[column] = value
        return values

    def size(self, values: dict) -> tuple[float, float]:
        """Image size from width/height columns, else from the image header."""
        if values.get("width") and values.get("height"):
            try:
                return float(values["width"]), float(values["height"])
            except (TypeError, ValueError):
                raise BadRow("bad_column_type", "width/height must be numbers") from None

        return image_size(values["image"])

    def render(self, row_id: str, record) -> Piece:
        """One row -> a `Piece`, or `BadRow` naming the reason."""
        if isinstance(record, BadRow):
            raise record
        values = self.values(record)
        image = self.image(values.get("image"))
        values["image"] = image
        rng = random.Random(f"{self.seed}:{self.salt}:{row_id}")
        made = TASK_TURNS[self.spec.task](values, self.options, rng, self)
        turns = [(self.phrase(task, variables, rng), answer)
                 for task, variables, answer, *_ in made]
        extras = [t[3] if len(t) > 3 else {} for t in made]
        qtype = record.get("answer_type") or record.get("question_type")
        return Piece(image_key(image), image, turns, reference_answers(self.spec.task, values),
                     qtype if isinstance(qtype, str) else None, row_id,
                     extras if any(extras) else None)

    def image(self, value):
        """Resolve and check an image once per path (VQA rows often share one image)."""
        if value is None:
            return None
        if not isinstance(value, str):
            return resolve_image(value, self.root)
        checked = self._checked.get(value)
        if checked is None:
            try:
                checked = resolve_image(value, self.root)
            except BadRow as bad:
                checked = bad
            self._checked[value] = checked
        if isinstance(checked, BadRow):
            raise BadRow(checked.reason, checked.detail)
        return checked

    def phrase(self, task: str, variables: dict, rng: random.Random) -> str:
        # a family trained on one fixed task prefix gets it (PaliGemma: "detect ...")
        prompts = ([self.task_prompts[task]] if task in self.task_prompts
                   else self.spec.prompts[task])
        text = fill(rng.choice(prompts), variables)
        suffix = self.options.get("suffix") or ""
        return f"{text}\n{suffix}" if suffix else text

    def conversations(self, pieces: list[Piece]) -> list[dict]:
        """Pieces -> conversations: one per turn, or grouped per image (up to max_turns)."""
        if not self.options["group_by_image"]:
            return [self.conversation(p.image, [(*t, p, i)]) for p in pieces
                    for i, t in enumerate(p.turns)]
        groups: dict[Any, list] = {}
        for p in pieces:
            groups.setdefault(p.image_key, [p.image, []])[1].extend(
                (*t, p, i) for i, t in enumerate(p.turns))
        step = self.options["max_turns"]
        return [self.conversation(image, turns[i:i + step])
                for image, turns in groups.values() for i in range(0, len(turns), step)]

    def conversation(self, image, turns: list[tuple[str, str, Piece, int]]) -> dict:
        messages = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}
                    ] if self.system_prompt else []
        for i, (question, answer, *_) in enumerate(turns):
            content = [{"type": "image"}] if i == 0 and image is not None else []
            messages.append({"role": "user", "content": [*content,
                                                         {"type": "text", "text": question}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        row = {"row_id": turns[0][2].row_id, "messages": messages,
               "images": [image] if image is not None else []}
        last, index = turns[-1][2], turns[-1][3]
        if last.extras:
            row.update(last.extras[index])
        if last.references:
            row["references"] = last.references
        if last.question_type:
            row["question_type"] = last.question_type
        return row


def column_value(record: dict, source: str):
    """`record[source]`, or a nested field named with dots (`objects.bbox`: a Hub detection
    set's boxes inside its `objects` feature)."""
    if source in record or "." not in source:
        return record.get(source)
    value = record
    for part in source.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def reference_answers(task: str, values: dict) -> list[str] | None:
    """All acceptable answers of a row, for evaluation (training uses the selected ones)."""
    column = {"vqa": "answers", "doc_qa": "answers", "caption": "captions"}.get(task)
    if column is None or values.get(column) is None:
        return None
    return as_text_list(values[column], column)


def image_key(image) -> Any:
    """What identifies an image for grouping: its path, or its bytes' hash."""
    if isinstance(image, str):
        return image
    if isinstance(image, dict) and image.get("bytes"):
        import hashlib

        return hashlib.sha1(image["bytes"]).hexdigest()
    return id(image)
