"""Training inputs from the checkpoint's own chat template: text, and which characters are replies.

The template a model ships (its processor's `chat_template`, or the family's `.jinja` file where
the family must deviate) is the only description of its conversation format. Which tokens carry
loss is derived from it generically, by rendering conversation prefixes with transformers'
renderer:

    context_i = render(messages[:i], add_generation_prompt=True)   # what the model is shown
    through_i = render(messages[:i + 1])                           # ... plus assistant reply i

Both must be prefixes of the full rendering (the template is "prefix-preserving"); the reply's
characters are `through_i[len(context_i):]`, cut after the family's `end_of_turn` (the stop
token; what follows it, such as Qwen's newline, is never generated), or, where the template
writes no `end_of_turn` after a reply, at the reply's end without trailing separator
whitespace. Where the template writes none after the FINAL reply (llava-1.5's published
template), `end_of_turn` is appended there, so the model learns to stop while every context it
is shown stays exactly the published one (see docs/families.md).

One-render fast path: a template that copies reply content verbatim needs no prefix renders.
Each reply's text is replaced by a sentinel, the conversation rendered ONCE, the sentinels
located and the real text put back; the span starts a fixed `lead` before the reply content and
`through_i` ends a fixed `tail` after it (both learnt from probe conversations). Whether a
template qualifies is decided once per template (`one_render_fit`: the fast path must give the
prefix method's text and spans on every probe, else it is not used), and a row whose reply
contains one of the template's own string literals (e.g. `</think>`) is rendered by prefixes.

Character spans become token masks through the tokenizer's offsets, shifted past image
placeholders the processor expands (`return_text_replacement_offsets`), with NumPy: no Python
loop over tokens.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from peftvlm.errors import ModelError


@dataclass(frozen=True)
class RenderedConversation:
    """A conversation rendered for training: its text and the character spans that carry loss."""

    text: str
    spans: tuple[tuple[int, int], ...]


def chat_template_of(processor) -> str:
    """The template the processor renders with (its own, else its tokenizer's)."""
    template = getattr(processor, "chat_template", None)
    if template is None:
        template = getattr(getattr(processor, "tokenizer", processor), "chat_template", None)
    if not template:
        raise ModelError(
            "the model's processor has no chat template, so peftvlm cannot render conversations "
            "for it",
            hint="use a checkpoint that ships chat_template.jinja (an -Instruct model), or give "
                 "its family a template file under peftvlm/families/templates/ (see "
                 "docs/families.md)")
    return template


def render_texts(processor, conversations: list[list[dict]],
                 add_generation_prompt: bool) -> list[str]:
    # transformers' own renderer (what processor.apply_chat_template calls), without its
    # per-message normalisation: our rows are already plain {"type": ...} content lists.
    from transformers.utils.chat_template_utils import render_jinja_template

    if not conversations:
        return []
    tokenizer = getattr(processor, "tokenizer", processor)
    texts, _ = render_jinja_template(conversations=conversations,
                                     chat_template=chat_template_of(processor),
                                     add_generation_prompt=add_generation_prompt,
                                     **tokenizer.special_tokens_map)
    return texts


def not_prefix_error(what: str) -> ModelError:
    return ModelError(
        f"the chat template does not render {what} as a prefix of the whole conversation, so "
        "the tokens of each assistant reply cannot be told from its context",
        hint="give the family a prefix-preserving training template as a .jinja file "
             "(FamilySpec.chat_template; see docs/families.md)")


def reply_span(text: str, start: int, end: int, end_of_turn: str | None) -> int:
    """Where reply characters `text[start:end]` stop carrying loss: after `end_of_turn` when the
    template wrote it, else at the reply's end without trailing separator whitespace."""
    segment = text[start:end]
    if end_of_turn and end_of_turn in segment:
        return start + segment.index(end_of_turn) + len(end_of_turn)
    return start + len(segment.rstrip())


def render_conversations(processor, conversations: list[list[dict]], end_of_turn: str | None,
                         fit: "OneRenderFit | None" = None) -> list[RenderedConversation]:
    """Render each conversation with the processor's chat template and find its reply spans;
    with `fit` (from `one_render_fit`), in one render per row where the row allows it."""
    out = [None] * len(conversations)
    fast = [i for i, c in enumerate(conversations) if fit is not None and fit.allows(c)]
    for i, r in zip(fast, _render_marked(processor, [conversations[i] for i in fast],
                                         end_of_turn, fit)):
        out[i] = r
    slow = [i for i, r in enumerate(out) if r is None]
    for i, r in zip(slow, render_by_prefixes(processor, [conversations[i] for i in slow],
                                             end_of_turn)):
        out[i] = r
    return out


def render_by_prefixes(processor, conversations: list[list[dict]],
                       end_of_turn: str | None) -> list[RenderedConversation]:
    """The reference method: each reply's span from renders of the conversation's prefixes."""
    if not conversations:
        return []
    replies = [[i for i, m in enumerate(c) if m["role"] == "assistant"] for c in conversations]
    contexts = [c[:i] for c, idx in zip(conversations, replies) for i in idx]
    throughs = [c[:i + 1] for c, idx in zip(conversations, replies) for i in idx]
    rendered_contexts = iter(render_texts(processor, contexts, add_generation_prompt=True))
    rendered = iter(render_texts(processor, list(conversations) + throughs,
                                 add_generation_prompt=False))
    fulls = [next(rendered) for _ in conversations]
    return [_spans(full, conversation, idx, rendered_contexts, rendered, end_of_turn)
            for full, conversation, idx in zip(fulls, conversations, replies)]


def _spans(full, conversation, reply_indices, contexts, throughs, end_of_turn):
    spans = []
    for i in reply_indices:
        context, through = next(contexts), next(throughs)
        if not full.startswith(context):
            raise not_prefix_error("the generation prompt before a reply")
        if not full.startswith(through):
            raise not_prefix_error("a conversation up to a reply")
        spans.append((i, len(context), len(through)))
    return _cut_spans(full, conversation, spans, end_of_turn)


def _cut_spans(full, conversation, replies, end_of_turn) -> RenderedConversation:
    """`replies`: (message index, context end, through end) per reply -> the trained spans."""
    spans = []
    for i, start, through_end in replies:
        stop = reply_span(full, start, through_end, end_of_turn)
        wrote_stop = end_of_turn and full[start:stop].endswith(end_of_turn)
        if end_of_turn and not wrote_stop and i == len(conversation) - 1:
            # The template writes no stop token after the final reply: append it (trained).
            full = full[:stop] + end_of_turn
            stop = len(full)
        if stop > start:
            spans.append((start, stop))
    return RenderedConversation(full, tuple(spans))


# --- one render per row ----------------------------------------------------------------------

SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters: in no real text


@dataclass(frozen=True)
class OneRenderFit:
    """How a template lays out a reply around its content: `lead` (what follows the generation
    prompt before the content) and `tail` (what a conversation ending in the reply adds after
    it); `literals`: the template's own strings, which a reply must not contain."""

    lead: str
    tail: str
    literals: frozenset

    def allows(self, conversation: list[dict]) -> bool:
        if any("\ue000" in t for t in _texts(conversation)):  # our sentinel's mark: no guessing
            return False
        return not any(lit in t for t in _reply_texts(conversation) for lit in self.literals)


def _texts(conversation, role=None):
    for m in conversation:
        if role is None or m["role"] == role:
            content = m["content"]
            yield from ([content] if isinstance(content, str) else
                        (c.get("text") or "" for c in content if c.get("type") == "text"))


def _reply_texts(conversation):
    return _texts(conversation, "assistant")


def _marked(conversation: list[dict], texts: list[str]) -> list[dict]:
    """The conversation with each assistant text replaced by a numbered sentinel (collected)."""
    def mark(text):
        texts.append(text)
        return f"\ue000{len(texts) - 1}\ue001"

    def content(c):
        if isinstance(c, str):
            return mark(c)
        return [{**x, "text": mark(x.get("text") or "")} if x.get("type") == "text" else x
                for x in c]

    return [{**m, "content": content(m["content"])} if m["role"] == "assistant" else m
            for m in conversation]


def _render_marked(processor, conversations, end_of_turn, fit):
    """One render per conversation; None for a row whose sentinels did not come back intact."""
    if not conversations:
        return []
    marked, texts = [], []
    for c in conversations:
        texts.append([])
        marked.append(_marked(c, texts[-1]))
    rendered = render_texts(processor, marked, add_generation_prompt=False)
    return [_unmark(r, c, t, end_of_turn, fit) for r, c, t in zip(rendered, conversations, texts)]


def _unmark(rendered, conversation, texts, end_of_turn, fit):
    """Real text back in place of the sentinels, and each reply's (index, start, through end)."""
    pieces, bounds, at, length = [], [], 0, 0
    for n, match in enumerate(SENTINEL.finditer(rendered)):
        if int(match.group(1)) != n:
            return None  # content dropped, repeated or reordered by the template
        pieces += [rendered[at:match.start()], texts[n]]
        length += match.start() - at
        bounds.append((length, length + len(texts[n])))
        length += len(texts[n])
        at = match.end()
    if len(bounds) != len(texts):
        return None
    full = "".join(pieces) + rendered[at:]
    replies, k = [], 0
    for i, m in enumerate(conversation):
        if m["role"] != "assistant":
            continue
        count = len(list(_reply_texts([m])))
        if count == 0:
            return None
        start, end = bounds[k][0] - len(fit.lead), bounds[k + count - 1][1] + len(fit.tail)
        k += count
        if start < 0 or full[start:start + len(fit.lead)] != fit.lead or \
                full[end - len(fit.tail):end] != fit.tail:
            return None
        replies.append((i, start, end))
    return _cut_spans(full, conversation, replies, end_of_turn)


def shift_spans(spans, replacements) -> list[tuple[int, int]]:
    """Character spans of the rendered text moved to the processor's expanded text, where each
    image placeholder became many image tokens (`replacements`: the processor's
    `text_replacement_offsets` of one row, `{"span": old, "new_span": new}` in text order)."""
    if replacements is None or len(replacements) == 0:  # may be a NumPy array
        return list(spans)
    ends = [r["span"][1] for r in replacements]
    gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]
    return [tuple(c + gained[bisect.bisect_right(ends, c)] for c in span) for span in spans]


