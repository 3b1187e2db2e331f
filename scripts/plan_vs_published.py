"""`peftvlm plan`'s estimate beside published peak-memory measurements (no GPU needed).

Run:  python scripts/plan_vs_published.py [--json]
Prints a markdown table (used in docs/distributed.md). Each row states the published set-up
as far as its source gives it; where the source leaves a setting open, the assumption is in
the row's note.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftvlm import memory  # noqa: E402

QWEN_7B_LORA = """\
model: {id: Qwen/Qwen2.5-VL-7B-Instruct, family: qwen2_5_vl}
method: {name: lora, r: 8, lora_alpha: 32, lora_dropout: 0.05, target: language}
data: {synthetic: {name: colour-vqa}}
train: {per_device_train_batch_size: 1, gradient_checkpointing: true, max_length: 2048}
"""


def qwen_rows() -> list[dict]:
    """ms-swift's Qwen2.5-VL-7B LoRA captioning example (one GPU, batch 1, ViT frozen)."""
    from peftvlm.plan import plan
    from peftvlm.recipe.load import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen7b.yaml"
        path.write_text(QWEN_7B_LORA)
        recipe = load_recipe(path)
        rows = []
        for text, size, note in ((100, (640, 480), "a 640x480 image, 100 text tokens"),
                                 (None, (1024, 1024), "a 1024x1024 image, rows padded to 2048")):
            result = plan(recipe, image_size=size, text_tokens=text)
            rows.append({"setup": "Qwen2.5-VL-7B LoRA r8 (language), bf16, batch 1, GC",
                         "published_gib": 22.0, "source": "ms-swift best practice (nvidia-smi)",
                         "estimate_gib": result["estimate"]["with_overhead"] / memory.GIB,
                         "note": note})
    return rows


def llama_row() -> dict:
    """torchtune's Llama-3.1-8B QLoRA (single device): text only, so the shape is written from
    the published config (4096 x 32 layers, 14336 MLP, 32/8 heads, vocab 128256, 8.03 B)."""
    hidden, layers, inter, vocab, kv = 4096, 32, 14336, 128256, 1024
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    r = 8  # torchtune's defaults: LoRA on q, v, the output projection and the three MLP layers
    adapted = [(hidden, hidden), (hidden, kv), (hidden, hidden),
               (hidden, inter), (hidden, inter), (inter, hidden)]
    trainable = layers * sum(r * (n_in + n_out) for n_in, n_out in adapted)
    shape = memory.Shape(total_params=8_030_261_248, trainable_params=trainable,
                         frozen_params_full=8_030_261_248 - linear, frozen_params_4bit=linear,
                         layers=layers, hidden=hidden, intermediate=inter, q_dim=hidden,
                         kv_dim=kv, vocab=vocab)
    work = memory.Workload(batch_size=2, seq_len=512, gradient_checkpointing=True)
    est = memory.estimate(shape, work)
    return {"setup": "Llama-3.1-8B QLoRA r8, bf16, GC (text only)",
            "published_gib": 7.4, "source": "torchtune's single-device QLoRA figure",
            "estimate_gib": est["peak_allocated"] / memory.GIB,
            "note": "batch 2 x 512 tokens assumed (the figure does not say); PyTorch's peak "
                    "(no CUDA context); torchtune chunks the output layer's loss, this "
                    "estimate counts TRL's fused head "
                    f"({est['parts']['logits'] / memory.GIB:.1f} GiB)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args()
    rows = qwen_rows() + [llama_row()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| set-up | published GiB | plan GiB | source | plan's assumption |")
    print("| --- | ---: | ---: | --- | --- |")
    for row in rows:
        print(f"| {row['setup']} | {row['published_gib']:.1f} | {row['estimate_gib']:.1f} | "
              f"{row['source']} | {row['note']} |")


if __name__ == "__main__":
    main()
