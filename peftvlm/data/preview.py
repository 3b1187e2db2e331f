"""Show a rendered training example with the tokens that carry loss highlighted."""

from __future__ import annotations

from peftvlm.data.collate import IGNORE_INDEX


def loss_spans(input_ids, labels) -> list[tuple[list[int], bool]]:
    """Consecutive runs of token ids, each flagged whether it carries loss."""
    spans: list[tuple[list[int], bool]] = []
    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE_INDEX
        if spans and spans[-1][1] == trained:
            spans[-1][0].append(tok)
        else:
            spans.append(([tok], trained))
    return spans


def render_example(collator, row: dict, image_token: str | None = None):
    """A rich Text of one encoded row: trained tokens in bold green, image runs collapsed."""
    from rich.text import Text

    batch = collator([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tokenizer = collator.processor.tokenizer
    # the processor's video token, where it has one (`<|video_pad|>`, `<video>`)
    video_token = getattr(collator.processor, "video_token", None) if row.get("videos") else None
    text = Text()
    for span, trained in loss_spans(ids, labels):
        piece = tokenizer.decode(span)
        for token in filter(None, (image_token, video_token)):
            if piece.count(token) > 3:  # a run of one image's / clip's tokens, shown counted
                piece = piece.replace(token * piece.count(token), f"{token}x{piece.count(token)}")
        text.append(piece, style="bold green" if trained else "dim")
    n_trained = sum(lab != IGNORE_INDEX for lab in labels)
    image_id = tokenizer.convert_tokens_to_ids(image_token) if image_token else None
    video_id = tokenizer.convert_tokens_to_ids(video_token) if video_token else None
    return text, {"tokens": len(ids), "trained_tokens": n_trained,
                  "image_tokens": ids.count(image_id) if image_id is not None else 0,
                  "video_tokens": ids.count(video_id) if video_id is not None else 0}
