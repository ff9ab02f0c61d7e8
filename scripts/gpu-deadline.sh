# Sourced by the GPU scripts: time caps under one session deadline, so that gpu-session.sh can run
# the check and the floors inside one 10-minute command of a 15-minute GPU loan.
#   GPU_DEADLINE   epoch second by which the whole command must be done (unset: caps apply as is)
#   GPU_RESERVE    seconds this script leaves for what runs after it (default 0)

# fd 3: the script's own stderr, for notices that must not vanish into a step's redirected log.
exec 3>&2

# cap SECONDS: prints the step's time limit, min(SECONDS, what the deadline leaves); 0 = no time.
cap() {
  local want=$1
  if [[ -z "${GPU_DEADLINE:-}" ]]; then echo "$want"; return; fi
  local left=$(( GPU_DEADLINE - $(date +%s) - ${GPU_RESERVE:-0} ))
  (( left < want )) && want=$left
  (( want < 5 )) && want=0
  echo "$want"
}

# run_capped SECONDS NAME CMD...: runs CMD under `timeout` with the capped limit, or reports NAME
# skipped for lack of time (exit 124, like a timeout: a skipped check is not a pass).
run_capped() {
  local t; t=$(cap "$1"); local name=$2; shift 2
  if (( t == 0 )); then echo "SKIPPED for time: $name (deadline)" | tee /dev/fd/3; return 124; fi
  timeout "$t" "$@"
}
