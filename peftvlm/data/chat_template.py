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

Character spans become token masks through the tokenizer's offsets, shifted past image
placeholders the processor expands (`return_text_replacement_offsets`), with NumPy: no Python
loop over tokens.
"""

from __future__ import annotations

import bisect
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


def _render(processor, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
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


def _not_prefix_error(what: str) -> ModelError:
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


def render_conversations(processor, conversations: list[list[dict]],
                         end_of_turn: str | None) -> list[RenderedConversation]:
    """Render each conversation with the processor's chat template and find its reply spans."""
    replies = [[i for i, m in enumerate(c) if m["role"] == "assistant"] for c in conversations]
    contexts = [c[:i] for c, idx in zip(conversations, replies) for i in idx]
    throughs = [c[:i + 1] for c, idx in zip(conversations, replies) for i in idx]
    rendered_contexts = iter(_render(processor, contexts, add_generation_prompt=True))
    rendered = iter(_render(processor, list(conversations) + throughs, add_generation_prompt=False))
    fulls = [next(rendered) for _ in conversations]
    return [_spans(full, conversation, idx, rendered_contexts, rendered, end_of_turn)
            for full, conversation, idx in zip(fulls, conversations, replies)]


def _spans(full, conversation, reply_indices, contexts, throughs, end_of_turn):
    spans = []
    for i in reply_indices:
        context, through = next(contexts), next(throughs)
        if not full.startswith(context):
            raise _not_prefix_error("the generation prompt before a reply")
        if not full.startswith(through):
            raise _not_prefix_error("a conversation up to a reply")
        stop = reply_span(full, len(context), len(through), end_of_turn)
        wrote_stop = end_of_turn and full[len(context):stop].endswith(end_of_turn)
        if end_of_turn and not wrote_stop and i == len(conversation) - 1:
            # The template writes no stop token after the final reply: append it (trained).
            full = full[:stop] + end_of_turn
            stop = len(full)
        if stop > len(context):
            spans.append((len(context), stop))
    return RenderedConversation(full, tuple(spans))


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
