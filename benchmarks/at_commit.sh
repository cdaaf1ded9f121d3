#!/usr/bin/env bash
# A previous commit's default job on the same 100 clips as benchmarks/stages.py, whole-process wall time, twice
# (an empty XLA cache, then a rerun): the "before" of a before/after. Flags are that commit's own.
#   bash benchmarks/at_commit.sh 16cc482 [--no-progress]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
commit=$1; shift
tmp=$(mktemp -d)
git worktree add -q "$tmp/code" "$commit"
.venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); from stages import clips_manifest; \
from common import FSDD; from pathlib import Path; clips_manifest(FSDD, 100, Path('$tmp'))"
out="$root/benchmarks/results/at_commit-$commit-100clips-cpu$(nproc).txt"
echo "commit $commit, 100 clips, $(lscpu | grep 'Model name' | sed 's/ \+/ /g'), $(nproc) cores" > "$out"
for i in 1 2; do
  s=$(date +%s.%N)
  (cd "$tmp" && PYTHONPATH="$tmp/code" JAX_COMPILATION_CACHE_DIR="$tmp/xla" "$root/.venv/bin/python" -m jaxtl.train \
    --data "$tmp/clips.csv" --weights random --out "$tmp/run-$i" --cache-dir "$tmp/cache-$i" "$@" > "$tmp/log-$i" 2>&1)
  e=$(date +%s.%N)
  echo "run $i: $(echo "$e - $s" | bc) s whole process" >> "$out"
  grep -E "frozen prefix|test accuracy" "$tmp/log-$i" >> "$out"
done
git worktree remove --force "$tmp/code"
cat "$out"
