#!/usr/bin/env bash
# GPU readiness smoke test: a short bf16 + torch.compile training of each stage, with DDP and with
# DeepSpeed ZeRO-2, on all visible GPUs; prints throughput and MFU from the telemetry callback.
#
#   bash scripts/gpu_smoke.sh                 # all stages × {ddp, zero2}
#   STEPS=100 STAGES="autoencoder" bash scripts/gpu_smoke.sh
#   FSDP2=0 bash scripts/gpu_smoke.sh         # without the FSDP2 fit -> resume -> export -> sample check
#
# Needs: CUDA GPUs, the project venv (.venv or $VENV), MNIST shards (packed here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
STEPS="${STEPS:-60}"
STAGES="${STAGES:-autoencoder diffusion}"
OUT="${OUT:-runs/gpu-smoke}"
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$NGPU" -lt 1 ]; then echo "gpu_smoke: no CUDA GPU visible" >&2; exit 2; fi
echo "gpu_smoke: $NGPU GPU(s): $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"

for split in train test; do
  [ -f "data/mnist/$split/manifest.json" ] || "$PY" -m ldm_lightning data pack --source mnist --split "$split" --out "data/mnist/$split"
done

declare -A STAGE_CFG=([autoencoder]=configs/autoencoder/tiny-mnist.yaml [diffusion]=configs/diffusion/mnist-unet-class.yaml)
declare -A STAGE_CLS=([autoencoder]=ldm_lightning.autoencoder.AutoencoderModule [diffusion]=ldm_lightning.diffusion.DiffusionModule)
mkdir -p "$OUT"
export WANDB_MODE="${WANDB_MODE:-offline}"

status=0
for stage in $STAGES; do
  cfg="${STAGE_CFG[$stage]}"
  if [ ! -f "$cfg" ]; then echo "gpu_smoke: $cfg missing, skipping $stage"; continue; fi
  for strat in ddp-8gpu deepspeed-zero2; do
    dir="$OUT/$stage-$strat"
    rm -rf "$dir"
    echo "=== $stage / $strat / bf16-mixed + compile / $NGPU GPU(s) / $STEPS steps ==="
    # compile flag: the stage module's `compile` argument (training/speed.compile_network), if it has one
    compile=()
    if "$PY" -c "import importlib, inspect, sys; m, c = sys.argv[1].rsplit('.', 1); \
sys.exit(0 if 'compile' in inspect.signature(getattr(importlib.import_module(m), c).__init__).parameters else 1)" \
        "${STAGE_CLS[$stage]}"; then compile=(--model.init_args.compile true); else echo "  (no compile flag on ${STAGE_CLS[$stage]})"; fi
    stage_args=()
    if [ "$stage" = diffusion ]; then
      # the frozen autoencoder: this smoke run's own autoencoder checkpoint, else a random tiny one
      ae="$(find "$OUT" -path "*autoencoder-*" -name last.ckpt 2>/dev/null | head -1)"
      if [ -z "$ae" ]; then
        ae="$OUT/random-tiny-ae"
        "$PY" -c "import sys, torch; from ldm_lightning.autoencoder import Autoencoder, get_preset; \
from ldm_lightning.autoencoder.export import export_autoencoder; torch.manual_seed(0); \
export_autoencoder(Autoencoder(get_preset('tiny-mnist')), sys.argv[1])" "$ae"
      fi
      stage_args=(--model.init_args.autoencoder "$ae" --model.init_args.val_num 0)
    fi
    set +e
    "$PY" -m ldm_lightning fit -c "$cfg" -c "configs/trainer/$strat.yaml" "${stage_args[@]}" \
        --trainer.devices "$NGPU" --trainer.max_steps "$STEPS" --trainer.log_every_n_steps 20 \
        --trainer.limit_val_batches 0 --trainer.default_root_dir "$dir" --trainer.enable_progress_bar false \
        "${compile[@]}" > "$dir.log" 2>&1
    rc=$?
    set -e
    grep -E "MFU unavailable|Error" "$dir.log" | tail -5 || true
    if [ "$rc" -ne 0 ]; then echo "gpu_smoke: $stage/$strat FAILED rc=$rc (log: $dir.log)"; tail -20 "$dir.log"; status=1; continue; fi
    # the last telemetry row logged to the offline W&B run
    "$PY" - "$dir" <<'PYEOF'
