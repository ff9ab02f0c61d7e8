#!/usr/bin/env bash
# Everything a GPU loan is for, in ONE command (a loan is 15 minutes of device time, machine start
# included; one command may run 10 minutes):
#
#   bash .device/on-gpu.sh bash scripts/gpu-session.sh          (timeout_s 590)
#
# carried as for gpu-check.sh, tsx included:
#   .device dist native/build/Release native/build/test_cuda_ops node_modules/tsx node_modules/esbuild node_modules/@esbuild
#
#   1. in the background, on the CPU: the 2B-shaped proxy for the floors (generate and pack,
#      scripts/gpu-floors.sh with FLOORS_PREPARE_ONLY=1);
#   2. scripts/gpu-check.sh: correctness of every CUDA kernel, the CUDA model and trainer, then the
#      kernel benchmarks, with its caps cut to leave FLOORS_SECONDS for step 3;
#   3. scripts/gpu-floors.sh: the issue's floors at full shape (whole-model forward and energy,
#      training step and peak memory), in the time left;
# then both short tables. SESSION_SECONDS (default 570) is the whole command's budget. Logs go to
# $OUT/check and $OUT/floors. Exit status: non-zero when a step failed or was skipped for time.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$PWD/gpu-session-out}"
mkdir -p "$OUT/check" "$OUT/floors"
export GPU_DEADLINE=$(( $(date +%s) + ${SESSION_SECONDS:-570} ))
started=$(date +%s)

echo "== Session: deadline in ${SESSION_SECONDS:-570} s; proxy preparation in the background"
OUT="$OUT/floors" FLOORS_PREPARE_ONLY=1 FLOORS_WORKERS="${FLOORS_WORKERS:-8}" bash "$here/gpu-floors.sh" > "$OUT/floors/prepare.log" 2>&1 &
prep=$!

OUT="$OUT/check" GPU_RESERVE="${FLOORS_SECONDS:-200}" bash "$here/gpu-check.sh" 2>&1 | tee "$OUT/check.log"
check=${PIPESTATUS[0]}
echo "== gpu-check.sh exit $check after $(( $(date +%s) - started )) s"

wait "$prep"
prep_rc=$?
tail -3 "$OUT/floors/prepare.log"
echo "== proxy preparation exit $prep_rc after $(( $(date +%s) - started )) s"

floors=1
if (( prep_rc == 0 )); then
  OUT="$OUT/floors" GPU_RESERVE=5 bash "$here/gpu-floors.sh" 2>&1 | tee "$OUT/floors.log"
  floors=${PIPESTATUS[0]}
fi

echo
echo "== Session summary ($(( $(date +%s) - started )) s; gpu-check exit $check, gpu-floors exit $floors)"
grep -E "all checks passed|check\(s\) failed|skipped" "$OUT/check/test_cuda_ops.log" 2>/dev/null | tail -1
grep -h "SKIPPED for time" "$OUT/check.log" "$OUT/floors.log" 2>/dev/null
cat "$OUT/check/gpu-bench-table.md" 2>/dev/null
sed -n '/^== Floors/,$p' "$OUT/floors.log" 2>/dev/null
(( check == 0 && floors == 0 ))
