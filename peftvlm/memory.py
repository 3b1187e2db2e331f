"""Peak GPU memory of a training step, from parameter counts, layer sizes and tokens.

Pure arithmetic (no torch), so a model of any size is estimated in microseconds once
`peftvlm.plan` has measured it on the meta device. Every term says how it was computed; the
assumptions are listed in `ASSUMPTIONS` and printed by `peftvlm plan`. Published measurements
it is compared with are in docs/distributed.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes nf4/fp4: 4 bits a weight plus one absmax per 64 weights (fp32, or 8-bit with a
# second-level fp32 constant per 256 blocks when double quantization is on).
BYTES_4BIT = {True: 0.5 + (1 + 4 / 256) / 64, False: 0.5 + 4 / 64}
BYTES_8BIT = 1.0 + 4 / 4096  # int8 weights plus one fp32 scale per row (rows of ~4k)

GPUS = [  # (GiB, common cards with that much memory)
    (24, "RTX 3090/4090, A10G, L4"), (40, "A100 40GB"), (48, "L40S, RTX 6000 Ada, A6000"),
    (80, "A100 80GB, H100"), (141, "H200"),
]

ASSUMPTIONS = [
    "weights at the recipe's dtype (bf16 on a GPU when `auto`); quantized linear layers of the "
    "language model at 4 bits + block constants (nf4, blocks of 64), or 8 bits",
    "trainable parameters, their gradients and optimizer states in fp32 (peft keeps adapters "
    "in fp32 under bf16 mixed precision)",
    "optimizer states by `train.optim`: AdamW 8 B/param, 8-bit AdamW 2 B/param, Lion 4, "
    "SGD 0, Adafactor ~0 (factored); unknown names are counted as AdamW",
    "activations in the compute dtype with SDPA/flash attention (no stored attention matrix): "
    "per token and decoder layer the inputs of the norms, q/k/v/o and the gated MLP; with "
    "gradient checkpointing one layer input per layer plus one layer recomputed",
    "every row padded to the longest allowed (train.max_length) unless --text-tokens is given",
    "the loss head: TRL's fused LM head (every family but those with "
    "`FamilySpec.unfused_lm_head`) scores only the positions with a label (with Triton on a "
    "GPU, and on CPU as peftvlm fits it; the share is measured on the recipe's first training "
    "rows, else every position is counted) and projects at most 4,096 of them x 32,768 "
    "vocabulary entries (4,096 on CPU) at a time (one tile buffer with Triton, 3 on CPU) plus "
    "fp32 per-token statistics and the fp32 gradient of the last hidden state; families on the "
    "logits head (BLIP-2) hold the full logits, their log-softmax and their gradient "
    "(3 x tokens x vocabulary, every position)",
    "a frozen vision tower keeps no activations (one layer's worth is live while it runs)",
    "FSDP / ZeRO-3 divide weights, gradients and optimizer states by the GPU count (plus one "
    "gathered layer); ZeRO-2 divides gradients and optimizer states; DDP divides nothing",
    "objectives (TRL 1.16): DPO runs chosen and rejected as one batch (2 x rows through the "
    "policy) and then the reference (the base, adapter disabled, no grad: one layer and the "
    "loss head's forward tiles live) while the policy's activations are held; GRPO samples "
    "per_device_train_batch_size x steps_per_generation completions at once with `generate` "
    "(KV cache of prompt + max_completion_length, the last position's logits), then, with "
    "beta > 0, the reference log-probabilities (no grad, per_device_train_batch_size "
    "completions at a time), then the loss step on per_device_train_batch_size completions "
    "(the loss head over the completions only: TRL labels nothing else); the peak is the "
    "largest of these phases",
    "beyond PyTorch's peak allocation: CUDA context ~0.75 GiB and ~10% allocator slack "
    "(what nvidia-smi shows; on CPU, ~8 MiB of first-step runtime buffers)",
]


@dataclass
class Shape:
    """What the estimate needs to know about a model, a method and a batch."""

    total_params: int
    trainable_params: int
    frozen_params_full: int        # frozen, stored at `dtype`
    frozen_params_4bit: int = 0
    frozen_params_8bit: int = 0
    double_quant: bool = True
    dtype: str = "bfloat16"
    layers: int = 1
    hidden: int = 1
    intermediate: int = 1
    q_dim: int = 1                 # heads x head_dim
    kv_dim: int = 1                # key/value heads x head_dim
    vocab: int = 1
    adapter_inputs_per_layer: int = 0  # extra per-token values per layer (LoRA dropout copies, r)
    vision_layers: int = 0
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_trainable: bool = False
    largest_layer_params: int = 0
    unfused_lm_head: bool = False  # the family computes its loss from full logits (lm_head.py)


@dataclass
class Workload:
    batch_size: int = 1
    seq_len: int = 1024
    vision_patches: int = 0        # per row, all images
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    gpus: int = 1
    sharding: str = "none"         # none | ddp | fsdp | zero2 | zero3
    device: str = "cuda"           # cuda | cpu: TRL's fused head folds its tiles differently
    objective: str = "sft"         # sft | dpo | grpo: what one step runs (see `estimate`)
    reference: bool = False        # a no-grad reference forward (DPO; GRPO with beta > 0)
    prompt_len: int = 0            # GRPO: prompt tokens of a rollout (seq_len adds the reply)
    generated: int = 0             # GRPO: completions sampled at once (one generation batch)
    labelled_share: float = 1.0    # SFT / DPO: share of positions with a label (see scored_tokens)


def step_rows(w: Workload) -> int:
    """Sequences through the policy in one step: DPO stacks chosen and rejected."""
    return w.batch_size * (2 if w.objective == "dpo" else 1)


def optimizer_bytes_per_param(optim: str) -> float:
    name = optim.lower()
    if "8bit" in name:
        return 1.0 if "lion" in name else 2.0
    if "lion" in name or "rmsprop" in name:
        return 4.0
    if name.startswith("sgd"):
        return 0.0
    if "adafactor" in name:
        return 0.0
    return 8.0


def layer_activation_values(s: Shape) -> int:
    """Values saved for backward per token in one decoder layer (SDPA, gated MLP)."""
    return (4 * s.hidden + 2 * s.q_dim + 2 * s.kv_dim + 4 * s.intermediate
            + s.adapter_inputs_per_layer)


# trl.kernels.chunked_logprob's TOKEN_CHUNK_SIZE, and the vocabulary chunk per device: TRL's
# 32,768 with its Triton kernel (GPU), which folds a tile in place (one buffer). On CPU
# `trainers.lm_head.fit_fused_head` gives TRL 4,096-entry chunks and folds them in place
# (`trainers.cpu_fold`: the projection buffer, the scaled logits and their exponentials live
# at once, 3 tiles). RSS checkpoints on the large-vocabulary twin (scripts/bench_memory.py,
# tiles mmapped so that a freed one goes back to the OS) put the step's peak at the end of the
# forward, 3.0 tiles above what the forward holds at 512 and 2,048 tokens; the backward's
# tiles (2) come after the forward's activations are partly freed. glibc's default heap can
# keep 1-3 freed tiles more (4.3-6.3 measured without mmapped tiles). TRL's own CPU fallback
# kept ~9 tiles of 32,768 (2.3 GiB at 2k tokens).
FUSED_TOKEN_TILE = 4096
FUSED_VOCAB_TILE = {"cuda": 32768, "cpu": 4096}
FUSED_TILES = {"cuda": 1.0, "cpu": 3.0}
# A forward without grad (a reference's log-probabilities) holds the forward's tiles only: on a
# GPU one; on CPU, folded in place (`cpu_fold`), the projection buffer, the scaled logits and
# their exponentials (3 tiles).
FUSED_FORWARD_TILES = {"cuda": 1.0, "cpu": 3.0}
# What a first training step adds to a CPU process's anonymous memory beyond its tensors, the
# CPU's counterpart of the CUDA context: the runtime's own buffers (RssAnon ~8 MiB above the
# counted tensors on the twin). The code pages a first step maps (RssFile +16 MiB at an SFT
# step's peak, ~17 MiB more for a GRPO step's `generate`) are not counted: the kernel can drop
# them at any time, and how many it maps depends on its page cache (scripts/bench_memory.py).
CPU_RUNTIME_BYTES = 8 * 1024 ** 2


def loss_head_bytes(s: Shape, tokens: int, a: int, device: str = "cuda",
                    positions: int | None = None) -> float:
    """Bytes the loss head adds at its peak over `tokens` scored positions of `positions` (by
    default the same). TRL's fused head keeps one projection tile (reused tile by tile,
    allocated again in backward; `FUSED_TILES` of them on CPU, with narrower chunks:
    `FUSED_VOCAB_TILE`), a few fp32 values per scored token (log-normaliser, entropy, target
    logit, running sums), the fp32 gradient of the hidden states it projects, and that
    gradient scattered back over every position; the logits head keeps the logits, the fp32
    log-softmax saved for backward and the logits' fp32 gradient."""
    if s.unfused_lm_head:
        return tokens * s.vocab * (a + 4 + 4)
    positions = tokens if positions is None else positions
    tile_bytes = a if device == "cuda" else 4  # the CPU fallback folds in fp32
    vocab_tile = FUSED_VOCAB_TILE.get(device, FUSED_VOCAB_TILE["cuda"])
    tile = min(tokens, FUSED_TOKEN_TILE) * min(s.vocab, vocab_tile) * tile_bytes
    return (tile * FUSED_TILES.get(device, 1.0) + tokens * (8 * 4 + s.hidden * 4)
            + positions * s.hidden * 4)