def token_mask(offsets, spans):
    """1 where a token's characters overlap any span. `offsets`: (tokens, 2) array of one row;
    zero-width tokens (padding, added BOS) never overlap."""
    import numpy as np

    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return mask


def _probe(*turns, system=None, images=1):
    """A probe conversation: (question, answer) turns, the first with `images` images."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for n, (question, answer) in enumerate(turns):
        media = [{"type": "image"}] * (images if n == 0 else 0)
        messages += [{"role": "user", "content": [*media, {"type": "text", "text": question}]},
                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return messages


# Single and multi-turn, system prompt, image and text-only, replies with edge whitespace and
# empty ones: a template that trims, rewrites or drops replies gives another text on one of them.
PROBES = (
    _probe(("What is it?", "Probe reply one.")),
    _probe(("What colour?", "red"), ("And the shape?", " a round circle "), ("Big?", "no\n")),
    _probe(("Name a colour.", "Green, mostly."), system="Answer briefly.", images=0),
    _probe(("Two?", "yes"), ("Why?", "  Both look the same.  "), images=2),
    _probe(("Say nothing.", ""), ("Now a word.", "Word")),
)


def one_render_fit(processor, end_of_turn: str | None) -> OneRenderFit | None:
    """The lead/tail layout under which one render per row gives exactly the prefix method's
    text and spans on every probe conversation; None when the template does not qualify."""
    lead_tail = _lead_and_tail(processor, PROBES[0])
    try:
        literals = _template_literals(chat_template_of(processor))
    except Exception:  # a tag plain Jinja does not know: keep to the prefix method
        return None
    if lead_tail is None:
        return None
    fit, checked = OneRenderFit(*lead_tail, literals), 0
    for probe in PROBES:
        try:
            expected = render_by_prefixes(processor, [probe], end_of_turn)
        except ModelError:  # not prefix-preserving: no reference to be equal to
            return None
        except Exception:  # the template refuses this probe (e.g. no system role): skip it
            continue
        try:
            fast = _render_marked(processor, [probe], end_of_turn, fit)
        except Exception:
            return None
        if fast != expected:
            return None
        checked += 1
    return fit if checked >= 2 else None


def _lead_and_tail(processor, probe) -> tuple[str, str] | None:
    """What the template writes between the generation prompt and the first reply's content,
    and after it when the conversation ends there: through = context + lead + reply + tail."""
    reply = probe[1]["content"][0]["text"]
    try:
        context = render_texts(processor, [probe[:1]], add_generation_prompt=True)[0]
        through = render_texts(processor, [probe[:2]], add_generation_prompt=False)[0]
    except Exception:
        return None
    segment = through[len(context):]
    if not through.startswith(context) or reply not in segment:
        return None
    at = segment.index(reply)
    return segment[:at], segment[at + len(reply):]


def _template_literals(template: str) -> frozenset:
    """The template's strings that look like markup (a non-alphanumeric character, 2+ long):
    a reply holding one could be rendered specially (e.g. split at `</think>`)."""
    from jinja2 import nodes
    from transformers.utils.chat_template_utils import _compile_jinja_template

    # transformers' own environment (cached per template): it knows `{% generation %}`
    tree = _compile_jinja_template(template).environment.parse(template)
    found = set()
    for node in tree.find_all((nodes.Const, nodes.TemplateData)):
        value = node.value if isinstance(node, nodes.Const) else node.data
        for part in str(value).split() if isinstance(value, str) else ():
            if len(part) >= 2 and not part.replace("'", "").isalnum():
                found.add(part)
    return frozenset(found)
