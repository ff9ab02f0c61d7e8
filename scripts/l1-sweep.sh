#!/bin/bash
# The L1 sweep of docs/results.md: one `sparsellm train` run per λ on fixtures/text/moby-dick.txt,
# each writing a checkpoint, a JSON log (one object per step, then a summary) and a plot.
#   scripts/l1-sweep.sh OUTDIR λ...      e.g. scripts/l1-sweep.sh /tmp/sweep 0 3e-4 1e-3 3e-3 1e-2
# Then: node --import tsx scripts/sweep-table.ts OUTDIR λ...   (the Markdown table)
set -euo pipefail
out=$1; shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
for L in "$@"; do
  node bin/sparsellm.js train fixtures/text/moby-dick.txt -o "$out/l$L" \
    --d-model 128 --layers 4 --heads 4 --d-ff 512 --context 256 --steps 300 --batch-tokens 2048 \
    --micro-batch-tokens 2048 --lr 2e-3 --l1 "$L" --seed 1 --eval-interval 50 --save-interval 100 \
    --threads 1 --json --plot "$out/l$L.svg" > "$out/l$L.jsonl" 2> "$out/l$L.err"
done
