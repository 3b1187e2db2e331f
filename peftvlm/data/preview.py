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
    text = Text()
    for span, trained in loss_spans(ids, labels):
        piece = tokenizer.decode(span)
        if image_token and piece.count(image_token) > 3:
            piece = piece.replace(image_token * piece.count(image_token),
                                  f"{image_token}x{piece.count(image_token)}")
        text.append(piece, style="bold green" if trained else "dim")
    n_trained = sum(lab != IGNORE_INDEX for lab in labels)
    image_id = tokenizer.convert_tokens_to_ids(image_token) if image_token else None
    return text, {"tokens": len(ids), "trained_tokens": n_trained,
                  "image_tokens": ids.count(image_id) if image_id is not None else 0}
