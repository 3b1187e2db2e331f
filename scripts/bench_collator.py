"""Benchmark the training collator: peftvlm's derived reply mask vs transformers' assistant mask.

Per tiny family, times one collated batch (default 16 rows: an image, a question, an answer)
three ways and prints a markdown table of milliseconds per batch:

- `peftvlm`: `ConversationCollator` (the checkpoint's template, reply spans derived by prefix
  rendering, mask from token offsets with NumPy; rendering cached per row after the first
  batch, as in every epoch after the first);
- `peftvlm (cold)`: the same with its render cache cleared before every batch (first epoch):
  no template render per row where the conversation's shape was proven to equal prefix
  rendering (`shapes.ShapeRenderer`: one set of probe renders per shape);
- `peftvlm (cold, prefixes)`: the same, forced to the prefix method (2 x replies + 1 renders
  per row), which templates that rewrite replies keep;
- `transformers mask`: `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`
  with a `{% generation %}`-marked training template (TRL's, or llava-1.5's published one),
  which maps spans onto tokens in a Python loop over every token.

    python scripts/bench_collator.py                      # batch 16, all chat families
    python scripts/bench_collator.py --batch-size 64 --repeats 20 --families llava smolvlm
    python scripts/bench_collator.py --turns 3              # multi-turn rows (3 replies each)
    python scripts/bench_collator.py --profile --families llava --turns 3 --repeats 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

# `{% generation %}`-marked templates for transformers' mask: llava-1.5's own template has the
# markers; TRL ships training copies of the others (trl/chat_templates/*_training.jinja).
REFERENCE_TEMPLATES = {"llava": None, "qwen2_vl": "qwen2_5_vl_training.jinja",
                       "qwen2_5_vl": "qwen2_5_vl_training.jinja",
                       "smolvlm": "smolvlm_training.jinja"}


def rows(n: int, turns: int = 1) -> list[dict]:
    from PIL import Image

    colours = [("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))]

    def turn(t, name):
        media = [{"type": "image"}] if t == 0 else []
        question = "What color is the shape?" if t == 0 else f"And now, turn {t}?"
        return [{"role": "user", "content": [*media, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"{name} {t}"}]}]

    return [{"messages": [m for t in range(turns) for m in turn(t, name)],
             "images": [Image.new("RGB", (32, 32), rgb)]}
            for name, rgb in (colours[i % 3] for i in range(n))]


def per_batch(fn, repeats: int) -> float:
    fn()  # warm-up (and the first render, for the cached variant)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def reference_template(name: str, processor) -> str:
    import trl

    file = REFERENCE_TEMPLATES[name]
    if file is None:
        return processor.chat_template
    return (Path(trl.__file__).parent / "chat_templates" / file).read_text()


def bench_family(name: str, batch_size: int, repeats: int, root: Path, turns: int) -> tuple:
    from transformers import AutoProcessor

    from peftvlm.data.render.chat_template import render_by_prefixes
    from peftvlm.data.batch.collate import ConversationCollator, with_images
    from peftvlm.families import FAMILIES

    spec = FAMILIES[name]
    spec.build_tiny(root / name)
    processor = (spec.processor_class() if spec.processor_class else AutoProcessor) \
        .from_pretrained(root / name)
    batch = rows(batch_size, turns)
    collator = ConversationCollator(processor, spec)
    by_prefixes = ConversationCollator(processor, spec)
    by_prefixes.render = lambda conversations: render_by_prefixes(  # never the shortcut
        processor, conversations, spec.end_of_turn)

    def cold(c=collator):
        c._rendered.clear()
        return c(batch)

    template = reference_template(name, processor)

    def transformers_mask():
        processor.tokenizer.padding_side = "right"
        return processor.apply_chat_template(
            [with_images(r["messages"], r["images"]) for r in batch], chat_template=template,
            tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            return_tensors="np", processor_kwargs={"padding": True})

    return (name, per_batch(lambda: collator(batch), repeats), per_batch(cold, repeats),
            per_batch(lambda: cold(by_prefixes), repeats), per_batch(transformers_mask, repeats))


def profile_collator(name: str, batch_size: int, repeats: int, turns: int, top: int = 20):
    """The collator's first-epoch cost (render cache cleared per batch) under cProfile, as
    shares of the profile's total (shares hold under load; seconds do not)."""
    import cProfile
    import pstats

    from transformers import AutoProcessor

    from peftvlm.data.batch.collate import ConversationCollator
    from peftvlm.families import FAMILIES

    spec = FAMILIES[name]
    with tempfile.TemporaryDirectory() as tmp:
        spec.build_tiny(Path(tmp) / name)
        processor = (spec.processor_class() if spec.processor_class else AutoProcessor) \
            .from_pretrained(Path(tmp) / name)
    batch, collator = rows(batch_size, turns), ConversationCollator(processor, spec)
    collator(batch)  # shapes proven once, as in any run
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats):
        collator._rendered.clear()
        collator(batch)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(v[2] for v in stats.stats.values()) or 1.0
    print(f"{name}, batch of {batch_size}, {turns} turn(s), {repeats} cold batches\n")
    print("| own time | cumulative | calls | function |\n| ---: | ---: | ---: | --- |")
    for (file, line, func), (_, calls, own, cumulative, _) in sorted(
            stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]:
        where = f"{Path(file).name}:{line}({func})" if line else func
        print(f"| {own / total:.1%} | {cumulative / total:.1%} | {calls} | `{where}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--turns", type=int, default=1, help="question/answer turns per row")
    parser.add_argument("--families", nargs="+", default=list(REFERENCE_TEMPLATES),
                        choices=list(REFERENCE_TEMPLATES))
    parser.add_argument("--profile", action="store_true",
                        help="instead: cProfile `--repeats` cold batches of the first family's "
                             "collator; top functions by share of own time")
    args = parser.parse_args()
    if args.profile:
        return profile_collator(args.families[0], args.batch_size, args.repeats, args.turns)
    print(f"batch of {args.batch_size}, {args.turns} turn(s) per row, mean of {args.repeats} "
          "batches, ms per batch\n")
    print("| family | peftvlm | peftvlm (cold) | peftvlm (cold, prefixes) | transformers mask |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families:
            family, warm, cold, prefixes, reference = bench_family(
                name, args.batch_size, args.repeats, Path(tmp), args.turns)
            print(f"| {family} | {warm:.1f} | {cold:.1f} | {prefixes:.1f} | {reference:.1f} |")


if __name__ == "__main__":
    main()
