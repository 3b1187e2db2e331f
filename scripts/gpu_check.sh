#!/usr/bin/env bash
# GPU-only checks (bf16, gradient checkpointing, QLoRA with CUDA kernels, merging there), then
# `peftvlm plan`'s estimate against measured peak memory of full-size random-weight models
# (LLaVA-1.5-7B QLoRA + LoRA, Qwen2-VL-2B LoRA; ~5 min; table for docs/benchmarks.md), then
# GRPO end to end on the GPU (bf16 rollouts with transformers' generate, use_vllm off: vLLM is
# an optional extra), its summary checked for finite rewards.
# Run on a machine with an NVIDIA GPU after `bash scripts/setup.sh`:
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
.venv/bin/python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py "$@"
timeout 480 .venv/bin/python scripts/gpu_plan_check.py --out "${OUT:-.}/gpu_plan_check.json"
# GRPO: rollouts, rewards, the KL to the base (adapter disabled) and the adapter's update in bf16.
grpo_run="${OUT:-/tmp}/gpu-grpo-tiny"
.venv/bin/python -m peftvlm train recipes/grpo-tiny.yaml -o "$grpo_run" --overwrite \
  train.grpo.use_vllm=false train.max_steps=6 train.logging_steps=1 train.bf16=true
.venv/bin/python - "$grpo_run/summary.json" <<'PY'
import json, math, sys
grpo = json.load(open(sys.argv[1]))["grpo"]
assert grpo["rewards"] and all(math.isfinite(v) for v in grpo["rewards"].values()), grpo
print("GRPO on GPU: rewards", grpo["rewards"])
PY
