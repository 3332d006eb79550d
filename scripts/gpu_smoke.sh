#!/usr/bin/env bash
# GPU smoke test (needs one CUDA GPU, about 3 minutes): FSDP + bf16 full fine-tuning with gradient
# clipping, its resumption from the sharded checkpoint, FSDP + LoRA with activation checkpointing,
# then bf16 DDP, each for a few steps on the quickstart data. Every run is tried; the script fails
# at the end if any run failed or did not bring the perplexity below the uniform baseline.
#   bash scripts/gpu_smoke.sh            (writes runs/gpu_smoke/...)
set -uo pipefail
cd "$(dirname "$0")/.."
MLO=${MLO:-mlo}
OUT_DIR=runs/gpu_smoke
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))" || exit 1
COMMON=(--config configs/quickstart.yaml --trainer.max_steps=30 --trainer.val_check_interval=15
        --trainer.limit_val_batches=4 --trainer.enable_progress_bar=false
        --trainer.logger.init_args.save_dir=$OUT_DIR)
failed=()

# run NAME ARGS...: one `mlo fit` under the run name NAME, then its metrics check
run() {
  local name=$1
  shift
  echo "=== $name"
  if ! $MLO fit "${COMMON[@]}" --trainer.logger.init_args.name="$name" "$@"; then
    failed+=("$name (mlo fit failed)")
    return
  fi
  python - "$OUT_DIR/$name" <<'PY' || failed+=("$name (metrics)")
import glob, json, sys
path = max(glob.glob(f"{sys.argv[1]}/version_*/metrics.json"),
           key=lambda p: int(p.split("version_")[-1].split("/")[0]))  # this run: the newest
m = json.load(open(path))["metrics"]
print(f"{sys.argv[1]:28s} val/ppl={m['val/ppl']:.2f} train/loss={m['train/loss']:.3f}")
assert m["val/ppl"] < 4096, "perplexity did not drop below the uniform baseline"
PY
}

FSDP=(--config configs/trainer/fsdp.yaml --trainer.devices=1)
run fsdp_bf16 "${FSDP[@]}" --model.init_args.model=tiny-llama-8l
last=$(ls -d "$OUT_DIR"/fsdp_bf16/version_*/checkpoints/last.ckpt 2>/dev/null | sort -V | tail -n 1)
if [[ -n $last ]]; then
  run fsdp_bf16_resumed "${FSDP[@]}" --model.init_args.model=tiny-llama-8l \
    --trainer.max_steps=45 --ckpt_path="$last"
else
  failed+=("fsdp_bf16_resumed (no sharded last.ckpt to resume from)")
fi
run fsdp_lora_ckpt "${FSDP[@]}" --trainer.strategy.init_args.activation_checkpointing=true \
  --model.init_args.lora="{r: 8, alpha: 16}"
run ddp_bf16 --config configs/trainer/ddp.yaml --trainer.devices=1

if ((${#failed[@]})); then
  printf 'GPU smoke FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "GPU smoke passed"
