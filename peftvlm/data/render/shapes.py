"""Training text and reply spans of many conversations, rendering the template once per shape.

The reference (`chat_template.render_by_prefixes`) costs 1 + 2 x replies Jinja renders per row
(~0.1 ms each: a checkpoint's template runs in transformers' sandbox). But most templates only
place each text where its message goes, so all conversations of one shape (the roles of their
messages and the kinds of their content items, e.g. user[image, text] assistant[text]: which
turns have images, a system prompt or not, how many turns) come out as the same literal pieces
around their texts, with each reply's span at the same place among them. `ShapeRenderer` runs
the reference once per shape on sentinel texts, keeps the pieces and where each span starts
and ends, and then fills in each row's texts: no Jinja per row. The collator (text + spans, for
labels) and the length counter (text, for token counts) both use it, so counting and labelling
can never disagree.

A shape's layout is only used where it provably gives the reference's result:
- the sentinel texts must come back once each, in order, and each span must start and end in
  the literal pieces (not inside a text);
- filled with probe texts (whitespace and newlines around and inside each text; plain words),
  the layout must give exactly the reference's text and spans for those texts, with the texts
  as they are or all stripped (`| trim`, Gemma 3), else the shape is rendered row by row;
- where the reference refuses the shape (e.g. Llama 3.2 Vision's template writes a system block
  before a text-only turn's prompt but not once an image follows), so do its rows, with the
  reference's error;
- a row whose texts could steer the template (empty or blank, holding `<` as in `<think>` and
  special tokens, a special token of the tokenizer or one of the template's own markup strings)
  is rendered by the reference;
- the first rows of every shape are also rendered by the reference, and any difference turns
  the shape off.
`tests/test_chat_templates.py` holds this for every registry family (mixed text-only and image
turns included); `tests/test_template_shortcuts.py` the refusals and whitespace-only templates.
"""

from __future__ import annotations

import re

from peftvlm.data.render.chat_template import (RenderedConversation, chat_template_of, cut_spans,
                                               prefix_layouts, render_by_prefixes,
                                               template_literals)
from peftvlm.errors import ModelError

SENTINEL = "\x00{}\x00"
PROBES = (" \n Probe{} text\n\tend \n", "Probe{} words.")
CHECKED_ROWS = 2  # rows per shape rendered both ways before the shape is trusted


class ShapeRenderer:
    """`render(conversations)` == `render_by_prefixes(...)` (text and reply spans), one set of
    reference renders per shape instead of per row; `texts(conversations)` its texts."""

    def __init__(self, processor, end_of_turn: str | None = None):
        self.processor, self.end_of_turn = processor, end_of_turn
        self._steering = steering_pattern(processor)
        self._shapes: dict[tuple, Layout | None] = {}
        self._checks: dict[tuple, int] = {}

    def texts(self, conversations: list[list[dict]]) -> list[str]:
        """The texts trained on (what token counts are taken of)."""
        return [r.text for r in self.render(conversations)]

    def render(self, conversations: list[list[dict]]) -> list[RenderedConversation]:
        out: list[RenderedConversation | None] = [None] * len(conversations)
        shapes = []
        for i, conversation in enumerate(conversations):
            shape, values = shape_of(conversation)
            shapes.append(shape)
            if shape is not None and self._steering is not None and \
                    all(map(self.inert, values)):
                layout = self.layout(shape, conversation)
                if layout is not None:
                    out[i] = layout.fill(conversation, values)
        exact = [i for i, r in enumerate(out) if r is None or self.checking(shapes[i])]
        for i, reference in zip(exact, self.reference([conversations[i] for i in exact])):
            if out[i] is not None and out[i] != reference:
                self._shapes[shapes[i]] = None  # the template does more than place texts
            out[i] = reference
        # Rows filled from a shape found wrong in this batch: rendered after all.
        done = set(exact)
        redo = [i for i in range(len(out)) if i not in done and shapes[i] is not None
                and self._shapes.get(shapes[i]) is None]
        for i, reference in zip(redo, self.reference([conversations[i] for i in redo])):
            out[i] = reference
        return out

    def reference(self, conversations: list[list[dict]]) -> list[RenderedConversation]:
        if not conversations:
            return []
        return render_by_prefixes(self.processor, conversations, self.end_of_turn)

    def inert(self, text: str) -> bool:
        """Whether a text cannot steer a template: not blank, no `<`, no special token, none
        of the template's markup strings, none of our sentinel characters."""
        return bool(text.strip()) and not self._steering.search(text)

    def checking(self, shape) -> bool:
        """True for the first CHECKED_ROWS rows of a shape (also rendered by the reference)."""
        seen = self._checks.get(shape, 0)
        self._checks[shape] = seen + 1
        return seen < CHECKED_ROWS

    def layout(self, shape: tuple, conversation) -> Layout | None:
        if shape not in self._shapes:
            self._shapes[shape] = Layout.probe(self.processor, conversation, self.end_of_turn)
        return self._shapes[shape]


