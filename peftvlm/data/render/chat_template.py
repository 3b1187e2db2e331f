"""Training inputs from the checkpoint's own chat template: text, and which characters are replies.

The template a model ships (its processor's `chat_template`, or the family's `.jinja` file where
the family must deviate) is the only description of its conversation format. Which tokens carry
loss is derived from it generically, by rendering conversation prefixes with transformers'
renderer (the reference method, `render_by_prefixes`):

    context_i = render(messages[:i], add_generation_prompt=True)   # what the model is shown
    through_i = render(messages[:i + 1])                           # ... plus assistant reply i

Where the template is "prefix-preserving" (both are prefixes of the full rendering), the text
trained on is the full rendering and each reply's characters are `through_i[len(context_i):]`,
cut after the family's `end_of_turn` (the stop token; what follows it, such as Qwen's newline,
is never generated), or, where the template writes no `end_of_turn` after a reply, at the
reply's end without trailing separator whitespace. Where the template writes none after the
FINAL reply (llava-1.5's published template), `end_of_turn` is appended there, so the model
learns to stop while every context it is shown stays exactly the published one.

Where the generation prompt and the same turn inside the conversation differ only in
whitespace (`assistant\n` vs `assistant \n`), the text trained on is what inference renders:
the final reply's generation prompt followed by the reply as the full conversation writes it.
An earlier reply whose context then differs from its own generation prompt (in whitespace) is
left untrained (a warning says so once per template), so every trained token follows exactly
the context a served model is shown. Any other difference is refused, naming the template and
the first differing characters (docs/families.md, docs/safety.md).

The fast path that renders once per conversation shape instead lives in `data/render/shapes.py`; it
is only taken where it gives this module's result.

Character spans become token masks through the tokenizer's offsets, shifted past image
placeholders the processor expands (`return_text_replacement_offsets`), with NumPy: no Python
loop over tokens.
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass

from peftvlm.errors import ModelError

CONTEXT_CHARS = 24  # characters shown either side of where two renderings part
_warned_untrained: set[str] = set()  # templates warned about (once each)


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


def template_name(processor) -> str:
    """Whose chat template this is, for messages: the checkpoint id or folder it came from."""
    tokenizer = getattr(processor, "tokenizer", processor)
    name = getattr(processor, "name_or_path", None) or getattr(tokenizer, "name_or_path", None)
    return f"the chat template of '{name}'" if name else "the model's chat template"


def render_texts(processor, conversations: list[list[dict]],
                 add_generation_prompt: bool) -> list[str]:
    # transformers' own renderer (what processor.apply_chat_template calls), without its
    # per-message normalisation: our rows are already plain {"type": ...} content lists.
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    if not conversations:
        return []
    tokenizer = getattr(processor, "tokenizer", processor)
    try:
        texts, _ = render_jinja_template(conversations=conversations,
                                         chat_template=chat_template_of(processor),
                                         add_generation_prompt=add_generation_prompt,
                                         **tokenizer.special_tokens_map)
    except TemplateError as error:  # the template's own `raise_exception`, or a broken template
        raise ModelError(
            f"{template_name(processor)} refuses a conversation: {error}",
            hint="such rows cannot be trained with this checkpoint's template: drop them or "
                 "change them as the message says (e.g. no system message next to an image)"
        ) from error
    return texts


def not_prefix_error(what: str, name: str = "the chat template", shown: str | None = None,
                     written: str | None = None) -> ModelError:
    """The template renders `what` (e.g. the generation prompt before a reply) otherwise than
    the whole conversation writes it; `shown` / `written` give the first differing characters."""
    where = ""
    if shown is not None and written is not None:
        at = len(os.path.commonprefix([shown, written]))
        start = max(0, at - CONTEXT_CHARS)
        where = (f" They part at character {at}: {shown[start:at + CONTEXT_CHARS]!r} (as "
                 f"{what}) vs {written[start:at + CONTEXT_CHARS]!r} (in the whole "
                 "conversation).")
    return ModelError(
        f"{name} does not render {what} as the whole conversation writes it (beyond "
        "whitespace), so the tokens of each assistant reply cannot be told from the context a "
        f"served model is shown.{where}",
        hint="give the family a prefix-preserving training template as a .jinja file "
             "(FamilySpec.chat_template; see docs/families.md), or drop such rows")


def reply_span(text: str, start: int, end: int, end_of_turn: str | None) -> int:
    """Where reply characters `text[start:end]` stop carrying loss: after `end_of_turn` when the
    template wrote it, else at the reply's end without trailing separator whitespace."""
    segment = text[start:end]
    if end_of_turn and end_of_turn in segment:
        return start + segment.index(end_of_turn) + len(end_of_turn)
    return start + len(segment.rstrip())


def render_conversations(processor, conversations: list[list[dict]],
                         end_of_turn: str | None) -> list[RenderedConversation]:
    """Each conversation's training text and reply spans by the reference method (prefix
    renders). `shapes.ShapeRenderer` gives the same, mostly without rendering."""
    return render_by_prefixes(processor, conversations, end_of_turn)


