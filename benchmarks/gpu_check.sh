#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: the scoring benchmark (plain forward, floor,
# batched, last:1, the output-layer feature exact and projected 64x128, exact per group: the
# reference's one backward per group) on random-init models of Qwen2.5-0.5B's and Qwen2.5-1.5B's shapes in bf16,
# HF generate against vLLM rollout throughput (vLLM when it is installed), peak memory,
# ratios printed by each step. Nothing is downloaded (the models are built from a
# transformers Qwen2Config with those dimensions).
#
#   benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --dry-run    # the same steps at a tiny shape on the CPU
#
# PY selects the interpreter (default .venv/bin/python); GPM the scoring step's groups per
# micro-batch (default 16; 0: the rule of select.groups_per_micro=0, which gives a 1.5B model
# 1 group where 16 groups of 8 rollouts would hold tens of GB of activations).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPM=${GPM:-16}

if [[ "${1:-}" == "--dry-run" ]]; then
    SHAPES=qwen-tiny DEVICE=cpu
    SCORE=(--problems 8 --rollouts 4 --val-problems 4)
    ROLL=(--prompts 4 --samples 2 --new-tokens 8 --batch 2)
else
    SHAPES=qwen2.5-0.5b,qwen2.5-1.5b DEVICE=cuda
    SCORE=(--problems 256 --rollouts 8 --val-problems 16)
    ROLL=(--prompts 256 --samples 8 --new-tokens 256 --batch 64)
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "gpu_check.sh: no CUDA GPU visible to $PY (--dry-run runs the CPU version)" >&2
        exit 1
    }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

echo "== scoring: forward, floor, batched, last:1, output exact / 64x128, exact per group ($SHAPES, bfloat16, $DEVICE)"
"$PY" benchmarks/scoring.py --sizes "$SHAPES" --device "$DEVICE" --dtype bfloat16 "${SCORE[@]}" \
    --groups-per-micro "$GPM"
echo
echo "== rollouts: HF generate vs vLLM ($SHAPES, bfloat16, $DEVICE)"
"$PY" benchmarks/rollout_throughput.py --shapes "$SHAPES" --device "$DEVICE" --dtype bfloat16 \
    "${ROLL[@]}"
