"""Prompts for the generator and the parsing of its answers into candidate tasks.

Text mode asks for numbered tasks (`Task N` / `Instruction:` / `Input:` / `Output:`), in the
manner of Self-Instruct and Alpaca. Visual mode shows one image as captions and boxes, LLaVA
style, and asks for `Question:` / `Answer:` pairs of one task type: a conversation (all pairs
make one multi-turn row), a detailed description, or complex reasoning questions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NO_INPUT = "<noinput>"
_EMPTY_INPUTS = {"", NO_INPUT.lower(), "none", "n/a", "-", "no input", "noinput"}

TEXT_PROMPT = (
    "You are asked to come up with {n} new, diverse tasks for an assistant that sees images "
    "and reads text. Each task has an instruction, an optional input and an output. When a "
    "task is about an image, its input describes the image as captions and object boxes with "
    "normalised coordinates. Vary the verbs, the kind of task (description, question answering,"
    " reasoning, counting, spatial relations, comparison, classification, writing) and the "
    "length. The output is the answer the assistant should give. Use exactly the format of the "
    "examples, write {no_input} when a task has no input, and start with Task {first}.\n\n"
)

VISUAL_PROMPT = (
    "You are an AI visual assistant looking at a single image. You see it through its "
    "annotations: captions, and object boxes as (x0, y0, x1, y1) normalised to [0, 1] with the "
    "origin at the top left. {ask} Answer as if you see the image yourself: never mention "
    "captions, annotations, boxes or coordinates. Use exactly the format of the examples.\n\n"
)


@dataclass(frozen=True)
class VisualTask:
    """How one visual task type is asked for and turned into rows."""

    ask: str  # `{n}` is the number of question/answer pairs asked for
    one_row: bool  # all pairs form one conversation row (else one row per pair)
    pairs: int | None = None  # fixed number of pairs (else tasks_per_prompt)


VISUAL_TASKS = {
    "conversation": VisualTask(
        "Write a conversation of {n} turns between a person asking about this image and you "
        "answering: the objects, their kinds, counts, actions, positions and relations. Only ask "
        "what the image answers with confidence.", one_row=True),
    "detailed_description": VisualTask(
        "Write {n} request for a detailed description of this image, and a rich, thorough "
        "description as the answer.", one_row=False, pairs=1),
    "complex_reasoning": VisualTask(
        "Write {n} questions that need reasoning beyond what is directly visible (why something "
        "is so, what may happen next, what is unusual, what would help), each answered step by "
        "step.", one_row=False),
}


@dataclass
class Candidate:
    """A generated task on its way through the filters; `turns` are (user, assistant) texts."""

    task_type: str
    turns: list[tuple[str, str]]
    input: str = ""
    image: str | None = None
    truncated: bool = False
    questions: list[str] = field(init=False)

    def __post_init__(self):
        self.questions = [q for q, _ in self.turns]

    @property
    def instruction(self) -> str:
        """The text the length, blacklist and novelty filters read."""
        return " ".join(self.questions)

    def full_text(self) -> str:
        """Instruction, input and answers: what the near-duplicate filter compares."""
        return " ".join([self.instruction, self.input] + [a for _, a in self.turns])

    def to_row(self) -> dict:
        """The trainer's row: messages with an image item in the first user turn if any."""
        messages = []
        for i, (question, answer) in enumerate(self.turns):
            text = f"{question}\n\n{self.input}" if self.input and i == 0 else question
            content = ([{"type": "image"}] if self.image and i == 0 else []) + [
                {"type": "text", "text": text}]
            messages += [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return {"messages": messages, "images": [self.image] if self.image else []}

    def to_meta(self) -> dict:
        """What a resumed run needs to rebuild its pools and in-context examples."""
        return {"task_type": self.task_type, "turns": self.turns, "input": self.input,
                "image": self.image}

    @classmethod
    def from_meta(cls, meta: dict) -> Candidate:
        return cls(meta["task_type"], [tuple(t) for t in meta["turns"]], meta["input"],
                   meta["image"])


def render_task(number: int, instruction: str, task_input: str, output: str) -> str:
    return (f"Task {number}\nInstruction: {instruction}\nInput: {task_input or NO_INPUT}\n"
            f"Output: {output}\n\n")


def text_prompt(examples: list[tuple[str, str, str]], n_new: int) -> str:
    """Numbered (instruction, input, output) examples, then a request for `n_new` more."""
    body = "".join(render_task(i, *ex) for i, ex in enumerate(examples, start=1))
    first = len(examples) + 1
    return TEXT_PROMPT.format(n=n_new, no_input=NO_INPUT, first=first) + body + f"Task {first}\n"


def render_pairs(turns: list[tuple[str, str]]) -> str:
    return "".join(f"Question: {q}\nAnswer: {a}\n" for q, a in turns)


def visual_prompt(task_type: str, examples: list[tuple[str, list[tuple[str, str]]]],
                  context: str, n_pairs: int) -> str:
    """(context, turns) examples of one task type, then the target image's context."""
    task = VISUAL_TASKS[task_type]
    ask = task.ask.format(n=task.pairs or n_pairs)
    body = "".join(f"Example {i}\n{ctx}\n\n{render_pairs(turns)}\n"
                   for i, (ctx, turns) in enumerate(examples, start=1))
    return VISUAL_PROMPT.format(ask=ask) + body + f"Now the image:\n{context}\n\nQuestion:"


@dataclass
class Parsed:
    """What one response yielded: candidates plus counts of cut and unreadable pieces."""

    candidates: list[Candidate]
    truncated: int = 0
    malformed: int = 0


_TASK_HEADER = re.compile(r"(?im)^[#*\s]*Task\s*\d+[*:.\s]*$")
_TASK_FIELDS = re.compile(r"(?is)Instruction:\s*(?P<instruction>.*?)\s*"
                          r"(?:\n\s*Input:\s*(?P<input>.*?)\s*)?\n\s*Output:\s*(?P<output>.*)")
_QUESTION = re.compile(r"(?im)^\s*Question:")
_PAIR = re.compile(r"(?is)\s*Question:\s*(?P<q>.*?)\s*\n\s*Answer:\s*(?P<a>.*)")


def parse_text_response(text: str, truncated: bool) -> Parsed:
    """Tasks of a text-mode answer; when the answer was cut, its last piece is the cut one."""
    pieces = _TASK_HEADER.split(text)
    if not re.search(r"(?i)Instruction:", pieces[0]):
        pieces = pieces[1:]  # a preamble such as "Sure, here are the tasks:"
    pieces = [p for p in pieces if p.strip()]
    parsed = Parsed([])
    for i, piece in enumerate(pieces):
        match = _TASK_FIELDS.search(piece)
        cut = truncated and i == len(pieces) - 1
        if match is None:
            parsed.truncated += cut
            parsed.malformed += not cut
            continue
        task_input = (match["input"] or "").strip()
        task_input = "" if task_input.lower() in _EMPTY_INPUTS else task_input
        parsed.candidates.append(Candidate("generated", [(match["instruction"].strip(),
                                                          match["output"].strip())],
                                           task_input, truncated=cut))
    return parsed


def parse_visual_response(text: str, truncated: bool, task_type: str, image: str) -> Parsed:
    """Question/answer pairs about one image; the prompt ends in `Question:`, so the answer
    continues it (some chat models repeat the label; both read the same)."""
    text = text if _QUESTION.match(text) else "Question: " + text
    pieces = [p for p in _QUESTION.split(text) if p.strip()]
    pairs, parsed = [], Parsed([])
    for i, piece in enumerate(pieces):
        match = _PAIR.match("Question: " + piece)
        cut = truncated and i == len(pieces) - 1
        if match is None and not cut:
            parsed.malformed += 1
        elif match is not None:
            pairs.append(((match["q"].strip(), match["a"].strip()), cut))
        elif cut:
            parsed.truncated += 1
    if VISUAL_TASKS[task_type].one_row:
        if pairs:
            parsed.truncated = 0  # the conversation as a whole is the cut task
            turns = [t for t, _ in pairs]
            parsed.candidates.append(Candidate(task_type, turns, image=image,
                                               truncated=truncated))
    else:
        parsed.candidates += [Candidate(task_type, [t], image=image, truncated=cut)
                              for t, cut in pairs]
    return parsed
