"""Chat-template text of many conversations, rendering the template once per conversation shape.

Counting tokens for a million rows spent most of its time in Jinja: a checkpoint's template runs
in transformers' sandbox and costs ~0.1 ms per conversation. But most templates only place
each text where its message goes, so all conversations of one shape (the roles of their
messages and the kinds of their content items, e.g. user[image, text] assistant[text]) render
to the same literal pieces around their texts. `ShapeRenderer` renders each shape once with
sentinel texts, keeps the literal pieces, and fills in each row's texts.

That is only used where it provably gives the template's own output for the texts seen:
- the sentinel render must hold each sentinel once, in order (texts are not dropped, repeated
  or moved); a second probe with whitespace and newlines around and inside each text must come
  out as the pieces filled with those texts as they are, or all stripped (`| trim`), else the
  shape is rendered row by row;
- a row whose texts could steer the template (empty or blank, holding `<` as in `<think>` and
  special tokens, or a special token of the tokenizer) is rendered itself;
- the first rows of every shape are also rendered, and any difference turns the shape off.
"""

from __future__ import annotations

SENTINEL = "\x00{}\x00"
PROBE = " \n Probe{} text\n\tend \n"
CHECKED_ROWS = 2  # rows per shape rendered both ways before the shape is trusted


class ShapeRenderer:
    """`render(conversations)` == the chat template's rendering (`add_generation_prompt`
    False), one Jinja call per shape instead of one per row."""

    def __init__(self, processor):
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", processor)
        self.specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        self._shapes: dict[tuple, Skeleton | None] = {}
        self._checks: dict[tuple, int] = {}

    def render(self, conversations: list[list[dict]]) -> list[str]:
        texts: list[str | None] = [None] * len(conversations)
        shapes = []
        for i, conversation in enumerate(conversations):
            shape, values = shape_of(conversation)
            shapes.append(shape)
            skeleton = self.skeleton(shape, conversation) if shape is not None else None
            if skeleton is not None and all(map(self.inert, values)):
                texts[i] = skeleton.fill(values)
        exact = [i for i, t in enumerate(texts) if t is None or self.checking(shapes[i])]
        for i, rendered in zip(exact, self.exact([conversations[i] for i in exact])):
            if texts[i] is not None and texts[i] != rendered:
                self._shapes[shapes[i]] = None  # the template does more than place texts
            texts[i] = rendered
        # Rows filled from a shape found wrong in this batch: rendered after all.
        done = set(exact)
        redo = [i for i in range(len(texts)) if i not in done and shapes[i] is not None
                and self._shapes.get(shapes[i]) is None]
        for i, rendered in zip(redo, self.exact([conversations[i] for i in redo])):
            texts[i] = rendered
        return texts

    def exact(self, conversations: list[list[dict]]) -> list[str]:
        from peftvlm.data.chat_template import render_texts

        return render_texts(self.processor, conversations, add_generation_prompt=False)

    def inert(self, text: str) -> bool:
        """Whether a text cannot steer a template: not blank, no `<`, no special token."""
        return bool(text.strip()) and "<" not in text and "\x00" not in text and \
            not any(s in text for s in self.specials)

    def checking(self, shape) -> bool:
        """True for the first CHECKED_ROWS rows of a shape (also rendered row by row)."""
        seen = self._checks.get(shape, 0)
        self._checks[shape] = seen + 1
        return seen < CHECKED_ROWS

    def skeleton(self, shape: tuple, conversation) -> Skeleton | None:
        if shape not in self._shapes:
            self._shapes[shape] = Skeleton.probe(self.processor, conversation)
        return self._shapes[shape]


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
            if set(item) != ({"type", "text"} if kind == "text" else {"type"}) or \
                    (kind == "text" and not isinstance(item["text"], str)):
                return None, []
            kinds.append(kind)
            if kind == "text":
                values.append(item["text"])
        shape.append((message["role"], tuple(kinds)))
    return tuple(shape), values


def with_texts(conversation, texts: list[str]) -> list[dict]:
    """The conversation with its texts replaced, in order."""
    it = iter(texts)
    return [{"role": m["role"], "content": [{"type": "text", "text": next(it)}
                                            if c["type"] == "text" else c
                                            for c in m["content"]]} for m in conversation]


class Skeleton:
    """A shape's rendering as literal pieces around its texts (`fill`), and whether the
    template strips each text."""

    def __init__(self, pieces: list[str], strip: bool):
        self.pieces, self.strip = pieces, strip

    def fill(self, texts: list[str]) -> str:
        out = [self.pieces[0]]
        for text, piece in zip(texts, self.pieces[1:]):
            out += (text.strip() if self.strip else text, piece)
        return "".join(out)

    @classmethod
    def probe(cls, processor, conversation) -> Skeleton | None:
        """The shape's skeleton, or None when the template does more than place texts."""
        from peftvlm.data.chat_template import render_texts

        count = len(shape_of(conversation)[1])
        sentinels = [SENTINEL.format(k) for k in range(count)]
        probes = [PROBE.format(k) for k in range(count)]
        marked, probed = render_texts(processor, [with_texts(conversation, sentinels),
                                             with_texts(conversation, probes)],
                                 add_generation_prompt=False)
        pieces, rest = [], marked
        for sentinel in sentinels:
            if marked.count(sentinel) != 1 or sentinel not in rest:
                return None
            before, rest = rest.split(sentinel)
            pieces.append(before)
        if "\x00" in rest:
            return None
        pieces.append(rest)
        for strip in (False, True):
            skeleton = cls(pieces, strip)
            if skeleton.fill(probes) == probed:
                return skeleton
        return None