def loss_head_forward_bytes(s: Shape, tokens: int, a: int, device: str = "cuda") -> float:
    """Bytes the loss head holds in a forward without grad (reference log-probabilities): the
    fused head's forward tiles and per-token statistics, or the logits head's logits and its
    fp32 log-softmax."""
    if s.unfused_lm_head:
        return tokens * s.vocab * (a + 4)
    tile_bytes = a if device == "cuda" else 4
    vocab_tile = FUSED_VOCAB_TILE.get(device, FUSED_VOCAB_TILE["cuda"])
    tile = min(tokens, FUSED_TOKEN_TILE) * min(s.vocab, vocab_tile) * tile_bytes
    return tile * FUSED_FORWARD_TILES.get(device, 1.0) + tokens * 8 * 4


def no_grad_layer_values(s: Shape) -> int:
    """Per-token values live at once in one decoder layer run without grad: the layer input
    and residual, and the gated MLP's gate, up and product (attention's q/k/v/out are fewer)."""
    return 2 * s.hidden + 3 * s.intermediate


def no_grad_forward_bytes(s: Shape, tokens: int, patches: int, a: int, device: str,
                          head_tokens: int | None = None) -> float:
    """A forward without grad over `tokens` (nothing kept for backward): the largest of the
    vision tower's one live layer, the decoder's one live layer, and the loss head's forward
    over `head_tokens` (by default all) beside the last hidden states; they run one after
    another."""
    scored = tokens if head_tokens is None else head_tokens
    return max(patches * vision_layer_values(s) * a,
               tokens * no_grad_layer_values(s) * a,
               tokens * s.hidden * a + loss_head_forward_bytes(s, scored, a, device))


