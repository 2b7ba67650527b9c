#!/usr/bin/env bash
# Runs one training job as NPROC processes on this machine, each with DEVICES_PER_PROC simulated
# CPU devices, joined by jax.distributed on localhost (gloo collectives between processes): the
# multi-host code path (each process loads only its rows of the global batch, process 0 writes
# metrics and logs) without a pod.
#
#   launch/local.sh -n NPROC -d DEVICES_PER_PROC [--logdir DIR] [--port PORT] [--dry-run] \
#       -- <train args>
#   launch/local.sh -n 2 -d 2 -- --config=configs/demo.py --workdir=/tmp/demo2x2
#
# Each process runs `$PYTHON -m siglip_jax.train <train args>` in the current directory, with
#   SIGLIP_JAX_COORDINATOR=127.0.0.1:PORT  SIGLIP_JAX_NUM_PROCESSES=NPROC  SIGLIP_JAX_PROCESS_ID=i
#   JAX_PLATFORMS=cpu  XLA_FLAGS=... --xla_force_host_platform_device_count=DEVICES_PER_PROC
#   PYTHONUNBUFFERED=1
# and writes its output to LOGDIR/process_<i>.log (appended; LOGDIR defaults to WORKDIR/logs,
# WORKDIR being the --workdir of the train args). Process 0's log is also echoed to stdout.
# SIGTERM and SIGINT are forwarded to every process (SIGTERM: each saves a checkpoint at the same
# step and stops; rerun the same command to resume), SIGHUP is passed on as SIGTERM; a second
# signal stops them (SIGTERM, then SIGKILL). If a process
# fails, the others are stopped (SIGTERM, then SIGKILL after a few seconds), the failing
# process's log tail goes to stderr and the script exits with its status. --dry-run prints the
# commands, one line per process, and runs nothing.
#
# Environment variables read:
#   PYTHON                   the interpreter (default: $VIRTUAL_ENV/bin/python, else the repo's
#                            .venv/bin/python, else python3)
#   XLA_FLAGS                passed on, minus any --xla_force_host_platform_device_count
#   SIGLIP_JAX_INIT_TIMEOUT  passed on: seconds a process waits to join the job (default 300)
#   SIGLIP_JAX_KILL_GRACE    seconds between SIGTERM and SIGKILL when stopping processes
#                            after a failure or a second signal (default 5)
# Any other variable of the caller's environment is passed on unchanged, except
# SIGLIP_JAX_LOCAL_DEVICES and SIGLIP_JAX_CLUSTER, which are removed.
set -euo pipefail
((BASH_VERSINFO[0] >= 4)) || { echo "local.sh: error: needs bash >= 4" >&2; exit 2; }

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
  echo "local.sh: error: $*" >&2
  exit 2
}
q() { printf '%q' "$1"; }  # a value inside a message, on one line

