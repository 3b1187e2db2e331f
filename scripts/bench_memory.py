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

`--objectives dpo,grpo` measures one training step of TRL's own DPOTrainer / GRPOTrainer as
`peftvlm train` runs them (our subclasses: the reference is the base with the adapter disabled),
text-only, on the same twin, beside `plan`'s estimate for a recipe with that objective:

- `dpo`: one pair, chosen and rejected of `--tokens`/2 tokens each (prompt + reply): the
  policy's forward and backward over both, and the reference forward (no grad);
- `grpo`: `GRPO_COMPLETIONS` completions of one prompt (beta 0.04: the reference forward runs),
  `--tokens`/`GRPO_COMPLETIONS` tokens each, a quarter of them generated (the random twin
  never samples its end token, so every completion reaches max_completion_length).

Also prints `peftvlm plan`'s estimate of the same step for the twin, per head (fp32, on CPU:
`with_overhead`, the peak allocation plus the runtime's first-step buffers; over the positions
the measured step labelled: `labelled_share`). Measured is the step's anonymous memory (peak RSS
less file-backed code pages: `peak_anonymous_rss`). CPU load does not change these figures
(they are bytes, not seconds).

    python scripts/bench_memory.py [--tokens 2048] [--vocab 151680] [--hidden 128] [--trl-head]
                                   [--json]
    python scripts/bench_memory.py --heads "" --objectives dpo,grpo [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HEADS = ("fused", "logits", "unfused")
OBJECTIVES = ("dpo", "grpo")
GRPO_COMPLETIONS = 4
MIB = 1024 ** 2


def peak_rss() -> int:
    """This process's peak resident set size since start or the last `reset_peak_rss`, in bytes
    (Linux: VmHWM)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024


def reset_peak_rss() -> None:
    """Start the peak (VmHWM) afresh from the current RSS (Linux >= 4.0: clear_refs 5), so one
    process can measure several steps one after another."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kib(*fields: str) -> int:
    with open("/proc/self/status") as f:
        return sum(int(line.split()[1]) for line in f if line.split(":")[0] in fields) * 1024


def anonymous_rss() -> int:
    """This process's resident memory now that no file backs (tensors, heaps), in bytes."""
    return _status_kib("RssAnon", "RssShmem")


def peak_anonymous_rss() -> int:
    """The peak RSS less the file-backed pages resident now (code pages of libtorch & co.): the
    step's memory without the pages the kernel maps from its page cache. Those depend on what
    the cache holds (the kernel maps cached neighbours of each faulting page, and this machine's
    reclaim evicts cold ones): the same DPO step peaked 30 MiB higher with a venv installed
    minutes before than with an older one. Code pages only accumulate during a step, so the
    ones resident now bound the ones resident at the peak."""
    return peak_rss() - _status_kib("RssFile")


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


def recipe_for(folder: Path, tokens: int, objective: str = "sft"):
    """The bench's recipe: LoRA r16 on the twin, batch 1 (DPO: one pair; GRPO:
    `GRPO_COMPLETIONS` completions of one prompt, a quarter of `tokens` generated)."""
    from peftvlm.recipe.load import validate_recipe_dict

    train = {"per_device_train_batch_size": 1, "max_length": tokens,
             "gradient_checkpointing": False, "objective": objective}
    if objective == "grpo":
        train.update(per_device_train_batch_size=GRPO_COMPLETIONS, rewards=[{"name": "length"}],
                     grpo={"num_generations": GRPO_COMPLETIONS, "beta": 0.04,
                           "max_completion_length": grpo_lengths(tokens)[1]})
    return validate_recipe_dict({
        "name": "bench-memory", "model": {"id": str(folder), "dtype": "float32"},
        "method": {"name": "lora", "r": 16, "lora_dropout": 0.0},
        "data": {"synthetic": {"name": "colour-vqa", "train_size": 8, "eval_size": 2}},
        "train": train})


def grpo_lengths(tokens: int) -> tuple[int, int]:
    """(prompt, completion) tokens of each GRPO completion: `tokens` over the group, a quarter
    of each sequence generated."""
    per_sequence = tokens // GRPO_COMPLETIONS
    return per_sequence - per_sequence // 4, per_sequence // 4


def plan_estimate(folder: Path, tokens: int, unfused: bool, objective: str = "sft",
                  row_tokens: int | None = None, labelled_share: float = 1.0) -> dict:
    """`peftvlm plan`'s step estimate for the twin (text only, `row_tokens` per row: the
    prompt for GRPO; by default `tokens`; `labelled_share` of the positions labelled, as the
    measured step labelled them), through plan's own objective arithmetic."""
    from peftvlm import memory, plan

    recipe = recipe_for(folder, tokens, objective)
    source = plan.find_config(recipe.model)
    model, config, family, _ = plan.build_on_meta(recipe, source)
    shape, _ = plan.model_shape(recipe, model, config, family)
    shape.unfused_lm_head = unfused
    seq = row_tokens or tokens
    work = memory.Workload(**{"batch_size": recipe.train.per_device_train_batch_size,
                              "seq_len": seq, "optim": recipe.train.optim, "device": "cpu",
                              "labelled_share": labelled_share,
                              **plan.objective_workload(recipe.train, seq)})
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
    baseline = anonymous_rss()
    base = model_class(family).from_config(config)
    if head in ("fused", "logits"):  # as SFTTrainer: patched before PEFT wraps the model
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
        if os.environ.get("BENCH_TRL_HEAD") is None:  # as every trainer peftvlm builds
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
    peak = peak_anonymous_rss()
    return {"head": head, "peak_bytes": peak - baseline, "loss": float(loss),
            "params": sum(p.numel() for p in model.parameters()),
            "labelled_share": int(out.label_mask.sum()) / tokens if head != "unfused" else 1.0}


def repeated(word: str, n: int, tokenizer) -> str:
    """`word` n times: n tokens (checked: the tokenizer keeps " a" whole)."""
    text = word * n
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n, word
    return text


def measure_objective(objective: str, folder: Path, tokens: int) -> dict:
    """One step of peftvlm's DPO / GRPO trainer (TRL's, subclassed) on the twin, text only;
    bytes above the post-import baseline, and the tokens a row really had."""
    import tempfile

    import torch
    import trl
    from datasets import Dataset

    from peftvlm.models import detect_family, load_processor, model_class
    from peftvlm.registry import get_method
    from peftvlm.trainers.objectives.dpo_trainer import DPOTrainer
    from peftvlm.trainers.lm_head import fit_fused_head
    from peftvlm.trainers.objectives.grpo_trainer import GRPOTrainer

    torch.manual_seed(0)
    recipe = recipe_for(folder, tokens, objective)
    family = detect_family(str(folder), recipe.model)
    processor = load_processor(str(folder), recipe.model, family)
    tokenizer = processor.tokenizer
    config = twin_config(*json.loads(os.environ["BENCH_TWIN"]))
    baseline = anonymous_rss()
    model = get_method("lora").apply(model_class(family).from_config(config), family,
                                     recipe.method, quantized=False,
                                     gradient_checkpointing=False)
    common = {"output_dir": tempfile.mkdtemp(prefix="bench-memory-run-"), "use_cpu": True,
              "max_steps": 1, "report_to": [], "save_strategy": "no", "disable_tqdm": True,
              "logging_steps": 1,
              # the recipe's setting, as `peftvlm train` passes it (trainers.sft.PASSTHROUGH):
              # TRL's configs default to True, which plan's recipe does not ask for
              "gradient_checkpointing": recipe.train.gradient_checkpointing}
    if objective == "dpo":
        half = tokens // 2  # each sequence: a quarter prompt, the rest the reply and its end
        reply = half - half // 4 - 1
        row = {"prompt": repeated(" a", half // 4, tokenizer),
               "chosen": repeated(" b", reply, tokenizer),
               "rejected": repeated(" c", reply, tokenizer)}
        args = trl.DPOConfig(per_device_train_batch_size=1, max_length=None, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([row] * 2),
                             processing_class=tokenizer)
        batch = trainer.data_collator([trainer.train_dataset[0]])
        row_tokens = batch["input_ids"].shape[1]
        # the positions TRL labels (the replies: `completion_mask`), as plan measures them
        labelled = int(batch["completion_mask"][:, 1:].sum()) / int(batch["attention_mask"].sum())
    else:
        prompt_len, completion_len = grpo_lengths(tokens)
        grpo = recipe.train.grpo
        args = trl.GRPOConfig(per_device_train_batch_size=GRPO_COMPLETIONS,
                              num_generations=grpo.num_generations, beta=grpo.beta,
                              max_completion_length=completion_len, **common)
        row = {"prompt": repeated(" a", prompt_len, tokenizer)}
        trainer = GRPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([row] * 8),
                              processing_class=processor,
                              reward_funcs=[lambda completions, **_: [0.0] * len(completions)])
        row_tokens, labelled = prompt_len, 1.0  # plan counts GRPO's completions from the lengths
    if os.environ.get("BENCH_TRL_HEAD") is None:  # as every trainer peftvlm builds
        fit_fused_head(torch.device("cpu"))
    trainer.train()
    peak = peak_anonymous_rss()
    logged = trainer.state.log_history[0]
    if objective == "grpo":  # every completion ran to max_completion_length
        assert logged["completions/min_length"] == grpo_lengths(tokens)[1], logged
    return {"objective": objective, "peak_bytes": peak - baseline, "loss": logged["loss"],
            "row_tokens": int(row_tokens), "labelled_share": labelled,
            "gradient_checkpointing": trainer.args.gradient_checkpointing}


def measure_in_turn(steps: list[tuple[str, int]], folder: Path) -> dict:
    """Several (head or objective, tokens) steps in this process, one after another, each on a
    model of its own: everything of a step is freed, given back to the OS (malloc_trim) and
    the peak reset before the next, which saves a child's imports per step (the test's cheap
    path; the benchmark keeps one process per step)."""
    import ctypes
    import gc

    results = {}
    for name, tokens in steps:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the last step freed goes back to the OS
        reset_peak_rss()
        run = measure_objective if name in OBJECTIVES else measure
        results[name] = run(name, folder, tokens)
    return results


def child_env(vocab: int, hidden: int) -> dict:
    """The measuring child's environment. Allocations of 1 MiB and more are mmapped, so a freed
    tile goes back to the OS at once: without it glibc keeps some freed tiles in its heap, and the
    fused head's peak RSS moved by ~20% from run to run (plan/measured 0.84-0.94 at 1,024 tokens;
    0.99-1.03 with it), a figure about the allocator rather than about what a step allocates."""
    return {**os.environ, "BENCH_TWIN": json.dumps([vocab, hidden]), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_child(head: str, folder: Path, tokens: int, vocab: int, hidden: int) -> dict:
    env = child_env(vocab, hidden)
    out = subprocess.run([sys.executable, __file__, "--child", head, "--folder", str(folder),
                          "--tokens", str(tokens)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{head}: child failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measured_in_one_child(steps: list[tuple[str, int]], folder: Path, vocab: int,
                          hidden: int) -> dict:
    env = child_env(vocab, hidden)
    out = subprocess.run([sys.executable, __file__, "--in-turn", json.dumps(steps),
                          "--folder", str(folder)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"child failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(tokens: int = 2048, vocab: int = 151_680, hidden: int = 128,
            heads=HEADS, objectives=(), objective_tokens: int | None = None,
            one_child: bool = False) -> dict:
    """Measured peak and plan's estimate per head (an SFT step of `tokens`) and per objective
    (`objective_tokens` through the policy, by default `tokens`); each step in a child process
    of its own, or with `one_child` all in one, in turn."""
    folder = save_twin(Path(tempfile.mkdtemp(prefix="bench-memory-")) / "twin", vocab, hidden)
    objective_tokens = objective_tokens or tokens
    steps = [(h, tokens) for h in heads] + [(o, objective_tokens) for o in objectives]
    if one_child:  # the objectives first: the step that runs first pays the runtime buffers a
        # fresh process pays (`memory.CPU_RUNTIME_BYTES`), and a trainer sets up more of them
        # than a bare step
        done = measured_in_one_child(steps[len(heads):] + steps[:len(heads)], folder, vocab,
                                     hidden)
    else:
        done = {name: run_child(name, folder, n, vocab, hidden) for name, n in steps}
    results = {}
    for head in heads:
        measured = done[head]
        estimate = plan_estimate(folder, tokens, unfused=head != "fused",
                                 labelled_share=measured["labelled_share"])
        results[head] = {**measured, "plan_bytes": estimate["with_overhead"],
                         "plan_parts": estimate["parts"]}
    for objective in objectives:
        measured = done[objective]
        estimate = plan_estimate(folder, objective_tokens, unfused=False, objective=objective,
                                 row_tokens=measured["row_tokens"],
                                 labelled_share=measured["labelled_share"])
        results[objective] = {**measured, "plan_bytes": estimate["with_overhead"],
                              "plan_parts": estimate["parts"],
                              "plan_phases": estimate["phases"]}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151_680)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--objectives", default="", help="also dpo and/or grpo (comma-separated)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trl-head", action="store_true",
                        help="the fused head as TRL ships it on CPU (32,768-entry chunks, its "
                             "out-of-place folds)")
    parser.add_argument("--child", choices=HEADS + OBJECTIVES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--in-turn", help=argparse.SUPPRESS)  # JSON [[step, tokens], ...]
    args = parser.parse_args()
    if args.in_turn:
        print(json.dumps(measure_in_turn(json.loads(args.in_turn), Path(args.folder))))
        return
    if args.child in OBJECTIVES:
        print(json.dumps(measure_objective(args.child, Path(args.folder), args.tokens)))
        return
    if args.child:
        print(json.dumps(measure(args.child, Path(args.folder), args.tokens)))
        return
    os.environ.setdefault("PEFTVLM_CACHE", str(Path.home() / ".cache" / "peftvlm"))
    if args.trl_head:
        os.environ["BENCH_TRL_HEAD"] = "1"
    results = compare(args.tokens, args.vocab, args.hidden,
                      [h for h in args.heads.split(",") if h],
                      [o for o in args.objectives.split(",") if o])
    if args.json:
        print(json.dumps(results))
        return
    print(f"twin: vocab {args.vocab:,}, hidden {args.hidden}, 2 layers; {args.tokens} tokens, "
          "batch 1, LoRA r16, AdamW, fp32 on CPU")
    print("| head / objective | labelled | measured peak MiB | plan MiB | plan / measured "
          "| vs unfused | loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    unfused = results.get("unfused", {}).get("peak_bytes")
    for head, r in results.items():
        ratio = f"{r['peak_bytes'] / unfused:.2f}" if unfused and head in HEADS else "-"
        print(f"| {head} | {r['labelled_share']:.1%} | {r['peak_bytes'] / MIB:.0f} | "
              f"{r['plan_bytes'] / MIB:.0f} | {r['plan_bytes'] / r['peak_bytes']:.2f} | {ratio} "
              f"| {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