def scored_tokens(w: Workload, tokens: int, fused: bool = True) -> int:
    """Positions the loss head projects in a step of `tokens`. TRL 1.16's fused head scores
    only the labelled positions where `_use_triton(device)` holds (CUDA/XPU with Triton: every
    Linux CUDA wheel of torch ships it, so a "cuda" plan assumes it) and, on CPU, as
    `trainers.lm_head.fit_fused_head` fits it; elsewhere (XLA-like devices) TRL scores every
    position. GRPO labels only the completions (TRL masks the prompt); SFT (assistant-only
    loss) and DPO (`completion_mask`) label the replies: `w.labelled_share` of the positions,
    which `plan` measures on the recipe's data. The logits head (`fused=False`) scores all."""
    if w.objective == "grpo" and w.prompt_len:
        return w.batch_size * (w.seq_len - w.prompt_len)
    if not fused:
        return tokens
    return min(tokens, round(tokens * w.labelled_share))


def rollout_bytes(s: Shape, w: Workload, a: int) -> dict:
    """GRPO's generation phase: the KV cache of every completion sampled at once (prompt +
    max_completion_length, keys and values per layer), the prefill's one live layer over the
    prompts, and the last position's logits with their fp32 copies (the logits `generate`
    keeps, the processed scores and the sampling probabilities)."""
    kv_cache = w.generated * w.seq_len * s.layers * 2 * s.kv_dim * a
    prefill = max(w.generated * w.prompt_len * no_grad_layer_values(s) * a,
                  w.generated * w.vision_patches * vision_layer_values(s) * a)
    logits = w.generated * s.vocab * (a + 3 * 4)
    return {"kv_cache": kv_cache, "prefill": prefill, "logits": logits}


