#!/usr/bin/env python
"""Peak memory of ONE training step on a large-vocabulary twin: TRL's fused LM head vs full logits.

The twin is tiny-qwen2-vl's config with a Qwen-sized vocabulary (151,680) and a small body
(hidden 128, 2 layers), random weights, built from config (no download). One step = LoRA
(`method: lora`, as a recipe applies it), one forward + backward over `--tokens` text tokens
(batch 1), one AdamW step. Each head runs in its own child process; the figure is the child's
peak RSS (`ru_maxrss`) minus its RSS once torch/transformers/trl are imported, so it holds the
model, the adapter, the optimiser and the step. The heads:

- `fused`: TRL 1.16's `add_fused_lm_head` with the outputs SFTTrainer asks for
  (log_probs, entropy, is_top1) and SFTTrainer's loss from `log_probs`, fitted to the CPU as
  `peftvlm train` fits it (`trainers.lm_head.fit_fused_head`: in-place tile folds, 4,096-entry
  vocabulary chunks; `--trl-head` keeps TRL's own): what `peftvlm train` runs for every
  family but BLIP-2.
- `logits`: our logits head (`peftvlm.trainers.lm_head`, BLIP-2's): the model's own logits,
  then TRL's outputs from them.
- `unfused`: the model's own forward with `labels` (transformers' full-vocabulary
  cross-entropy): what TRL did before 1.16.

Also prints `peftvlm plan`'s estimate (`peak_allocated`, fp32 on CPU) of the same step for the
twin, per head. CPU load does not change these figures (they are bytes, not seconds).

    python scripts/bench_memory.py [--tokens 2048] [--vocab 151680] [--hidden 128] [--trl-head]
                                   [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HEADS = ("fused", "logits", "unfused")
MIB = 1024 ** 2


def current_rss() -> int:
    """This process's resident set size now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def twin_config(vocab: int, hidden: int, layers: int = 2):
    """tiny-qwen2-vl's config with a large vocabulary and a `hidden`-wide text model."""
    from transformers import AutoConfig

    from peftvlm.models import tiny_model_path

    config = AutoConfig.from_pretrained(tiny_model_path("tiny-qwen2-vl"))
    text = config.text_config
    heads = max(2, hidden // 32)
    head_dim = hidden // heads
    quarter = head_dim // 2  # mrope_section sums to head_dim / 2
    text.vocab_size, text.hidden_size, text.intermediate_size = vocab, hidden, 2 * hidden
    text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads = layers, heads, heads
    text.layer_types = ["full_attention"] * layers
    text.max_position_embeddings = 8192
    text.rope_parameters["mrope_section"] = [quarter - 2 * (quarter // 3), quarter // 3,
                                             quarter // 3]
    config.vocab_size = vocab
    return config


def save_twin(folder: Path, vocab: int, hidden: int) -> Path:
    """A model folder `plan` can read (config + the tiny twin's processor); no weights needed."""
    import shutil

    from peftvlm.models import tiny_model_path

    source = tiny_model_path("tiny-qwen2-vl")
    folder.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json":
            shutil.copy(f, folder / f.name)
    twin_config(vocab, hidden).save_pretrained(folder)
    return folder


def recipe_for(folder: Path, tokens: int):
    from peftvlm.recipe.load import validate_recipe_dict

    return validate_recipe_dict({
        "name": "bench-memory", "model": {"id": str(folder), "dtype": "float32"},
        "method": {"name": "lora", "r": 16, "lora_dropout": 0.0},
        "data": {"synthetic": {"name": "colour-vqa", "train_size": 8, "eval_size": 2}},
        "train": {"per_device_train_batch_size": 1, "max_length": tokens,
                  "gradient_checkpointing": False}})


def plan_estimate(folder: Path, tokens: int, unfused: bool) -> dict:
    """`peftvlm plan`'s step estimate for the twin (text only, `tokens` per row)."""
    from peftvlm import memory, plan

    recipe = recipe_for(folder, tokens)
    source = plan.find_config(recipe.model)
    model, config, family, _ = plan.build_on_meta(recipe, source)
    shape, _ = plan.model_shape(recipe, model, config, family)
    shape.unfused_lm_head = unfused
    work = memory.Workload(batch_size=1, seq_len=tokens, optim=recipe.train.optim,
                           device="cpu")
    return memory.estimate(shape, work)


def measure(head: str, folder: Path, tokens: int) -> dict:
    """One LoRA training step with `head`; bytes above the post-import baseline."""
    import torch
    import trl  # noqa: F401  (imported before the baseline: its import is not the step's)
    from trl.trainer.utils import add_fused_lm_head

    from peftvlm.models import detect_family, model_class
    from peftvlm.registry import get_method
    from peftvlm.trainers.lm_head import fit_fused_head, use_logits_head

    torch.manual_seed(0)
    recipe = recipe_for(folder, tokens)
    family = detect_family(str(folder), recipe.model)
    config = twin_config(*json.loads(os.environ["BENCH_TWIN"]))
    baseline = current_rss()
    base = model_class(family).from_config(config)
    if head in ("fused", "logits"):  # as SFTTrainer: patched before PEFT wraps the model
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
        if os.environ.get("BENCH_TRL_HEAD") is None:  # as `peftvlm train` (generative.py)
            fit_fused_head(torch.device("cpu"))
    if head == "logits":
        use_logits_head(base)
    model = get_method("lora").apply(base, family, recipe.method, quantized=False,
                                     gradient_checkpointing=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.text_config.vocab_size, (1, tokens))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if head == "unfused":
        loss = model(**inputs).loss
    else:  # SFTTrainer.compute_loss: the loss from the fused outputs' log-probabilities
        out = model(**inputs, fused_lm_head=True)
        loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"head": head, "peak_bytes": peak - baseline, "loss": float(loss),
            "params": sum(p.numel() for p in model.parameters())}


def run_child(head: str, folder: Path, tokens: int, vocab: int, hidden: int) -> dict:
    env = {**os.environ, "BENCH_TWIN": json.dumps([vocab, hidden]), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, "--child", head, "--folder", str(folder),
                          "--tokens", str(tokens)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{head}: child failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(tokens: int = 2048, vocab: int = 151_680, hidden: int = 128,
            heads=HEADS) -> dict:
    """Measured peak and plan's estimate per head."""
    folder = save_twin(Path(tempfile.mkdtemp(prefix="bench-memory-")) / "twin", vocab, hidden)
    results = {}
    for head in heads:
        measured = run_child(head, folder, tokens, vocab, hidden)
        estimate = plan_estimate(folder, tokens, unfused=head != "fused")
        results[head] = {**measured, "plan_bytes": estimate["peak_allocated"],
                         "plan_parts": estimate["parts"]}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_680)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trl-head", action="store_true",
                        help="the fused head as TRL ships it on CPU (32,768-entry chunks, its "
                             "out-of-place folds)")
    parser.add_argument("--child", choices=HEADS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, Path(args.folder), args.tokens)))
        return
    os.environ.setdefault("PEFTVLM_CACHE", str(Path.home() / ".cache" / "peftvlm"))
    if args.trl_head:
        os.environ["BENCH_TRL_HEAD"] = "1"
    results = compare(args.tokens, args.vocab, args.hidden, args.heads.split(","))
    if args.json:
        print(json.dumps(results))
        return
    print(f"twin: vocab {args.vocab:,}, hidden {args.hidden}, 2 layers; {args.tokens} tokens, "
          "batch 1, LoRA r16, AdamW, fp32 on CPU")
    print("| head | measured peak MiB | plan MiB | plan / measured | vs unfused | loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    unfused = results.get("unfused", {}).get("peak_bytes")
    for head, r in results.items():
        ratio = f"{r['peak_bytes'] / unfused:.2f}" if unfused else "-"
        print(f"| {head} | {r['peak_bytes'] / MIB:.0f} | {r['plan_bytes'] / MIB:.0f} | "
              f"{r['plan_bytes'] / r['peak_bytes']:.2f} | {ratio} | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