nproc=""
ndev=""
logdir=""
port=""
dry_run=0
while (($#)); do
  case "$1" in
    -n) (($# >= 2)) || die "-n needs a value"; nproc="$2"; shift 2 ;;
    -n*) nproc="${1#-n}"; shift ;;
    -d) (($# >= 2)) || die "-d needs a value"; ndev="$2"; shift 2 ;;
    -d*) ndev="${1#-d}"; shift ;;
    --logdir) (($# >= 2)) || die "--logdir needs a value"; logdir="$2"; shift 2 ;;
    --logdir=*) logdir="${1#--logdir=}"; shift ;;
    --port) (($# >= 2)) || die "--port needs a value"; port="$2"; shift 2 ;;
    --port=*) port="${1#--port=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $(q "$1") (train arguments go after --; see --help)" ;;
  esac
done

[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "-n NPROC must be a positive integer (got $(q "$nproc"))"
[[ "$ndev" =~ ^[1-9][0-9]*$ ]] ||
  die "-d DEVICES_PER_PROC must be a positive integer (got $(q "$ndev"))"
[[ -z "$port" || "$port" =~ ^[1-9][0-9]*$ ]] ||
  die "--port must be a port number (got $(q "$port"))"
(($#)) || die "no train arguments after -- (e.g. -- --config=configs/demo.py --workdir=DIR)"
train_args=("$@")

# The workdir, for the default log folder.
workdir=""
prev=""
for arg in "${train_args[@]}"; do
  case "$arg" in
    --workdir=* | -workdir=*) workdir="${arg#*=}" ;;
    *) if [[ "$prev" == "--workdir" || "$prev" == "-workdir" ]]; then workdir="$arg"; fi ;;
  esac
  prev="$arg"
done
if [[ -z "$logdir" ]]; then
  [[ -n "$workdir" ]] || die "no --workdir in the train arguments: give --logdir DIR"
  logdir="$workdir/logs"
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
  python="$VIRTUAL_ENV/bin/python"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  python="$repo/.venv/bin/python"
else
  python="python3"
fi
# `env` runs it: a leading '-' would be read as an option and a NAME=value word as a setting.
[[ "$python" != -* && "$python" != *=* ]] ||
  die "PYTHON must be an interpreter path without '=' or a leading '-' (got $(q "$python"))"

if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')" || die "could not pick a free port with $python (give --port)"
fi

# XLA_FLAGS's words, split at blanks only: a glob in a flag is not matched against file names.
read -r -d '' -a flags <<<"${XLA_FLAGS:-}" || true
xla_flags=""
for flag in ${flags[@]+"${flags[@]}"}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] && continue
  xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$ndev"

grace="${SIGLIP_JAX_KILL_GRACE:-5}"
[[ "$grace" =~ ^[0-9]+$ ]] || die "SIGLIP_JAX_KILL_GRACE must be a whole number of seconds"

# The processes run in their own sessions (setsid), so a Ctrl-C on the terminal reaches this
# script only, which passes it on once.
setsid=()
if command -v setsid >/dev/null 2>&1; then setsid=(setsid); fi

# The environment and command of process $1, as words.
process_command() {
  cmd=("${setsid[@]}" env -u SIGLIP_JAX_LOCAL_DEVICES -u SIGLIP_JAX_CLUSTER
       "SIGLIP_JAX_COORDINATOR=127.0.0.1:$port" "SIGLIP_JAX_NUM_PROCESSES=$nproc"
       "SIGLIP_JAX_PROCESS_ID=$1" "JAX_PLATFORMS=cpu" "XLA_FLAGS=$xla_flags"
       "PYTHONUNBUFFERED=1" "$python" -m siglip_jax.train "${train_args[@]}")
}

if ((dry_run)); then
  for ((i = 0; i < nproc; i++)); do
    process_command "$i"
    printf '%q ' "${cmd[@]}"
    printf '>>%q 2>&1 &\n' "$logdir/process_$i.log"
  done
  exit 0
fi

mkdir -p "$logdir"

pids=()
tail_pid=""
signals=0

stop_all() {  # $1: first signal to send; then SIGKILL after the grace period
  local pid sig="$1" waited=0
  for pid in "${pids[@]}"; do kill "-$sig" "$pid" 2>/dev/null || true; done
  while ((waited < grace * 10)); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

# shellcheck disable=SC2317  # called from the traps below
on_signal() {  # $1: the signal received, $2: the signal to pass on
  signals=$((signals + 1))
  if ((signals == 1)); then
    echo "local.sh: got SIG$1: sending SIG$2 to the $nproc processes" >&2 || true
    for pid in "${pids[@]}"; do kill "-$2" "$pid" 2>/dev/null || true; done
  else
    echo "local.sh: got SIG$1 again: stopping the processes" >&2 || true
    stop_all TERM
  fi
}
# While the processes are being started a signal is only noted: handled at once, it would reach
# the processes started so far and miss the rest (which then run on alone).
pending=()
trap 'pending=(TERM TERM)' TERM
trap 'pending=(INT INT)' INT
trap 'pending=(HUP TERM)' HUP

echo "local.sh: $nproc processes x $ndev CPU devices, coordinator 127.0.0.1:$port," \
  "logs in $logdir/process_<i>.log" >&2
for ((i = 0; i < nproc; i++)); do
  log="$logdir/process_$i.log"
  echo "=== local.sh: process $i of $nproc, $ndev devices, coordinator 127.0.0.1:$port," \
    "$(date '+%Y-%m-%d %H:%M:%S')" >>"$log"
  process_command "$i"
  # Process 0's output is echoed from here on (measured before it starts: it may write at once).
  size=$(stat -c %s "$log" 2>/dev/null || echo 0)
  # `trap - INT`: a background job of a script would otherwise start with SIGINT ignored.
  (trap - INT TERM; exec "${cmd[@]}" >>"$log" 2>&1 </dev/null) &
  pids+=("$!")
  if ((i == 0)); then
    tail -c "+$((size + 1))" -F --pid="$!" "$log" 2>/dev/null &
    tail_pid=$!
  fi
done

trap 'on_signal TERM TERM' TERM
trap 'on_signal INT INT' INT
# The processes have their own sessions, so a closed terminal reaches only this script: treat
# it as a preemption (save and stop) rather than leave them running unattended.
trap 'on_signal HUP TERM' HUP
if ((${#pending[@]})); then on_signal "${pending[@]}"; fi

# Wait for every process; the first failure stops the others.
status=0
failed=""
declare -A done_rc=()
while ((${#done_rc[@]} < nproc)); do
  for ((i = 0; i < nproc; i++)); do
    [[ -n "${done_rc[$i]:-}" ]] && continue
    pid="${pids[$i]}"
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    done_rc[$i]=$rc
    if ((rc != 0 && status == 0)); then
      status=$rc
      failed=$i
      if ((signals == 0)); then
        echo "local.sh: process $i exited with status $rc; stopping the others" >&2
        stop_all TERM
      fi
    fi
  done
  ((${#done_rc[@]} < nproc)) && sleep 0.2
done

if [[ -n "$tail_pid" ]]; then
  wait "$tail_pid" 2>/dev/null || true
fi
if [[ -n "$failed" ]]; then
  log="$logdir/process_$failed.log"
  echo "local.sh: process $failed failed (status $status); the end of $log:" >&2
  tail -n 20 "$log" >&2 || true
fi
exit "$status"
