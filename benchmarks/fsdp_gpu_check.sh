#!/usr/bin/env bash
# FSDP2 on CUDA GPUs (train.fsdp): the parts the CPU tests cannot run, because accelerate
# runs FSDP only on GPUs. On N >= 1 GPUs (one rank each), with the built-in models:
#
#   1. scoring memory per rank (benchmarks/fsdp_memory.py) at R = 1 and R = N, builtin:small;
#   2. a 2-round `gradalign run` with train.fsdp under `accelerate launch`;
#   3. the same run SIGKILLed in round 2 and resumed: its rounds equal the uninterrupted run's;
#   4. `gradalign export` of it: a consolidated save_pretrained model that loads unsharded;
#   5. examples/trl_callback.py --fsdp (the callback in a user's TRL script) under FSDP2.
#
#   benchmarks/fsdp_gpu_check.sh             # on the GPU machine, from the repository root
#   benchmarks/fsdp_gpu_check.sh --dry-run   # on the CPU: step 1 at R = 1, 2 (gloo, tiny)
#                                            # and the refusal of train.fsdp on CPU
#
# PY selects the interpreter (default .venv/bin/python); OUT the scratch folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d)}
ROUND=(rounds=2 select.chunk_size=16 select.k=4 train.batch_size=2 train.steps_per_round=2
       train.num_generations=4 rollout.k_r=4 rollout.k_v=4 rollout.max_new_tokens=8
       model.warmstart_steps=20 data.pool_size=48 data.val_size=6 data.eval_size=12
       train.fsdp=true)
sets() { for s in "${ROUND[@]}" "$@"; do printf -- '--set=%s\n' "$s"; done; }

if [[ "${1:-}" == "--dry-run" ]]; then
    echo "== 1. scoring memory per rank at R = 1, 2 (builtin:tiny, gloo on cpu)"
    "$PY" benchmarks/fsdp_memory.py --model tiny --ranks 1,2 --problems 4 --val-problems 2 \
        --rollouts 2 --groups-per-micro 2
    echo
    echo "== 2. gradalign run with train.fsdp on cpu is refused (exit 2, one line)"
    set +e
    mapfile -t ARGS < <(sets model.device=cpu "out_dir=$OUT/cpu" "model.cache_dir=$OUT/cache")
    "$PY" -m gradalign.cli run "${ARGS[@]}" 2> "$OUT/refused.txt"
    rc=$?
    set -e
    cat "$OUT/refused.txt"
    [[ $rc == 2 ]] || { echo "fsdp_gpu_check.sh: expected exit 2, got $rc" >&2; exit 1; }
    echo "== dry run done (steps 2-5 need GPUs: run without --dry-run there)"
    exit 0
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "fsdp_gpu_check.sh: no CUDA GPU visible to $PY (--dry-run runs the CPU part)" >&2
    exit 1
}
N=$("$PY" -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$N" --num_machines 1
        --mixed_precision no --dynamo_backend no)
[[ $N == 1 ]] && LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)

echo "== 1. scoring memory per rank at R = 1 and R = $N (builtin:small, NCCL)"
RANKS=1; [[ $N -gt 1 ]] && RANKS="1,$N"
"$PY" benchmarks/fsdp_memory.py --model small --ranks "$RANKS" --device cuda --problems 64 \
    --val-problems 16 --rollouts 8 --groups-per-micro 16

echo "== 2. a 2-round run with train.fsdp (${LAUNCH[*]})"
mapfile -t REF < <(sets model.device=cuda "out_dir=$OUT/ref" "model.cache_dir=$OUT/cache")
"${LAUNCH[@]}" -m gradalign.cli run "${REF[@]}"
test -f "$OUT/ref/summary.json"

echo "== 3. killed in round 2 (GRADALIGN_KILL_AT=training:1), resumed, compared"
mapfile -t KIL < <(sets model.device=cuda "out_dir=$OUT/killed" "model.cache_dir=$OUT/cache")
GRADALIGN_KILL_AT=training:1 "${LAUNCH[@]}" -m gradalign.cli run "${KIL[@]}" && {
    echo "fsdp_gpu_check.sh: the killed run finished" >&2; exit 1; } || true
"${LAUNCH[@]}" -m gradalign.cli run "${KIL[@]}"
for r in 0001 0002; do
    for f in selected.jsonl scores.jsonl rollouts.jsonl; do
        cmp "$OUT/ref/rounds/$r/$f" "$OUT/killed/rounds/$r/$f"
    done
done
echo "resumed run equals the uninterrupted one (selected, scores, rollouts of both rounds)"

echo "== 4. gradalign export: consolidated, loads without FSDP"
"$PY" -m gradalign.cli export "$OUT/ref" --out "$OUT/exported"
"$PY" - "$OUT/exported" <<'PY'
import sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
n = sum(p.numel() for p in model.parameters())
print(f"exported model loads unsharded: {n} parameters, {type(model).__name__}")
PY

echo "== 5. the TRL callback in a user script under FSDP2"
"${LAUNCH[@]}" examples/trl_callback.py --fsdp --rounds 2 --warmstart-steps 20
echo "== fsdp_gpu_check.sh done"
