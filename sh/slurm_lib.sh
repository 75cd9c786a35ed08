# Sourced by sh/slurm_train.sh and by the job arrays `python -m at.sweep SPEC --slurm` writes:
# what a Slurm batch job does around training so that no signal loses a run
# (docs/scale.md#preemption-and-slurm).
#
#   slurm_setup REPO        cd to REPO, activate the venv, trap SIGTERM/SIGUSR1, relay step signals
#   slurm_train CONFIG [dotted.key=value ...]
#                           train (resuming what the run directory holds), then succeed, requeue
#                           this job (or array task) or fail
#   slurm_supervise CMD...  run CMD with signals passed on; requeue if a signal stopped it
#
# Signals. The batch shell traps SIGTERM and SIGUSR1 (`--signal=B:TERM@…`, `scancel --full`,
# a preemption without grace time) and passes SIGTERM on to the training processes, again every
# 3 s while they run (a process still starting ignores it until at.train installs its handlers).
# On one node the training runs in the batch step itself, without srun: srun answers its own
# SIGTERM by killing its tasks. Signals Slurm sends to job steps only (`scancel --signal=TERM`,
# `--signal=TERM@…`, a preemption with grace time) reach a one-task relay step, which hands them
# to the batch shell. On several nodes srun starts one torchrun per node and the shell passes the
# signal on to that step with scancel; a whole-job SIGTERM still reaches srun there, which kills
# the training at once.

_slurm_signal=""   # the signal this start received (TERM or USR1)
_slurm_sent=0      # when it was last passed on ($SECONDS)
_slurm_child=""    # the supervised process
_slurm_mode=""     # how to reach the training: self | children | steps
_slurm_relay=""    # pid of the relay step's srun

slurm_fail() {
  echo "slurm: error: $*" >&2
  exit 1
}

slurm_setup() {
  cd "$1" || slurm_fail "cannot enter the repository at $1 on node $(hostname)"
  # shellcheck source=sh/venv.sh
  source sh/venv.sh
  trap '_slurm_on_signal TERM' TERM
  trap '_slurm_on_signal USR1' USR1
  trap '_slurm_stop_relay' EXIT
  if [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_JOB_NUM_NODES:-1}" = 1 ] && command -v srun >/dev/null
  then
    # $0 in the relay is this shell's pid; it ends when this shell does.
    srun --overlap --nodes=1 --ntasks=1 --cpus-per-task=1 --kill-on-bad-exit=0 --quiet \
      --job-name=signal-relay bash -c 'trap "kill -s TERM $0" TERM USR1
        while kill -0 "$0" 2>/dev/null; do sleep 5 & wait $!; done' "$$" >/dev/null 2>&1 &
    _slurm_relay=$!
  fi
}

_slurm_stop_relay() {
  if [ -n "$_slurm_relay" ]; then kill "$_slurm_relay" 2>/dev/null; fi
}

# This job as scontrol names it: an array task is ARRAYID_TASKID (its own SLURM_JOB_ID may equal
# the array's id, which names every task).
slurm_job_ref() {
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "${SLURM_JOB_ID:?not inside a Slurm job}"
  fi
}

_slurm_on_signal() {
  local first="$_slurm_signal"
  _slurm_signal="$1"
  if [ -z "$first" ]; then
    echo "slurm: SIG$1 at $(date +%H:%M:%S); passing SIGTERM on to the training" >&2
  fi
  _slurm_pass_on
}

_slurm_pass_on() {
  [ -n "$_slurm_child" ] || return 0
  _slurm_sent=$SECONDS
  case "$_slurm_mode" in
    self) kill -s TERM "$_slurm_child" 2>/dev/null ;;
    children) pkill -TERM -P "$_slurm_child" 2>/dev/null ;;  # torchrun's workers
    steps) scancel --signal=TERM "$(slurm_job_ref)" 2>/dev/null ;;
  esac
  return 0
}

# _slurm_start MODE CMD...: CMD in the background, SIGTERM and SIGUSR1 ignored until it installs
# its own handlers (at.train does on its first line).
_slurm_start() {
  _slurm_mode="$1"
  shift
  (trap '' TERM USR1; exec "$@") &
  _slurm_child=$!
  # A signal that came earlier is passed on by _slurm_wait, once CMD had time to start (a
  # signal right after the fork would reach the subshell before it ignores it).
  _slurm_sent=$SECONDS
}

# Wait for the supervised process, passing a received signal on every 3 s; its exit status.
_slurm_wait() {
  while kill -0 "$_slurm_child" 2>/dev/null; do
    if [ -n "$_slurm_signal" ] && [ $((SECONDS - _slurm_sent)) -ge 3 ]; then _slurm_pass_on; fi
    sleep 1 &
    wait $! 2>/dev/null
  done
  wait "$_slurm_child"
  local status=$?
  _slurm_child=""
  return "$status"
}

