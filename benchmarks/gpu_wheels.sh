#!/usr/bin/env bash
# Run HERE (a machine with the package index), once, before `benchmarks/gpu.sh` runs on a GPU machine that
# has no internet: downloads the wheels its image lacks (librosa, soundfile, soxr and what they need beyond
# the image's packages; Python 3.12, manylinux x86-64) into .whl/, and copies the FSDD recordings into
# .fsdd/ (both ignored by git; the device tool's `carry` takes them along: carry [".whl", ".fsdd"]).
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
mkdir -p .whl
# librosa's and soundfile's needs that the GPU image (device KINDS.md) does not hold; numba, llvmlite,
# scipy, scikit-learn, joblib, msgpack, lazy-loader and typing-extensions are there already.
PKGS="librosa==0.11.0 soundfile==0.13.1 soxr==1.0.0 audioread==3.0.1 pooch==1.8.2 decorator==5.2.1
      platformdirs==4.3.8 cffi==2.0.0 pycparser==2.23"
for pkg in $PKGS; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg"
done
if [ -d ../shared/data/fsdd/recordings ]; then
  mkdir -p .fsdd && cp -u ../shared/data/fsdd/recordings/*.wav .fsdd/
fi
du -sh .whl .fsdd 2>/dev/null
ls .whl
