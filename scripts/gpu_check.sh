#!/usr/bin/env bash
# One prepared GPU check: on a CUDA machine with nothing downloaded, builds the 7B LLaVA-OneVision and
# Qwen2-VL with random weights in bf16 and writes, in under 8 minutes on one H100/H200:
#   the prefill table of every registered method (sdpa, and flash_attention_2 when flash-attn imports),
#   decode = masked no-cache reference in bf16 with a tolerance, and peak memory per method,
# as results/gpu_check/gpu_check.json and gpu_check.md (--out DIR to change).
#   bash scripts/gpu_check.sh              # GPU
#   bash scripts/gpu_check.sh --dry-run    # CPU, tiny backbones (tests/test_gpu_check.py runs it in CI)
# Any other option goes to scripts/gpu_check.py (--methods, --retention, --budget-s, --atol, --new-tokens).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export SHARP_CACHE="${SHARP_CACHE:-$(mktemp -d)}"
if [[ " $* " != *" --dry-run "* ]]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA device; use --dry-run on a CPU" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec python "${ROOT}/scripts/gpu_check.py" "$@"