def vision_layer_values(s: Shape) -> int:
    return 6 * s.vision_hidden + 2 * s.vision_intermediate


def estimate(s: Shape, w: Workload) -> dict:
    """Bytes per GPU by part, and the total a training step peaks at."""
    a = DTYPE_BYTES[s.dtype]
    weights = (s.frozen_params_full * a + s.frozen_params_4bit * BYTES_4BIT[s.double_quant]
               + s.frozen_params_8bit * BYTES_8BIT)
    adapter = s.trainable_params * 4.0
    grads = s.trainable_params * 4.0
    optim = s.trainable_params * optimizer_bytes_per_param(w.optim)
    weight_shards = w.gpus if w.sharding in ("fsdp", "zero3") else 1
    state_shards = w.gpus if w.sharding in ("fsdp", "zero3", "zero2") else 1
    gathered = s.largest_layer_params * a if weight_shards > 1 else 0
    rows = step_rows(w)
    tokens = rows * w.seq_len
    per_layer = layer_activation_values(s) * a
    if w.gradient_checkpointing:
        activations = tokens * (s.layers * s.hidden * a + per_layer)
    else:
        activations = tokens * s.layers * per_layer
    head_tokens = scored_tokens(w, tokens, fused=not s.unfused_lm_head)
    logits = loss_head_bytes(s, head_tokens, a, w.device, tokens)
    patches = rows * w.vision_patches
    vision_layer = patches * vision_layer_values(s) * a
    if s.vision_trainable:
        vision = (patches * s.vision_layers * s.vision_hidden * a + vision_layer
                  if w.gradient_checkpointing else vision_layer * s.vision_layers)
    else:
        vision = vision_layer
    parts = {"weights": weights / weight_shards + gathered, "adapter": adapter / weight_shards,
             "gradients": grads / state_shards, "optimizer": optim / state_shards,
             "activations": activations, "logits": logits, "vision": vision}
    fixed = sum(parts[k] for k in ("weights", "adapter", "gradients", "optimizer"))
    rollout = rollout_bytes(s, w, a) if w.generated else None
    # The phases do not add up, on a GPU (the caching allocator hands the freed blocks to the
    # next phase) or on CPU: what RSS keeps after `generate` and the reference forward is the
    # code they ran for the first time (RssFile +10 and +6 MiB on the twin at 2,048 tokens: not
    # counted, see CPU_RUNTIME_BYTES; RssAnon +2 and +5: their tensors went back).
    phases = {}
    if rollout:
        phases["rollout"] = sum(rollout.values())
    if w.reference and w.objective == "dpo":  # after the policy's forward, its activations held
        phases["reference"] = activations + vision * s.vision_trainable + no_grad_forward_bytes(
            s, tokens, patches, a, w.device, head_tokens)
    elif w.reference:  # GRPO: before the step, per_device_train_batch_size completions a time
        phases["reference"] = no_grad_forward_bytes(s, tokens, patches, a, w.device, head_tokens)
    phases["step"] = activations + logits + vision
    peak_phase = max(phases, key=phases.get)
    peak = fixed + phases[peak_phase]
    return {"parts": parts, "phases": phases, "peak_phase": peak_phase, "rollout": rollout,
            "peak_allocated": peak, "with_overhead": with_overhead(peak, w.device)}


def with_overhead(peak: float, device: str) -> float:
    """What the system shows for a step that allocates `peak` bytes at most: on a GPU the CUDA
    context and the caching allocator's slack (nvidia-smi); on CPU the runtime's first-step
    buffers (peak anonymous RSS: scripts/bench_memory.py)."""
    if device == "cpu":
        return peak + CPU_RUNTIME_BYTES
    return peak * 1.10 + 0.75 * GIB


def fits(total_bytes: float) -> list[dict]:
    return [{"gib": gib, "cards": cards, "fits": total_bytes <= gib * GIB} for gib, cards in GPUS]


def with_changes(s: Shape, w: Workload, shape: dict | None = None, work: dict | None = None):
    """The estimate after changing some fields (for "what to change" suggestions)."""
    return estimate(replace(s, **(shape or {})), replace(w, **(work or {})))


def as_dict(s: Shape, w: Workload) -> dict:
    return {"shape": asdict(s), "workload": asdict(w)}