import sys
sys.path.insert(0, "tests")
from wandb_reader import find_runs, read_run
run = read_run(find_runs(sys.argv[1])[-1])
row = next(r for r in reversed(run.history) if "perf/images_per_sec" in r)
print(f"  images/s {row['perf/images_per_sec']:.1f}  step {row['perf/step_time_s']*1e3:.1f} ms  "
      f"stall {row['perf/loader_stall_frac']:.1%}  peak mem {row['perf/peak_mem_gb']:.2f} GB  "
      f"TFLOP/s/GPU {row.get('perf/tflops_per_device', float('nan')):.2f}  MFU {row.get('perf/mfu', float('nan')):.2%}")
PYEOF
  done
done

# FSDP2 on CUDA (what CPU CI cannot run: the bf16 MixedPrecisionPolicy, NCCL): the JiT DiT on pixels, a DCP
# checkpoint, a resume from it, then export (gathers the shards) and sample from the export.
if [ "${FSDP2:-1}" = 1 ] && [[ " $STAGES " == *" diffusion "* ]]; then
  dir="$OUT/diffusion-fsdp2"
  rm -rf "$dir" "$dir-export" "$dir-samples"
  echo "=== diffusion / fsdp2 (bf16 params, fp32 reduce) / $NGPU GPU(s) / $STEPS steps + resume + export ==="
  fsdp=(-c configs/diffusion/mnist-jit-pixels.yaml -c configs/trainer/fsdp2.yaml --model.init_args.val_num 0
        --trainer.devices "$NGPU" --trainer.log_every_n_steps 20 --trainer.limit_val_batches 0
        --trainer.default_root_dir "$dir" --trainer.enable_progress_bar false)
  set +e
  "$PY" -m ldm_lightning fit "${fsdp[@]}" --trainer.max_steps "$STEPS" > "$dir.log" 2>&1 \
    && "$PY" -m ldm_lightning fit "${fsdp[@]}" --trainer.max_steps "$((STEPS + 10))" --ckpt_path last >> "$dir.log" 2>&1 \
    && "$PY" -m ldm_lightning export --checkpoint "$dir/checkpoints/last.ckpt" --out "$dir-export" >> "$dir.log" 2>&1 \
    && "$PY" -m ldm_lightning sample --checkpoint "$dir-export" --classes 0-9 --num 1 --sampler flow_euler --steps 10 \
         --out "$dir-samples" >> "$dir.log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then echo "gpu_smoke: diffusion/fsdp2 FAILED rc=$rc (log: $dir.log)"; tail -20 "$dir.log"; status=1
  else grep -E "resuming from|\[progress\].*100.0%|wrote" "$dir.log" | tail -3; fi
fi
# The autoencoder stage under FSDP2 on CUDA, the GAN on from the middle of the run (bf16 gathered weights through
# the adaptive GAN weight's autograd.grad), a resume, then export and load_autoencoder of the export.
if [ "${FSDP2:-1}" = 1 ] && [[ " $STAGES " == *" autoencoder "* ]]; then
  dir="$OUT/autoencoder-fsdp2"
  rm -rf "$dir" "$dir-export"
  echo "=== autoencoder / fsdp2 (bf16 params, fp32 reduce, GAN on) / $NGPU GPU(s) / $STEPS steps + resume + export ==="
  fsdp=(-c configs/autoencoder/tiny-mnist.yaml -c configs/trainer/fsdp2.yaml --trainer.devices "$NGPU"
        --trainer.log_every_n_steps 20 --trainer.limit_val_batches 2 --trainer.default_root_dir "$dir"
        --trainer.enable_progress_bar false --model.init_args.loss.disc_start "$((STEPS / 2))"
        --model.init_args.loss.disc_warmup_train 5 --model.init_args.optim.warmup_steps 0)
  set +e
  "$PY" -m ldm_lightning fit "${fsdp[@]}" --trainer.max_steps "$STEPS" > "$dir.log" 2>&1 \
    && "$PY" -m ldm_lightning fit "${fsdp[@]}" --trainer.max_steps "$((STEPS + 10))" --ckpt_path last >> "$dir.log" 2>&1 \
    && "$PY" -m ldm_lightning export --checkpoint "$dir/checkpoints/last.ckpt" --out "$dir-export" >> "$dir.log" 2>&1 \
    && "$PY" -c "import sys; from ldm_lightning.autoencoder.load import load_autoencoder as l; \
print('export loads, scale_factor', float(l(sys.argv[1]).scale_factor))" "$dir-export" >> "$dir.log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then echo "gpu_smoke: autoencoder/fsdp2 FAILED rc=$rc (log: $dir.log)"; tail -20 "$dir.log"; status=1
  else grep -E "resuming from|\[progress\].*100.0%|export loads" "$dir.log" | tail -3; fi
fi
exit $status
