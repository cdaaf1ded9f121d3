#!/usr/bin/env bash
# One prepared run for a GPU machine: installs nothing from the network, writes results into $OUT
# (default benchmarks/results/): step_time in float32 and bfloat16 at batch 32, 128 and 256 (224x224,
# every mode; peers only where installed), then the input pipeline's feed rate. Six files in all.
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/gpu-log.txt"
timeout 480 python3 benchmarks/step_time.py --batch 32,128,256 --dtype bfloat16,float32 --size 224 --steps 20 \
  --peers keras-jax,torch --out "$OUT" 2>&1 | tail -n 40 | tee -a "$OUT/gpu-log.txt"
timeout 60 python3 benchmarks/input_pipeline.py --batch 256 --size 224 --out "$OUT" 2>&1 | tail -n 8 \
  | tee -a "$OUT/gpu-log.txt"
