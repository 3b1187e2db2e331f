#!/usr/bin/env bash
# GPU-only checks (bf16, gradient checkpointing, QLoRA with CUDA kernels, merging there), then
# `peftvlm plan`'s estimate against measured peak memory of full-size random-weight models
# (LLaVA-1.5-7B QLoRA + LoRA, Qwen2-VL-2B LoRA; ~5 min; table for docs/benchmarks.md).
# Run on a machine with an NVIDIA GPU after `bash scripts/setup.sh`:
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
.venv/bin/python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py "$@"
timeout 480 .venv/bin/python scripts/gpu_plan_check.py --out "${OUT:-.}/gpu_plan_check.json"
