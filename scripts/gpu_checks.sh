#!/usr/bin/env bash
# Every GPU check of the project in one go, for a machine with one CUDA GPU (about 6 minutes; BUDGET_S caps it):
#   1. the CUDA-only tests (tests/test_gpu_device_paths.py and the CUDA cases of test_configs.py);
#   2. scripts/gpu_smoke.sh: FSDP + bf16, FSDP + LoRA + activation checkpointing, bf16 DDP;
#   3. scripts/layer_parallel_gpu_check.py: fused-pair vs sequential decode tokens/s, and the
#      tensor-parallel emulation that counts all-reduces;
#   4. if time is left, the default test suite with the GPU visible (tests that pick
#      accelerator "auto" then run on it).
# Each step runs even if an earlier one failed; the last lines summarize them. Logs go to
# LOG_DIR (default runs/gpu_checks). The whole run stops at BUDGET_S seconds (default 480).
# STEPS picks steps by name (default: "cuda_tests smoke layer_parallel suite").
#   bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${LOG_DIR:-runs/gpu_checks}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$LOG_DIR"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
deadline=$((SECONDS + BUDGET_S))
summary=()
failed=0

# step NAME CAP_S COMMAND...: runs COMMAND for at most CAP_S seconds (less if the budget is short)
step() {
  local name=$1 cap=$2
  shift 2
  if [[ " ${STEPS:-cuda_tests smoke layer_parallel suite} " != *" $name "* ]]; then
    summary+=("$name: not selected")
    return
  fi
  local left=$((deadline - SECONDS))
  if ((left < 20)); then
    summary+=("$name: skipped (budget spent)")
    return
  fi
  ((cap > left)) && cap=$left
  local start=$SECONDS
  echo "=== $name (at most ${cap}s): $*" | tee "$LOG_DIR/$name.log"
  timeout --kill-after=10 "$cap" "$@" >>"$LOG_DIR/$name.log" 2>&1
  local rc=$?
  local verdict="rc $rc"
  ((rc == 124 || rc == 137)) && verdict="timed out after ${cap}s"
  ((rc != 0)) && failed=1
  summary+=("$name: $verdict in $((SECONDS - start))s")
  tail -n 25 "$LOG_DIR/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, lightning, transformers, peft; print('torch', torch.__version__, \
'lightning', lightning.__version__, 'transformers', transformers.__version__, \
'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$LOG_DIR/env.log"

step cuda_tests 90 python -m pytest -q -p no:cacheprovider tests/test_gpu_device_paths.py \
  tests/test_configs.py
step smoke 200 bash scripts/gpu_smoke.sh
# the tensor-parallel emulation needs one GPU per rank (2); on one GPU only the decode timing runs
# (the emulation's CPU dry run, --tiny, is in the test suite)
skip_tp=()
(($(python -c "import torch; print(torch.cuda.device_count())") < 2)) && skip_tp=(--skip-tp)
step layer_parallel 150 python scripts/layer_parallel_gpu_check.py "${skip_tp[@]}" \
  --out "$LOG_DIR/layer_parallel.json"
# pytest-xdist, when installed, spreads the suite over 12 processes of 2 threads each
xdist=()
python -c "import xdist" 2>/dev/null && xdist=(-n 12 --dist loadfile)
OMP_NUM_THREADS=2 step suite 600 python -m pytest -v --tb=short -p no:cacheprovider -m "not slow" "${xdist[@]}"

echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$LOG_DIR/summary.log"
exit "$failed"