def steering_pattern(processor) -> re.Pattern | None:
    """What marks a text that could steer the template: `<`, our sentinel, a special token, a
    markup string of the template; None (no shortcut) where the template cannot be parsed."""
    tokenizer = getattr(processor, "tokenizer", processor)
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    try:
        literals = template_literals(chat_template_of(processor))
    except ModelError:
        raise
    except Exception:  # a tag plain Jinja does not know: keep to the reference
        return None
    marks = sorted({"<", "\x00", *specials, *literals}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, marks)))


def shape_of(conversation) -> tuple[tuple | None, list[str]]:
    """(roles and content kinds, the texts in order); shape None when a message or item holds
    anything else than our normalised fields (such rows are rendered as they are)."""
    shape, values = [], []
    for message in conversation:
        content = message.get("content")
        if set(message) != {"role", "content"} or not isinstance(content, list):
            return None, []
        kinds = []
        for item in content:
            kind = item.get("type")
            if kind == "text":
                if set(item) != {"type", "text"} or not isinstance(item["text"], str):
                    return None, []
                values.append(item["text"])
            elif set(item) - {"type", kind}:  # media items: a placeholder or the decoded media
                return None, []
            kinds.append(kind)
        shape.append((message["role"], tuple(kinds)))
    return tuple(shape), values


def with_texts(conversation, texts: list[str]) -> list[dict]:
    """The conversation with its texts replaced, in order."""
    it = iter(texts)
    return [{"role": m["role"], "content": [{"type": "text", "text": next(it)}
                                            if c["type"] == "text" else c
                                            for c in m["content"]]} for m in conversation]


class Layout:
    """A shape's training text as literal pieces around its texts (`fill`), whether the
    template strips each text, and each trained reply's (message index, start, through end),
    each an anchor (piece, offset into it)."""

    def __init__(self, pieces: list[str], strip: bool, replies: list, end_of_turn: str | None):
        self.pieces, self.strip = pieces, strip
        self.replies, self.end_of_turn = replies, end_of_turn

    def fill(self, conversation, texts: list[str]) -> RenderedConversation:
        out, starts, at = [self.pieces[0]], [0], len(self.pieces[0])
        for text, piece in zip(texts, self.pieces[1:]):
            text = text.strip() if self.strip else text
            at += len(text)
            starts.append(at)
            at += len(piece)
            out += (text, piece)
        replies = [(i, starts[a] + o, starts[b] + p) for i, (a, o), (b, p) in self.replies]
        return cut_spans("".join(out), conversation, replies, self.end_of_turn)

    @classmethod
    def probe(cls, processor, conversation, end_of_turn) -> Layout | None:
        """The shape's layout, or None where it would not give the reference's result."""
        count = len(shape_of(conversation)[1])
        sentinels = [SENTINEL.format(k) for k in range(count)]
        try:
            text, replies = prefix_layouts(processor, [with_texts(conversation, sentinels)])[0]
            probes = [[p.format(k) for k in range(count)] for p in PROBES]
            expected = render_by_prefixes(processor, [with_texts(conversation, t)
                                                      for t in probes], end_of_turn)
        except Exception:  # refused (rows then get the reference's own error) or raised
            return None
        pieces, bounds = _pieces(text, sentinels)
        if pieces is None:
            return None
        anchored = [(i, _anchor(start, bounds), _anchor(end, bounds)) for i, start, end in replies]
        if any(a is None or b is None for _, a, b in anchored):
            return None
        for strip in (False, True):
            layout = cls(pieces, strip, anchored, end_of_turn)
            if all(layout.fill(with_texts(conversation, t), t) == e
                   for t, e in zip(probes, expected)):
                return layout
        return None


def _pieces(text: str, sentinels: list[str]):
    """The literal pieces between the sentinels, and each piece's (start, end) in `text`."""
    pieces, bounds, at = [], [], 0
    for sentinel in sentinels:
        found = text.find(sentinel, at)
        if found < 0 or text.count(sentinel) != 1:
            return None, None
        pieces.append(text[at:found])
        bounds.append((at, found))
        at = found + len(sentinel)
    if "\x00" in text[at:]:
        return None, None
    pieces.append(text[at:])
    bounds.append((at, len(text)))
    return pieces, bounds


def _anchor(position: int, bounds) -> tuple[int, int] | None:
    """(piece, offset into it) of a position in the sentinel text; None inside a sentinel."""
    for n, (start, end) in enumerate(bounds):
        if start <= position <= end:
            return n, position - start
    return None
