"""GPU proof for `peftvlm plan`: measured peak memory and speed of full-size random-weight models
beside plan's estimate, for peftvlm's trainer set-up and TRL's stock SFTTrainer + peft set-up.

Run on a CUDA machine (called by scripts/gpu_check.sh; ~5 min on one 80 GB GPU):
    python scripts/gpu_plan_check.py [--steps 6] [--cases llava-qlora,llava-lora,qwen2vl-lora]
                                     [--out gpu_plan_check.json]
CPU smoke test of the script itself (tiny model, 2 steps):  python scripts/gpu_plan_check.py --tiny
Cases: LLaVA-1.5-7B QLoRA and LoRA bf16, Qwen2-VL-2B LoRA bf16, all built from the bundled
configs with random weights; batch 1, one 640x480 image + 512 text tokens, gradient
checkpointing on, LoRA r=16 on the language model. Prints a markdown table for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = {  # name -> (model id, family, method)
    "llava-qlora": ("llava-hf/llava-1.5-7b-hf", "llava", "qlora"),
    "llava-lora": ("llava-hf/llava-1.5-7b-hf", "llava", "lora"),
    "qwen2vl-lora": ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", "lora"),
}
TEXT_TOKENS, IMAGE_SIZE = 512, (640, 480)


def recipe_for(model_id: str, family: str, method: str, seq: int):
    from peftvlm.recipe.load import validate_recipe_dict

    model = {"id": model_id, "family": family, "dtype": "bfloat16"}
    if method == "qlora":
        model["quantization"] = {"bits": 4, "compute_dtype": "bfloat16"}
    return validate_recipe_dict({
        "model": model, "method": {"name": method, "r": 16, "lora_dropout": 0.05},
        "data": {"synthetic": {"name": "colour-vqa", "train_size": 8, "eval_size": 2}},
        "train": {"per_device_train_batch_size": 1, "gradient_checkpointing": True,
                  "max_length": seq, "bf16": True}})


def random_model(folder: Path, family, quant, device: str, tmp: Path):
    """Random weights from the config; QLoRA goes through a saved checkpoint, since bitsandbytes
    quantizes at load time."""
    import torch
    from transformers import AutoConfig

    from peftvlm.models import model_class

    config = AutoConfig.from_pretrained(folder)
    cls = model_class(family)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device if quant is None else "cpu"):
        model = cls.from_config(config, dtype=dtype)
    if quant is None:
        return model, config
    model.save_pretrained(tmp / "random")
    del model
    gc.collect()
    return cls.from_pretrained(tmp / "random", quantization_config=quant, dtype=dtype,
                               device_map={"": 0} if device == "cuda" else None), config


def one_batch(folder: Path, config, family, model_forward) -> tuple[dict, int]:
    """One row: an image block (the family's own token layout) then random text tokens."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    inputs = AutoImageProcessor.from_pretrained(folder)(images=[Image.new("RGB", IMAGE_SIZE)],
                                                        return_tensors="pt")
    n_image, _ = family.image_tokens({k: v.numpy() for k, v in inputs.items()}, config)
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    block = [image_id] * n_image
    start = getattr(config, "vision_start_token_id", None)
    if start is not None:
        block = [start, *block, config.vision_end_token_id]
    vocab = config.get_text_config().vocab_size
    special = {image_id, start, getattr(config, "vision_end_token_id", None)}
    text = [t if t not in special else 3 for t in
            torch.randint(3, min(20000, vocab - 1), (TEXT_TOKENS,)).tolist()]
    ids = torch.tensor([[1, *block, *text]])
    labels = ids.clone()
    labels[0, : len(block) + 1] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             **{k: v for k, v in inputs.items()}}
    if "mm_token_type_ids" in inspect.signature(model_forward).parameters:
        batch["mm_token_type_ids"] = (ids == image_id).long()  # M-RoPE: 1 marks image tokens
    return batch, ids.shape[1]


def train_steps(model, args, batch, steps: int, peft_config=None) -> dict:
    """Train `steps` steps on the fixed batch; `peft_config`: TRL's stock path, where
    SFTTrainer prepares and wraps the model itself."""
    import torch
    import trl
    from datasets import Dataset

    from peftvlm.families._tokenizer import build_tiny_tokenizer

    # Inputs are pre-tokenized ids; TRL only needs some tokenizer object (bundled configs come
    # without one, and random-weight models have no Hub name to load it from).
    trainer = trl.SFTTrainer(model=model, args=args, peft_config=peft_config,
                             processing_class=build_tiny_tokenizer([]),
                             train_dataset=Dataset.from_dict({"i": list(range(64))}),
                             data_collator=lambda rows: dict(batch))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {"peak_gib": peak / 1024 ** 3, "step_s": seconds / steps}


def sft_args(out: Path, steps: int, device: str, **extra):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=1,
                     learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[],
                     bf16=device == "cuda", use_cpu=device != "cuda", max_length=None,
                     gradient_checkpointing=True, remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True}, **extra)


def run_case(name: str, steps: int, tiny: bool, tmp: Path) -> list[dict]:
    import torch

    from peftvlm.families import get_family
    from peftvlm.methods.lora import peft_config
    from peftvlm.models import quantization_config
    from peftvlm.plan import BUNDLED, plan
    from peftvlm.registry import get_method

    model_id, family_name, method = CASES[name]
    family = get_family(family_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if tiny:
        from peftvlm.models import tiny_model_path

        model_id = family.tiny_name
        folder = tiny_model_path(model_id)
    else:
        folder = BUNDLED / model_id.replace("/", "--")
    recipe = recipe_for(model_id, family_name, method, 4096)
    quant = quantization_config(recipe.model, family, method) if device == "cuda" else None
    rows = []
    for contender in ("peftvlm", "trl-stock"):
        base, config = random_model(folder, family, quant, device, tmp)
        batch, seq = one_batch(folder, config, family, base.forward)
        args = sft_args(tmp / "out", steps, device)
        if contender == "peftvlm":  # peftvlm's method application (targets, k-bit prep)
            model = get_method(method).apply(base, family, recipe.method,
                                             quantized=quant is not None,
                                             gradient_checkpointing=True)
            measured = train_steps(model, args, batch, steps)
        else:
            model = base
            measured = train_steps(model, args, batch, steps, peft_config(family, recipe.method))
        del model, base
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
        rows.append({"case": name, "contender": contender, "tokens": seq,
                     "tokens_per_s": seq / measured["step_s"], **measured})
    estimate = plan(recipe_for(model_id, family_name, method, seq), image_size=IMAGE_SIZE,
                    text_tokens=TEXT_TOKENS,  # the batch labels its text tokens only
                    labelled=TEXT_TOKENS / seq)["estimate"]
    for row in rows:
        row["plan_peak_gib"] = estimate["peak_allocated"] / 1024 ** 3
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per contender")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " +
                        ", ".join(CASES))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny models")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    names = [c for c in args.cases.split(",") if c]
    if args.tiny:
        names, args.steps = [n for n in names if n != "llava-qlora"], min(args.steps, 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rows += run_case(name, args.steps, args.tiny, Path(tmp))
    print("| case | contender | tokens | peak allocated GiB | plan GiB | step s | tokens/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['contender']} | {r['tokens']} | {r['peak_gib']:.2f} | "
              f"{r['plan_peak_gib']:.2f} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
