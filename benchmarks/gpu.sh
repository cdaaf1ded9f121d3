#!/usr/bin/env bash
# One prepared run for a GPU machine, under 8 minutes, nothing from the network. First, here (with the
# package index): `bash benchmarks/gpu_wheels.sh` (wheels the GPU image lacks -> .whl/, FSDD -> .fsdd/).
# Then on the device, from the repository root, carrying .whl and .fsdd:  bash benchmarks/gpu.sh
# It writes gpu-log.txt and gpu-results.tgz (every benchmark's JSON and markdown) into $OUT:
#   1. VGG16 forward at 224, bfloat16 and float32, batch 32/128/256, against the dense peak; torchvision beside it
#   2. train steps at 224 (frozen on cached features, fine-tune on cached block-4 outputs), bf16, batch 32/128/256
#   3. the frozen job end to end on the FSDD clips (decode + features on the host's cores, the prefix pass on
#      the device, head epochs, test), at 224 in bf16 and at the default size, each stage's clips/s
#   4. the host's feed rate per core (cached features -> images -> device) against the device's rate
#   5. every backbone family's forward (the frozen pass) at 224, bfloat16 and float32, at step 1's largest batch
# GPU_SH_SMALL=1 makes every part tiny, to check the script on a CPU (it measures nothing then).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
RES="$(mktemp -d)"
mkdir -p "$OUT"
LOG="$OUT/gpu-log.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
DATA=.fsdd; [ -d "$DATA" ] || DATA=jaxtl/demo/fsdd
if [ "${GPU_SH_SMALL:-0}" = 1 ]; then
  S=64; B=4,8; N=2; STEPS=2; CLIPS=100; SIZES=32; DT=float32  # XLA:CPU bf16 VGG16 is non-finite in jax 0.11
else
  S=224; B=32,128,256; N=10; STEPS=20; CLIPS=0; SIZES=224,64; DT=bfloat16
fi
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; nproc
  python3 -c "import jax, flax, librosa; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, \
'librosa', librosa.__version__)"; } 2>&1 | tee "$LOG"
step() { echo "== $1" | tee -a "$LOG"; shift; timeout "$@" 2>&1 | tail -n 30 | tee -a "$LOG"; }
step "1. VGG16 forward" 130 python3 benchmarks/forward.py --batch "$B" --dtype bfloat16,float32 --size "$S" \
  --iters "$N" --out "$RES"
step "2. train steps" 100 python3 benchmarks/step_time.py --batch "$B" --dtype bfloat16 --size "$S" \
  --steps "$STEPS" --modes frozen-cached,finetune-cached --peers torch --out "$RES"
step "3. the frozen job end to end ($DATA)" 120 python3 benchmarks/stages.py --data "$DATA" --clips "$CLIPS" \
  --size "$SIZES" --runs 1 --extra "--dtype $DT --batch-size 256" --name stages-gpu --out "$RES"
step "4. host feed rate" 50 python3 benchmarks/input_pipeline.py --batch 256 --size "$S" --out "$RES"
step "5. backbone forwards" 60 python3 benchmarks/backbones.py speed --sizes "$S" --dtypes bfloat16,float32 \
  --batch "${B##*,}" --iters "$N" --forward-only --name backbones-forward-gpu --out "$RES"
tar czf "$OUT/gpu-results.tgz" -C "$RES" . && ls -la "$RES" | tee -a "$LOG"