# Requeue this job (or array task) and end this start: Slurm starts it again after its requeue
# delay, and the run continues from its run directory.
slurm_requeue() {
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm: $1; not a Slurm job: run the same command again to continue" >&2
    exit 75
  fi
  local ref
  ref="$(slurm_job_ref)"
  # A cancel (scancel without --signal) sends SIGTERM too, and so does the time limit itself:
  # the job is no longer RUNNING then, and whoever cancelled it wants it gone.
  if [ -z "$(squeue -h -j "$ref" -t RUNNING -o %i 2>/dev/null)" ]; then
    echo "slurm: $1; the job is ending (cancelled, or at its time limit), so it is not" \
         "requeued: submit the same command again to continue the run" >&2
    exit 75
  fi
  echo "slurm: $1; requeueing job $ref" >&2
  if scontrol requeue "$ref"; then exit 0; fi
  echo "slurm: error: scontrol requeue $ref failed; submit the same command again to" \
       "continue" >&2
  exit 75
}

# A signal this start received stopped CMD: at.train's and at.sweep's 75, or killed by it.
_slurm_stopped_by_signal() {
  [ -n "$_slurm_signal" ] && case "$1" in 75|143|138) true ;; *) false ;; esac
}

slurm_supervise() {
  _slurm_start self "$@"
  _slurm_wait
  local status=$?
  if _slurm_stopped_by_signal "$status"; then slurm_requeue "stopped by SIG$_slurm_signal"; fi
  return "$status"
}

# Processes per node: one per GPU Slurm gave this job, else per visible GPU (CUDA_VISIBLE_DEVICES,
# else nvidia-smi); one on a node without GPUs.
_slurm_procs_per_node() {
  local n="${SLURM_GPUS_ON_NODE:-}"
  if [ -z "$n" ] && [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    n="$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)"
  elif [ -z "$n" ] && command -v nvidia-smi >/dev/null; then
    n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
  fi
  case "$n" in ''|*[!0-9]*|0) n=1 ;; esac
  echo "$n"
}

slurm_train() {
  local config="${1:?usage: sbatch [options] sh/slurm_train.sh CONFIG [dotted.key=value ...]}"
  local out_dir
  # The run directory, resolved by the project's own loader (a bad config: one line, exit 1);
  # a signal to the whole job meanwhile is kept by this shell, not fatal to the loader.
  out_dir="$(trap '' TERM USR1; python - "$@" <<'EOF'
import sys
from at.config import load_config
from errors import USER_ERRORS, report
try:
    print(load_config(sys.argv[1], sys.argv[2:])["out_dir"])
except USER_ERRORS as err:
    sys.exit(report("slurm_train.sh", err))
EOF
)" || exit 1
  shift
  local resume=()
  if [ -f "$out_dir/config.yaml" ]; then
    resume=(--resume)  # any run directory this run started, checkpoint or not
  elif [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && [ ! -d "$out_dir" ]; then
    # Started before (and made out_dir), yet it is not here: it is on a filesystem this node
    # does not see. Starting over would train the run again and lose the first.
    slurm_fail "out_dir $out_dir does not exist on node $(hostname), though this job started" \
      "before (restart ${SLURM_RESTART_COUNT}): out_dir must be on a filesystem every node sees"
  fi
  mkdir -p "$out_dir" || slurm_fail "cannot create out_dir $out_dir on node $(hostname)"
  # A marker left by an earlier start must not requeue an error of this one.
  rm -f "$out_dir/preempted.json"
  local start procs nodes="${SLURM_JOB_NUM_NODES:-1}"
  start="$(date +%s)"
  procs="$(_slurm_procs_per_node)"
  echo "slurm: job ${SLURM_JOB_ID:+$(slurm_job_ref) }start $((${SLURM_RESTART_COUNT:-0} + 1))" \
       "on $(hostname) at $(date +%H:%M:%S): $nodes node(s) x $procs process(es), out_dir" \
       "$out_dir${resume[*]:+ (resuming)}" >&2
  local train=(-m at.train -c "$config" "$@" "${resume[@]}")
  # torchrun leaves SIGTERM alone (it would stop its workers after 30 s, final test or not).
  local elastic=(env TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT torchrun)
  if [ "$nodes" = 1 ] && [ "$procs" = 1 ]; then
    _slurm_start self python "${train[@]}"
  elif [ "$nodes" = 1 ]; then
    _slurm_start children "${elastic[@]}" --standalone --nproc_per_node="$procs" "${train[@]}"
  else
    # One torchrun per node; the rendezvous port follows the job id, so that two jobs sharing
    # a head node do not meet in one store.
    local head port
    head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    port="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID} % 20000))}"
    _slurm_start steps srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c \
      'trap "" TERM USR1; exec "$@"' bash "${elastic[@]}" --nnodes="$nodes" \
      --nproc_per_node="$procs" --rdzv_id="$(slurm_job_ref)" --rdzv_backend=c10d \
      --rdzv_endpoint="$head:$port" "${train[@]}"
  fi
  _slurm_wait
  local status=$?
  # The run directory says what happened (torchrun exits 1 whatever stopped its workers).
  if [ -f "$out_dir/final.json" ] && [ "$(stat -c %Y "$out_dir/final.json")" -ge "$start" ]; then
    return 0
  fi
  if [ -f "$out_dir/preempted.json" ]; then
    slurm_requeue "preempted ($(cat "$out_dir/preempted.json"))"
  fi
  if _slurm_stopped_by_signal "$status"; then
    slurm_requeue "stopped by SIG$_slurm_signal before the run saved anything"
  fi
  [ "$status" -ne 0 ] || status=1  # exit 0 without final.json: not a finished run
  return "$status"
}