def render_by_prefixes(processor, conversations: list[list[dict]],
                       end_of_turn: str | None) -> list[RenderedConversation]:
    """The reference method: each reply's span from renders of the conversation's prefixes."""
    return [cut_spans(text, conversation, replies, end_of_turn)
            for (text, replies), conversation in zip(prefix_layouts(processor, conversations),
                                                     conversations)]


def prefix_layouts(processor, conversations: list[list[dict]]) -> list[tuple[str, list]]:
    """Per conversation, the text trained on and `(message index, context end, through end)`
    of each trained reply, from prefix renders (before `cut_spans`)."""
    if not conversations:
        return []
    replies = [[i for i, m in enumerate(c) if m["role"] == "assistant"] for c in conversations]
    contexts = [c[:i] for c, idx in zip(conversations, replies) for i in idx]
    throughs = [c[:i + 1] for c, idx in zip(conversations, replies) for i in idx]
    rendered_contexts = iter(render_texts(processor, contexts, add_generation_prompt=True))
    rendered = iter(render_texts(processor, list(conversations) + throughs,
                                 add_generation_prompt=False))
    fulls = [next(rendered) for _ in conversations]
    name, template = template_name(processor), chat_template_of(processor)
    out = []
    for full, conversation, idx in zip(fulls, conversations, replies):
        pairs = [(i, next(rendered_contexts), next(rendered)) for i in idx]
        out.append(_layout(full, conversation, pairs, name, template))
    return out


def _layout(full: str, conversation, pairs, name: str, template: str) -> tuple[str, list]:
    """`pairs`: (message index, context, through) per reply -> (text, trained replies)."""
    if all(full.startswith(c) and full.startswith(t) for _, c, t in pairs):
        return full, [(i, len(c), len(t)) for i, c, t in pairs]
    if not pairs:
        return full, []
    text, last = _inference_text(full, conversation, pairs[-1], name)
    trained, untrained = [], False
    for i, context, through in pairs[:-1]:
        if text.startswith(context) and text.startswith(through):
            trained.append((i, len(context), len(through)))
        elif _same_but_whitespace(context, text):
            untrained = True  # its own prompt is served with other whitespace than here
        else:
            raise not_prefix_error("the generation prompt before a reply", name, context, text)
    if untrained and template not in _warned_untrained:
        _warned_untrained.add(template)
        logging.getLogger("peftvlm").warning(
            "%s writes the generation prompt with other whitespace than the same turn inside a "
            "conversation: earlier replies of multi-turn rows are not trained (only the final "
            "reply, whose context is exactly the generation prompt)", name)
    return text, trained + [last]


def _inference_text(full: str, conversation, pair, name: str) -> tuple[str, tuple]:
    """The text ending in the final reply as inference renders it: its generation prompt,
    then the reply as the full conversation writes it (tolerating whitespace differences)."""
    i, context, through = pair
    if not full.startswith(through):
        raise not_prefix_error("a conversation up to a reply", name, through, full)
    if full.startswith(context):
        return full, (i, len(context), len(through))
    end = _aligned_end(context, full)
    first = next(iter(_texts([conversation[i]])), "")
    # only whitespace may stand between the prompt's last character and the reply's content
    if end is None or end > len(through) or not first.strip() or \
            not full[end:len(through)].lstrip().startswith(first.strip()):
        raise not_prefix_error("the generation prompt before a reply", name, context, full)
    # whitespace after the prompt's last character belongs to the turn's header, except what
    # the reply itself starts with (kept where the template copied it)
    gap = len(full[end:]) - len(full[end:].lstrip())
    own = len(first) - len(first.lstrip())
    start = end + gap - (own if own and full[end:end + gap].endswith(first[:own]) else 0)
    shift = len(context) - start
    return context + full[start:], (i, len(context), len(through) + shift)


def _aligned_end(prompt: str, text: str) -> int | None:
    """Where in `text` the characters of `prompt` end when whitespace is ignored on both
    sides; None where a non-whitespace character differs."""
    at = 0
    for ch in prompt:
        if ch.isspace():
            continue
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text) or text[at] != ch:
            return None
        at += 1
    return at


def _same_but_whitespace(prompt: str, text: str) -> bool:
    return _aligned_end(prompt, text) is not None


def cut_spans(full, conversation, replies, end_of_turn) -> RenderedConversation:
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


def _texts(conversation, role=None):
    for m in conversation:
        if role is None or m["role"] == role:
            content = m["content"]
            yield from ([content] if isinstance(content, str) else
                        (c.get("text") or "" for c in content if c.get("type") == "text"))


def template_literals(template: str) -> frozenset:
    """The template's strings that look like markup (a non-alphanumeric character, 2+ long):
    a text holding one could be rendered specially (e.g. split at `</think>`)."""
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


