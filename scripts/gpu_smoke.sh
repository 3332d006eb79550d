#!/usr/bin/env bash
# GPU smoke test (needs one CUDA GPU, < 3 minutes): FSDP + bf16 full fine-tuning, then FSDP +
# LoRA with activation checkpointing, then bf16 DDP, each for a few steps on the quickstart data.
#   bash scripts/gpu_smoke.sh            (writes runs/gpu_smoke/...)
set -euo pipefail
cd "$(dirname "$0")/.."
MLO=${MLO:-mlo}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))"
COMMON=(--config configs/quickstart.yaml --trainer.max_steps=30 --trainer.val_check_interval=15
        --trainer.limit_val_batches=4 --trainer.enable_progress_bar=false
        --trainer.logger.init_args.save_dir=runs/gpu_smoke)

$MLO fit "${COMMON[@]}" --config configs/trainer/fsdp.yaml --trainer.devices=1 \
  --trainer.logger.init_args.name=fsdp_bf16 --model.init_args.model=tiny-llama-8l
$MLO fit "${COMMON[@]}" --config configs/trainer/fsdp.yaml --trainer.devices=1 \
  --trainer.strategy.init_args.activation_checkpointing=true \
  --model.init_args.lora="{r: 8, alpha: 16}" --trainer.logger.init_args.name=fsdp_lora_ckpt
$MLO fit "${COMMON[@]}" --config configs/trainer/ddp.yaml --trainer.devices=1 \
  --trainer.logger.init_args.name=ddp_bf16
for run in fsdp_bf16 fsdp_lora_ckpt ddp_bf16; do
  python - "$run" <<'PY'
import json, sys, glob
path = sorted(glob.glob(f"runs/gpu_smoke/{sys.argv[1]}/version_*/metrics.json"))[-1]
m = json.load(open(path))["metrics"]
print(f"{sys.argv[1]:16s} val/ppl={m['val/ppl']:.2f} train/loss={m['train/loss']:.3f}")
assert m["val/ppl"] < 4096, "perplexity did not drop below the uniform baseline"
PY
done
echo "GPU smoke passed"
